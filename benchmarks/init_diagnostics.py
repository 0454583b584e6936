"""Why the GHN init falls behind timm's default init after about one CIFAR-10 epoch: both inits measured
layer by layer while they train (issue 18).

For each architecture (``--archs``, built for 32x32 inputs and 10 classes by benchmarks/finetune.py, whose
model building, data and job processes this reuses) and each init (``ghn``: the GHN's prediction;
``default``: timm's init from the same seed), one run of the finetune benchmark's training (the SGD recipe,
batches and flips of examples/finetune.py, so the final accuracy is the benchmark's) for ``--steps`` steps,
measured at ``--record-at``. Per conv/linear weight and per norm-layer affine weight:

* Frobenius norm, RMS, drift ||W_t - W_0|| and relative drift ||W_t - W_0|| / ||W_0||;
* gradient norm, of the mean loss over ``--probe-batches`` fixed batches (the first training images, no
  flips, train mode): the same images at every step and for every init;
* weights, as out x (in * kh * kw) matrices: effective rank (exp of the entropy of the normalized singular
  values) as a fraction of min(out, in * kh * kw), sigma_max / sigma_median, and the copy cosine: the
  cosine between the weight and itself shifted by one GHN tile (the GHN's ``block`` channels of spatial
  kernels, ``block_1x1`` of 1x1 and linear weights) where it is wider than a tile. Tiled copies have 1, the
  GHN's prediction about 1 / (1 + untie_noise^2), a random init about 0: how far training unties the copies;
* norm affines: their mean;

and per model the probe loss (the train loss), test accuracy (eval mode, as the benchmark tests) and mean
norm-affine weight. Weights that end residual branches, which the GHN scales by ``residual_branch_gain``,
are flagged and summarized apart. The GHN init is also measured at step 0 as predicted with untie noise 0.
Measuring costs time only at the recorded steps, between optimizer steps, and puts back the norm
statistics and random state it touches: training is the same as unmeasured.

``--lr-sweep`` and ``--wd-sweep`` add runs that report only the final test accuracy, of both inits at each
peak learning rate or weight decay, the rest of the recipe at its defaults; the recipe's own value is in
every sweep, as the measured run:

    python benchmarks/init_diagnostics.py --lr-sweep 0.02 0.05 0.1 0.2 --wd-sweep 5e-5 5e-4 5e-3 --workers 2

Writes benchmarks/results/init_diagnostics.json after every finished job (each job is one run; every job
uses one torch thread, ``--workers`` run at once in their own processes), then init_diagnostics.png: per
architecture, median relative drift, gradient norm and effective-rank fraction over the conv/linear
weights and test accuracy against the step for both inits, and the sweeps. ``--results-md`` also puts the
tables into RESULTS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import statistics
import time
from pathlib import Path
from typing import Any

import finetune
import torch
import torch.nn.functional as F
from _report import HERE, describe_ghn, update_results
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import ghn_init
from ghn_init.graph import build_graph
from train_ghn.data import normalize
from train_ghn.evaluate import accuracy
from train_ghn.sgd import SGDRecipe

#: Where the GHN init is ahead at 200 steps and behind at 1,000 (benchmarks/finetune.py).
ARCHITECTURES = ("resnet18", "rexnet_100", "regnety_004")
INITS = finetune.INITS
#: The GHN init predicted without untie noise: measured at step 0 only.
NOISELESS = "ghn_untie_noise_0"
KINDS = ("stem", "depthwise", "pointwise", "conv", "linear", "norm")
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
#: Sweepable ``SGDRecipe`` fields and their command-line flags.
SWEEPS = {"lr": "--lr-sweep", "weight_decay": "--wd-sweep"}
RESULTS = HERE / "results"

Job = tuple[str, str, str | None, float | None]  # architecture, init, swept recipe field or None, its value


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every job of an invocation shares."""

    steps: int
    record_at: tuple[int, ...]
    seed: int
    ghn: str | None
    probe_batches: int
    #: GHN tile widths for spatial kernels and for 1x1/linear weights; None when the GHN does not tile.
    tile: tuple[int, int] | None
    branch_gain: float


def effective_rank(matrix: torch.Tensor) -> float:
    """exp of the entropy of the singular values normalized to sum 1 (Roy & Vetterli, 2007): how many
    directions carry the matrix, from 1 to min(rows, cols); 0 for a zero matrix."""
    return _effective_rank(torch.linalg.svdvals(matrix.double()))


def _effective_rank(sigma: torch.Tensor) -> float:
    total = sigma.sum()
    if total == 0:
        return 0.0
    p = sigma / total
    return math.exp(-float(torch.special.xlogy(p, p).sum()))


def copy_cosine(weight: torch.Tensor, period: int) -> float | None:
    """Mean cosine between ``weight`` and itself shifted by ``period`` output units, and by ``period`` input
    channels, over the dims longer than that; None where neither is. 1 when copies of a tile repeat exactly."""
    cosines = [F.cosine_similarity(weight.narrow(dim, period, size - period).flatten(),
                                   weight.narrow(dim, 0, size - period).flatten(), dim=0)
               for dim, size in enumerate(weight.shape[:2]) if size > period]
    return float(torch.stack(cosines).mean()) if cosines else None


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """Parameter name -> kind (``KINDS``) of every conv/linear weight and norm affine weight; the stem is the
    first conv."""
    kinds: dict[str, str] = {}
    for prefix, module in model.named_modules():
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        if isinstance(module, nn.Conv2d):
            if "stem" not in kinds.values():
                kind = "stem"
            elif module.groups > 1 and module.groups == module.in_channels:
                kind = "depthwise"
            else:
                kind = "pointwise" if module.kernel_size == (1, 1) else "conv"
        elif isinstance(module, nn.Linear):
            kind = "linear"
        elif isinstance(module, NORMS):
            kind = "norm"
        else:
            continue
        kinds[f"{prefix}.weight" if prefix else "weight"] = kind
    return kinds


def residual_branch_ends(model: nn.Module, gain: float) -> set[str]:
    """Weights the GHN scales by ``residual_branch_gain``, decided as the GHN decides: residual branch ends,
    unless the gain is 1 or the output is read from a learned token."""
    if gain == 1.0:
        return set()
    graph = build_graph(model, (3, 32, 32))
    if graph.reads_learned_token():
        return set()
    return {name for node in graph.residual_branch_ends() for name, _, role in graph.nodes[node].params
            if role == "weight"}


def tensor_stats(weight: torch.Tensor, initial: torch.Tensor, grad: torch.Tensor, kind: str,
                 tile: tuple[int, int] | None) -> dict[str, float | None]:
    """The statistics of one tensor at one step; ``initial`` is its value at step 0."""
    weight = weight.detach().float()
    norm, start, drift = float(weight.norm()), float(initial.norm()), float((weight - initial).norm())
    stats = {"norm": norm, "rms": norm / math.sqrt(weight.numel()), "drift": drift,
             "rel_drift": drift / start if start else None, "grad_norm": float(grad.norm())}
    if kind == "norm":
        return {**stats, "mean": float(weight.mean())}
    sigma = torch.linalg.svdvals(weight.reshape(len(weight), -1).double())
    median = float(sigma.quantile(0.5))
    spatial = weight.dim() == 4 and weight.shape[2:] != (1, 1)
    return {**stats, "erank_fraction": _effective_rank(sigma) / len(sigma),
            "sigma_ratio": float(sigma[0]) / median if median else None,
            "copy_cosine": copy_cosine(weight, tile[0] if spatial else tile[1]) if tile else None}


class Recorder:
    """Measures a model at chosen steps against its weights at construction (step 0)."""

    def __init__(self, model: nn.Module, plan: Plan, branch_ends: set[str]) -> None:
        (train_images, train_labels), (test_images, test_labels) = finetune.job_state["data"]
        params = dict(model.named_parameters())
        kinds = {name: kind for name, kind in layer_kinds(model).items() if name in params}
        self.model, self.tile = model, plan.tile
        self.params = {name: params[name] for name in kinds}
        self.initial = {name: p.detach().float().clone() for name, p in self.params.items()}
        size = SGDRecipe.batch_size
        self.probe = [(normalize(train_images[i:i + size]), train_labels[i:i + size])
                      for i in range(0, plan.probe_batches * size, size)]
        self.test = normalize(test_images), test_labels
        self.layers = {name: {"kind": kind, "shape": list(params[name].shape), "branch_end": name in branch_ends,
                              "steps": {}} for name, kind in kinds.items()}
        self.steps: dict[str, dict[str, float | None]] = {}
        self.seconds = 0.0

    def record(self, step: int) -> None:
        started = time.perf_counter()
        loss, grads = self._probe()
        for (name, layer), grad in zip(self.layers.items(), grads):
            layer["steps"][str(step)] = tensor_stats(self.params[name], self.initial[name], grad, layer["kind"],
                                                     self.tile)
        norms = [p.detach().flatten() for name, p in self.params.items() if self.layers[name]["kind"] == "norm"]
        was_training = self.model.training
        self.steps[str(step)] = {"train_loss": loss, "test_accuracy": accuracy(self.model, *self.test, batch_size=250),
                                 "norm_weight_mean": float(torch.cat(norms).mean()) if norms else None}
        self.model.train(was_training)
        self.seconds += time.perf_counter() - started

    def _probe(self) -> tuple[float, list[torch.Tensor]]:
        """Mean loss over the probe batches in train mode and its gradient per tracked tensor. The norm
        statistics and random state are put back and ``.grad`` is left alone: training goes on unchanged."""
        buffers = {name: buffer.clone() for name, buffer in self.model.named_buffers()}
        params = list(self.params.values())
        grads = [torch.zeros_like(p) for p in params]
        total = 0.0
        was_training = self.model.training
        self.model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for x, y in self.probe:
                loss = F.cross_entropy(self.model(x), y) / len(self.probe)
                for sum_, grad in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                    if grad is not None:
                        sum_ += grad
                total += float(loss.detach())
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                buffer.copy_(buffers[name])
        self.model.train(was_training)
        return total, grads

    def result(self) -> dict[str, Any]:
        return {"steps": self.steps, "layers": self.layers, "measure_s": round(self.seconds, 1)}


def train_and_record(model: nn.Module, plan: Plan, recipe: SGDRecipe, branch_ends: set[str]) -> dict[str, Any]:
    """Fine-tune ``model`` in place as the finetune benchmark does, measured at ``plan.record_at``.

    The measurements run in an optimizer step hook, so the training loop is the benchmark's own.
    """
    example, (train, test), accelerator = (finetune.job_state[key] for key in ("example", "data", "accelerator"))
    recorder = Recorder(model, plan, branch_ends)
    if 0 in plan.record_at:
        recorder.record(0)
    anchor = next(iter(recorder.params.values()))
    done = 0

    def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        nonlocal done
        if any(p is anchor for group in optimizer.param_groups for p in group["params"]):
            done += 1
            if done in plan.record_at:
                recorder.record(done)

    handle = register_optimizer_step_post_hook(after_step)
    try:
        run = example.finetune(model, train, test, accelerator, steps=plan.steps, recipe=recipe, progress=False)
    finally:
        handle.remove()
    accelerator.free_memory()
    return {"accuracy": run["accuracy"], "train_s": run["train_s"], "loss_curve": run["loss_curve"],
            **recorder.result()}


def _build(name: str, init: str, plan: Plan) -> nn.Module:
    """``init``'s model as the finetune benchmark builds it, from the same seed."""
    torch.manual_seed(plan.seed)
    kwargs = finetune.KWARGS[name]
    if init != NOISELESS:
        return finetune.job_state["example"].build_model(name, init, plan.ghn, **kwargs)
    ghn = ghn_init.load(plan.ghn)
    ghn.config = dataclasses.replace(ghn.config, untie_noise=0.0)
    return ghn_init.create_model(name, ghn=ghn, num_classes=10, **kwargs)


def _run_job(job: Job, plan: Plan) -> dict[str, Any]:
    """One job in a worker: a measured run, the untie-noise-0 init at step 0, or a sweep run's accuracy."""
    name, init, field, value = job
    model = _build(name, init, plan)
    recipe = SGDRecipe(seed=plan.seed)
    if field is not None:
        example, (train, test), accelerator = (finetune.job_state[key] for key in ("example", "data", "accelerator"))
        run = example.finetune(model, train, test, accelerator, steps=plan.steps,
                               recipe=dataclasses.replace(recipe, **{field: value}), progress=False)
        accelerator.free_memory()
        return {"accuracy": run["accuracy"], "train_s": run["train_s"]}
    ends = residual_branch_ends(model, plan.branch_gain)
    if init == NOISELESS:
        recorder = Recorder(model, plan, ends)
        recorder.record(0)
        return recorder.result()
    return train_and_record(model, plan, recipe, ends)


def _jobs(archs: list[str], sweeps: dict[str, list[float]]) -> list[Job]:
    """Measured runs first, smallest architecture first, then the sweep runs the measured ones do not cover."""
    default = SGDRecipe()
    order = {name: finetune.params_millions(name) for name in archs}
    archs = sorted(archs, key=order.__getitem__)
    jobs: list[Job] = [(name, init, None, None) for name in archs for init in (*INITS, NOISELESS)]
    jobs += [(name, init, field, value) for field, values in sweeps.items() for value in values
             if value != getattr(default, field) for name in archs for init in INITS]
    return jobs


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarize(layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Medians over layers of every statistic at every step: over all conv/linear weights (``weights``), per
    kind, and over the residual branch ends where there are any."""
    members = list(layers.values())
    groups = {"weights": [m for m in members if m["kind"] != "norm"],
              **{kind: [m for m in members if m["kind"] == kind] for kind in KINDS},
              "branch_end": [m for m in members if m["branch_end"]]}
    return {group: {step: {"layers": len(found), **{stat: _median([m["steps"][step][stat] for m in found])
                                                    for stat in stats}}
                    for step, stats in found[0]["steps"].items()}
            for group, found in groups.items() if found}


def _result(setup: dict[str, Any], runs: dict[Job, dict[str, Any]], invocation: dict[str, Any]) -> dict[str, Any]:
    """Per architecture: each init's measured run with its summary, and the sweeps' final accuracies."""
    default = SGDRecipe()
    rows: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(job[0] for job in runs):
        measured = {init: {**run, "summary": summarize(run["layers"])} for (arch, init, field, _), run in runs.items()
                    if arch == name and field is None}
        row: dict[str, Any] = {"kwargs": finetune.KWARGS[name], "params_m": finetune.params_millions(name),
                               "runs": measured}
        for field in SWEEPS:
            row[f"{field}_sweep"] = {
                f"{value:g}": {init: run["accuracy"] for init in INITS if (run := (
                    measured.get(init) if value == getattr(default, field) else runs.get((name, init, field, value))))}
                for value in setup[f"{field}_sweep"]}
        rows[name] = row
    return {"setup": setup, "architectures": rows, "invocation": invocation}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=finetune.ARCHITECTURES)
    parser.add_argument("--ghn", help="GHN reference (default: the embedded GHN)")
    parser.add_argument("--steps", type=int, default=1000, help="SGD steps of every run (the schedule spans them)")
    parser.add_argument("--record-at", type=int, nargs="+", default=[0, 50, 200, 1000], help="steps measured at")
    parser.add_argument("--seed", type=int, default=SGDRecipe.seed, help="init, batches and flips")
    parser.add_argument("--lr-sweep", type=float, nargs="*", default=[], help="peak learning rates to compare")
    parser.add_argument("--wd-sweep", type=float, nargs="*", default=[], help="weight decays to compare")
    parser.add_argument("--probe-batches", type=int, default=4, help="fixed training batches for loss and gradients")
    parser.add_argument("--test-per-class", type=int, default=200, help="200: balanced 2,000; 1000: full test split")
    parser.add_argument("--workers", type=int, default=1, help="jobs run at once, each in its own process")
    parser.add_argument("--out", default="init_diagnostics", help="stem of the files under benchmarks/results/")
    parser.add_argument("--results-md", action="store_true", help="also write the tables into RESULTS.md")
    args = parser.parse_args(argv)
    record_at = tuple(sorted(set(args.record_at)))
    if record_at[0] < 0 or record_at[-1] > args.steps:
        parser.error(f"--record-at must lie in 0..{args.steps} (--steps)")
    torch.set_num_threads(1)
    ghn = ghn_init.load(args.ghn)
    config = ghn.config
    tile = (config.block, config.block_1x1) if getattr(config, "decoder", None) == "tiling" else None
    plan = Plan(args.steps, record_at, args.seed, args.ghn, args.probe_batches, tile, config.residual_branch_gain)
    sweeps = {field: sorted({*values, getattr(SGDRecipe, field)}) if values else []
              for field, values in (("lr", args.lr_sweep), ("weight_decay", args.wd_sweep))}
    setup = {**finetune.setup_of(ghn, SGDRecipe.lr, args.test_per_class), "seed": args.seed, "steps": args.steps,
             "record_at": list(record_at), "probe": f"first {args.probe_batches * SGDRecipe.batch_size} train images, "
             "no flips, train mode", "tile": list(tile) if tile else None,
             **{f"{field}_sweep": values for field, values in sweeps.items()}}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.out}.json"
    jobs = _jobs(args.archs, sweeps)
    print(f"{len(jobs)} jobs", flush=True)
    runs: dict[Job, dict[str, Any]] = {}
    invocation = {"command": _command(setup, args.archs, args.out), "jobs": 0, "workers": args.workers, "wall_s": 0.0}
    started = time.perf_counter()

    def finished(job: Job, run: dict[str, Any]) -> None:
        runs[job] = run
        invocation.update(jobs=invocation["jobs"] + 1, wall_s=round(time.perf_counter() - started, 1))
        finetune.write_atomically(path, _result(setup, runs, invocation))
        name, init, field, value = job
        what = f"{field} {value:g}" if field else "measured" if init != NOISELESS else "step 0"
        score = f"{run['accuracy']:.2%}" if "accuracy" in run else f"{run['steps']['0']['test_accuracy']:.2%} at step 0"
        print(f"{name} {init} {what}: {score} ({invocation['wall_s']:.0f} s elapsed, {invocation['jobs']}/{len(jobs)})",
              flush=True)

    if args.workers > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, context, finetune.start_job_process,
                                                    (args.test_per_class, 1, os.getpid())) as pool:
            futures = {pool.submit(_run_job, job, plan): job for job in jobs}
            for future in concurrent.futures.as_completed(futures):
                finished(futures[future], future.result())
    else:
        finetune.start_job_process(args.test_per_class, 1)
        for job in jobs:
            finished(job, _run_job(job, plan))
    result = _result(setup, runs, invocation)
    finetune.write_atomically(path, result)
    _plot(result, RESULTS / f"{args.out}.png")
    tables = _tables(result)
    print(tables)
    if args.results_md:
        update_results("init_diagnostics", "## GHN init against default init while training, CIFAR-10\n\n" + tables)


def _command(setup: dict[str, Any], archs: list[str], stem: str) -> str:
    words = ["--archs", *archs, "--steps", str(setup["steps"]), "--record-at", *map(str, setup["record_at"])]
    words += [] if setup["seed"] == SGDRecipe.seed else ["--seed", str(setup["seed"])]
    for field, flag in SWEEPS.items():
        words += [flag, *(f"{v:g}" for v in setup[f"{field}_sweep"])] if setup[f"{field}_sweep"] else []
    words += [] if stem == "init_diagnostics" else ["--out", stem]
    return f"python benchmarks/init_diagnostics.py {' '.join(words)}"


def _g(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _change(group: dict[str, dict[str, Any]], stat: str, first: str, last: str) -> str:
    return f"{_g(group[first][stat])} → {_g(group[last][stat])}"


def _tables(result: dict[str, Any]) -> str:
    """Trajectories (medians over conv/linear weights), the same per layer kind, and the sweeps."""
    setup, rows = result["setup"], result["architectures"]
    recipe, host = setup["recipe"], setup["machine"]
    first, last = str(setup["record_at"][0]), str(setup["record_at"][-1])
    lines = [f"{describe_ghn(setup)}; {setup['steps']:,} steps of {recipe['optimizer']}, momentum "
             f"{recipe['momentum']}, weight decay {recipe['weight_decay']}, one-cycle lr peaking at {recipe['lr']}, "
             f"batch {recipe['batch_size']}, flips, seed {setup['seed']} (the finetune benchmark's runs); "
             f"{setup['split']}, eval mode; train loss and gradients on the {setup['probe']}; "
             f"{host['processor']}, torch threads {host['torch_threads']}, torch {host['torch']}, timm {host['timm']}. "
             "Medians over the conv/linear weights: RMS, relative drift ||W_t - W_0|| / ||W_0||, gradient norm, "
             "effective rank / min(out, in·kh·kw), σmax/σmedian, and the copy cosine (weight against itself shifted "
             "by one GHN tile, over the weights wider than a tile: 1 = exact tile copies, about 0 = untied); the "
             "mean of all norm-layer weights.", "",
             "| architecture | init | step | test acc | train loss | RMS | rel. drift | grad norm | eff. rank | "
             "σmax/σmed | copy cos | norm weight mean |", "|---|---|---|" + "---|" * 9]
    for name, row in rows.items():
        for init, run in sorted(row["runs"].items(), key=lambda item: (INITS + (NOISELESS,)).index(item[0])):
            label = "ghn, untie noise 0" if init == NOISELESS else init
            for step, model in run["steps"].items():
                weights = run["summary"]["weights"][step]
                lines.append(f"| {name} | {label} | {int(step):,} | {_pct(model['test_accuracy'])} | "
                             f"{model['train_loss']:.3f} | " + " | ".join(_g(weights[stat]) for stat in (
                                 "rms", "rel_drift", "grad_norm", "erank_fraction", "sigma_ratio", "copy_cosine"))
                             + f" | {_g(model['norm_weight_mean'])} |")
    lines += ["", f"Per layer kind, medians at step {first} → {last} (the stem is the first conv; residual branch "
              "ends are the weights the GHN scales by its gain; norm rows: the mean of the weight instead of the "
              "rank):", "",
              "| architecture | layers (n) | init | RMS | rel. drift | grad norm | eff. rank | σmax/σmed | copy cos | "
              "eff. rank at 0, untie noise 0 |", "|---|---|---|" + "---|" * 7]
    for name, row in rows.items():
        runs = row["runs"]
        for group in (*KINDS, "branch_end"):
            for init in INITS:
                summary = runs.get(init, {}).get("summary", {}).get(group)
                if summary is None:
                    continue
                count = summary[first]["layers"]
                rank = ("mean",) if group == "norm" else ("erank_fraction", "sigma_ratio", "copy_cosine")
                cells = [_change(summary, stat, first, last) for stat in ("rms", "rel_drift", "grad_norm", *rank)]
                cells += ["—"] * (7 - len(cells))
                quiet = runs.get(NOISELESS, {}).get("summary", {}).get(group, {}).get("0", {}).get("erank_fraction")
                cells[-1] = _g(quiet) if init == "ghn" else "—"
                lines.append(f"| {name} | {group.replace('_', ' ')} ({count}) | {init} | " + " | ".join(cells) + " |")
    sweeps = [field for field in SWEEPS if setup[f"{field}_sweep"]]
    if sweeps:
        lines += ["", "Test accuracy after the same steps, one setting changed (the recipe's own value is the "
                  "measured run):", "", "| architecture | setting | ghn init | default init | ghn - default (points) |",
                  "|---|---|---|---|---|"]
        for name, row in rows.items():
            for field in sweeps:
                for value, cell in row[f"{field}_sweep"].items():
                    ghn, default = cell.get("ghn"), cell.get("default")
                    diff = "—" if ghn is None or default is None else f"{100 * (ghn - default):+.1f}"
                    own = " (recipe)" if float(value) == recipe[field] else ""
                    label = f"{field.replace('_', ' ')} {value}{own}"
                    lines.append(f"| {name} | {label} | {_pct(ghn)} | {_pct(default)} | {diff} |")
    invocation = result["invocation"]
    return "\n".join(lines + ["", f"Wall time {finetune.hours(invocation['wall_s'])} for {invocation['jobs']} jobs, "
                                  f"{invocation['workers']} at once.", "", f"`{invocation['command']}`"])


def _plot(result: dict[str, Any], path: Path) -> None:
    """Per architecture: medians over conv/linear weights and test accuracy against the step for both inits
    (the untie-noise-0 init at step 0 as a cross), then accuracy against each swept setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup, rows = result["setup"], result["architectures"]
    panels = [("rel_drift", "median relative drift"), ("grad_norm", "median gradient norm"),
              ("erank_fraction", "median effective-rank fraction"), ("test_accuracy", "test accuracy")]
    sweeps = [field for field in SWEEPS if setup[f"{field}_sweep"]]
    cols = len(panels) + len(sweeps)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.2 * cols, 2.8 * len(rows)), squeeze=False)
    steps = setup["record_at"]
    for r, (name, row) in enumerate(rows.items()):
        for init, style in zip((*INITS, NOISELESS), ("o-C0", "o-C1", "xC0")):
            run = row["runs"].get(init)
            if run is None:
                continue
            xs = [int(step) for step in run["steps"]]
            for ax, (stat, _) in zip(axes[r], panels):
                ys = [run["steps"][str(x)][stat] if stat == "test_accuracy" else run["summary"]["weights"][str(x)][stat]
                      for x in xs]
                label = "ghn, untie noise 0" if init == NOISELESS else f"{init} init"
                ax.plot(xs, [math.nan if y is None else y for y in ys], style, ms=4, label=label)
        for ax, (_, title) in zip(axes[r], panels):
            ax.set_title(f"{name}: {title}", fontsize=8)
            ax.set_xscale("symlog", linthresh=max(1, min((s for s in steps if s), default=1)))
            ax.set_xticks(steps, [f"{s:,}" for s in steps])
            ax.set_xlabel("SGD step", fontsize=7)
        for ax, field in zip(axes[r, len(panels):], sweeps):
            cells = row[f"{field}_sweep"]
            xs = sorted(cells, key=float)
            for init, color in zip(INITS, ("C0", "C1")):
                ax.plot([float(x) for x in xs], [cells[x].get(init, math.nan) for x in xs], "o-", color=color,
                        ms=4, label=f"{init} init")
            ax.axvline(setup["recipe"][field], color="gray", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_xticks([float(x) for x in xs], xs)
            ax.minorticks_off()
            ax.set_title(f"{name}: accuracy after {setup['steps']:,} steps", fontsize=8)
            ax.set_xlabel(f"peak {field.replace('_', ' ')}" if field == "lr" else field.replace("_", " "), fontsize=7)
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{setup['ghn']} init against timm's default init while training on CIFAR-10 "
                 f"({setup['split']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
