"""benchmarks/finetune.py: job processes end with the benchmark; runs per (architecture, init, seed, budget), smallest
first, kept across files of the old one-budget format, written as they finish; the two inits paired per seed."""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# A stand-in for a benchmark's main process (finetune's job pool, coverage's workers): starts one worker
# that watches it, prints the worker's pid once the watch is running, then dies by SIGKILL, which no
# handler of its own could clean up after.
_PARENT = """
import os, signal, subprocess, sys
job = subprocess.Popen([sys.executable, "-c", '''
import os
from ghn_init.coverage import exit_when_orphaned
parent = os.getppid()
print(os.getpid(), flush=True)
exit_when_orphaned(parent, every_s=0.05)
'''], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
print(job.stdout.readline().strip(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_job_process_exits_when_the_benchmark_is_killed():
    parent = subprocess.run([sys.executable, "-c", _PARENT], capture_output=True, text=True, timeout=120)
    job = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 30
    while _running(job) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(job), f"job process {job} outlived the killed benchmark process"


@pytest.fixture
def finetune(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import finetune

    return finetune


def _run(accuracy: float, train_s: float = 1.0) -> dict:
    return {"accuracy": accuracy, "train_s": train_s, "loss_curve": [2.3], "params_m": 11.18}


def test_paired_difference_and_its_standard_error(finetune):
    three = finetune._paired_difference([0.06, 0.02, 0.01])
    assert three["mean"] == pytest.approx(0.03)
    # deviations 0.03, -0.01, -0.02: variance 0.0014 / 2 = 0.0007, s.e. sqrt(0.0007 / 3)
    assert three["standard_error"] == pytest.approx(0.0152753, rel=1e-5)
    assert three["n"] == 3
    assert finetune._paired_difference([0.05]) == {"mean": 0.05, "standard_error": None, "n": 1}


def test_table_reports_each_budget_paired_per_seed(finetune, monkeypatch):
    accuracy = {("ghn", 0, 200): 0.46, ("ghn", 1, 200): 0.40, ("default", 0, 200): 0.40, ("default", 1, 200): 0.38,
                ("ghn", 0, 1000): 0.50, ("default", 0, 1000): 0.51, ("ghn", 1, 1000): 0.70}
    runs = {("resnet18", init, seed, steps): _run(acc) for (init, seed, steps), acc in accuracy.items()}
    setup = {"recipe": {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "lr": 0.05, "batch_size": 64},
             "split": "balanced", "machine": {"processor": "x86_64", "torch_threads": 1, "torch": "2", "timm": "1"}}
    result = finetune._result(setup, runs, [{"jobs": 5, "workers": 2, "wall_s": 7200.0}])
    cells = result["architectures"]["resnet18"]["steps"]
    assert list(cells) == ["200", "1000"]
    assert cells["200"]["ghn_minus_default"] == pytest.approx({"mean": 0.04, "standard_error": 0.02, "n": 2})
    # seed 1 ran only from the GHN init at 1,000 steps (a stopped run): kept, but outside the means and pairing
    assert cells["1000"]["ghn"]["accuracy"] == pytest.approx(0.50) and set(cells["1000"]["ghn"]["seeds"]) == {"0", "1"}
    assert cells["1000"]["ghn_minus_default"] == pytest.approx({"mean": -0.01, "standard_error": None, "n": 1})
    monkeypatch.setattr(finetune, "describe_ghn", lambda setup: "GHN")
    table = finetune._table(result, "finetune")
    assert "| resnet18 | `{}` | 11.18 | 200 | **43.0%** | 39.0% | +4.0 ± 2.0 | 2 |" in table
    assert "| | | | 1,000 | 50.0% | **51.0%** | -1.0 | 1 |" in table
    assert "Wall time 2.0 h for the 5 runs of 1 invocation (2 at once); 2 runs kept from a file" in table
    assert "`python benchmarks/finetune.py --steps 200 1000 --seeds 0 1 --archs resnet18`" in table


def test_seeds_per_budget_and_job_order(finetune):
    plan = finetune._plan([3000, 200, 1000], [0, 1, 2], [finetune._seeds_at("3000=0")])
    assert plan == {200: [0, 1, 2], 1000: [0, 1, 2], 3000: [0]}
    assert finetune._seeds_at("1000=0,3") == (1000, [0, 3])
    for bad in ("1000", "x=0", "1000=0,"):
        with pytest.raises(argparse.ArgumentTypeError, match="STEPS=SEED"):
            finetune._seeds_at(bad)
    with pytest.raises(ValueError, match="500 is not one of --steps"):
        finetune._plan([200], [0], [(500, [0])])
    params = {"resnet18": 11.18, "mobilenetv3_small_100": 1.53}
    done = {("mobilenetv3_small_100", "default", 0, 20)}
    jobs = finetune._jobs(["resnet18", "mobilenetv3_small_100"], ["ghn", "default"], {20: [0, 1], 40: [0]},
                          params, done)
    assert jobs == [("mobilenetv3_small_100", "ghn", 0, 20), ("mobilenetv3_small_100", "ghn", 1, 20),
                    ("mobilenetv3_small_100", "default", 1, 20), ("mobilenetv3_small_100", "ghn", 0, 40),
                    ("mobilenetv3_small_100", "default", 0, 40), ("resnet18", "ghn", 0, 20),
                    ("resnet18", "default", 0, 20), ("resnet18", "ghn", 1, 20), ("resnet18", "default", 1, 20),
                    ("resnet18", "ghn", 0, 40), ("resnet18", "default", 0, 40)]


def test_committed_one_budget_file_is_kept_at_its_budget(finetune):
    """benchmarks/results/finetune.json predates --steps taking several: its runs count as 200-step runs."""
    path = BENCHMARKS / "results" / "finetune.json"
    earlier = json.loads(path.read_text())
    then = earlier["setup"]
    now = {**then, "recipe": {k: v for k, v in then["recipe"].items() if k not in ("seeds", "steps")}}
    runs, invocations = finetune._earlier_runs(path, now)
    assert len(runs) == 8 * 2 * 3 and {key[3] for key in runs} == {200} and invocations == []
    kept = runs[("vit_tiny_patch16_224", "default", 1, 200)]
    assert kept == {"params_m": 5.36, **earlier["architectures"]["vit_tiny_patch16_224"]["default"]["seeds"]["1"]}
    other_ghn, _ = finetune._earlier_runs(path, {**now, "ghn_sha256": "0" * 16})
    assert {key[1] for key in other_ghn} == {"default"} and len(other_ghn) == 24
    assert finetune._earlier_runs(path, {**now, "split": "test (10,000)"}) == ({}, [])


@pytest.mark.data
def test_budgets_are_separate_runs_written_as_they_finish(finetune, monkeypatch, tmp_path, capsys):
    import ghn_init
    from train_ghn.sgd import SGDRecipe

    monkeypatch.setattr(finetune, "RESULTS", tmp_path)
    name = "mobilenetv3_small_100"
    setup = finetune.setup_of(ghn_init.load(), SGDRecipe.lr, 2)
    kept = {"accuracy": 0.123, "train_s": 9.9, "loss_curve": [2.3]}
    old = {"setup": {**setup, "recipe": {**setup["recipe"], "seeds": [0], "steps": 2}, "inits": ["default"]},
           "architectures": {name: {"kwargs": {}, "params_m": 1.53,
                                    "default": {"accuracy": 0.123, "seeds": {"0": kept}}}},
           "mean_accuracy": {"default": 0.123}}
    path = tmp_path / "finetune.json"
    path.write_text(json.dumps(old))
    on_file, run_one = [], finetune._finetune_one

    def watched(*job):
        result = json.loads(path.read_text())
        on_file.append(sum(len(cell[init]["seeds"]) for cell in result["architectures"][name].get(
            "steps", {"2": result["architectures"][name]}).values() for init in ("ghn", "default") if init in cell))
        return run_one(*job)

    monkeypatch.setattr(finetune, "_finetune_one", watched)
    argv = ["--archs", name, "--steps", "2", "3", "--seeds", "0", "1", "--seeds-at", "3=0", "--test-per-class", "2"]
    finetune.main(argv)
    out = capsys.readouterr().out
    assert "5 runs to do, 1 kept" in out
    assert on_file == [1, 2, 3, 4, 5]  # each finished run is on file before the next starts
    for job in ("ghn seed 0, 2 steps", "ghn seed 1, 2 steps", "default seed 1, 2 steps", "ghn seed 0, 3 steps",
                "default seed 0, 3 steps"):
        assert f"{name} {job}: " in out
    result = json.loads(path.read_text())
    cells = result["architectures"][name]["steps"]
    assert cells["2"]["default"]["seeds"]["0"] == kept
    assert cells["2"]["ghn_minus_default"]["n"] == 2 and cells["2"]["ghn_minus_default"]["standard_error"] >= 0
    assert cells["3"]["ghn_minus_default"]["n"] == 1 and set(cells["3"]["ghn"]["seeds"]) == {"0"}
    assert result["invocations"][0]["jobs"] == 5 and result["setup"]["inits"] == ["ghn", "default"]
    assert (tmp_path / "finetune.png").stat().st_size > 0
    assert "`python benchmarks/finetune.py --steps 2 3 --seeds 0 1 --seeds-at 3=0 --archs" in out
    finetune.main(argv)
    assert "0 runs to do, 6 kept" in capsys.readouterr().out  # the kept 2-step default run is now in the new format
    assert json.loads(path.read_text())["architectures"] == result["architectures"]
