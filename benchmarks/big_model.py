"""Peak memory of GHN-initializing a 1B-parameter timm model with Accelerate, against the size of its weights.

Runs examples/big_model.py in fresh processes: predicting the sharded checkpoint; loading it with
``device_map="auto"`` (all weights in RAM on a CPU-only machine) and with ``max_memory`` plus an offload folder;
the whole recipe in one process; and, for contrast, ``max_memory`` with a single-file checkpoint, which
``load_checkpoint_and_dispatch`` reads whole. Each run reports its own peak RSS (``getrusage``) and is sampled
every 0.05 s for a curve. Writes benchmarks/results/big_model.{json,png} and a section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import accelerate
import psutil
import safetensors
from _report import HERE, machine, update_results

EXAMPLE = HERE.parent / "examples" / "big_model.py"

_SINGLE_FILE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from big_model import empty_model, forward_check, load, peak_rss, placement
import ghn_init
from ghn_init.export import input_size_for, write_predicted
name, path, max_memory, offload = sys.argv[2:6]
report = {"peak_rss_after_imports": peak_rss()}
model = empty_model(name)
ghn = ghn_init.load()
write_predicted(ghn, model, input_size_for(model, ghn, None), path, metadata={"format": "pt"})
report["peak_rss_after_predict"] = peak_rss()
started = time.perf_counter()
model = load(model, path, max_memory, offload)
report.update(load_s=round(time.perf_counter() - started, 1), peak_rss_after_load=peak_rss(),
              placement=placement(model), max_memory=max_memory)
report.update(forward_check(model, None), peak_rss=peak_rss())
print(json.dumps(report))
"""


def run(label: str, command: list[str]) -> dict:
    """Run ``command`` (which prints a JSON report last), sampling its RSS; its report plus the curve."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        proc, curve = psutil.Process(child.pid), []
        while child.poll() is None:
            try:
                curve.append((round(time.perf_counter() - started, 2), proc.memory_info().rss))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        raise RuntimeError(f"{label} failed ({child.returncode}): {' '.join(command)}\n{stderr[-3000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    report.update(label=label, wall_s=round(time.perf_counter() - started, 1), rss_curve=curve)
    print(label, json.dumps({k: v for k, v in report.items() if k != "rss_curve"}), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="vit_giant_patch14_224")
    parser.add_argument("--max-shard-size", default="500MB")
    parser.add_argument("--max-memory", default="1GiB", help="RAM for weights in the offloaded runs")
    parser.add_argument("--workdir", type=Path, help="for the checkpoints and offload folders (default: a temp dir)")
    parser.add_argument("--skip-single-file", action="store_true", help="skip the single-file contrast run")
    args = parser.parse_args()

    import timm

    meta = timm.create_model(args.model, device="meta")
    params = sum(p.numel() for p in meta.parameters())
    weights = sum(t.numel() * t.element_size() for t in meta.state_dict().values())
    setup = {"model": args.model, "params": params, "weights_bytes": weights, "max_shard_size": args.max_shard_size,
             "max_memory": args.max_memory, "ram_total": psutil.virtual_memory().total,
             "ram_available": psutil.virtual_memory().available, "machine": machine(),
             "accelerate": accelerate.__version__, "safetensors": safetensors.__version__}
    print(json.dumps(setup, indent=2), flush=True)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ghn-big-model-"))
    shards, offload = work / "shards", work / "offload"
    example = [sys.executable, str(EXAMPLE), args.model, "--out"]
    runs = []
    try:
        runs.append(run("predict: shards", [*example, str(shards), "--stage", "predict",
                                            "--max-shard-size", args.max_shard_size]))
        runs.append(run("load: device_map=auto, all in RAM", [*example, str(shards), "--stage", "load"]))
        runs.append(run(f"load: max_memory {args.max_memory} + offload folder",
                        [*example, str(shards), "--stage", "load", "--max-memory", args.max_memory,
                         "--offload-folder", str(offload)]))
        shutil.rmtree(offload)
        runs.append(run(f"whole recipe, one process (max_memory {args.max_memory})",
                        [*example, str(work / "all"), "--max-shard-size", args.max_shard_size,
                         "--max-memory", args.max_memory, "--offload-folder", str(offload)]))
        shutil.rmtree(offload)
        shutil.rmtree(work / "all")
        if not args.skip_single_file:
            runs.append(run(f"single file, max_memory {args.max_memory} (contrast)",
                            [sys.executable, "-c", _SINGLE_FILE, str(EXAMPLE.parent), args.model,
                             str(work / "single.safetensors"), args.max_memory, str(offload)]))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "big_model.json").write_text(json.dumps({"setup": setup, "runs": runs}) + "\n")
    _plot(setup, runs, out / "big_model.png")
    update_results("big_model", _markdown(setup, runs))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _markdown(setup: dict, runs: list[dict]) -> str:
    m, weights = setup["machine"], setup["weights_bytes"]
    lines = ["## Models larger than memory: peak RSS with Accelerate", "",
             f"`{setup['model']}`, {setup['params'] / 1e9:.3f}B parameters, {_gib(weights)} GiB of float32 weights; "
             f"shards of at most {setup['max_shard_size']}; {m['processor']}, {m['cpus']} CPUs, "
             f"{_gib(setup['ram_total'])} GiB RAM, torch {m['torch']}, timm {m['timm']}, accelerate "
             f"{setup['accelerate']}. Each row a fresh process (examples/big_model.py); peak RSS from `getrusage`, "
             "imports (torch, timm, ghn_init) included; the forward pass is one 224x224 image.", "",
             "| run | weights in RAM / on disk (GiB) | peak RSS (GiB) | peak RSS / weights | seconds |",
             "|---|---|---|---|---|"]
    for r in runs:
        placed = r.get("placement", {})
        where = f"{_gib(placed.get('cpu', 0))} / {_gib(placed.get('disk', 0))}" if placed else "-"
        lines.append(f"| {r['label']} | {where} | {_gib(r['peak_rss'])} | **{r['peak_rss'] / weights:.2f}** "
                     f"| {r['wall_s']} |")
    lines += ["", "`python benchmarks/big_model.py` -> `benchmarks/results/big_model.json`, `big_model.png`"]
    return "\n".join(lines)


def _plot(setup: dict, runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = setup["weights_bytes"] / 2**30
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    labels = [r["label"] for r in runs]
    bars.barh(range(len(runs)), [r["peak_rss"] / 2**30 for r in runs], color="tab:blue")
    bars.axvline(weights, color="tab:red", ls="--", label=f"weights {weights:.2f} GiB")
    bars.set_yticks(range(len(runs)), labels, fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel("peak RSS of the process (GiB)")
    bars.legend(fontsize=8)
    for r in runs:
        t, rss = zip(*r["rss_curve"]) if r["rss_curve"] else ((), ())
        curves.plot(t, [v / 2**30 for v in rss], label=r["label"], lw=1.2)
    curves.axhline(weights, color="tab:red", ls="--")
    curves.set_xlabel("seconds since the process started")
    curves.set_ylabel("RSS (GiB), sampled every 0.05 s")
    curves.legend(fontsize=7)
    fig.suptitle(f"{setup['model']} ({setup['params'] / 1e9:.2f}B params): GHN weights through "
                 "init_empty_weights + shards + load_checkpoint_and_dispatch", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
