"""Time of ``ghn.predict`` on a meta-device model (graph included) against timm's own random init.

For each model: median of ``--repeats`` runs (default 10) of
``ghn.predict(timm.create_model(name, device="meta"), calibrate_bn=False)`` (the weights, BatchNorm
statistics at identity as timm's own init leaves them) and of ``timm.create_model(name)`` on the
CPU, measured in the same worker process (after one warm-up each, interleaved; ``ghn.predict`` with
its default data-free BatchNorm calibration is timed alongside, as an extra column), and the peak RSS
above the post-import baseline of a fresh worker running one method once. Writes
benchmarks/results/predict_speed.{json,png} and a table in RESULTS.md; with ``--ghn REF --label L``
(e.g. a converted GHN-3-T) the same for that GHN, as predict_speed_L.{json,png} and its own table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _report import HERE, machine, update_results

MODELS = ["resnet18", "resnet50", "convnext_base", "efficientnet_b3", "vit_small_patch16_224",
          "vit_base_patch16_224", "vit_large_patch16_224"]

_WORKER = r"""
import json, resource, statistics, sys, time
import torch, timm, ghn_init
torch.set_num_threads(int(sys.argv[3]))
name, method, repeats = sys.argv[1], sys.argv[2], int(sys.argv[4])
ghn = ghn_init.load(sys.argv[5] or None)
methods = {"ghn": lambda: ghn.predict(timm.create_model(name, num_classes=1000, device="meta"), calibrate_bn=False),
           "timm": lambda: timm.create_model(name, num_classes=1000),
           "ghn_bn": lambda: ghn.predict(timm.create_model(name, num_classes=1000, device="meta"))}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if method == "both":  # timing: interleaved in one process, one warm-up each
    times = {m: [] for m in methods}
    for i in range(repeats + 1):
        for m, run in methods.items():
            t = time.perf_counter(); run(); times[m].append(time.perf_counter() - t)
    result = {m: statistics.median(t[1:]) for m, t in times.items()}
    result["params"] = sum(p.numel() for p in timm.create_model(name, device="meta").parameters())
else:  # memory: one method alone in a fresh process
    methods[method]()
    result = {"peak_rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}
print(json.dumps(result))
"""


def measure(name: str, method: str, threads: int, repeats: int = 1, ghn: str | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", _WORKER, name, method, str(threads), str(repeats), ghn or ""],
                         capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per method (median reported)")
    parser.add_argument("--ghn", help="GHN to time (default: the embedded GHN)")
    parser.add_argument("--label", help="name of this GHN's results (required with --ghn), e.g. ghn3-t")
    args = parser.parse_args()
    if bool(args.ghn) != bool(args.label):
        parser.error("--ghn and --label go together")
    setup = {"models": args.models, "threads": args.threads, "repeats": args.repeats, "machine": machine()}
    if args.ghn:
        import ghn_init

        ghn = ghn_init.load(args.ghn)
        setup.update(ghn=ghn.meta.get("name", args.ghn), ghn_sha256=ghn_init.content_hash(ghn)[:16])
    print(json.dumps(setup, indent=2))
    rows = {}
    for name in args.models:
        times = measure(name, "both", args.threads, args.repeats, args.ghn)
        rows[name] = {"params_m": round(times["params"] / 1e6, 1), "ghn_predict_s": round(times["ghn"], 4),
                      "timm_init_s": round(times["timm"], 4), "ratio": round(times["ghn"] / times["timm"], 3),
                      "ghn_predict_calibrated_s": round(times["ghn_bn"], 4),
                      "ghn_peak_rss_mb": round(measure(name, "ghn", args.threads, ghn=args.ghn)["peak_rss_mb"]),
                      "timm_peak_rss_mb": round(measure(name, "timm", args.threads, ghn=args.ghn)["peak_rss_mb"])}
        print(name, json.dumps(rows[name]))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem = f"predict_speed_{args.label}" if args.label else "predict_speed"
    (out / f"{stem}.json").write_text(json.dumps({"setup": setup, "models": rows}, indent=2) + "\n")
    _plot(rows, out / f"{stem}.png")
    which = f"{setup['ghn']} (sha256 {setup['ghn_sha256']}); " if args.ghn else ""
    lines = [f"{which}{setup['machine']['processor']}, {setup['machine']['cpus']} CPUs, {args.threads} torch threads, "
             f"torch {setup['machine']['torch']}, timm {setup['machine']['timm']}; medians of {args.repeats} after a "
             "warm-up, 1,000 classes.", "",
             "| model | params (M) | ghn.predict on meta (s) | timm.create_model on CPU (s) | ratio "
             "| peak RSS, GHN / timm (MB) | with data-free BN calibration (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['params_m']} | {r['ghn_predict_s']:.3f} | {r['timm_init_s']:.3f} | "
                     f"**{r['ratio']:.2f}** | {r['ghn_peak_rss_mb']} / {r['timm_peak_rss_mb']} | "
                     f"{r['ghn_predict_calibrated_s']:.3f} |")
    command = "python benchmarks/predict_speed.py" + (f" --ghn {args.ghn} --label {args.label}" if args.ghn else "")
    lines += ["", f"`{command}` -> `benchmarks/results/{stem}.json`, `.png`"]
    title = f"## Prediction speed of {args.label} against timm's random init" if args.label else \
        "## Prediction speed against timm's random init"
    update_results(stem, title + "\n\n" + "\n".join(lines))


def _plot(rows: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [rows[n]["ghn_predict_s"] for n in names], 0.4, label="ghn.predict (meta model)")
    ax.bar([x + 0.2 for x in xs], [rows[n]["timm_init_s"] for n in names], 0.4, label="timm.create_model (CPU)")
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds (median of 5)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
