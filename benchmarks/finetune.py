"""Fine-tuning on CIFAR-10 from the GHN init against timm's default init, same recipe, seed and data order.

For each architecture in ``ARCHITECTURES`` (built for 32x32 inputs and 10 classes with the kwargs of
``train_ghn.evaluate.OOD_ARCHITECTURES``): SGD with the recipe of examples/finetune.py (whose
``finetune`` this reuses) for a fixed number of steps from each init, then test accuracy in eval
mode. Writes benchmarks/results/finetune.{json,png} and prints a markdown table (``--results-md`` also
puts it into RESULTS.md). Running a subset of ``--inits`` keeps the other inits' results from an
earlier JSON with the same recipe, split and thread count: the default init's from any GHN, the
GHN init's only from the same GHN (content hash, prediction settings included) and ghn_init release.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch
from _report import HERE, describe_ghn, ghn_setup, machine, update_results
from accelerate import Accelerator

import ghn_init
from train_ghn.evaluate import OOD_ARCHITECTURES
from train_ghn.sgd import SGDRecipe

#: The protocol's out-of-distribution architectures but resnet50 (for time); kwargs from OOD_ARCHITECTURES.
ARCHITECTURES = ("resnet18", "convnext_atto", "regnetx_002", "efficientnet_b0", "mobilenetv3_small_100",
                 "vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mixer_s16_224")
INITS = ("ghn", "default")


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("finetune_example", HERE.parent / "examples" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _earlier_rows(path: Path, setup: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Results of an earlier run with the same recipe, split and machine that this run can keep:
    the default init's always (it does not involve the GHN), the GHN init's if the GHN is the same."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    if any(earlier["setup"].get(k) != setup[k] for k in ("recipe", "split")):
        return {}
    if earlier["setup"]["machine"]["torch_threads"] != setup["machine"]["torch_threads"]:
        return {}
    same_ghn = all(earlier["setup"].get(k) == setup[k] for k in ("ghn_sha256", "ghn_init"))
    return {name: {k: v for k, v in row.items() if same_ghn or k != "ghn"}
            for name, row in earlier["architectures"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", nargs="*", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--inits", nargs="*", default=["ghn", "default"], choices=INITS)
    parser.add_argument("--ghn", help="GHN reference (default: the embedded GHN)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=SGDRecipe.lr, help="peak of the one-cycle learning rate")
    parser.add_argument("--test-per-class", type=int, default=200, help="200: balanced 2,000; 1000: full test split")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="finetune", help="stem of the files under benchmarks/results/")
    parser.add_argument("--results-md", action="store_true", help="also write the table into RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    example = _example()
    ghn = ghn_init.load(args.ghn)
    recipe = SGDRecipe(lr=args.lr, seed=args.seed)
    test_split = ("test (10,000)" if args.test_per_class >= 1000 else
                  f"balanced test (first {args.test_per_class} per class, {10 * args.test_per_class:,})")
    recipe_setup = {**recipe.to_dict(), "steps": args.steps, "label_smoothing": 0.0,
                    "train_images": "first 45,000 of the train split", "batches": "DataLoader, seeded shuffle"}
    setup = {**ghn_setup(ghn), "recipe": recipe_setup, "split": test_split, "machine": machine()}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    earlier = _earlier_rows(out / f"{args.out}.json", setup)
    setup["inits"] = inits = [i for i in INITS if i in args.inits or all(i in earlier.get(n, {}) for n in args.archs)]
    print(json.dumps(setup, indent=2), flush=True)
    train, test = example.load_data(test_per_class=args.test_per_class)
    accelerator = Accelerator(cpu=True)
    rows: dict[str, dict[str, Any]] = {}
    for name in args.archs:
        kwargs = OOD_ARCHITECTURES[name]
        rows[name] = row = {"kwargs": kwargs, **{i: earlier[name][i] for i in inits if i not in args.inits}}
        for init in args.inits:
            torch.manual_seed(args.seed)
            model = example.build_model(name, init, args.ghn, **kwargs)
            row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
            started = time.perf_counter()
            result = example.finetune(model, train, test, accelerator, steps=args.steps, recipe=recipe,
                                      progress=False)
            accelerator.free_memory()
            row[init] = {k: result[k] for k in ("accuracy", "train_s", "loss_curve")}
            print(f"{name} {init}: {result['accuracy']:.2%} ({time.perf_counter() - started:.0f} s)", flush=True)
    result = {"setup": setup, "architectures": rows,
              "mean_accuracy": {i: sum(r[i]["accuracy"] for r in rows.values()) / len(rows) for i in inits}}
    (out / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(rows, inits, out / f"{args.out}.png", setup)
    table = _table(rows, inits, result["mean_accuracy"], setup, args.out)
    print(table)
    if args.results_md:
        update_results(args.out, "## Fine-tuning from the GHN init, CIFAR-10\n\n" + table)


def _table(rows: dict, inits: list[str], means: dict, setup: dict, stem: str) -> str:
    recipe = setup["recipe"]
    lines = [f"{describe_ghn(setup)}; {recipe['steps']} steps of {recipe['optimizer']}, "
             f"momentum {recipe['momentum']}, weight decay {recipe['weight_decay']}, one-cycle lr peaking at "
             f"{recipe['lr']}, batch {recipe['batch_size']}, flips, seed {recipe['seed']}, the same batches for every "
             f"init; {setup['split']}, eval mode; "
             f"{setup['machine']['processor']}, torch threads {setup['machine']['torch_threads']}, "
             f"torch {setup['machine']['torch']}, timm {setup['machine']['timm']}.", "",
             "| architecture | kwargs | params (M) | " + " | ".join(f"{i} init" for i in inits) + " |",
             "|---|---|---|" + "---|" * len(inits)]
    for name, r in rows.items():
        best = max(r[i]["accuracy"] for i in inits)
        cells = [f"**{r[i]['accuracy']:.1%}**" if r[i]["accuracy"] == best else f"{r[i]['accuracy']:.1%}"
                 for i in inits]
        lines.append(f"| {name} | `{json.dumps(r['kwargs'])}` | {r['params_m']} | " + " | ".join(cells) + " |")
    lines.append("| **mean** | | | " + " | ".join(f"{means[i]:.1%}" for i in inits) + " |")
    lines += ["", f"`python benchmarks/finetune.py --inits {' '.join(inits)}` -> `benchmarks/results/{stem}.json`, "
              f"`{stem}.png`"]
    return "\n".join(lines)


def _plot(rows: dict, inits: list[str], path: Path, setup: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(inits)
    for i, init in enumerate(inits):
        ax.bar([x + i * width for x in range(len(names))], [rows[n][init]["accuracy"] for n in names], width,
               label=f"{init} init")
    ax.set_xticks([x + width * (len(inits) - 1) / 2 for x in range(len(names))],
                  [n.split("_patch")[0] for n in names], rotation=20, fontsize=8)
    ax.axhline(0.1, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("CIFAR-10 test accuracy")
    ax.set_title(f"{setup['ghn']}: {setup['recipe']['steps']} SGD steps from each init ({setup['split']})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
