"""Cost of one meta-training step on the CPU, by phase and in operators: this tree against a baseline commit.

For each config and each code version (``--baseline REF``, checked out in a temporary git worktree,
and this working tree), a worker process with one torch thread builds the config's ``Trainer`` on
the CPU, prebuilds its pool (``--pool-size`` architectures per family), encodes every graph once
(as a long run has) and takes warm-up steps. Then, on the same seeded meta-batches for both versions:

- steps/s over ``--steps`` calls of ``Trainer.train_step``;
- operators per step, from ``torch.profiler`` over ``--profile-steps`` steps: all aten operators
  (nested calls included), top-level ones, and kernels (leaf operators that are not views or
  metadata: what a GPU would launch);
- a breakdown of a step into data, GHN node states (encoding, message passing), decoding, tiling,
  target forward (loss included), backward (GHN and targets) and optimizer, timed separately.

Versions alternate ``--repeats`` times (baseline, current, baseline, ...); medians are reported and
the speed-up is current over baseline. The config file is the same for both (taken from this tree),
so a setting the baseline ignores counts as this tree's gain: cifar10-cpu.yaml has ``amp: bf16``, which
the baseline ignored on the CPU; ``cifar10-cpu+none`` runs it without. Results of configs not rerun are
kept from the JSON when their baseline is the same commit.
Writes benchmarks/results/step_cost.{json,png} and the ``step_cost`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _report import HERE, machine, update_results

REPO = HERE.parent
#: names in train_ghn/configs; a suffix "+none" or "+bf16" overrides the config's ``amp``
CONFIGS = ["smoke", "cifar10-cpu+none", "cifar10-cpu"]
#: main before the step-cost work of issue 17 (grouped tiling, fused optimizer, CPU bf16)
BASELINE = "83d4b2b"
PHASES = ("data", "node_states", "decode", "tiling", "target_forward", "backward", "optimizer")
#: aten operators that only make views or read metadata: no kernel of their own
METADATA_OPS = frozenset(f"aten::{name}" for name in (
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "select", "slice", "narrow", "unsqueeze",
    "squeeze", "expand", "expand_as", "permute", "t", "transpose", "detach", "detach_", "alias", "unbind", "split",
    "split_with_sizes", "lift_fresh", "empty", "empty_strided", "resolve_conj", "resolve_neg", "view_as",
    "flatten", "unflatten", "contiguous", "to", "chunk", "numpy_T", "is_nonzero", "result_type", "size", "stride",
))


def _count_operators(profile) -> dict[str, int]:
    """All aten operators, top-level ones, and kernels: operators that are not views or metadata
    and call no such operator themselves (``linear`` calls ``mm``: one kernel)."""
    events = [e for e in profile.events() if e.name.startswith("aten::")]
    composite = set()
    for event in events:
        if event.name not in METADATA_OPS:
            parent = event.cpu_parent
            while parent is not None and id(parent) not in composite:
                composite.add(id(parent))
                parent = parent.cpu_parent
    top = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    kernels = [e for e in events if e.name not in METADATA_OPS and id(e) not in composite]
    return {"all": len(events), "top_level": len(top), "kernels": len(kernels)}


def worker(config_path: str, amp: str, pool_size: int, warmup: int, steps: int, profile_steps: int) -> dict:
    """Measure one code version (whatever ``train_ghn`` the import path holds) in this process."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from train_ghn.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    config = TrainConfig.from_yaml(config_path)
    config.amp = amp
    config.pool_size = min(config.pool_size, pool_size)
    config.eval_every, config.prebuild_workers = 0, 0
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out, device="cpu")
    trainer.prebuild(1)
    ghn = trainer.ghn
    with torch.no_grad():
        for _, graph in trainer._pool.values():
            ghn([graph])
    for _ in range(warmup):
        trainer.train_step()

    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    steps_per_s = steps / (time.perf_counter() - started)

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(profile_steps):
            trainer.train_step()
    operators = {k: round(v / profile_steps) for k, v in _count_operators(prof).items()}

    # node_states, decode and forward each redo the earlier stages: phases are their differences
    timed = dict.fromkeys(("data", "node_states", "decode_total", "forward_total", "target_forward", "backward",
                           "optimizer"), 0.0)
    for _ in range(steps):
        clock = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timed[phase] += now - clock
            clock = now

        draws = trainer.sampler.draw(config.meta_batch)
        x, y = trainer.batches.next()
        archs = [trainer.architecture(*draw) for draw in draws]
        graphs = [graph for _, graph in archs]
        lap("data")
        ghn.node_states(graphs)
        lap("node_states")
        ghn.decode(graphs)
        lap("decode_total")
        predicted = ghn(graphs)
        lap("forward_total")
        loss = sum(F.cross_entropy(trainer._logits(model, params, x), y, label_smoothing=config.label_smoothing)
                   for (model, _), params in zip(archs, predicted))
        lap("target_forward")
        loss.backward()
        lap("backward")
        torch.nn.utils.clip_grad_norm_(ghn.parameters(), config.grad_clip)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        lap("optimizer")
    phases = {"data": timed["data"], "node_states": timed["node_states"],
              "decode": timed["decode_total"] - timed["node_states"],
              "tiling": timed["forward_total"] - timed["decode_total"], "target_forward": timed["target_forward"],
              "backward": timed["backward"], "optimizer": timed["optimizer"]}
    return {"steps_per_s": round(steps_per_s, 4), "operators": operators,
            "phases_s": {k: round(v / steps, 4) for k, v in phases.items()}}


def _run_worker(root: Path, config: Path, amp: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "GHN_INIT_DATA": str(Path(os.environ.get("GHN_INIT_DATA", REPO.parent / "shared" / "data")).resolve())}
    command = [sys.executable, __file__, "--worker", str(config), "--amp", amp, "--pool-size", str(args.pool_size),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--profile-steps", str(args.profile_steps)]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"step_cost worker on {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _config_amp(config: Path) -> str:
    """The config's own ``amp`` setting."""
    return (yaml.safe_load(config.read_text()) or {}).get("amp", "none")


def _median_row(runs: list[dict]) -> dict:
    return {"steps_per_s": statistics.median(r["steps_per_s"] for r in runs),
            "operators": {k: statistics.median(r["operators"][k] for r in runs) for k in runs[0]["operators"]},
            "phases_s": {k: statistics.median(r["phases_s"][k] for r in runs) for k in PHASES},
            "runs": runs}


def measure(args: argparse.Namespace) -> dict:
    """Both versions on every config, alternating; returns the results by config and version."""
    commit = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="step_cost_") as tmp:
        baseline_root = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline_root), commit], cwd=REPO,
                       capture_output=True, check=True)
        try:
            for name in args.configs:
                stem, _, variant = name.partition("+")
                config = REPO / "train_ghn" / "configs" / f"{stem}.yaml"
                amp = variant or _config_amp(config)
                runs: dict[str, list[dict]] = {"baseline": [], "current": []}
                for _ in range(args.repeats):
                    for version, root in (("baseline", baseline_root), ("current", REPO)):
                        runs[version].append(_run_worker(root, config, amp, args))
                        print(name, version, json.dumps(runs[version][-1]), flush=True)
                rows = {version: _median_row(r) for version, r in runs.items()}
                rows["speedup"] = statistics.median(c["steps_per_s"] / b["steps_per_s"]
                                                    for b, c in zip(runs["baseline"], runs["current"]))
                rows["fewer_operators"] = {k: rows["baseline"]["operators"][k] / rows["current"]["operators"][k]
                                           for k in rows["current"]["operators"]}
                results[name] = rows
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline_root)], cwd=REPO, capture_output=True)
    return {"baseline": commit, "results": results}


def markdown(setup: dict, measured: dict) -> str:
    m = setup["machine"]
    lines = [f"{m['processor']}, {m['cpus']} CPUs, torch {m['torch']}, one process x one thread; baseline: commit "
             f"`{measured['baseline']}`, current: this tree; pools of at most {setup['pool_size']} architectures per "
             f"family prebuilt and encoded, {setup['warmup']} warm-up steps, {setup['steps']} timed steps, "
             f"{setup['profile_steps']} profiled steps, the same meta-batches for both; median of "
             f"{setup['repeats']} alternating runs.", "",
             "| config | version | steps/s | aten operators / step | top-level | kernels | "
             + " | ".join(f"{p} (ms)" for p in PHASES) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(PHASES)]
    for name, rows in measured["results"].items():
        for version in ("baseline", "current"):
            r = rows[version]
            ops = r["operators"]
            lines.append(f"| {name} | {version} | {r['steps_per_s']:.3f} | {ops['all']:,.0f} | "
                         f"{ops['top_level']:,.0f} | "
                         f"{ops['kernels']:,.0f} | " + " | ".join(f"{1000 * r['phases_s'][p]:.0f}" for p in PHASES)
                         + " |")
        fewer = rows["fewer_operators"]
        lines.append(f"| {name} | **current / baseline** | **{rows['speedup']:.2f}x** | "
                     f"**{fewer['all']:.2f}x fewer** | "
                     f"{fewer['top_level']:.2f}x fewer | {fewer['kernels']:.2f}x fewer |" + " |" * len(PHASES))
    lines += ["", "Phases are timed apart from the trainer's step (node states, decoding and tiling as differences of "
              "nested calls); target forward includes the loss, without the norm penalty.", "",
              f"`python benchmarks/step_cost.py --baseline {measured['baseline']}` -> "
              "`benchmarks/results/step_cost.json`, `.png`"]
    return "## Cost of a meta-training step (CPU)\n\n" + "\n".join(lines)


def _plot(measured: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(measured["results"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for n, name in enumerate(names):
        for v, version in enumerate(("baseline", "current")):
            bottom = 0.0
            for p, phase in enumerate(PHASES):
                value = measured["results"][name][version]["phases_s"][phase]
                axes[0].bar(n + (v - 0.5) * 0.4, value, 0.38, bottom=bottom, color=f"C{p}",
                            label=phase if n == 0 and v == 0 else None, hatch="//" if version == "baseline" else None)
                bottom += value
    axes[0].set_xticks(range(len(names)), [f"{n}\n(hatched: baseline)" for n in names])
    axes[0].set_ylabel("seconds per step (one thread)")
    axes[0].legend(fontsize=7)
    kinds = ("all", "top_level", "kernels")
    for n, name in enumerate(names):
        for v, version in enumerate(("baseline", "current")):
            ops = measured["results"][name][version]["operators"]
            axes[1].bar([n * 4 + k + (v - 0.5) * 0.4 for k in range(3)], [ops[k] for k in kinds], 0.38,
                        color="grey" if version == "baseline" else "C0", label=version if n == 0 else None)
    axes[1].set_xticks([n * 4 + k for n in range(len(names)) for k in range(3)],
                       [f"{name}\n{k}" for name in names for k in kinds], fontsize=7)
    axes[1].set_ylabel("aten operators per step")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=CONFIGS, help="names in train_ghn/configs")
    parser.add_argument("--baseline", default=BASELINE, help="git commit to compare against")
    parser.add_argument("--pool-size", type=int, default=20, help="cap on architectures per family")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (and steps of the phase breakdown)")
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each version")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for step_cost.json/.png")
    parser.add_argument("--no-results-md", action="store_true", help="leave benchmarks/RESULTS.md alone")
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--amp", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.amp, args.pool_size, args.warmup, args.steps, args.profile_steps)))
        return
    setup = {k: getattr(args, k) for k in ("configs", "pool_size", "warmup", "steps", "profile_steps", "repeats")}
    setup["machine"] = machine()
    print(json.dumps(setup, indent=2))
    measured = measure(args)
    path = args.out / "step_cost.json"
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier.get("baseline") == measured["baseline"]:
            measured["results"] = {**{k: v for k, v in earlier["results"].items() if k not in measured["results"]},
                                   **measured["results"]}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"setup": setup, **measured}, indent=2) + "\n")
    _plot(measured, args.out / "step_cost.png")
    table = markdown(setup, measured)
    print(table)
    if not args.no_results_md:
        update_results("step_cost", table)


if __name__ == "__main__":
    main()
