"""benchmarks/finetune.py: job processes end with the benchmark, and the table pairs the two inits per seed."""

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


def test_table_reports_the_paired_per_seed_difference(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import finetune

    accuracy = {("ghn", 0): 0.46, ("ghn", 1): 0.40, ("default", 0): 0.40, ("default", 1): 0.38}
    runs = {("resnet18", init, seed): {"accuracy": acc, "train_s": 1.0, "loss_curve": [], "params_m": 11.18}
            for (init, seed), acc in accuracy.items()}
    row = finetune._row("resnet18", ["ghn", "default"], [0, 1], runs)
    assert row["ghn_minus_default"]["mean"] == pytest.approx(0.04)  # (0.06 + 0.02) / 2
    assert row["ghn_minus_default"]["standard_error"] == pytest.approx(0.02)  # stdev 0.0283 / sqrt(2)
    setup = {"recipe": {"seeds": [0, 1], "steps": 200, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
                        "lr": 0.05, "batch_size": 64},
             "split": "balanced", "machine": {"processor": "x86_64", "torch_threads": 1, "torch": "2", "timm": "1"}}
    monkeypatch.setattr(finetune, "describe_ghn", lambda setup: "GHN")
    table = finetune._table({"resnet18": row}, ["ghn", "default"], {"ghn": 0.43, "default": 0.39}, setup, "finetune")
    assert "| +4.0 ± 2.0 |" in table and "ghn - default, paired" in table
