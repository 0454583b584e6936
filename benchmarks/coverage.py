"""Coverage of timm by the embedded GHN, through what users call: for every architecture of
``timm.list_models()`` (or a glob), prediction on a meta-device model and, for models up to
``--max-params``, ``ghn.apply_`` on a CPU-built model with a forward pass, ``ghn_init.create_model``
and the ``ghn-init predict`` folder loaded by plain timm (see :mod:`ghn_init.coverage`).

Writes benchmarks/results/coverage.{json,png} and the coverage section of RESULTS.md. With ``--rows``
every finished architecture is appended to a JSON-lines file and a rerun skips those already there
(``--retry-failed`` reruns the failed ones): a run over all of timm can stop and resume.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

from _report import HERE, describe_ghn, ghn_setup, machine, update_results
from tqdm.auto import tqdm

import ghn_init
from ghn_init.coverage import CHECKS, MAX_CPU_PARAMS, check_counts, run_coverage, select_models

_LABELS = {"predict": "predict (meta)", "apply": "`apply_` + forward", "create_model": "`create_model`",
           "export": "`local-dir:` folder"}


def _load_rows(path: Path | None) -> dict[str, dict]:
    if path is None or not path.is_file():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["name"]] = row  # a later line (a retry) replaces an earlier one
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pattern")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--meta-only", action="store_true", help="only predict on meta-device models (minutes)")
    parser.add_argument("--max-params", type=int, default=MAX_CPU_PARAMS,
                        help="larger models skip the CPU-built checks (reported with the reason)")
    parser.add_argument("--rows", type=Path, help="JSON-lines file of finished architectures (appended, resumed)")
    parser.add_argument("--retry-failed", action="store_true", help="with --rows: rerun architectures that failed")
    parser.add_argument("--ghn", help="GHN to cover (default: the embedded GHN), e.g. a converted GHN-3-T")
    parser.add_argument("--label", help="name of this GHN's results (required with --ghn), e.g. ghn3-t")
    args = parser.parse_args()
    if bool(args.ghn) != bool(args.label):
        parser.error("--ghn and --label go together")
    names = select_models(args.pattern, args.limit)
    done = {name: row for name, row in _load_rows(args.rows).items() if name in set(names)}
    if args.retry_failed:
        done = {name: row for name, row in done.items() if row["ok"]}
    todo = [n for n in names if n not in done]
    setup = {"architectures": len(names), "pattern": args.pattern, "workers": args.workers,
             "timeout_s": args.timeout, "num_classes": 10, "checks": ["predict"] if args.meta_only else list(CHECKS),
             "max_cpu_params": None if args.meta_only else args.max_params, **ghn_setup(ghn_init.load(args.ghn)),
             "ghn_ref": args.ghn, "label": args.label,
             "machine": machine()}
    print(json.dumps({**setup, "resumed": len(done), "to_run": len(todo)}, indent=2))
    started = time.perf_counter()
    with tqdm(total=len(todo), desc="coverage") as bar:
        def progress(row: dict) -> None:
            bar.update(1)
            if not row["ok"]:
                bar.write(f"{row['name']}: {row['error'][:300]}")
            if args.rows:
                with args.rows.open("a") as file:
                    file.write(json.dumps(row) + "\n")

        new = run_coverage(todo, ghn_ref=args.ghn, workers=args.workers, timeout_s=args.timeout, progress=progress,
                           user_paths=not args.meta_only, max_cpu_params=args.max_params)
    setup["wall_s"] = round(time.perf_counter() - started, 1)
    rows = sorted([*done.values(), *new], key=lambda r: r["name"])
    # with resumed rows, the sum of the time each architecture held its worker is the run's real cost
    setup["architecture_wall_s_total"] = round(sum(r.get("wall_s", 0.0) for r in rows), 1)
    write_report(rows, setup)


def write_report(rows: list[dict], setup: dict) -> None:
    families: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        families[row["family"] or "?"].append(row)
    counts = check_counts(rows)
    predicted = [r for r in rows if r["checks"].get("predict", {}).get("status") == "ok" and not r.get("skipped")]
    summary = {"architectures": len(rows), "fully_predicted": len(predicted),
               "graph_built": sum(r["graph_built"] for r in rows),
               "tensors_skipped": sum(len(r.get("skipped") or {}) for r in rows),
               "constant_buffers_copied": {r["name"]: r["copied_buffers"] for r in rows if r.get("copied_buffers")},
               "nodes": sum(r.get("nodes", 0) for r in rows),
               "other_op_nodes": sum(r.get("other_ops", 0) for r in rows),
               "architectures_with_other_ops": sum(bool(r.get("other_ops")) for r in rows),
               "graph_s_total": round(sum(r.get("graph_s", 0) for r in rows), 1),
               "predict_s_total": round(sum(r.get("predict_s", 0) for r in rows), 1),
               "checks": counts,
               "all_checks_passed": sum(r["ok"] for r in rows),
               "cpu_checks_skipped": {r["name"]: r["checks"]["apply"]["reason"] for r in rows
                                      if r["checks"].get("apply", {}).get("status") == "skipped"},
               "kept_by_reason": dict(Counter(_reason_kind(note) for r in rows
                                              for note in (r.get("skipped") or {}).values()).most_common()),
               "failed": {r["name"]: r["error"] for r in rows if not r["ok"]}}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem = f"coverage_{setup['label']}" if setup.get("label") else "coverage"
    (out / f"{stem}.json").write_text(json.dumps({"setup": setup, "summary": summary, "architectures": rows},
                                                 indent=1) + "\n")
    _plot(families, out / f"{stem}.png")
    title = f"## Coverage of timm by {setup['label']}" if setup.get("label") else "## Coverage of timm"
    update_results(stem, title + "\n\n" + "\n".join(_markdown(rows, families, setup, summary)))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("failed", "constant_buffers_copied",
                                                                   "cpu_checks_skipped")}))


def _reason_kind(note: str) -> str:
    """The kind of reason a tensor was kept for, without the module it names."""
    if note.startswith("no graph node for its module"):
        return "no graph node for its module type (GroupNorm, RmsNorm, BatchNorm1d, Conv1d, ...)"
    if "is not a weight or bias" in note:
        return "not a weight or bias the published graphs represent (gains, scales, extra tokens, ...)"
    return note.split(":")[0]


def _markdown(rows: list[dict], families: dict[str, list[dict]], setup: dict, summary: dict) -> list[str]:
    counts = summary["checks"]
    ran = [c for c in CHECKS if sum(counts[c][k] for k in ("ok", "failed", "skipped"))]
    bound = setup.get("max_cpu_params")
    lines = [f"{summary['all_checks_passed']}/{summary['architectures']} architectures passed every check that ran; "
             f"{describe_ghn(setup)}, 10 classes, timm {setup['machine']['timm']}, torch {setup['machine']['torch']}, "
             f"{setup['workers']} worker(s) of one thread on {setup['machine']['cpus']} CPUs, "
             f"{setup['timeout_s']:.0f} s limit per architecture.", "",
             "| check | what it runs | passed | failed | skipped | summed time |", "|---|---|---|---|---|---|"]
    what = {"predict": "graph of the meta-device model; every tensor predicted, or kept at the model's init and "
                       "reported with the reason (published GHNs)",
            "apply": "`timm.create_model` on the CPU, `ghn.apply_(model)`, train-mode forward of 2 images at the "
                     "model's input size: same Parameter objects, finite outputs",
            "create_model": "`ghn_init.create_model(name, num_classes=10)`: loaded tensors equal the prediction",
            "export": "`save_predicted` (as `ghn-init predict`), then `timm.create_model(\"local-dir:DIR\", "
                      "pretrained=True)`: loaded tensors equal the prediction"}
    for check in ran:
        c = counts[check]
        lines.append(f"| {_LABELS[check]} | {what[check]} | {c['ok']} | {c['failed']} | {c['skipped']} | "
                     f"{c['s']:,.0f} s |")
    lines += ["", f"Wall time {setup['architecture_wall_s_total']:,.0f} s summed over architectures (the time each "
              f"held its worker; this session's wall {setup['wall_s']:,.0f} s). "]
    if summary["nodes"]:  # ghn-init's own graphs
        lines[-1] += (f"Graph builds sum to {summary['graph_s_total']} s, predictions from the graphs to "
                      f"{summary['predict_s_total']} s; {summary['fully_predicted']} architectures fully predicted "
                      f"({summary['graph_built']} graphs built, {summary['tensors_skipped']} parameter tensors "
                      f"skipped); generic `other` ops: {summary['other_op_nodes']} of {summary['nodes']} graph "
                      f"nodes, in {summary['architectures_with_other_ops']} architectures.")
    else:  # a published GHN: graph and prediction timed together, kept tensors reported below
        lines[-1] += (f"Graphs and predictions sum to {summary['predict_s_total']} s; {summary['fully_predicted']} "
                      "architectures have every parameter predicted, the others keep some at the model's own init, "
                      "each reported with its reason (below).")
    lines.append("")
    if bound:
        skipped = summary["cpu_checks_skipped"]
        sizes = sorted((r.get("parameters") or 0, r["name"]) for r in rows if r["name"] in skipped)
        lines += [f"Skipped CPU checks ({len(skipped)}): models over {bound / 1e6:,.0f}M parameters (counted on the "
                  "meta device) are not built on the CPU here: the checks peak at about 9 bytes per parameter "
                  "(timm holds the model and the state dict it loads) and take about a minute per 600M "
                  "parameters on one thread. " + ", ".join(f"{n} ({p / 1e6:,.0f}M)" for p, n in sizes) + ".", ""]
    if summary["kept_by_reason"]:
        lines += [f"Parameter tensors kept at the model's own init, each reported with its reason ("
                  f"{summary['tensors_skipped']} in {sum(bool(r.get('skipped')) for r in rows)} architectures), by "
                  "reason: " + ", ".join(f"{reason} {n}" for reason, n in summary["kept_by_reason"].items()) + ".", ""]
    failed = [r for r in rows if not r["ok"]]
    lines += [f"Failures ({len(failed)}):" if failed else "Failures: none.", ""]
    for row in failed:
        for check, result in row["checks"].items():
            if result["status"] == "failed":
                lines.append(f"- {row['name']}, {_LABELS[check]}: {result['error'][:300]}")
    lines += [""] if failed else []
    lines += [f"{len(summary['constant_buffers_copied'])} architectures also save constant buffers that timm sets at "
              "construction (attention-bias index tables, activation clip bounds, input statistics; not weights); "
              "they are copied from a parameter-free build and listed as `copied_buffers`: "
              + ", ".join(f"{n} ({len(b)})" for n, b in sorted(summary["constant_buffers_copied"].items())) + ".", "",
              "| family | architectures | " + " | ".join(_LABELS[c] for c in ran) + " | not covered (reason) |",
              "|---|---|" + "---|" * len(ran) + "---|"]
    for family in sorted(families):
        group = families[family]
        cells = []
        for check in ran:
            results = [r["checks"].get(check, {}).get("status") for r in group]
            cell = f"{results.count('ok')}"
            if results.count("skipped"):
                cell += f" ({results.count('skipped')} skipped)"
            cells.append(cell)
        bad = [f"{r['name']} ({r['error']})"[:160] for r in group if not r["ok"]]
        lines.append(f"| {family} | {len(group)} | " + " | ".join(cells) +
                     f" | {'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} |")
    which = f" --ghn {setup['ghn_ref']} --label {setup['label']}" if setup.get("label") else ""
    stem = f"coverage_{setup['label']}" if setup.get("label") else "coverage"
    lines += ["", f"`nice python benchmarks/coverage.py{which} --rows coverage.rows.jsonl` (resumable; "
              "`--retry-failed`, `--meta-only` for the meta-device prediction alone, `--max-params N`) -> "
              f"`benchmarks/results/{stem}.json`, `{stem}.png`"]
    return lines


def _plot(families: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(families, key=lambda f: -len(families[f]))
    good = [sum(r["ok"] and r["checks"].get("apply", {}).get("status") != "skipped" for r in families[f])
            for f in names]
    large = [sum(r["ok"] and r["checks"].get("apply", {}).get("status") == "skipped" for r in families[f])
             for f in names]
    bad = [len(families[f]) - g - s for f, g, s in zip(names, good, large)]
    fig, ax = plt.subplots(figsize=(14, 4))
    ax.bar(names, good, label="every check passed")
    ax.bar(names, large, bottom=good, label="predicted; too large for the CPU checks", color="tab:gray")
    ax.bar(names, bad, bottom=[g + s for g, s in zip(good, large)], label="a check failed", color="tab:red")
    ax.set_ylabel("architectures")
    ax.tick_params(axis="x", rotation=90, labelsize=6)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
