"""Published-GHN graphs of every timm architecture: does :func:`build_legacy_graph` build each one, how
fast, and which parameters the graph leaves to their initial values.

Each architecture is built with ``timm.create_model(name, num_classes=10, device="meta")`` and its graph
is built at the model's own default input size (``pretrained_cfg['input_size']``).

Writes benchmarks/results/legacy_graph_scan.json (one process; run it under ``nice``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import time
from collections import Counter
from collections.abc import Iterator

import timm
import torch
from _report import HERE, machine
from tqdm.auto import tqdm

from ghn_init.coverage import select_models
from ghn_init.published.legacy_graph import LEGACY_GRAPH_EXTENSIONS, Builder, build_legacy_graph


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise TimeoutError(f"no graph after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def scan_architecture(name: str, builders: tuple[Builder, ...] = ("ghn3",), timeout_s: float = 300.0) -> dict:
    """Build ``name``'s graph with each builder; report size, time, order and parameters left out."""
    row: dict = {"name": name}
    try:
        model = timm.create_model(name, num_classes=10, device="meta")
    except Exception as err:  # noqa: BLE001 - a model timm cannot build is reported, not fatal
        row["model_error"] = f"{type(err).__name__}: {err}"[:400]
        return row
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    row["input_size"] = list(size)
    params = dict(model.named_parameters())
    row["parameters"] = len(params)
    for builder in builders:
        result: dict = {}
        started = time.perf_counter()
        try:
            with _time_limit(timeout_s):
                graph = build_legacy_graph(model, builder, size)
        except Exception as err:  # noqa: BLE001 - every failure is recorded with its reason
            result["ok"] = False
            result["error"] = f"{type(err).__name__}: {err}"[:600]
        else:
            real = torch.nonzero(graph.dist == 1)
            covered = graph.parameter_names()
            left_out = [n for n in params if n not in covered]
            owners = dict(model.named_modules())
            result.update(
                ok=True, nodes=graph.num_nodes, edges=int(real.shape[0]),
                input_first=graph.nodes[0].op == "input",
                topological=bool((real[:, 0] < real[:, 1]).all()),
                parameters_predicted=len(params) - len(left_out),
                left_out_by_module=dict(Counter(type(owners[n.rpartition(".")[0]]).__name__ for n in left_out)),
            )
        result["build_s"] = round(time.perf_counter() - started, 3)
        row[builder] = result
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pattern", help="glob over timm.list_models()")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--builder", action="append", choices=["ghn3", "ppuda"],
                        help="repeatable; default ghn3")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per graph")
    parser.add_argument("--out", default=str(HERE / "results" / "legacy_graph_scan.json"))
    args = parser.parse_args()
    builders = tuple(args.builder or ["ghn3"])
    torch.set_num_threads(1)
    names = select_models(args.pattern, args.limit)
    started = time.perf_counter()
    rows = [scan_architecture(name, builders, args.timeout) for name in tqdm(names, desc="legacy graphs")]
    summary = {}
    for builder in builders:
        done = [r[builder] for r in rows if builder in r]
        ok = [r for r in done if r["ok"]]
        times = {r["name"]: r[builder]["build_s"] for r in rows if builder in r}
        slowest = max(times, key=times.get) if times else None
        summary[builder] = {
            "architectures": len(rows), "built": len(ok),
            "failed": {r["name"]: r[builder]["error"] for r in rows if builder in r and not r[builder]["ok"]},
            "model_errors": {r["name"]: r["model_error"] for r in rows if "model_error" in r},
            "build_s_total": round(sum(times.values()), 1),
            "build_s_max": {"name": slowest, "s": times.get(slowest)},
            "not_topological": sorted(r["name"] for r in rows if r.get(builder, {}).get("topological") is False),
            "fully_predicted": sum(r["parameters_predicted"] == rows_r["parameters"]
                                   for rows_r in rows for r in [rows_r.get(builder, {})] if r.get("ok")),
            "nodes_max": max((r["nodes"] for r in ok), default=0),
        }
    setup = {"architectures": len(names), "pattern": args.pattern, "builders": list(builders), "num_classes": 10,
             "device": "meta", "timeout_s": args.timeout, "wall_s": round(time.perf_counter() - started, 1),
             "machine": machine(), "extensions": list(LEGACY_GRAPH_EXTENSIONS)}
    with open(args.out, "w") as f:
        json.dump({"setup": setup, "summary": summary, "architectures": rows}, f, indent=1)
        f.write("\n")
    print(json.dumps({b: {k: v for k, v in s.items() if k not in ("failed", "not_topological")}
                      for b, s in summary.items()}, indent=1))


if __name__ == "__main__":
    main()
