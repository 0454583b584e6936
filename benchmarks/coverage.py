"""Coverage of timm by the embedded GHN: for every architecture of ``timm.list_models()`` (or a glob),
whether the graph builds and every tensor is predicted, with graph and predict times.

Writes benchmarks/results/coverage.{json,png} and a per-family table in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

from _report import HERE, machine, update_results
from tqdm.auto import tqdm

from ghn_init.coverage import run_coverage, select_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pattern")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    names = select_models(args.pattern, args.limit)
    setup = {"architectures": len(names), "pattern": args.pattern, "workers": args.workers,
             "timeout_s": args.timeout, "num_classes": 10, "machine": machine()}
    print(json.dumps(setup, indent=2))
    started = time.perf_counter()
    with tqdm(total=len(names), desc="coverage") as bar:
        rows = run_coverage(names, workers=args.workers, timeout_s=args.timeout, progress=lambda _: bar.update(1))
    setup["wall_s"] = round(time.perf_counter() - started, 1)
    families: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        families[row["family"] or "?"].append(row)
    ok = [r for r in rows if r["ok"] and not r["skipped"]]
    summary = {"architectures": len(rows), "fully_predicted": len(ok),
               "graph_built": sum(r["graph_built"] for r in rows),
               "tensors_skipped": sum(len(r.get("skipped") or {}) for r in rows),
               "constant_buffers_copied": {r["name"]: r["copied_buffers"] for r in rows if r.get("copied_buffers")},
               "nodes": sum(r.get("nodes", 0) for r in rows),
               "other_op_nodes": sum(r.get("other_ops", 0) for r in rows),
               "architectures_with_other_ops": sum(bool(r.get("other_ops")) for r in rows),
               "graph_s_total": round(sum(r.get("graph_s", 0) for r in rows), 1),
               "predict_s_total": round(sum(r.get("predict_s", 0) for r in rows), 1),
               "failed": {r["name"]: r["error"] for r in rows if not r["ok"]}}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "coverage.json").write_text(json.dumps({"setup": setup, "summary": summary, "architectures": rows},
                                                  indent=1) + "\n")
    _plot(families, out / "coverage.png")
    lines = [f"{summary['fully_predicted']}/{summary['architectures']} architectures fully predicted "
             f"({summary['graph_built']} graphs built, {summary['tensors_skipped']} parameter tensors skipped); "
             f"sums of per-model times: graph builds {summary['graph_s_total']} s, predictions from the graphs "
             f"{summary['predict_s_total']} s; wall {setup['wall_s']} s with "
             f"{args.workers} workers on {setup['machine']['cpus']} CPUs, timm {setup['machine']['timm']}.", "",
             f"Generic `other` ops: {summary['other_op_nodes']} of {summary['nodes']} graph nodes, in "
             f"{summary['architectures_with_other_ops']} architectures.", "",
             f"{len(summary['constant_buffers_copied'])} architectures also save constant buffers that timm sets at "
             "construction (attention-bias index tables, activation clip bounds, input statistics; not weights); "
             "they are copied from a parameter-free build and listed as `copied_buffers`: "
             + ", ".join(f"{n} ({len(b)})" for n, b in sorted(summary["constant_buffers_copied"].items())) + ".", "",
             "| family | architectures | fully predicted | not covered (reason) |", "|---|---|---|---|"]
    for family in sorted(families):
        group = families[family]
        bad = [f"{r['name']} ({r.get('error') or 'skipped tensors'})"[:160] for r in group
               if not r["ok"] or r.get("skipped")]
        lines.append(f"| {family} | {len(group)} | {len(group) - len(bad)} | {'; '.join(bad[:3])}"
                     f"{' ...' if len(bad) > 3 else ''} |")
    lines += ["", "`python benchmarks/coverage.py` -> `benchmarks/results/coverage.json`, `coverage.png`"]
    update_results("coverage", "## Coverage of timm\n\n" + "\n".join(lines))
    print(json.dumps({k: v for k, v in summary.items() if k != "failed"}))


def _plot(families: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(families, key=lambda f: -len(families[f]))
    good = [sum(r["ok"] and not r.get("skipped") for r in families[f]) for f in names]
    bad = [len(families[f]) - g for f, g in zip(names, good)]
    fig, ax = plt.subplots(figsize=(14, 4))
    ax.bar(names, good, label="fully predicted")
    ax.bar(names, bad, bottom=good, label="not covered", color="tab:red")
    ax.set_ylabel("architectures")
    ax.tick_params(axis="x", rotation=90, labelsize=6)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
