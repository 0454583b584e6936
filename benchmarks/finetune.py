"""Fine-tuning on CIFAR-10 from the GHN init against timm's default init, same recipe, seeds and data order,
at several step budgets.

For each architecture in ``ARCHITECTURES`` (built for 32x32 inputs and 10 classes with the kwargs of
``train_ghn.evaluate.OOD_ARCHITECTURES``, or ``EXTRA_KWARGS`` for those outside it): SGD with the recipe of
examples/finetune.py (whose ``finetune`` this reuses) for each of ``--steps`` from each init and seed (the
seed fixes the batches, flips and any random init), then test accuracy in eval mode. Every (architecture,
init, seed, budget) is its own run: the one-cycle schedule spans the budget, so 1,000 steps are not the
start of 3,000. ``--seeds`` applies to every budget, ``--seeds-at STEPS=SEED[,SEED...]`` replaces it for one:

    python benchmarks/finetune.py --steps 200 1000 3000 --seeds 0 1 2 --seeds-at 3000=0 --workers 2

The table reports, per architecture and budget, each init's mean over seeds and the per-seed GHN - default
difference (mean and standard error; the two inits of a seed share batches and flips). Short runs differ by
a point or two between seeds, so margins that small need several: rerun with more seeds for those
architectures and budgets only (``--archs vit_tiny_patch16_224 --steps 3000 --seeds 0 1 2``).

Writes benchmarks/results/finetune.{json,png}: the JSON after every finished run, so a killed run loses only
the runs in progress, and the plot with the markdown table once all are done (``--results-md`` also puts the
table into RESULTS.md). Runs found in an earlier JSON with the same recipe, split and thread count are kept
(``--rerun`` repeats the asked-for runs of ``--inits``), per (architecture, init, seed, budget): the default
init's from any GHN, the GHN init's only from the same GHN (content hash, prediction settings included) and
ghn_init release; files of one budget (before ``--steps`` took several) count as runs at that budget. The
JSON holds every kept run, not only the asked-for ones, and the table and plot report all of it.
``--workers`` runs that many jobs at once, each in its own process, smallest architecture (parameters) and
budget first; a job's result does not depend on it.
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

import timm
import torch
from _report import HERE, describe_ghn, ghn_setup, machine, update_results
from accelerate import Accelerator

import ghn_init
from ghn_init.coverage import exit_when_orphaned
from train_ghn.evaluate import OOD_ARCHITECTURES
from train_ghn.sgd import SGDRecipe

#: Architectures outside the protocol's OOD list, with their timm kwargs: CNNs whose strides end on a 1x1
#: map at 32x32, so they need none.
EXTRA_KWARGS: dict[str, dict[str, Any]] = {"rexnet_100": {}, "regnety_004": {}}
#: The protocol's out-of-distribution architectures but resnet50 (for time), then ``EXTRA_KWARGS``.
ARCHITECTURES = ("resnet18", "convnext_atto", "regnetx_002", "efficientnet_b0", "mobilenetv3_small_100",
                 "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mixer_s16_224", *EXTRA_KWARGS)
KWARGS: dict[str, dict[str, Any]] = {name: EXTRA_KWARGS[name] if name in EXTRA_KWARGS else OOD_ARCHITECTURES[name]
                                     for name in ARCHITECTURES}
INITS = ("ghn", "default")
RUN_KEYS = ("accuracy", "train_s", "loss_curve")
RESULTS = HERE / "results"

Job = tuple[str, str, int, int]  # architecture, init, seed, steps

job_state: dict[str, Any] = {}  # what each job process loads once: the example module, data, accelerator


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("finetune_example", HERE.parent / "examples" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_job_process(test_per_class: int, threads: int, parent: int | None = None) -> None:
    """Initializer of a job process: loads the example module, data and an Accelerator once into ``job_state``."""
    if parent is not None:
        threading.Thread(target=exit_when_orphaned, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    job_state["example"] = example = _example()
    job_state["data"] = example.load_data(test_per_class=test_per_class)
    job_state["accelerator"] = Accelerator(cpu=True)


def _millions(model: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def params_millions(name: str) -> float:
    """Parameter count of the benchmarked model, built on the meta device: orders jobs before any runs."""
    with torch.device("meta"):
        return _millions(timm.create_model(name, num_classes=10, **KWARGS[name]))


def _finetune_one(name: str, init: str, seed: int, steps: int, lr: float, ghn_ref: str | None) -> dict[str, Any]:
    """One (architecture, init, seed, budget) run in a worker; returns its accuracy, time, losses and size."""
    example, (train, test), accelerator = job_state["example"], job_state["data"], job_state["accelerator"]
    torch.manual_seed(seed)
    model = example.build_model(name, init, ghn_ref, **KWARGS[name])
    params_m = _millions(model)
    result = example.finetune(model, train, test, accelerator, steps=steps, recipe=SGDRecipe(lr=lr, seed=seed),
                              progress=False)
    accelerator.free_memory()
    return {"params_m": params_m, **{k: result[k] for k in RUN_KEYS}}


def setup_of(ghn: Any, lr: float, test_per_class: int) -> dict[str, Any]:
    """What the runs share: the GHN, the recipe but seeds and steps, the test split and the machine."""
    recipe = {**{k: v for k, v in SGDRecipe(lr=lr).to_dict().items() if k != "seed"}, "label_smoothing": 0.0,
              "train_images": "first 45,000 of the train split", "batches": "DataLoader, seeded shuffle"}
    split = ("test (10,000)" if test_per_class >= 1000 else
             f"balanced test (first {test_per_class} per class, {10 * test_per_class:,})")
    return {**ghn_setup(ghn), "recipe": recipe, "split": split, "machine": machine()}


def _comparable(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe without its seeds and budgets (files of one budget had them in it): runs at different seeds
    and budgets of the same recipe can be combined."""
    return {k: v for k, v in recipe.items() if k not in ("seed", "seeds", "steps")}


def _earlier_runs(path: Path, setup: dict[str, Any]) -> tuple[dict[Job, dict[str, Any]], list[dict[str, Any]]]:
    """Runs of an earlier result file that this run can keep, keyed by (architecture, init, seed, steps): the
    default init's always (it does not involve the GHN), the GHN init's if the GHN is the same; and, in that
    case, the file's record of invocations (their wall time). Files written before ``--steps`` took several
    hold one budget, the recipe's ``steps``; files written before ``--seeds`` one run per cell, at its ``seed``."""
    if not path.is_file():
        return {}, []
    earlier = json.loads(path.read_text())
    then = earlier["setup"]
    if _comparable(then["recipe"]) != _comparable(setup["recipe"]) or then["split"] != setup["split"]:
        return {}, []
    if then["machine"]["torch_threads"] != setup["machine"]["torch_threads"]:
        return {}, []
    same_ghn = all(then.get(k) == setup[k] for k in ("ghn_sha256", "ghn_init"))
    runs = {}
    for name, row in earlier["architectures"].items():
        for steps, cell in (row.get("steps") or {str(then["recipe"]["steps"]): row}).items():
            for init in INITS:
                if init not in cell or (init == "ghn" and not same_ghn):
                    continue
                per_seed = cell[init].get("seeds") or {str(then["recipe"]["seed"]): cell[init]}
                for seed, run in per_seed.items():
                    runs[(name, init, int(seed), int(steps))] = {"params_m": row["params_m"],
                                                                 **{k: run[k] for k in RUN_KEYS}}
    return runs, earlier.get("invocations", []) if same_ghn else []


def _seeds_at(text: str) -> tuple[int, list[int]]:
    steps, sep, seeds = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(steps), [int(seed) for seed in seeds.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds-at expects STEPS=SEED[,SEED...], got {text!r}") from None


def _plan(steps: list[int], seeds: list[int], seeds_at: list[tuple[int, list[int]]]) -> dict[int, list[int]]:
    """Seeds per budget: ``seeds`` everywhere but where ``seeds_at`` names the budget."""
    plan = {budget: seeds for budget in sorted(set(steps))}
    for budget, budget_seeds in seeds_at:
        if budget not in plan:
            raise ValueError(f"--seeds-at {budget}: {budget} is not one of --steps {' '.join(map(str, plan))}")
        plan[budget] = budget_seeds
    return plan


def _jobs(archs: list[str], inits: list[str], plan: dict[int, list[int]], params_m: dict[str, float],
          done: set[Job]) -> list[Job]:
    """The runs still to do, smallest architecture first, then smallest budget, seed, init: a stopped run
    leaves the small architectures complete, and the two inits of a seed run side by side."""
    jobs = {(name, init, seed, steps) for name in archs for steps, seeds in plan.items() for seed in seeds
            for init in inits} - done
    return sorted(jobs, key=lambda job: (params_m[job[0]], job[0], job[3], job[2], INITS.index(job[1])))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="*", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--inits", nargs="*", default=list(INITS), choices=INITS)
    parser.add_argument("--ghn", help="GHN reference (default: the embedded GHN)")
    parser.add_argument("--steps", type=int, nargs="+", default=[200], help="step budgets, each its own runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed, init and budget")
    parser.add_argument("--seeds-at", type=_seeds_at, nargs="+", default=[], metavar="STEPS=SEED[,SEED...]",
                        help="seeds for one budget instead of --seeds, e.g. 3000=0")
    parser.add_argument("--lr", type=float, default=SGDRecipe.lr, help="peak of the one-cycle learning rate")
    parser.add_argument("--test-per-class", type=int, default=200, help="200: balanced 2,000; 1000: full test split")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--workers", type=int, default=1, help="jobs run at once, each in its own process")
    parser.add_argument("--out", default="finetune", help="stem of the files under benchmarks/results/")
    parser.add_argument("--rerun", action="store_true", help="run --inits again even where an earlier run is kept")
    parser.add_argument("--results-md", action="store_true", help="also write the table into RESULTS.md")
    args = parser.parse_args(argv)
    try:
        plan = _plan(args.steps, args.seeds, args.seeds_at)
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    setup = setup_of(ghn_init.load(args.ghn), args.lr, args.test_per_class)
    print(json.dumps(setup, indent=2), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.out}.json"
    runs, invocations = _earlier_runs(path, setup)
    jobs = _jobs(args.archs, args.inits, plan, {name: params_millions(name) for name in args.archs},
                 set() if args.rerun else set(runs))
    if not jobs and not runs:
        parser.error("no runs to do and none kept: give --archs and --inits")
    print(f"{len(jobs)} runs to do, {len(runs)} kept from {path}", flush=True)
    invocation = {"jobs": 0, "workers": args.workers, "wall_s": 0.0}
    if jobs:
        invocations.append(invocation)
    started = time.perf_counter()

    def finished(job: Job, run: dict[str, Any]) -> None:
        runs[job] = run
        invocation.update(jobs=invocation["jobs"] + 1, wall_s=round(time.perf_counter() - started, 1))
        write_atomically(path, _result(setup, runs, invocations))
        name, init, seed, steps = job
        print(f"{name} {init} seed {seed}, {steps} steps: {run['accuracy']:.2%} ({run['train_s']:.0f} s of "
              f"training; {invocation['wall_s']:.0f} s elapsed, {invocation['jobs']}/{len(jobs)} runs)", flush=True)

    if jobs and args.workers > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, context, start_job_process,
                                                    (args.test_per_class, args.threads, os.getpid())) as pool:
            futures = {pool.submit(_finetune_one, *job, args.lr, args.ghn): job for job in jobs}
            for future in concurrent.futures.as_completed(futures):
                finished(futures[future], future.result())
    elif jobs:
        start_job_process(args.test_per_class, args.threads)
        for job in jobs:
            finished(job, _finetune_one(*job, args.lr, args.ghn))
    result = _result(setup, runs, invocations)
    write_atomically(path, result)
    _plot(result, RESULTS / f"{args.out}.png")
    table = _table(result, args.out)
    print(table)
    if args.results_md:
        update_results(args.out, "## Fine-tuning from the GHN init, CIFAR-10\n\n" + table)


def write_atomically(path: Path, result: dict[str, Any]) -> None:
    """Replace ``path`` in one step: a run killed while writing leaves the previous file whole."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(partial, path)


def _result(setup: dict[str, Any], runs: dict[Job, dict[str, Any]], invocations: list[dict]) -> dict[str, Any]:
    """The result file: per architecture and budget, each init's runs and the paired difference."""
    rows = {name: _row(name, runs) for name in ARCHITECTURES if any(key[0] == name for key in runs)}
    inits = [init for init in INITS if any(key[1] == init for key in runs)]
    return {"setup": {**setup, "inits": inits}, "architectures": rows, "invocations": invocations}


def _row(name: str, runs: dict[Job, dict[str, Any]]) -> dict[str, Any]:
    """One architecture's results: per budget and init each seed's run and the mean accuracy, over the seeds
    run from both inits where there are any (a stopped run can leave one init a seed ahead), so that the
    means differ by the paired difference."""
    mine = {key: run for key, run in sorted(runs.items()) if key[0] == name}
    row: dict[str, Any] = {"kwargs": KWARGS[name], "params_m": next(iter(mine.values()))["params_m"], "steps": {}}
    for budget in sorted({key[3] for key in mine}):
        per_seed = {init: {str(seed): {k: run[k] for k in RUN_KEYS}
                           for (_, i, seed, steps), run in mine.items() if (i, steps) == (init, budget)}
                    for init in INITS}
        paired = [seed for seed in per_seed["ghn"] if seed in per_seed["default"]]
        cell: dict[str, Any] = {
            init: {"accuracy": statistics.fmean(seeds[s]["accuracy"] for s in paired or seeds), "seeds": seeds}
            for init, seeds in per_seed.items() if seeds}
        if paired:
            cell["ghn_minus_default"] = _paired_difference(
                [per_seed["ghn"][s]["accuracy"] - per_seed["default"][s]["accuracy"] for s in paired])
        row["steps"][str(budget)] = cell
    return row


def _paired_difference(differences: list[float]) -> dict[str, Any]:
    """Mean and standard error (None from one seed) of per-seed accuracy differences, and their number. Both
    inits of a seed see the same batches and flips, so pairing removes the data-order part of the seed spread."""
    error = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else None
    return {"mean": statistics.fmean(differences), "standard_error": error, "n": len(differences)}


def hours(seconds: float) -> str:
    """A duration as the tables print it."""
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds:.0f} s"


def _wall_time(result: dict[str, Any]) -> str:
    """How long the invocations that ran the reported runs took, and their training time summed."""
    invocations = result["invocations"]
    runs = [run for row in result["architectures"].values() for cell in row["steps"].values()
            for init in INITS if init in cell for run in cell[init]["seeds"].values()]
    jobs = sum(i["jobs"] for i in invocations)
    workers = ", ".join(map(str, sorted({i["workers"] for i in invocations})))
    text = (f"Wall time {hours(sum(i['wall_s'] for i in invocations))} for the {jobs} runs of "
            f"{len(invocations)} invocation{'s' * (len(invocations) != 1)} ({workers} at once)" if invocations
            else "No wall time recorded")
    if len(runs) > jobs:
        text += f"; {len(runs) - jobs} runs kept from a file that did not record it"
    return f"{text}. Training alone, summed over all {len(runs)} runs: {hours(sum(r['train_s'] for r in runs))}."


def _command(result: dict[str, Any], stem: str) -> str:
    """The command that runs (or, with the file in place, reports) what the table shows."""
    rows, inits = result["architectures"], result["setup"]["inits"]
    plan: dict[int, set[int]] = {}
    for row in rows.values():
        for steps, cell in row["steps"].items():
            for init in inits:
                plan.setdefault(int(steps), set()).update(map(int, cell.get(init, {}).get("seeds", {})))
    budgets = sorted(plan)
    words = ["--steps", *map(str, budgets), "--seeds", *map(str, sorted(plan[budgets[0]]))]
    at = [f"{b}={','.join(map(str, sorted(plan[b])))}" for b in budgets if plan[b] != plan[budgets[0]]]
    words += ["--seeds-at", *at] if at else []
    words += ["--archs", *rows] if len(rows) < len(ARCHITECTURES) else []
    words += ["--inits", *inits] if len(inits) < len(INITS) else []
    words += ["--out", stem] if stem != "finetune" else []
    return f"`python benchmarks/finetune.py {' '.join(words)}` -> `benchmarks/results/{stem}.json`, `{stem}.png`"


def _table(result: dict[str, Any], stem: str) -> str:
    setup, rows, inits = result["setup"], result["architectures"], result["setup"]["inits"]
    recipe, host = setup["recipe"], setup["machine"]
    lines = [f"{describe_ghn(setup)}; {recipe['optimizer']}, momentum {recipe['momentum']}, weight decay "
             f"{recipe['weight_decay']}, one-cycle lr peaking at {recipe['lr']} over each budget (each budget is "
             f"its own run), batch {recipe['batch_size']}, flips, the same batches for every init of a seed; "
             f"{setup['split']}, eval mode; {host['processor']}, torch threads {host['torch_threads']}, torch "
             f"{host['torch']}, timm {host['timm']}. Accuracy is the mean over seeds; the difference is paired "
             "per seed (no standard error from one seed).", "",
             "| architecture | kwargs | params (M) | steps | " + " | ".join(f"{i} init" for i in inits)
             + " | ghn - default, paired (points, mean ± s.e.) | seeds |",
             "|---|---|---|---|" + "---|" * (len(inits) + 2)]
    for name, row in rows.items():
        first = f"| {name} | `{json.dumps(row['kwargs'])}` | {row['params_m']} |"
        for steps, cell in row["steps"].items():
            diff = cell.get("ghn_minus_default")
            best = max(cell[i]["accuracy"] for i in inits if i in cell) if diff else None
            cells = ["—" if init not in cell else f"**{cell[init]['accuracy']:.1%}**"
                     if cell[init]["accuracy"] == best else f"{cell[init]['accuracy']:.1%}" for init in inits]
            if diff is None:
                cells += ["—", str(max(len(cell[i]["seeds"]) for i in inits if i in cell))]
            else:
                error = "" if diff["standard_error"] is None else f" ± {100 * diff['standard_error']:.1f}"
                cells += [f"{100 * diff['mean']:+.1f}{error}", str(diff["n"])]
            lines.append(f"{first} {int(steps):,} | " + " | ".join(cells) + " |")
            first = "| | | |"
    return "\n".join(lines + ["", _wall_time(result), "", _command(result, stem)])


def _plot(result: dict[str, Any], path: Path) -> None:
    """Per architecture: accuracy against steps for each init (mean as a line, each seed as a dot), and
    below it the paired GHN - default difference with its standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, inits = result["architectures"], result["setup"]["inits"]
    budgets = sorted({int(steps) for row in rows.values() for steps in row["steps"]})
    cols = min(5, len(rows))
    grid = -(-len(rows) // cols)
    fig, axes = plt.subplots(2 * grid, cols, figsize=(3.2 * cols, 4.4 * grid), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1] * grid})
    for i, (name, row) in enumerate(rows.items()):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        cells = {int(steps): cell for steps, cell in row["steps"].items()}
        for init, color in zip(inits, ("C0", "C1")):
            xs = [steps for steps, cell in cells.items() if init in cell]
            top.plot(xs, [cells[x][init]["accuracy"] for x in xs], "-", color=color, label=f"{init} init")
            for x in xs:
                seeds = [run["accuracy"] for run in cells[x][init]["seeds"].values()]
                top.plot([x] * len(seeds), seeds, "o", ms=3, color=color, alpha=0.6)
        paired = {x: cell["ghn_minus_default"] for x, cell in cells.items() if "ghn_minus_default" in cell}
        bottom.errorbar(list(paired), [100 * d["mean"] for d in paired.values()],
                        yerr=[100 * (d["standard_error"] or 0) for d in paired.values()], fmt="o-", ms=3,
                        capsize=3, color="C2")
        bottom.axhline(0, color="gray", lw=0.8, ls="--")
        top.set_title(f"{name.split('_patch')[0]} ({row['params_m']}M)", fontsize=9)
        top.tick_params(labelbottom=False)
        bottom.set_xlabel("SGD steps", fontsize=8)
    for r, ax in enumerate(axes[:, 0]):
        ax.set_ylabel("ghn - default\n(points ± s.e.)" if r % 2 else "test accuracy", fontsize=8)
    for i in range(len(rows), grid * cols):
        axes[2 * (i // cols), i % cols].set_visible(False)
        axes[2 * (i // cols) + 1, i % cols].set_visible(False)
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b:,}" for b in budgets], fontsize=7)
        ax.minorticks_off()
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{result['setup']['ghn']}: CIFAR-10 accuracy after SGD from each init, dots = seeds, "
                 f"{result['setup']['split']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
