"""Fine-tuning on CIFAR-10 from the GHN init against timm's default init, same recipe, seeds and data order.

For each architecture in ``ARCHITECTURES`` (built for 32x32 inputs and 10 classes with the kwargs of
``train_ghn.evaluate.OOD_ARCHITECTURES``): SGD with the recipe of examples/finetune.py (whose
``finetune`` this reuses) for a fixed number of steps from each init and each of ``--seeds`` (the seed
fixes the batches, flips and any random init), then test accuracy in eval mode; the table reports the
mean over seeds and, with both inits, the per-seed GHN - default difference (mean and standard error; the
two inits of a seed share batches and flips). Short runs differ by a point or two between seeds, so margins
that small need several.
Writes benchmarks/results/finetune.{json,png} and prints a markdown table (``--results-md`` also puts it
into RESULTS.md). Runs found in an earlier JSON with the same recipe, split and thread count are kept
(``--rerun`` repeats those of ``--inits``), per (architecture, init, seed): the default init's from any
GHN, the GHN init's only from the same GHN (content hash, prediction settings included) and ghn_init
release. ``--workers`` runs that many (architecture, init, seed) jobs at once, each in its own process;
a job's result does not depend on it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _report import HERE, describe_ghn, ghn_setup, machine, update_results
from accelerate import Accelerator

import ghn_init
from ghn_init.coverage import exit_when_orphaned
from train_ghn.evaluate import OOD_ARCHITECTURES
from train_ghn.sgd import SGDRecipe

#: The protocol's out-of-distribution architectures but resnet50 (for time); kwargs from OOD_ARCHITECTURES.
ARCHITECTURES = ("resnet18", "convnext_atto", "regnetx_002", "efficientnet_b0", "mobilenetv3_small_100",
                 "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mixer_s16_224")
INITS = ("ghn", "default")
RUN_KEYS = ("accuracy", "train_s", "loss_curve")

_worker: dict[str, Any] = {}  # what each job process loads once: the example module, data, accelerator


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("finetune_example", HERE.parent / "examples" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _start_worker(test_per_class: int, threads: int, parent: int | None = None) -> None:
    if parent is not None:
        threading.Thread(target=exit_when_orphaned, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    _worker["example"] = example = _example()
    _worker["data"] = example.load_data(test_per_class=test_per_class)
    _worker["accelerator"] = Accelerator(cpu=True)


def _finetune_one(name: str, init: str, seed: int, steps: int, lr: float, ghn_ref: str | None) -> dict[str, Any]:
    """One (architecture, init, seed) run in a worker; returns its accuracy, time, losses and size."""
    example, (train, test), accelerator = _worker["example"], _worker["data"], _worker["accelerator"]
    torch.manual_seed(seed)
    model = example.build_model(name, init, ghn_ref, **OOD_ARCHITECTURES[name])
    params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    result = example.finetune(model, train, test, accelerator, steps=steps, recipe=SGDRecipe(lr=lr, seed=seed),
                              progress=False)
    accelerator.free_memory()
    return {"params_m": params_m, **{k: result[k] for k in RUN_KEYS}}


def _comparable(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe without its seeds: runs at different seeds of the same recipe can be combined."""
    return {k: v for k, v in recipe.items() if k not in ("seed", "seeds")}


def _earlier_runs(path: Path, setup: dict[str, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Runs of an earlier result file that this run can keep, keyed by (architecture, init, seed): the
    default init's always (it does not involve the GHN), the GHN init's if the GHN is the same.
    Files written before ``--seeds`` hold one run per cell, at the recipe's ``seed``."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    then = earlier["setup"]
    if _comparable(then["recipe"]) != _comparable(setup["recipe"]) or then["split"] != setup["split"]:
        return {}
    if then["machine"]["torch_threads"] != setup["machine"]["torch_threads"]:
        return {}
    same_ghn = all(then.get(k) == setup[k] for k in ("ghn_sha256", "ghn_init"))
    runs = {}
    for name, row in earlier["architectures"].items():
        for init in INITS:
            if init not in row or (init == "ghn" and not same_ghn):
                continue
            per_seed = row[init].get("seeds") or {str(then["recipe"]["seed"]): row[init]}
            for seed, run in per_seed.items():
                runs[(name, init, int(seed))] = {"params_m": row["params_m"], **{k: run[k] for k in RUN_KEYS}}
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", nargs="*", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--inits", nargs="*", default=["ghn", "default"], choices=INITS)
    parser.add_argument("--ghn", help="GHN reference (default: the embedded GHN)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and init; mean reported")
    parser.add_argument("--lr", type=float, default=SGDRecipe.lr, help="peak of the one-cycle learning rate")
    parser.add_argument("--test-per-class", type=int, default=200, help="200: balanced 2,000; 1000: full test split")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--workers", type=int, default=1, help="jobs run at once, each in its own process")
    parser.add_argument("--out", default="finetune", help="stem of the files under benchmarks/results/")
    parser.add_argument("--rerun", action="store_true", help="run --inits again even where an earlier run is kept")
    parser.add_argument("--results-md", action="store_true", help="also write the table into RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ghn = ghn_init.load(args.ghn)
    recipe = {k: v for k, v in SGDRecipe(lr=args.lr).to_dict().items() if k != "seed"}
    test_split = ("test (10,000)" if args.test_per_class >= 1000 else
                  f"balanced test (first {args.test_per_class} per class, {10 * args.test_per_class:,})")
    recipe_setup = {**recipe, "seeds": args.seeds, "steps": args.steps, "label_smoothing": 0.0,
                    "train_images": "first 45,000 of the train split", "batches": "DataLoader, seeded shuffle"}
    setup = {**ghn_setup(ghn), "recipe": recipe_setup, "split": test_split, "machine": machine()}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    earlier = _earlier_runs(out / f"{args.out}.json", setup)
    setup["inits"] = inits = [i for i in INITS if i in args.inits or
                              all((n, i, s) in earlier for n in args.archs for s in args.seeds)]
    print(json.dumps(setup, indent=2), flush=True)
    runs = {key: run for key, run in earlier.items() if key[1] in inits and not (args.rerun and key[1] in args.inits)}
    jobs = [(name, init, seed) for name in args.archs for seed in args.seeds for init in args.inits
            if (name, init, seed) not in runs]
    started = time.perf_counter()
    if args.workers > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, context, _start_worker,
                                                    (args.test_per_class, args.threads, os.getpid())) as pool:
            futures = {pool.submit(_finetune_one, *job, args.steps, args.lr, args.ghn): job for job in jobs}
            for future in concurrent.futures.as_completed(futures):
                runs[futures[future]] = _report_run(futures[future], future.result(), started)
    else:
        _start_worker(args.test_per_class, args.threads)
        for job in jobs:
            runs[job] = _report_run(job, _finetune_one(*job, args.steps, args.lr, args.ghn), started)
    rows = {name: _row(name, inits, args.seeds, runs) for name in ARCHITECTURES if name in args.archs}
    result = {"setup": setup, "architectures": rows,
              "mean_accuracy": {i: sum(r[i]["accuracy"] for r in rows.values()) / len(rows) for i in inits}}
    (out / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(rows, inits, out / f"{args.out}.png", setup)
    table = _table(rows, inits, result["mean_accuracy"], setup, args.out)
    print(table)
    if args.results_md:
        update_results(args.out, "## Fine-tuning from the GHN init, CIFAR-10\n\n" + table)


def _report_run(job: tuple[str, str, int], run: dict[str, Any], started: float) -> dict[str, Any]:
    name, init, seed = job
    print(f"{name} {init} seed {seed}: {run['accuracy']:.2%} ({run['train_s']:.0f} s of training; "
          f"{time.perf_counter() - started:.0f} s elapsed)", flush=True)
    return run


def _row(name: str, inits: list[str], seeds: list[int], runs: dict) -> dict[str, Any]:
    """One architecture's results: per init the mean accuracy over seeds and each seed's run."""
    row: dict[str, Any] = {"kwargs": OOD_ARCHITECTURES[name],
                           "params_m": next(runs[(name, i, s)]["params_m"] for i in inits for s in seeds)}
    for init in inits:
        per_seed = {str(s): {k: runs[(name, init, s)][k] for k in RUN_KEYS} for s in seeds}
        row[init] = {"accuracy": statistics.fmean(r["accuracy"] for r in per_seed.values()), "seeds": per_seed}
    if set(INITS) <= set(inits) and len(seeds) > 1:
        row["ghn_minus_default"] = _paired_difference([runs[(name, "ghn", s)]["accuracy"] -
                                                       runs[(name, "default", s)]["accuracy"] for s in seeds])
    return row


def _paired_difference(differences: list[float]) -> dict[str, float]:
    """Mean and standard error of per-seed accuracy differences. Both inits of a seed see the same batches
    and flips, so pairing removes the data-order part of the seed-to-seed spread."""
    return {"mean": statistics.fmean(differences),
            "standard_error": statistics.stdev(differences) / len(differences) ** 0.5}


def _table(rows: dict, inits: list[str], means: dict, setup: dict, stem: str) -> str:
    recipe, seeds = setup["recipe"], setup["recipe"]["seeds"]
    several = len(seeds) > 1
    paired = all("ghn_minus_default" in r for r in rows.values())
    seed_text = (f"seeds {', '.join(map(str, seeds))} (mean; each seed in parentheses)" if several
                 else f"seed {seeds[0]}")
    lines = [f"{describe_ghn(setup)}; {recipe['steps']} steps of {recipe['optimizer']}, "
             f"momentum {recipe['momentum']}, weight decay {recipe['weight_decay']}, one-cycle lr peaking at "
             f"{recipe['lr']}, batch {recipe['batch_size']}, flips, {seed_text}, the same batches for every "
             f"init; {setup['split']}, eval mode; "
             f"{setup['machine']['processor']}, torch threads {setup['machine']['torch_threads']}, "
             f"torch {setup['machine']['torch']}, timm {setup['machine']['timm']}.", "",
             "| architecture | kwargs | params (M) | " + " | ".join(f"{i} init" for i in inits)
             + (" | ghn - default, paired (points, mean ± s.e.) |" if paired else " |"),
             "|---|---|---|" + "---|" * (len(inits) + paired)]
    for name, r in rows.items():
        best = max(r[i]["accuracy"] for i in inits)
        cells = []
        for init in inits:
            mean = f"{r[init]['accuracy']:.1%}"
            cell = f"**{mean}**" if r[init]["accuracy"] == best else mean
            if several:
                cell += " (" + " / ".join(f"{run['accuracy']:.1%}" for run in r[init]["seeds"].values()) + ")"
            cells.append(cell)
        if paired:
            diff = r["ghn_minus_default"]
            cells.append(f"{100 * diff['mean']:+.1f} ± {100 * diff['standard_error']:.1f}")
        lines.append(f"| {name} | `{json.dumps(r['kwargs'])}` | {r['params_m']} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | | | " + " | ".join(f"{means[i]:.1%}" for i in inits) + " |" + " |" * paired)
    seed_args = f" --seeds {' '.join(map(str, seeds))}" if seeds != [0] else ""
    lines += ["", f"`python benchmarks/finetune.py --inits {' '.join(inits)}{seed_args}` -> "
              f"`benchmarks/results/{stem}.json`, `{stem}.png`"]
    return "\n".join(lines)


def _plot(rows: dict, inits: list[str], path: Path, setup: dict) -> None:
    """Mean accuracy per architecture and init as bars, each seed's run as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(inits)
    for i, init in enumerate(inits):
        xs = [x + i * width for x in range(len(names))]
        bars = ax.bar(xs, [rows[n][init]["accuracy"] for n in names], width, label=f"{init} init")
        for x, n in zip(xs, names):
            accuracies = [run["accuracy"] for run in rows[n][init]["seeds"].values()]
            ax.plot([x] * len(accuracies), accuracies, "o", ms=3, color="black", alpha=0.6,
                    markerfacecolor=bars.patches[0].get_facecolor())
    ax.set_xticks([x + width * (len(inits) - 1) / 2 for x in range(len(names))],
                  [n.split("_patch")[0] for n in names], rotation=20, fontsize=8)
    ax.axhline(0.1, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("CIFAR-10 test accuracy")
    seeds = setup["recipe"]["seeds"]
    ax.set_title(f"{setup['ghn']}: {setup['recipe']['steps']} SGD steps from each init, "
                 f"{'mean of seeds ' + ', '.join(map(str, seeds)) if len(seeds) > 1 else f'seed {seeds[0]}'} "
                 f"({setup['split']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
