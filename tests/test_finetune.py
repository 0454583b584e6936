"""examples/finetune.py: every rank starts from exactly ``ghn.predict``'s weights, launched or not."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"
TINY_RUN = ["resnet18", "--cpu", "--steps", "4", "--batch-size", "16", "--train-images", "128", "--test-per-class", "5"]


def _example():
    spec = importlib.util.spec_from_file_location("finetune_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *args, "--main_process_port", str(_free_port())]


def _run(prefix: list[str], tmp_path: Path) -> tuple[dict, str]:
    report = tmp_path / "report.json"
    env = {**os.environ, "GHN_INIT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(name, None)
    done = subprocess.run([*prefix, str(SCRIPT), *TINY_RUN, "--report", str(report)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(report.read_text()), done.stdout


@pytest.fixture(scope="module")
def predicted_checksum(default_ghn) -> str:
    model = timm.create_model("resnet18", num_classes=10, device="meta")
    return _example().state_checksum(default_ghn.predict(model, (3, 32, 32)))  # the size create_model predicts at


@pytest.mark.data
def test_two_gloo_ranks_start_from_the_predicted_weights(tmp_path, predicted_checksum):
    launch = _launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no")
    result, stdout = _run(launch, tmp_path)
    assert result["num_processes"] == 2
    assert stdout.splitlines()[0] == "2 processes ran", stdout
    assert result["predicted_sha256"] == [predicted_checksum] * 2
    assert result["initial_sha256"] == [predicted_checksum] * 2, "ranks must train from rank 0's weights"
    assert result["steps"] == 4 and 0.0 <= result["accuracy"] <= 1.0 and result["test_images"] == 50


@pytest.mark.data
def test_plain_python_run(tmp_path, predicted_checksum):
    result, stdout = _run([sys.executable], tmp_path)
    assert stdout.splitlines()[0] == "1 process ran", stdout
    assert result["num_processes"] == 1 and result["initial_sha256"] == [predicted_checksum]
    assert result["test_images"] == 50 and len(result["loss_curve"]) == 1


@pytest.mark.data
def test_cpu_launch_that_starts_one_of_two_processes_says_so(tmp_path):
    result, stdout = _run(_launch("--cpu", "--num_processes", "2"), tmp_path)
    assert result["num_processes"] == 1
    assert stdout.splitlines()[0].startswith("1 process ran, but accelerate launch asked for more"), stdout
    assert "--multi_gpu --num_processes N --num_machines 1" in stdout


# Environments the launchers set, recorded from accelerate 1.15 on a CPU machine.
SIMPLE_LAUNCHER_TWO = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
SIMPLE_LAUNCHER_ONE = {"ACCELERATE_USE_CPU": "True"}
TORCHRUN_TWO = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


@pytest.mark.parametrize("ran, env, expected", [
    (1, {}, "1 process ran"),
    (1, SIMPLE_LAUNCHER_ONE, "1 process ran"),
    (2, TORCHRUN_TWO, "2 processes ran"),
    (1, SIMPLE_LAUNCHER_TWO, "1 process ran, but accelerate launch asked for more"),
    (1, TORCHRUN_TWO, "1 process ran, but WORLD_SIZE asked for 2"),
])
def test_process_count_message(ran, env, expected):
    message = _example().process_count_message(ran, env)
    assert message == expected if expected.endswith("ran") else message.startswith(expected), message
