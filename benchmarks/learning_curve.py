"""Learning curves of meta-training: held-out accuracy of predicted weights against training compute.

Each config (a ``train_ghn`` YAML, seed from ``--seed`` or the YAML) is meta-trained from scratch in
this one process with ``--threads`` torch threads, on the CPU, for a budget of ``--steps`` steps or
``--minutes`` CPU-minutes, and evaluated at ``--points`` equally spaced points of that budget (step
fractions or CPU-time fractions). At each point the GHN's current weights predict the held-out timm
architectures (``--archs``, default resnet18 and vit_tiny at 32x32 with 4-pixel patches; ``ood`` for
the protocol's nine), scored as ``train_ghn.evaluate`` scores them: class-balanced test split (first
200 per class), BatchNorm recalibrated on 500 train images, eval mode; batch-statistics accuracy is
kept beside it. The mean meta-batch training loss over the last 50 steps before the point comes from
the run's log.jsonl.

Compute is the CPU time (``time.process_time``, summed over threads) and wall time of
``Trainer.train_step`` (GHN, target networks, optimizer, image batches) plus building the
architecture pool, up front in this process and counted once: a resumed run rebuilds it uncounted.
Evaluation, checkpoints and logging are outside it. The config's ``prebuild_workers``,
``eval_every``, ``log_every`` and ``time_limit_min`` are not used: the pool is built in this
process, the points replace validation, every step is logged, and the budget decides the stop. The
lr schedule always follows the config's ``max_steps``: the budget only decides where training stops
and is evaluated, so a curve is the start of the run that config describes, and ``--steps`` beyond
``max_steps`` is refused. With ``--minutes`` a run that reaches ``max_steps`` first stops there (the
lr is zero from then on), with one last point; set ``max_steps`` to what the budget reaches to
compare annealed runs.

Runs live in ``--runs``/<config stem>-s<seed>[-<label suffix>]/ (the Trainer's checkpoints and
log.jsonl, plus curve.json with the points so far): rerunning the same command resumes each run
where it stopped and keeps the evaluated points; a run complete in the results JSON with the same
setup is not run again. The JSON keeps the runs of other labels, so configs added one by one share
the plot. Writes ``--out-dir``/<out>.json and <out>.png (accuracy per architecture, the mean and the
training loss against CPU-minutes, one line per run) and, with ``--results-md``, a table in
RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import timm
import torch
from _report import HERE, machine, update_results
from tqdm.auto import tqdm

from train_ghn.data import balanced_test_indices
from train_ghn.evaluate import Architecture, evaluate_model, load_eval_data, named_architecture, ood_architectures
from train_ghn.trainer import TrainConfig, Trainer, deterministic_algorithms

REPO = HERE.parent
#: Short names accepted by ``--archs``.
ARCH_ALIASES = {"vit_tiny": "vit_tiny_patch16_224"}
#: Steps averaged for the training loss reported at a point.
LOSS_WINDOW = 50
#: What makes two runs the same run: a stored run with other values is not resumed.
SETUP_KEYS = ("yaml", "seed", "budget", "points", "threads", "archs", "eval")

logger = logging.getLogger("learning_curve")


def resolve_archs(names: list[str]) -> list[Architecture]:
    """``--archs`` values: timm names (32x32 kwargs from ``OOD_ARCHITECTURES``), aliases, or ``ood``."""
    archs: dict[str, Architecture] = {}
    for name in names:
        found = ood_architectures() if name == "ood" else [named_architecture(ARCH_ALIASES.get(name, name))]
        for arch in found:
            if not timm.is_model(arch.name):
                raise ValueError(f"--archs: {name!r} is not a timm architecture, an alias "
                                 f"({', '.join(ARCH_ALIASES)}) or 'ood'")
            archs.setdefault(arch.name, arch)
    return list(archs.values())


@functools.cache
def eval_data(per_class: int, calibrate_bn: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The balanced test split (first ``per_class`` of each class) and the BN-calibration images."""
    (images, labels), calibration = load_eval_data(False, calibrate_bn, torch.device("cpu"))
    keep = balanced_test_indices(labels, per_class)
    return (images[keep], labels[keep]), calibration


def evaluate_ghn(ghn: torch.nn.Module, archs: list[Architecture], test: tuple[torch.Tensor, torch.Tensor],
                 calibration: torch.Tensor, input_size: tuple[int, int, int]) -> dict[str, dict[str, float]]:
    """``evaluate_model``'s numbers for each architecture with weights predicted by ``ghn`` as it is now."""
    scores = {}
    for arch in archs:
        torch.manual_seed(0)  # tensors the GHN does not predict keep timm's init, the same one at every point
        model = arch.build()
        ghn.apply_(model, input_size)
        scores[arch.name] = evaluate_model(model, test, calibration)
    return scores


@dataclasses.dataclass
class Clock:
    """CPU and wall seconds accumulated over the ``running()`` blocks only (training, not evaluation)."""

    cpu_s: float = 0.0
    wall_s: float = 0.0

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        cpu, wall = time.process_time(), time.perf_counter()
        yield
        self.cpu_s += time.process_time() - cpu
        self.wall_s += time.perf_counter() - wall


def _git_commit() -> str:
    """HEAD, with ``+dirty`` when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "HEAD") or "unknown") + ("+dirty" if git("status", "--porcelain", "-uno") else "")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic, so a killed benchmark never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(data, indent=2) + "\n")
    staging.replace(path)


def _read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _loss_near(records: list[dict[str, Any]], step: int, since: int) -> float | None:
    """Mean meta-batch loss over the last ``LOSS_WINDOW`` steps up to ``step`` (none before ``since``)."""
    first = max(since, step - LOSS_WINDOW)
    losses = [r["loss"] for r in records if first < r["step"] <= step and math.isfinite(r["loss"])]
    return sum(losses) / len(losses) if losses else None


def plan_run(config: Path, args: argparse.Namespace, archs: list[Architecture]) -> tuple[str, dict[str, Any]]:
    """The label and the stored record of one config's run, before any training; checks the budget."""
    text = config.read_text()
    cfg = TrainConfig.from_yaml(config)
    seed = cfg.seed if args.seed is None else args.seed
    if args.steps is not None and args.steps > cfg.max_steps:
        raise ValueError(f"{config}: --steps {args.steps} is past max_steps {cfg.max_steps}, where its lr schedule "
                         "ends; raise max_steps in the YAML (the schedule follows it) or lower --steps")
    label = f"{config.stem}-s{seed}" + (f"-{args.label_suffix}" if args.label_suffix else "")
    budget = {"steps": args.steps} if args.steps is not None else {"cpu_minutes": args.minutes}
    return label, {
        "config": str(config), "yaml": text, "seed": seed, "budget": budget, "points": args.points,
        "threads": args.threads, "archs": [a.name for a in archs],
        "eval": {"test_per_class": args.test_per_class, "calibrate_bn": args.calibrate_bn},
        "lr_schedule_steps": cfg.max_steps, "run_dir": str(args.runs / label), "machine": machine(),
        "git_commit": _git_commit(), "curve": [], "done": False,
    }


def _same_setup(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[key] == b[key] for key in SETUP_KEYS)


def learning_curve(label: str, record: dict[str, Any], archs: list[Architecture],
                   previous: dict[str, Any] | None = None,
                   on_point: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Meta-train one run to its budget, evaluating at each point; resumes from its folder.

    ``previous`` is the run as the results JSON holds it: when complete with the same setup it is
    returned as is. ``on_point(record)`` is called after each evaluated point.
    """
    config_path, run_dir = Path(record["config"]), Path(record["run_dir"])
    state_path = run_dir / "curve.json"
    if state_path.is_file():
        stored = json.loads(state_path.read_text())
        if not _same_setup(stored, record):
            changed = [k for k in SETUP_KEYS if stored[k] != record[k]]
            raise SystemExit(f"{run_dir} holds run {label} with another {', '.join(changed)}: delete the folder "
                             "to start it again, or give this setup its own --label-suffix")
        record = stored
    elif previous is not None and previous["done"] and _same_setup(previous, record):
        logger.info("%s: complete in the results JSON, kept", label)
        return previous
    if record["done"]:
        logger.info("%s: complete in %s, kept", label, run_dir)
        return record

    config = TrainConfig.from_yaml(config_path)
    config.seed = record["seed"]
    trainer = Trainer(config, run_dir, device="cpu")
    with deterministic_algorithms(config.deterministic):  # and the setting back for evaluation elsewhere
        log_path = run_dir / "log.jsonl"
        clock = Clock()
        resumed = trainer.start()  # also drops log records past the checkpoint, or all of them on a fresh start
        if resumed:
            logged = _read_log(log_path)
            if not logged or logged[-1]["step"] != trainer.step or "cpu_s" not in logged[-1]:
                raise SystemExit(f"{log_path} has no record of step {trainer.step}, where its checkpoint is: delete "
                                 f"{run_dir} to start {label} again")
            clock = Clock(logged[-1]["cpu_s"], logged[-1]["time_s"])
            logger.info("%s: resumed at step %d, %.2f CPU-minutes, %d points", label, trainer.step, clock.cpu_s / 60,
                        len(record["curve"]))
        else:
            record["curve"] = []
            _write_json(state_path, record)
        with contextlib.nullcontext() if resumed else clock.running():
            trainer.prebuild(1)
        test, calibration = eval_data(record["eval"]["test_per_class"], record["eval"]["calibrate_bn"])
        budget, points = record["budget"], record["points"]
        bar = tqdm(total=budget.get("steps"), initial=trainer.step, desc=label, dynamic_ncols=True)
        with log_path.open("a") as log:
            for k in range(len(record["curve"]) + 1, points + 1):
                if "steps" in budget:
                    until_step, until_cpu_s = round(budget["steps"] * k / points), math.inf
                else:
                    until_step, until_cpu_s = config.max_steps, 60 * budget["cpu_minutes"] * k / points
                _train(trainer, clock, log, until_step, until_cpu_s, bar)
                trainer.save_checkpoint()
                started = time.perf_counter()
                scores = evaluate_ghn(trainer.ghn, archs, test, calibration, trainer.input_size)
                acc = {name: s["acc_bn_calibrated"] for name, s in scores.items()}
                since = record["curve"][-1]["step"] if record["curve"] else 0
                record["curve"].append({
                    "step": trainer.step, "cpu_min": round(clock.cpu_s / 60, 4),
                    "wall_min": round(clock.wall_s / 60, 4),
                    "loss": _loss_near(_read_log(log_path), trainer.step, since), "acc": acc,
                    "acc_batch_stats": {name: s["acc_batch_stats"] for name, s in scores.items()},
                    "mean": sum(acc.values()) / len(acc), "eval_s": round(time.perf_counter() - started, 1)})
                logger.info("%s point %d/%d: %s", label, k, points, json.dumps(record["curve"][-1]))
                _write_json(state_path, record)
                if on_point is not None:
                    on_point(record)
                if clock.cpu_s < until_cpu_s < math.inf:  # max_steps came before the CPU-time budget
                    record["note"] = (f"reached max_steps {config.max_steps} (the end of its lr schedule) after "
                                      f"{clock.cpu_s / 60:.2f} of {budget['cpu_minutes']} CPU-minutes")
                    logger.warning("%s: %s; no further points", label, record["note"])
                    break
        bar.close()
        trainer.save_final()
    record["done"] = True
    _write_json(state_path, record)
    return record


def _train(trainer: Trainer, clock: Clock, log: TextIO, until_step: int, until_cpu_s: float, bar: tqdm) -> None:
    """Train steps until either limit, logging every step with its compute and checkpointing as configured."""
    while trainer.step < until_step and clock.cpu_s < until_cpu_s:
        with clock.running():
            metrics = trainer.train_step()
        trainer.wall_time = clock.wall_s
        record = {**metrics, "step": trainer.step, "time_s": round(clock.wall_s, 3), "cpu_s": round(clock.cpu_s, 3),
                  "skipped_steps": trainer.skipped_steps}
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", cpu_min=f"{clock.cpu_s / 60:.2f}")
        if trainer.step % trainer.config.checkpoint_every == 0:
            trainer.save_checkpoint()


def _budget(run: dict[str, Any]) -> str:
    budget = run["budget"]
    return f"{budget['steps']} steps" if "steps" in budget else f"{budget['cpu_minutes']} CPU-minutes"


def plot(results: dict[str, Any], path: Path) -> None:
    """Accuracy per architecture, the mean and the training loss against CPU-minutes; one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    archs = list(dict.fromkeys(a for run in runs.values() for a in run["archs"]))
    panels = [*archs, "mean", "loss"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for label, run in runs.items():
            curve = [p for p in run["curve"] if panel in ("mean", "loss") or panel in p["acc"]]
            ys = [p[panel] if panel in ("mean", "loss") else p["acc"][panel] for p in curve]
            ax.plot([p["cpu_min"] for p in curve], [math.nan if y is None else y for y in ys], marker="o",
                    label=f"{label} ({_budget(run)}, {run['threads']} thr.)")
        if panel != "loss":
            ax.axhline(0.1, color="black", lw=0.6, ls=":")
            ax.set_ylabel("test accuracy")
        else:
            ax.set_ylabel(f"meta-batch loss, last {LOSS_WINDOW} steps")
        ax.set_title({"mean": "mean over each run's architectures", "loss": "training loss"}.get(panel, panel),
                     fontsize=9)
        ax.set_xlabel("meta-training CPU-minutes")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    setup = results["setup"]
    fig.suptitle(f"Predicted-weight accuracy along meta-training: CIFAR-10, {setup['split']}, BN recalibrated on "
                 f"{setup['calibrate_bn_images']} train images", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict[str, Any], out: str, out_dir: Path = HERE / "results") -> str:
    """A RESULTS.md section: one row per (run, point)."""
    setup, runs = results["setup"], results["runs"]
    archs = list(dict.fromkeys(a for run in runs.values() for a in run["archs"]))
    m = setup["machine"]
    lines = [f"## Meta-training learning curves (`{out}`)", "",
             f"Predicted weights on CIFAR-10, {setup['split']}, BN recalibrated on {setup['calibrate_bn_images']} "
             "train images, eval mode. Compute: CPU and wall time of the training steps in one process (evaluation "
             "excluded); each lr schedule follows its config's max_steps, the budget only sets the points. Loss: "
             f"mean meta-batch training loss over the last {LOSS_WINDOW} steps. {m['processor']}, {m['cpus']} CPUs, "
             f"torch {m['torch']}, timm {m['timm']}.", "",
             "| run | point | step | CPU min | wall min | loss | " + " | ".join(archs) + " | **mean** |",
             "|---|---|---|---|---|---|" + "---|" * (len(archs) + 1)]
    for label, run in runs.items():
        for k, p in enumerate(run["curve"], 1):
            loss = "-" if p["loss"] is None else f"{p['loss']:.3f}"
            accs = [f"{100 * p['acc'][a]:.1f}%" if a in p["acc"] else "-" for a in archs]
            cells = [label, f"{k}/{run['points']}", str(p["step"]), f"{p['cpu_min']:.2f}", f"{p['wall_min']:.2f}",
                     loss, *accs, f"**{100 * p['mean']:.1f}%**"]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for label, run in runs.items():
        note = f"; {run['note']}" if run.get("note") else ""
        lines.append(f"- `{label}`: `{run['config']}`, seed {run['seed']}, {_budget(run)}, {run['threads']} torch "
                     f"thread(s), lr schedule over {run['lr_schedule_steps']} steps, commit "
                     f"{run['git_commit'][:12]}{note}")
    shown = out_dir.resolve().relative_to(REPO) if out_dir.resolve().is_relative_to(REPO) else out_dir
    lines += ["", f"`{setup['command']}` -> `{shown}/{out}.json`, `{out}.png`"]
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=Path, required=True, help="train_ghn YAML files")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="budget in CPU-minutes of training per config")
    budget.add_argument("--steps", type=_positive, help="budget in meta-training steps per config")
    parser.add_argument("--points", type=_positive, required=True, help="evaluations, equally spaced over the budget")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "vit_tiny"],
                        help="held-out timm architectures, 'vit_tiny' (img 32, patch 4) or 'ood' (the protocol's nine)")
    parser.add_argument("--seed", type=int, help="meta-training seed (default: each YAML's)")
    parser.add_argument("--threads", type=_positive, default=1, help="torch threads of the training process")
    parser.add_argument("--label-suffix", default="", help="runs are labelled (and foldered) <stem>-s<seed>-SUFFIX")
    parser.add_argument("--out", default="learning_curve", help="name of the JSON, PNG and RESULTS.md section")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "learning_curve", help="run folders")
    parser.add_argument("--test-per-class", type=_positive, default=200,
                        help="balanced test images per class, at most 200 (200: the protocol's 2,000)")
    parser.add_argument("--calibrate-bn", type=_positive, default=500, help="train images for BN recalibration")
    parser.add_argument("--results-md", action="store_true", help="write the table into benchmarks/RESULTS.md")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < args.points:
        parser.error(f"--steps {args.steps} has fewer steps than --points {args.points}")
    if args.test_per_class > 200:
        parser.error("--test-per-class: the balanced split holds 200 images per class")
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be positive")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    try:
        archs = resolve_archs(args.archs)
        planned = [plan_run(config, args, archs) for config in args.configs]
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    results_path = args.out_dir / f"{args.out}.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    previous = dict(results["runs"])
    results["setup"] = {
        "split": f"balanced test (first {args.test_per_class} per class, {10 * args.test_per_class:,})",
        "calibrate_bn_images": args.calibrate_bn, "machine": machine(), "git_commit": _git_commit(),
        "command": shlex.join(["python", "benchmarks/learning_curve.py", *argv]),
    }
    eval_setup = planned[0][1]["eval"]
    for label, run in previous.items():
        if run["eval"] != eval_setup:
            logger.warning("%s was evaluated with %s, this invocation with %s: its points are not comparable",
                           label, run["eval"], eval_setup)
    print(json.dumps({**results["setup"], "runs": [label for label, _ in planned]}, indent=2), flush=True)

    def save(label: str, record: dict[str, Any]) -> None:
        results["runs"][label] = record
        _write_json(results_path, results)

    for label, record in planned:
        save(label, learning_curve(label, record, archs, previous.get(label), functools.partial(save, label)))
    plot(results, args.out_dir / f"{args.out}.png")
    table = markdown(results, args.out, args.out_dir)
    print(table)
    if args.results_md:
        update_results(args.out, table)
    return results


if __name__ == "__main__":
    main()
