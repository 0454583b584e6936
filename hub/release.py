"""Publish a trained GHN as a release folder ``hub/<name>/`` and, optionally, to the Hugging Face Hub.

    python hub/release.py runs/stage3/final --name ghn2-cifar10 \
        --earlier runs/stage1/final runs/stage2/final \
        --evaluation benchmarks/results/default_ghn_quality.json benchmarks/results/default_ghn_quality_full.json \
        --finetune benchmarks/results/finetune.json --notes hub/notes/ghn2-cifar10.md [--push-to-hub ORG/REPO]

The folder gets the GHN's config.json and model.safetensors and a model card stating its data,
its training stages and compute, and the accuracies in the given evaluation JSON files (written by
``benchmarks/default_ghn_quality.py``): as tables, and as the card's ``model-index`` metadata, which
the Hub shows; with ``--finetune``, also the fine-tuning benchmark's table (card only). The quality
results are also kept in config.json (``evaluation``), so a later ``ghn_init.hub.push_to_hub`` of the
loaded GHN writes the same metadata. Every number in the card comes from those JSON files; the notes
are prose about how the GHN was made. ``hub/ghn2-cifar10`` is the embedded default GHN; a release
folder is its own input when only the card changes (weights and config.json come out unchanged):

    python hub/release.py hub/ghn2-cifar10 --name ghn2-cifar10 --evaluation ... --finetune ... --notes ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ghn_init.cards import architecture_has_batchnorm, ghn_card
from ghn_init.ghn import GHN
from ghn_init.hub import load_folder, push_folder
from train_ghn.trainer import summarize_stages, training_stages

HUB = Path(__file__).resolve().parent


def evaluation_markdown(paths: list[Path]) -> str:
    """Tables of the quality benchmark's JSON files, with the command that reproduces them."""
    parts = []
    for path in paths:
        result = json.loads(path.read_text())
        setup = result["setup"]
        rows = result["architectures"]
        without_bn = [name for name, row in rows.items() if architecture_has_batchnorm(name, row["kwargs"]) is False]
        lines = [f"CIFAR-10, {setup['split']}: weights predicted for architectures the GHN never saw, saved by "
                 "`ghn-init predict` and loaded by plain timm. Eval mode after recalibrating BatchNorm statistics on "
                 f"{setup['calibrate_bn_images']} unlabeled train images, and train mode (batch statistics, "
                 "GHN-2's protocol)"
                 + (f"; {', '.join(without_bn)} have no BatchNorm, so for them eval mode involves no recalibration."
                    if without_bn else "."), "",
                 "| architecture | timm kwargs | predicted, eval mode | predicted, train mode "
                 "| timm default init, eval mode |",
                 "|---|---|---|---|---|"]
        for name, row in rows.items():
            lines.append(f"| {name} | `{json.dumps(row['kwargs'])}` | {row['ghn']['acc_bn_calibrated']:.1%} | "
                         f"{row['ghn']['acc_batch_stats']:.1%} | {row['default_init']['acc_bn_calibrated']:.1%} |")
        lines.append(f"| **mean** | | **{result['mean_ghn_acc_bn_calibrated']:.1%}** | | |")
        full = " --full" if "10,000" in setup["split"] else ""
        lines += ["", f"Reproduce: `python benchmarks/default_ghn_quality.py{full}` "
                  f"({setup['machine']['processor']}, torch {setup['machine']['torch']}).", ""]
        parts.append("\n".join(lines))
    return "\n".join(parts)


def _budgets(row: dict, recipe: dict) -> dict[int, dict]:
    """An architecture's results by SGD budget; files written before budgets had one, the recipe's."""
    return {int(steps): cell for steps, cell in (row.get("steps") or {str(recipe["steps"]): row}).items()}


def finetune_markdown(path: Path) -> str:
    """The fine-tuning benchmark's table (GHN init against timm's init, paired per seed, per SGD budget) and,
    per budget, which init to start from: where the paired difference is negative beyond two standard
    errors, timm's own init measured better; within two, they are level."""
    result = json.loads(path.read_text())
    recipe = result["setup"]["recipe"]
    cells = {name: _budgets(row, recipe) for name, row in result["architectures"].items()}
    unpaired = [f"{name} ({steps} steps)" for name, budgets in cells.items() for steps, cell in budgets.items()
                if "ghn_minus_default" not in cell]
    if unpaired:
        raise SystemExit(f"{path}: no paired GHN - default difference for {', '.join(unpaired)}; run "
                         "`python benchmarks/finetune.py --inits ghn default --seeds 0 1 2` first")
    lines = [f"CIFAR-10, SGD (peak lr {recipe['lr']}, one-cycle over each budget, batch {recipe['batch_size']}) "
             f"from the predicted weights and from timm's default init, same batches per seed; "
             f"{result['setup']['split']}; accuracy is the mean over the seeds, the difference paired per seed.", "",
             "| architecture | timm kwargs | SGD steps | GHN init | timm default init | GHN - default, paired (points) "
             "| seeds |", "|---|---|---|---|---|---|---|"]
    verdicts: dict[int, tuple[list[str], list[str]]] = {}
    for name, budgets in cells.items():
        kwargs = json.dumps(result["architectures"][name]["kwargs"])
        for steps, cell in sorted(budgets.items()):
            diff = cell["ghn_minus_default"]
            seeds = diff.get("n") or len(recipe.get("seeds", ()))
            mean = 100 * diff["mean"]
            error = None if diff["standard_error"] is None else 100 * diff["standard_error"]
            spread = "" if error is None else f" ± {error:.1f}"
            lines.append(f"| {name} | `{kwargs}` | {steps:,} | {cell['ghn']['accuracy']:.1%} | "
                         f"{cell['default']['accuracy']:.1%} | {mean:+.1f}{spread} | {seeds} |")
            worse, level = verdicts.setdefault(steps, ([], []))
            if error is None:
                continue
            if mean + 2 * error < 0:
                worse.append(name)
            elif mean - 2 * error <= 0:
                level.append(name)
    lines.append("")
    seeds = {steps: max(c[steps]["ghn_minus_default"].get("n") or len(recipe.get("seeds", ()))
                        for c in cells.values() if steps in c) for steps in verdicts}
    most = max(seeds.values())
    fewer = [f"{steps}={','.join(map(str, range(n)))}" for steps, n in sorted(seeds.items()) if n < most]
    command = (f"--steps {' '.join(map(str, sorted(seeds)))} --seeds {' '.join(map(str, range(most)))}"
               + (f" --seeds-at {' '.join(fewer)}" if fewer else ""))
    for steps, (worse, level) in sorted(verdicts.items()):
        lines.append(f"- {steps:,} steps: level within two standard errors: {', '.join(level) or 'none'}; better "
                     f"started from timm's own init: {', '.join(worse) or 'none'}.")
    lines += ["", "One seed gives no standard error and no verdict. Reproduce: "
              f"`python benchmarks/finetune.py --inits ghn default {command}`.", ""]
    return "\n".join(lines)


def release_card(ghn: GHN, evaluation: list[Path], finetune: Path | None = None, notes: Path | None = None,
                 repo_id: str | None = None) -> str:
    """The model card of a release: ``ghn``'s meta (training stages, data) plus the benchmark JSON files."""
    card = ghn_card(ghn, evaluation_markdown(evaluation) if evaluation else None, repo_id=repo_id)
    if finetune:
        card += "\n## Fine-tuning from the predicted weights\n\n" + finetune_markdown(finetune)
    if notes:
        card += "\n## Notes\n\n" + notes.read_text().strip() + "\n"
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ghn", type=Path, help="folder of the trained GHN (a run's final/, or the release folder)")
    parser.add_argument("--name", required=True, help="release name: the folder hub/<name>/")
    parser.add_argument("--earlier", type=Path, nargs="*", default=[],
                        help="GHN folders of earlier training stages whose runs this one continued, oldest first")
    parser.add_argument("--evaluation", type=Path, nargs="*", default=[], help="benchmark JSON files")
    parser.add_argument("--finetune", type=Path, help="JSON of benchmarks/finetune.py with both inits and seeds")
    parser.add_argument("--notes", type=Path, help="markdown file appended to the card under 'Notes'")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the release folder to this Hub repo")
    args = parser.parse_args()

    ghn = load_folder(args.ghn)
    stages = [stage for folder in args.earlier for stage in training_stages(load_folder(folder).meta)]
    ghn.meta["training"] = summarize_stages(stages + training_stages(ghn.meta))
    ghn.meta["name"] = args.name
    if args.evaluation:
        ghn.meta["evaluation"] = [json.loads(path.read_text()) for path in args.evaluation]
    card = release_card(ghn, args.evaluation, args.finetune, args.notes, repo_id=args.push_to_hub)
    folder = ghn.save_pretrained(HUB / args.name, model_card=card)
    print(f"wrote {folder}")
    if args.push_to_hub:
        print(f"pushed to {push_folder(folder, args.push_to_hub, commit_message=f'Release {args.name}')}")


if __name__ == "__main__":
    main()
