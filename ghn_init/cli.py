"""``ghn-init``: predict weights for timm architectures from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]

logger = logging.getLogger("ghn_init")


def _kwarg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON where possible (``drop_rate=0.1``, ``act_layer=gelu``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--kwarg expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _predict(args: argparse.Namespace) -> None:
    from .export import save_predicted
    from .hub import load

    ghn = load(args.ghn)
    images, source = _calibration_images(args.calibrate_bn, args.data, ghn) if args.calibrate_bn else (None, None)
    out = save_predicted(args.model, args.out, ghn, num_classes=args.num_classes, img_size=args.img_size,
                         model_kwargs=dict(args.kwarg), overwrite=args.overwrite,
                         calibrate_bn=args.calibrate_bn != 0, calibration_images=images, calibration_source=source)
    print(f"wrote {out}: load it with timm.create_model('local-dir:{out}', pretrained=True)")
    if args.push_to_hub:
        from .hub import push_predicted

        url = push_predicted(out, args.push_to_hub, private=args.private or None)
        print(f"pushed to {url}: load it with timm.create_model('hf-hub:{args.push_to_hub}', pretrained=True)")


def _calibration_images(count: int, root: str | None, ghn: Any) -> tuple[Any, str]:
    """The first ``count`` CIFAR-10 train images, normalized as the GHN's inputs, and their description."""
    import numpy as np

    from train_ghn.data import CIFAR10_MEAN, CIFAR10_STD, NUM_VALIDATION, data_root, load_cifar10, normalize

    limit = 50000 - NUM_VALIDATION
    if count > limit:
        raise ValueError(f"--calibrate-bn {count}: the CIFAR-10 train split has {limit} images (validation excluded)")
    try:
        images, _ = load_cifar10("train", root=root, indices=np.arange(count))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--calibrate-bn {count} needs CIFAR-10, not found under {root or data_root()}: pass "
                                "--data PATH (the folder holding cifar10/) or set GHN_INIT_DATA") from err
    data = ghn.data_config
    return (normalize(images, data.get("mean", CIFAR10_MEAN), data.get("std", CIFAR10_STD)),
            f"CIFAR-10 train images (the first {count})")


def _graph(args: argparse.Namespace) -> None:
    from .export import create_meta_model
    from .graph import build_graph

    out = Path(args.out)
    if out.suffix not in (".json", ".png", ".svg"):
        raise ValueError(f"{out}: write the graph as .json, .png or .svg")
    model, _ = create_meta_model(args.model, num_classes=args.num_classes, img_size=args.img_size)
    size = (3, args.img_size, args.img_size) if args.img_size else None
    graph = build_graph(model, size, name=args.model)
    if out.suffix == ".json":
        out.write_text(json.dumps(graph.to_dict(), indent=1) + "\n")
    else:
        from .draw import draw_graph

        draw_graph(graph, out, title=args.model)
    print(f"wrote {out}: {graph.num_nodes} nodes, {len(graph.edges)} edges, ops {graph.summary()}")


def _eval(args: argparse.Namespace) -> None:
    from train_ghn.evaluate import main as evaluate

    argv = [*args.models, "--calibrate-bn", str(args.calibrate_bn), "--seed", str(args.seed)]
    for flag in ("ghn", "split", "sgd_steps", "train_images", "out", "plot"):
        value = getattr(args, flag)
        argv += [f"--{flag.replace('_', '-')}", str(value)] if value is not None else []
    argv += ["--full"] if args.full else []
    evaluate(argv)


def _coverage(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .coverage import run_coverage, select_models

    names = select_models(args.pattern, args.limit)
    if not names:
        raise ValueError(f"no timm architecture matches {args.pattern!r}")
    with tqdm(total=len(names), desc="coverage", dynamic_ncols=True) as bar:
        def progress(row: dict[str, Any]) -> None:
            bar.update(1)
            if not row["ok"]:
                bar.write(f"{row['name']}: {row['error']}")

        rows = run_coverage(names, ghn_ref=args.ghn, workers=args.workers, timeout_s=args.timeout, progress=progress)
    ok = sum(r["ok"] and not r["skipped"] for r in rows)
    summary = {"architectures": len(rows), "fully_predicted": ok, "failed": [r["name"] for r in rows if not r["ok"]]}
    Path(args.out).write_text(json.dumps({"summary": summary, "architectures": rows}, indent=1) + "\n")
    print(f"{ok}/{len(rows)} architectures built and fully predicted; details in {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ghn-init", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    predict = sub.add_parser("predict", help="predict weights for a timm model into a timm-loadable folder")
    predict.add_argument("model", help="timm architecture name, e.g. resnet18")
    predict.add_argument("--num-classes", type=int, help="classifier outputs (default: the GHN's, 10 for CIFAR-10)")
    predict.add_argument("--img-size", type=int, help="input size; passed to models that take img_size")
    predict.add_argument("--kwarg", type=_kwarg, action="append", default=[], metavar="KEY=VALUE",
                         help="extra timm.create_model kwarg (repeatable; VALUE parsed as JSON where possible)")
    predict.add_argument("--ghn", help="GHN: a local folder or Hub repo id (default: the embedded GHN)")
    predict.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    predict.add_argument("--calibrate-bn", type=int, metavar="N",
                         help="BatchNorm statistics from the first N CIFAR-10 train images (see --data); 0 leaves "
                         "them at identity (default: calibrated without data, on synthetic images)")
    predict.add_argument("--data", metavar="PATH",
                         help="with --calibrate-bn: the folder holding cifar10/ "
                         "(default: $GHN_INIT_DATA, else ../shared/data)")
    predict.add_argument("--push-to-hub", metavar="REPO_ID",
                         help="then upload the folder to this Hub model repo (created if missing; uses your HF login)")
    predict.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo as private")
    predict.set_defaults(run=_predict)

    graph = sub.add_parser("graph", help="write the architecture graph of a timm model")
    graph.add_argument("model")
    graph.add_argument("--num-classes", type=int, default=10)
    graph.add_argument("--img-size", type=int)
    graph.add_argument("--out", required=True, help="FILE.json, FILE.png or FILE.svg")
    graph.set_defaults(run=_graph)

    coverage = sub.add_parser("coverage", help="check graph building and prediction over timm architectures")
    coverage.add_argument("--pattern", help="glob over timm.list_models(), e.g. 'resnet*'")
    coverage.add_argument("--limit", type=int, help="only the first N matching architectures")
    coverage.add_argument("--ghn", help="GHN reference (default: the embedded GHN)")
    coverage.add_argument("--workers", type=int, default=2, help="worker processes")
    coverage.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per architecture")
    coverage.add_argument("--out", default="coverage.json", help="JSON report")
    coverage.set_defaults(run=_coverage)

    evaluate = sub.add_parser("eval", help="CIFAR-10 accuracy of predicted weights")
    evaluate.add_argument("models", nargs="*", help="timm names or local-dir:DIR folders")
    evaluate.add_argument("--split", choices=("ood", "id", "both"), help="add the OOD and/or ID protocol architectures")
    evaluate.add_argument("--sgd-steps", help="comma-separated SGD budgets, e.g. 100,500,2500 (baselines)")
    evaluate.add_argument("--ghn")
    evaluate.add_argument("--calibrate-bn", type=int, default=500)
    evaluate.add_argument("--train-images", type=int, help="SGD on only the first N train images")
    evaluate.add_argument("--seed", type=int, default=0, help="default init, SGD batch order and flips")
    evaluate.add_argument("--full", action="store_true", help="all 10,000 test images")
    evaluate.add_argument("--out", help="JSON results")
    evaluate.add_argument("--plot", help="PNG of accuracy against SGD steps")
    evaluate.set_defaults(run=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "private", False) and not args.push_to_hub:
        parser.error("--private only applies with --push-to-hub")
    if args.command == "predict" and args.calibrate_bn is not None and args.calibrate_bn < 0:
        parser.error(f"--calibrate-bn takes a number of images, 0 or more; got {args.calibrate_bn}")
    if args.command == "predict" and args.data and not args.calibrate_bn:
        parser.error("--data only applies with --calibrate-bn N")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as err:
        print(f"ghn-init {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
