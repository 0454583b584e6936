"""DESIGN.md's evaluation protocol: predicted weights against timm's default init and SGD from both.

For the OOD timm architectures (train_ghn.evaluate.OOD_ARCHITECTURES) and the DeepNets-1M ``id``
nets (ID_SEEDS): accuracy of the predicted weights (BN recalibrated / batch statistics), of the
default init, and after k SGD steps from each init (same seed and batches). Writes
benchmarks/results/ghn_eval[_full].{json,png} and a section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from _report import HERE, describe_ghn, machine, update_results

from train_ghn.evaluate import (
    SGD_STEPS,
    id_architectures,
    ood_architectures,
    plot_sgd,
    run_protocol,
)
from train_ghn.sgd import SGDRecipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", choices=("ood", "id", "both"), default="both")
    parser.add_argument("--sgd-steps", default=",".join(map(str, SGD_STEPS)), help="comma-separated SGD budgets")
    parser.add_argument("--ghn", help="GHN reference (default: the embedded GHN)")
    parser.add_argument("--full", action="store_true", help="all 10,000 test images (default: balanced 2,000)")
    parser.add_argument("--calibrate-bn", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    steps = tuple(int(s) for s in args.sgd_steps.split(",") if s)
    archs = (ood_architectures() if args.split in ("ood", "both") else []) + \
        (id_architectures() if args.split in ("id", "both") else [])
    print(json.dumps({"split": args.split, "sgd_steps": steps, "full": args.full, "machine": machine()}, indent=2))
    result = run_protocol(archs, args.ghn, args.full, args.calibrate_bn, steps, SGDRecipe(seed=args.seed),
                          device=torch.device(args.device))
    result["setup"]["machine"] = machine()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem = "ghn_eval" + ("_full" if args.full else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_sgd(result, out / f"{stem}.png")
    command = f"python benchmarks/ghn_eval.py --split {args.split} --sgd-steps {args.sgd_steps}" + \
        (" --full" if args.full else "")
    update_results(stem, _markdown(result, command, stem))


def _markdown(result: dict, command: str, stem: str) -> str:
    setup, steps = result["setup"], result["setup"]["sgd_steps"]
    m = setup["machine"]
    lines = [f"## GHN init against default init and SGD, CIFAR-10, {setup['split']}", "",
             f"{describe_ghn(setup)}, {setup['ghn_training_steps']} training steps; "
             f"BN recalibrated on {setup['calibrate_bn_images']} train images; SGD: batch "
             f"{setup['sgd']['batch_size']}, Nesterov, lr {setup['sgd']['lr']} one-cycle over the k steps, "
             f"weight decay {setup['sgd']['weight_decay']}, flips, seed {setup['sgd']['seed']}, "
             f"{setup.get('sgd_train_images', 0):,} train images; evaluated in eval mode. "
             f"{m['processor']}, {m['cpus']} CPUs, {m['torch_threads']} torch threads, torch {m['torch']}, "
             f"timm {m['timm']}.", "",
             "Cells: accuracy; `a / b` is SGD from the default init / from the GHN init.", ""]
    header = ["architecture", "params (M)", "GHN, BN recal.", "GHN, batch stats", "default init"]
    header += [f"SGD {k}" for k in steps]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, summary in result["summary"].items():
        for name, row in result["architectures"].items():
            if row["group"] != group:
                continue
            cells = [f"{name} ({group})", f"{row['params'] / 1e6:.2f}", f"{row['ghn']['acc_bn_calibrated']:.1%}",
                     f"{row['ghn']['acc_batch_stats']:.1%}", f"{row['default_init']['acc_bn_calibrated']:.1%}"]
            cells += [f"{row['sgd'][str(k)]['default_init']['acc']:.1%} / {row['sgd'][str(k)]['ghn']['acc']:.1%}"
                      for k in steps]
            lines.append("| " + " | ".join(cells) + " |")
        cells = [f"**mean {group}** ({summary['architectures']})", "", f"**{summary['ghn_acc_bn_calibrated']:.1%}**",
                 f"{summary['ghn_acc_batch_stats']:.1%}", f"{summary['default_init_acc_bn_calibrated']:.1%}"]
        cells += [f"{summary['sgd'][str(k)]['default_init']:.1%} / **{summary['sgd'][str(k)]['ghn']:.1%}** "
                  f"(GHN >= default on {summary['sgd'][str(k)]['ghn_at_least_default']})" for k in steps]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"`{command}` -> `benchmarks/results/{stem}.json`, `{stem}.png`"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
