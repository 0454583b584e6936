"""The ``ghn-init`` command: predict weights for timm architectures, draw graphs, measure coverage and accuracy."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import pickle
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__
from .coverage import MAX_CPU_PARAMS

__all__ = ["build_parser", "main"]

logger = logging.getLogger("ghn_init")

DESCRIPTION = ("Predict the weights of any timm architecture with a graph hypernetwork (GHN), as a folder plain "
               "timm loads; draw architecture graphs; measure coverage and CIFAR-10 accuracy.")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` for options whose default is a value, not for flags or unset options."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == []
        if "%(default)" in text or not action.option_strings or unset or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _kwarg(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON where possible (``drop_rate=0.1``, ``act_layer=gelu``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--kwarg expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _check_can_push(repo_id: str | None) -> None:
    """Before any work: ``--push-to-hub`` cannot succeed with ``HF_HUB_OFFLINE=1``."""
    from huggingface_hub import constants

    if repo_id and constants.HF_HUB_OFFLINE:
        raise ValueError("--push-to-hub needs the network, but HF_HUB_OFFLINE=1 is set: unset it, or leave out "
                         "--push-to-hub and push the folder later")


def _predict(args: argparse.Namespace) -> None:
    from .export import save_predicted
    from .hub import load

    _check_can_push(args.push_to_hub)
    ghn = load(args.ghn)
    images, source = _calibration_images(args.calibrate_bn, args.data, ghn) if args.calibrate_bn else (None, None)
    out = save_predicted(args.model, args.out, ghn, num_classes=args.num_classes, img_size=args.img_size,
                         model_kwargs=dict(args.kwarg), overwrite=args.overwrite,
                         calibrate_bn=args.calibrate_bn != 0, calibration_images=images, calibration_source=source)
    print(f"wrote {out}: load it with timm.create_model('local-dir:{out}', pretrained=True)")
    if args.push_to_hub:
        from .hub import push_predicted

        try:
            url = push_predicted(out, args.push_to_hub, private=args.private or None)
        except RuntimeError as err:
            raise RuntimeError(f"{err} ({out} is complete; push it later with "
                               f"ghn_init.hub.push_predicted({str(out)!r}, {args.push_to_hub!r}))") from err
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


def _convert(args: argparse.Namespace) -> None:
    from .export import check_output_folder
    from .hub import load
    from .published.ghn import PublishedGHN

    out = Path(args.out)
    check_output_folder(out, args.overwrite)
    _check_can_push(args.push_to_hub)
    ghn = load(args.src, revision=args.revision, filename=args.filename)
    if not isinstance(ghn, PublishedGHN):
        raise ValueError(f"{args.src} is already a ghn-init GHN (safetensors + JSON); there is nothing to convert")
    ghn.save_pretrained(out, model_card=ghn.model_card(load_ref=str(out)))
    print(f"wrote {out} ({ghn.meta['name']}, sha256 of the original {ghn.meta['source']['sha256'][:16]}...): "
          f"load it with ghn_init.load('{out}')")
    if args.push_to_hub:
        url = ghn.push_to_hub(args.push_to_hub, private=args.private or None)
        print(f"pushed to {url}: load it with ghn_init.load('{args.push_to_hub}')")


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


def _results_table(result: dict[str, Any]) -> str:
    """``ghn-init eval`` results as a plain-text table: accuracy per architecture, then the mean."""
    rows = result["architectures"]
    steps = list(next(iter(rows.values()), {}).get("sgd", {}))
    header = ["architecture", "GHN, eval mode", "GHN, train mode", "default init"]
    header += [f"{init} + {k} SGD" for k in steps for init in ("default", "GHN")]
    table = [header]
    for name, row in rows.items():
        line = [name, row["ghn"]["acc_bn_calibrated"], row["ghn"]["acc_batch_stats"],
                row["default_init"]["acc_bn_calibrated"]]
        line += [row["sgd"][k][init]["acc"] for k in steps for init in ("default_init", "ghn")]
        table.append([line[0], *(f"{value:.1%}" for value in line[1:])])
    table.append(["mean", f"{result['mean_ghn_acc_bn_calibrated']:.1%}", *[""] * (len(header) - 2)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table)


def _eval(args: argparse.Namespace) -> None:
    from train_ghn.data import load_cifar10
    from train_ghn.evaluate import main as evaluate

    if not args.models and not args.split:
        raise ValueError("name MODELs to evaluate, or --split ood|id|both")
    try:
        load_cifar10("test", indices=[0])
    except FileNotFoundError as err:
        raise FileNotFoundError(f"ghn-init eval needs the CIFAR-10 copy: {err}") from None
    argv = [*args.models, "--calibrate-bn", str(args.calibrate_bn), "--seed", str(args.seed)]
    for flag in ("ghn", "split", "sgd_steps", "train_images", "out", "plot"):
        value = getattr(args, flag)
        argv += [f"--{flag.replace('_', '-')}", str(value)] if value is not None else []
    argv += ["--full"] if args.full else []
    result = evaluate(argv)
    statistics = (f"after recalibrating BatchNorm (where a model has it) on {args.calibrate_bn} train images"
                  if args.calibrate_bn else "with the BatchNorm statistics the weights come with (data-free for "
                  "predicted weights, identity for timm's init)")
    print(f"CIFAR-10 {result['setup']['split']}: accuracy of predicted weights (GHN) and timm's default init in "
          f"eval mode, {statistics}, and in train mode (batch statistics)")
    print(_results_table(result))


def _coverage(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from .coverage import check_counts, run_coverage, select_models

    names = select_models(args.pattern, args.limit)
    if not names:
        raise ValueError(f"no timm architecture matches {args.pattern!r}")
    with tqdm(total=len(names), desc="coverage", dynamic_ncols=True) as bar:
        def progress(row: dict[str, Any]) -> None:
            bar.update(1)
            if not row["ok"]:
                bar.write(f"{row['name']}: {row['error']}")

        rows = run_coverage(names, ghn_ref=args.ghn, workers=args.workers, timeout_s=args.timeout, progress=progress,
                            user_paths=not args.meta_only, max_cpu_params=args.max_params)
    predicted = sum(r["checks"].get("predict", {}).get("status") == "ok" and not r.get("skipped") for r in rows)
    counts = check_counts(rows)
    summary = {"architectures": len(rows), "fully_predicted": predicted, "checks": counts,
               "failed": [r["name"] for r in rows if not r["ok"]]}
    Path(args.out).write_text(json.dumps({"summary": summary, "architectures": rows}, indent=1) + "\n")
    ran = ", ".join(f"{check} {c['ok']} ok / {c['failed']} failed / {c['skipped']} skipped"
                    for check, c in counts.items() if c["ok"] + c["failed"] + c["skipped"])
    print(f"{len(rows) - len(summary['failed'])}/{len(rows)} architectures passed every check that ran ({ran}); "
          f"details in {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ghn-init", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=description or text, formatter_class=_HelpFormatter)

    ghn_help = ("GHN: a local folder, a Hub repo id, a published GHN (ghn3-t, ghn3-s, ghn3-l, ghn3-xl, ghn2) or a "
                "published checkpoint file (default: the embedded CIFAR-10 GHN)")
    predict = command("predict", "predict weights for a timm model into a folder that plain timm loads")
    predict.add_argument("model", help="timm architecture name, e.g. resnet18")
    predict.add_argument("--num-classes", type=_positive_int, metavar="N",
                         help="classifier outputs (default: the classes the GHN was trained on, 10 for the "
                              "embedded CIFAR-10 GHN)")
    predict.add_argument("--img-size", type=_positive_int, metavar="S",
                         help="input size; passed to models that take img_size (default: the size a fixed-size "
                              "model was built for, else the GHN's training size)")
    predict.add_argument("--kwarg", type=_kwarg, action="append", default=[], metavar="KEY=VALUE",
                         help="extra timm.create_model kwarg (repeatable; VALUE parsed as JSON where possible)")
    predict.add_argument("--ghn", metavar="REF", help=ghn_help)
    predict.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
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

    convert = command("convert", "convert a published GHN-2/GHN-3 checkpoint to safetensors + JSON")
    convert.add_argument("src", metavar="SRC", help="a published GHN: ghn3-t, ghn3-s, ghn3-l, ghn3-xl, ghn2, a local "
                         "file (e.g. ppuda's ghn2_cifar10.pt), or a Hub repo id with --filename")
    convert.add_argument("--filename", metavar="FILE", help="file in the Hub repo SRC, e.g. ghn3tm8.pt")
    convert.add_argument("--revision", metavar="REV", help="Hub branch, tag or commit of SRC (default: main)")
    convert.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    convert.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload the converted GHN to this Hub repo")
    convert.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo as private")
    convert.set_defaults(run=_convert)

    graph = command("graph", "write the architecture graph of a timm model as JSON or a picture")
    graph.add_argument("model", help="timm architecture name, e.g. resnet18")
    graph.add_argument("--num-classes", type=_positive_int, default=10, metavar="N", help="classifier outputs")
    graph.add_argument("--img-size", type=_positive_int, metavar="S",
                       help="input size the graph is traced at (default: the model's own)")
    graph.add_argument("--out", required=True, metavar="FILE", help="FILE.json, FILE.png or FILE.svg")
    graph.set_defaults(run=_graph)

    coverage = command("coverage", "check prediction, apply_, create_model and predicted folders over timm "
                       "architectures")
    coverage.add_argument("--pattern", metavar="GLOB", help="glob over timm.list_models(), e.g. 'resnet*' "
                          "(default: all architectures)")
    coverage.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N matching architectures")
    coverage.add_argument("--ghn", metavar="REF", help=ghn_help)
    coverage.add_argument("--workers", type=_positive_int, default=2, metavar="N", help="worker processes")
    coverage.add_argument("--timeout", type=float, default=600.0, metavar="S", help="seconds allowed per architecture")
    coverage.add_argument("--meta-only", action="store_true",
                          help="only predict on meta-device models (fast; no model is built on the CPU)")
    coverage.add_argument("--max-params", type=_positive_int, default=MAX_CPU_PARAMS, metavar="N",
                          help="larger models skip the CPU-built checks, reported with the reason")
    coverage.add_argument("--out", default="coverage.json", metavar="FILE", help="JSON report")
    coverage.set_defaults(run=_coverage)

    evaluate = command(
        "eval", "CIFAR-10 accuracy of predicted weights (needs the CIFAR-10 copy)",
        "CIFAR-10 accuracy of predicted weights against timm's default init, printed as a table. Needs the "
        "offline CIFAR-10 copy at $GHN_INIT_DATA/cifar10/cifar10-jpeg75.npz (GHN_INIT_DATA defaults to "
        "../shared/data).")
    evaluate.add_argument("models", nargs="*", metavar="MODEL", help="timm names or local-dir:DIR folders")
    evaluate.add_argument("--split", choices=("ood", "id", "both"), help="add the OOD and/or ID protocol architectures")
    evaluate.add_argument("--sgd-steps", metavar="K,K,...",
                          help="comma-separated SGD budgets for the baselines, e.g. 100,500,2500 (default: the "
                               "protocol's with --split, none for MODELs alone)")
    evaluate.add_argument("--ghn", metavar="REF", help=ghn_help)
    evaluate.add_argument("--calibrate-bn", type=int, default=500, metavar="N",
                          help="unlabeled train images to recalibrate BatchNorm statistics on")
    evaluate.add_argument("--train-images", type=_positive_int, metavar="N",
                          help="SGD on only the first N train images (default: all 45,000)")
    evaluate.add_argument("--seed", type=int, default=0, help="default init, SGD batch order and flips")
    evaluate.add_argument("--full", action="store_true", help="all 10,000 test images (default: the balanced 2,000)")
    evaluate.add_argument("--out", metavar="FILE", help="also write the results as JSON")
    evaluate.add_argument("--plot", metavar="FILE", help="also write a PNG of accuracy against SGD steps")
    evaluate.set_defaults(run=_eval)
    return parser


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[dict[str, int]]:
    """SIGTERM (a plain ``kill``) raises KeyboardInterrupt like Ctrl-C, so partial output gets cleaned up.

    Further SIGTERMs are ignored while that cleanup runs. Yields where the received signal is recorded.
    """
    received: dict[str, int] = {}

    def on_sigterm(signum: int, frame: Any) -> None:
        received["signal"] = signum
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # only it may handle signals
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main_thread else None
    try:
        yield received
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _message(err: BaseException) -> str:
    """One line for the user: OS errors name the file and what to do, the rest carry their own message."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        text = f"{err.strerror}: {err.filename}"
        if isinstance(err, PermissionError):
            text += " (choose a location you can write to, or change its permissions)"
        return text
    return str(err)


def main(argv: list[str] | None = None) -> int:
    """Run ``ghn-init``; returns the exit status (2 for an error, 128 + the signal number when interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "private", False) and not args.push_to_hub:
        parser.error("--private only applies with --push-to-hub")
    if args.command == "predict" and args.calibrate_bn is not None and args.calibrate_bn < 0:
        parser.error(f"--calibrate-bn takes a number of images, 0 or more; got {args.calibrate_bn}")
    if args.command == "predict" and args.data and not args.calibrate_bn:
        parser.error("--data only applies with --calibrate-bn N")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with _sigterm_as_interrupt() as received:
        try:
            args.run(args)
        except KeyboardInterrupt:
            signum = received.get("signal", signal.SIGINT)
            print(f"ghn-init {args.command}: stopped by {signal.Signals(signum).name}; "
                  "no partial output is left behind", file=sys.stderr)
            return 128 + signum
        except (ValueError, OSError, RuntimeError, pickle.UnpicklingError) as err:
            print(f"ghn-init {args.command}: error: {_message(err)}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
