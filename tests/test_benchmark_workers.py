"""benchmarks/finetune.py's job processes end with the benchmark, however it was stopped."""

import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# A stand-in for the benchmark's main process: starts one job process that watches it, prints the job's
# pid once the watch is running, then dies by SIGKILL, which no handler of its own could clean up after.
_PARENT = f"""
import os, signal, subprocess, sys
job = subprocess.Popen([sys.executable, "-c", '''
import os, sys
sys.path.insert(0, {str(BENCHMARKS)!r})
import finetune
parent = os.getppid()
print(os.getpid(), flush=True)
finetune._exit_when_orphaned(parent, every_s=0.05)
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
