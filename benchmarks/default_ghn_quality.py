"""CIFAR-10 accuracy of weights predicted by a GHN, loaded through plain timm from `ghn-init predict` folders.

For each out-of-distribution timm architecture (32x32 inputs, 10 classes, kwargs from
train_ghn.evaluate.OOD_ARCHITECTURES): predicted weights with BatchNorm recalibrated on 500
unlabeled train images (eval mode) and with batch statistics, against timm's default init.
Writes benchmarks/results/default_ghn_quality.{json,png} and a table in RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import timm
import torch
from _report import HERE, describe_ghn, ghn_setup, machine, update_results

import ghn_init
from ghn_init.export import save_predicted
from train_ghn.evaluate import OOD_ARCHITECTURES, evaluate_model, load_eval_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ghn", help="GHN reference (default: the embedded GHN)")
    parser.add_argument("--full", action="store_true", help="all 10,000 test images (default: balanced 2,000)")
    parser.add_argument("--calibrate-bn", type=int, default=500)
    parser.add_argument("--untie-noise", type=float,
                        help="predict with this untie noise instead of the GHN's own (results get their own files)")
    args = parser.parse_args()
    torch.manual_seed(0)
    ghn = ghn_init.load(args.ghn)
    if args.untie_noise is not None:
        ghn.config = dataclasses.replace(ghn.config, untie_noise=args.untie_noise)
    setup = {**ghn_setup(ghn), "ghn_training_steps": ghn.meta.get("training", {}).get("steps"),
             "split": "test (10,000)" if args.full else "balanced test (first 200 per class, 2,000)",
             "calibrate_bn_images": args.calibrate_bn, "machine": machine()}
    print(json.dumps(setup, indent=2))
    test, calibration = load_eval_data(args.full, args.calibrate_bn, torch.device("cpu"))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kwargs in OOD_ARCHITECTURES.items():
            folder = Path(tmp) / name
            kw = dict(kwargs)
            started = time.perf_counter()
            save_predicted(name, folder, ghn, num_classes=10, img_size=kw.pop("img_size", None), model_kwargs=kw)
            predict_s = time.perf_counter() - started
            predicted = evaluate_model(timm.create_model(f"local-dir:{folder}", pretrained=True), test, calibration)
            default = evaluate_model(timm.create_model(name, num_classes=10, **kwargs), test, calibration)
            rows[name] = {"kwargs": kwargs, "predict_and_save_s": round(predict_s, 3), "ghn": predicted,
                          "default_init": default}
            print(name, json.dumps(rows[name]))
    mean = sum(r["ghn"]["acc_bn_calibrated"] for r in rows.values()) / len(rows)
    result = {"setup": setup, "architectures": rows, "mean_ghn_acc_bn_calibrated": mean}
    print(f"mean predicted accuracy (BN recalibrated): {mean:.4f}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem = ("default_ghn_quality" + ("_full" if args.full else "")
            + ("" if args.untie_noise is None else f"_untie{args.untie_noise:g}"))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(rows, out / f"{stem}.png", setup)
    lines = [f"{describe_ghn(setup)}, {setup['ghn_training_steps']} training steps; "
             f"{setup['split']}, BN recalibrated on {args.calibrate_bn} train images; "
             f"{setup['machine']['processor']}, torch {setup['machine']['torch']}, timm {setup['machine']['timm']}.",
             "", "| architecture | kwargs | GHN, BN recalibrated | GHN, batch stats | default init, BN recalibrated |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | `{json.dumps(r['kwargs'])}` | {r['ghn']['acc_bn_calibrated']:.1%} | "
                     f"{r['ghn']['acc_batch_stats']:.1%} | {r['default_init']['acc_bn_calibrated']:.1%} |")
    lines.append(f"| **mean** | | **{mean:.1%}** | | |")
    flags = (" --full" if args.full else "") + (
        "" if args.untie_noise is None else f" --untie-noise {args.untie_noise:g}")
    lines += ["", f"`python benchmarks/default_ghn_quality.py{flags}` "
              f"-> `benchmarks/results/{stem}.json`, `{stem}.png`"]
    noise = "" if args.untie_noise is None else f", untie noise {args.untie_noise:g}"
    update_results(stem, "## Predicted-weight accuracy, CIFAR-10 "
                   + ("(full test split" if args.full else "(balanced 2,000") + noise + ")\n\n" + "\n".join(lines))


def _plot(rows: dict, path: Path, setup: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    series = {"GHN, BN recalibrated": [rows[n]["ghn"]["acc_bn_calibrated"] for n in names],
              "GHN, batch stats": [rows[n]["ghn"]["acc_batch_stats"] for n in names],
              "default init": [rows[n]["default_init"]["acc_bn_calibrated"] for n in names]}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
    ax.set_xticks([x + width for x in range(len(names))], names)
    ax.axhline(0.1, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("CIFAR-10 test accuracy")
    ax.set_title(f"{setup['ghn']}: accuracy of predicted weights ({setup['split']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
