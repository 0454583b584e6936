"""GHN encoders and decoders compared at equal meta-training compute: GHN-2 against GHN-3 and LoGAH.

Variants: encoder ``gated_gnn`` (GHN-2) or ``transformer`` (GHN-3), decoder ``tiling`` or
``low_rank`` (LoGAH), each meta-trained from scratch on ``--config`` (same seed, so the same
architectures and images at every step). Equal compute: a pilot times meta-training steps of every
variant in this process on the same prebuilt architectures (one thread), and each variant gets the
number of steps that take as long as ``--steps`` steps of the GHN-2 baseline (its own warm-up and
cosine schedule over them). Runs live in resumable folders under ``--runs`` (``python -m
train_ghn``); an interrupted benchmark picks up where it stopped with the same step counts. Each final
GHN is then evaluated on the out-of-distribution timm list (predicted accuracy, BN recalibrated,
balanced test split). Writes benchmarks/results/ghn_variants.{json,png} and a table in RESULTS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _report import HERE, machine, update_results

import ghn_init
from train_ghn.data import data_root
from train_ghn.evaluate import OOD_ARCHITECTURES, ood_architectures, run_protocol
from train_ghn.trainer import TrainConfig, Trainer

REPO = HERE.parent
#: ``encoder-decoder`` (GHNConfig values) -> what the variant is
VARIANTS = {"gated_gnn-tiling": "GHN-2 (gated GNN, tiling)",
            "transformer-tiling": "GHN-3 encoder (graph transformer, tiling)",
            "gated_gnn-low_rank": "LoGAH decoder (gated GNN, low rank)",
            "transformer-low_rank": "GHN-3 + LoGAH (graph transformer, low rank)"}
BASELINE = "gated_gnn-tiling"


def _config(base: dict[str, Any], variant: str, **changes: Any) -> dict[str, Any]:
    encoder, decoder = variant.split("-")
    return {**base, "ghn": {**base["ghn"], "encoder": encoder, "decoder": decoder}, **changes}


def pilot(base: dict[str, Any], variants: list[str], warmup: int, steps: int, pool_size: int,
          work: Path) -> dict[str, float]:
    """Seconds per meta-training step of each variant: same draws and images, pools prebuilt."""
    seconds = {}
    for variant in variants:
        config = TrainConfig(**_config(base, variant, pool_size=pool_size, max_steps=warmup + steps))
        trainer = Trainer(config, work / f"pilot-{variant}", device="cpu")
        trainer.prebuild(1)
        for _ in range(warmup):
            trainer.train_step()
        started = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        seconds[variant] = (time.perf_counter() - started) / steps
        print(f"pilot: {VARIANTS[variant]}: {seconds[variant]:.3f} s/step", flush=True)
    return seconds


def train(config: dict[str, Any], out: Path) -> Path:
    """``python -m train_ghn`` in a fresh one-thread process; resumes ``out`` if it holds a checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "GHN_INIT_DATA": str(data_root().resolve())}
    command = [sys.executable, "-m", "train_ghn", "--config", str(path), "--out", str(out), "--device", "cpu"]
    with (out / "train.log").open("a") as log:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed; see {out / 'train.log'}")
    return out / "final"


def _final_loss(run: Path, fraction: float = 0.2) -> float:
    """Mean logged training loss over the last ``fraction`` of the run."""
    losses = [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    tail = losses[-max(1, int(len(losses) * fraction)):]
    return sum(tail) / len(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="train_ghn/configs/variants-cpu.yaml")
    parser.add_argument("--steps", type=int, default=300, help="meta-training steps of the GHN-2 baseline")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "variants")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once (one thread each)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help=f"encoder-decoder pairs; {BASELINE} (the step budget's reference) is always run")
    parser.add_argument("--pilot-steps", type=int, default=12)
    parser.add_argument("--archs", nargs="*", default=list(OOD_ARCHITECTURES), choices=list(OOD_ARCHITECTURES),
                        help="architectures evaluated (default: the whole OOD list)")
    parser.add_argument("--no-results-md", action="store_true", help="leave benchmarks/RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = yaml.safe_load((REPO / args.config).read_text())
    args.runs.mkdir(parents=True, exist_ok=True)
    variants = [BASELINE, *(v for v in args.variants if v != BASELINE)]
    plan_path = args.runs / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    if plan.get("config") != base or plan.get("baseline_steps") != args.steps or set(variants) - set(plan["steps"]):
        seconds = pilot(base, variants, 3, args.pilot_steps, 4, args.runs)
        steps = {v: max(1, round(args.steps * seconds[BASELINE] / s)) for v, s in seconds.items()}
        plan = {"config": base, "baseline_steps": args.steps, "pilot_s_per_step": seconds, "steps": steps}
        plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    print(json.dumps(plan["steps"], indent=2), flush=True)

    def run(variant: str) -> Path:
        config = _config(base, variant, name=f"ghn-variant-{variant}", max_steps=plan["steps"][variant])
        return train(config, args.runs / variant)

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        finals = dict(zip(variants, pool.map(run, variants)))
    rows = {}
    for variant, final in finals.items():
        result = run_protocol([a for a in ood_architectures() if a.name in args.archs], str(final), sgd_steps=())
        training = json.loads((final / "config.json").read_text())["training"]
        rows[variant] = {"label": VARIANTS[variant], "ghn": dict(zip(("encoder", "decoder"), variant.split("-"))),
                         "ghn_params": sum(p.numel() for p in ghn_init.load(str(final)).parameters()),
                         "steps": training["steps"], "wall_time_s": training["wall_time_s"],
                         "pilot_s_per_step": round(plan["pilot_s_per_step"][variant], 4),
                         "final_train_loss": round(_final_loss(final.parent), 4),
                         "ood_acc_bn_calibrated": {n: r["ghn"]["acc_bn_calibrated"]
                                                   for n, r in result["architectures"].items()},
                         "mean_ood_acc": result["mean_ghn_acc_bn_calibrated"]}
        print(variant, json.dumps(rows[variant]), flush=True)
    setup = {"config": args.config, "baseline_steps": args.steps, "split": result["setup"]["split"],
             "calibrate_bn_images": result["setup"]["calibrate_bn_images"], "machine": machine()}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "ghn_variants.json").write_text(json.dumps({"setup": setup, "variants": rows}, indent=2) + "\n")
    _plot(rows, out / "ghn_variants.png")
    table = _table(setup, rows)
    print(table)
    if not args.no_results_md:
        update_results("ghn_variants", table)


def _table(setup: dict[str, Any], rows: dict[str, dict[str, Any]]) -> str:
    m = setup["machine"]
    archs = list(next(iter(rows.values()))["ood_acc_bn_calibrated"])
    lines = ["## GHN variants at equal meta-training compute, CIFAR-10", "",
             f"Each variant meta-trained from scratch with `{setup['config']}` (same seed, architectures and images), "
             f"for the steps that take as long as {setup['baseline_steps']} GHN-2 steps (pilot timing, one thread); "
             f"predicted weights on the OOD timm list, {setup['split']}, BN recalibrated on "
             f"{setup['calibrate_bn_images']} train images; {m['processor']}, torch {m['torch']}, timm {m['timm']}.",
             "", "| variant | GHN params | s/step | steps | final train loss | " + " | ".join(archs) + " | **mean** |",
             "|---|---|---|---|---|" + "---|" * (len(archs) + 1)]
    best = max(r["mean_ood_acc"] for r in rows.values())
    for r in rows.values():
        accs = " | ".join(f"{100 * r['ood_acc_bn_calibrated'][a]:.1f}%" for a in archs)
        mean = f"{100 * r['mean_ood_acc']:.1f}%"
        cells = [r["label"], f"{r['ghn_params'] / 1e6:.2f}M", f"{r['pilot_s_per_step']:.2f}", str(r["steps"]),
                 f"{r['final_train_loss']:.3f}", accs, f"**{mean}**" if r["mean_ood_acc"] == best else mean]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`python benchmarks/ghn_variants.py` -> `benchmarks/results/ghn_variants.json`, `.png`"]
    return "\n".join(lines)


def _plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    archs = list(next(iter(rows.values()))["ood_acc_bn_calibrated"])
    width = 0.8 / len(rows)
    for i, r in enumerate(rows.values()):
        xs = [a + (i - (len(rows) - 1) / 2) * width for a in range(len(archs) + 1)]
        ax.bar(xs, [100 * r["ood_acc_bn_calibrated"][a] for a in archs] + [100 * r["mean_ood_acc"]], width,
               label=f"{r['label']}: {r['steps']} steps")
    ax.axhline(10, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(archs) + 1), [a.split("_")[0] for a in archs] + ["mean"], fontsize=7)
    ax.set_ylabel("predicted-weight accuracy (%)")
    ax.set_title("GHN variants at equal meta-training compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
