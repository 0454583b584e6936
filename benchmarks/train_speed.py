"""Meta-training throughput on the CPU: two processes against one process with one or two threads.

For each config, one invocation runs, one setup after the other, ``python -m train_ghn`` with
1 process x 1 thread and 1 process x 2 threads, and ``accelerate launch`` with 2 gloo processes
x 1 thread, with the config's ``shard`` and with ``shard: archs`` for comparison. All setups
train on the same seeded meta-batches and images. Each run prebuilds its architecture pool
(outside the timing), then trains warm-up + measured steps, logging every step, with no
validation or checkpoints; steps/s is taken from the log's wall times over the measured steps.
Writes benchmarks/results/train_speed.{json,png} and a table in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from _report import HERE, machine, update_results

REPO = HERE.parent
CONFIGS = ["smoke", "cifar10-cpu"]
#: (label, processes, threads per process, shard override)
SETUPS = [("1 x 1 thread", 1, 1, None), ("1 x 2 threads", 1, 2, None), ("2 x 1 thread", 2, 1, None),
          ("2 x 1 thread, shard archs", 2, 1, "archs")]
BASELINE = SETUPS[0][0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(config: dict, processes: int, threads: int, warmup: int, steps: int, work: Path) -> dict:
    """Train ``warmup + steps`` steps in fresh processes; steps/s over the last ``steps``."""
    work.mkdir(parents=True)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    train = ["-m", "train_ghn", "--config", str(path), "--out", str(work / "run"), "--device", "cpu"]
    if processes == 1:
        command = [sys.executable, *train]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "GHN_INIT_DATA": str(Path(os.environ.get("GHN_INIT_DATA", REPO.parent / "shared" / "data")).resolve())}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    times = {r["step"]: r["time_s"] for r in map(json.loads, (work / "run" / "log.jsonl").read_text().splitlines())}
    steps_per_s = steps / (times[warmup + steps] - times[warmup])
    return {"processes": processes, "threads": threads, "shard": config["shard"], "steps_per_s": round(steps_per_s, 4),
            "samples_per_s": round(steps_per_s * config["batch_size"] * config["meta_batch"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", nargs="*", default=CONFIGS, help="names in train_ghn/configs")
    parser.add_argument("--steps", type=int, default=30, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps run before the measured ones")
    parser.add_argument("--pool-size", type=int, default=8, help="cap on architectures per family (prebuilt)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for train_speed.json/.png")
    parser.add_argument("--no-results-md", action="store_true", help="leave benchmarks/RESULTS.md alone")
    args = parser.parse_args()
    setup = {"configs": args.configs, "steps": args.steps, "warmup": args.warmup, "pool_size": args.pool_size,
             "setups": [s[0] for s in SETUPS], "machine": machine()}
    print(json.dumps(setup, indent=2))
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        for name in args.configs:
            base = yaml.safe_load((REPO / "train_ghn" / "configs" / f"{name}.yaml").read_text())
            base.update(max_steps=args.warmup + args.steps, log_every=1, eval_every=0, checkpoint_every=10**9,
                        pool_size=min(base.get("pool_size", args.pool_size), args.pool_size), prebuild_workers=1,
                        time_limit_min=None, init_from=None)
            base.setdefault("shard", "archs")
            results[name] = {}
            for label, processes, threads, shard in SETUPS:
                config = {**base, "shard": shard or base["shard"]}
                work = Path(tmp) / name / label.replace(" ", "_").replace(",", "")
                row = measure(config, processes, threads, args.warmup, args.steps, work)
                results[name][label] = row
                print(name, label, json.dumps(row), flush=True)
            baseline = results[name][BASELINE]["samples_per_s"]
            for row in results[name].values():
                row["speedup"] = round(row["samples_per_s"] / baseline, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_speed.json").write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    _plot(results, args.out / "train_speed.png")
    m = setup["machine"]
    lines = [f"{m['processor']}, {m['cpus']} CPUs, torch {m['torch']}; {args.warmup} warm-up + {args.steps} measured "
             f"meta-training steps per run, architecture pools prebuilt (at most {args.pool_size} per family), "
             "no validation or checkpoints; all setups see the same meta-batches.", "",
             "| config | processes x threads | shard | steps/s | (images x architectures)/s | vs 1 x 1 thread |",
             "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for label, r in rows.items():
            lines.append(f"| {name} | {label.split(',')[0]} | {r['shard']} | {r['steps_per_s']:.3f} | "
                         f"{r['samples_per_s']:.1f} | **{r['speedup']:.2f}x** |")
    lines += ["", "`python benchmarks/train_speed.py` -> `benchmarks/results/train_speed.json`, `.png`"]
    table = "## Meta-training speed: processes against threads (CPU)\n\n" + "\n".join(lines)
    print(table)
    if not args.no_results_md:
        update_results("train_speed", table)


def _plot(results: dict[str, dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    labels = list(results[names[0]])
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, label in enumerate(labels):
        xs = [n + (i - (len(labels) - 1) / 2) * width for n in range(len(names))]
        ax.bar(xs, [results[name][label]["speedup"] for name in names], width, label=label)
    ax.axhline(1.6, color="grey", ls="--", lw=1, label="target for 2 x 1 thread")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("(images x architectures)/s vs 1 x 1 thread")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
