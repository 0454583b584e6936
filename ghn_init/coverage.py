"""Which timm architectures a GHN covers, through the paths users call.

Per architecture: ``predict`` (graph built and every tensor predicted on a meta-device model), then,
for models small enough to build on the CPU, ``apply`` (``ghn.apply_`` on a CPU-built model and a
train-mode forward pass of two images with finite outputs), ``create_model`` (``ghn_init.create_model``,
tensors equal to the prediction) and ``export`` (the folder ``ghn-init predict`` writes, loaded by
plain timm from ``local-dir:``, tensors equal to the prediction). Each architecture runs in a worker
process with a time limit, so one model that hangs or eats memory costs one slot, not the run.
Workers import timm and load the GHN once.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import gc
import multiprocessing
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["CHECKS", "MAX_CPU_PARAMS", "check_architecture", "check_counts", "exit_when_orphaned", "family_of",
           "run_coverage", "select_models"]

#: The checks of a row's ``checks``, in the order they run; all but ``predict`` build the model on the CPU.
CHECKS = ("predict", "apply", "create_model", "export")

#: Largest model (parameters counted on the meta device) that the CPU checks build. They peak at about
#: 9 bytes per parameter (timm holds a model and the state dict it loads) and take about a minute per
#: 600M parameters on one thread: 700M keeps a check within about 6 GiB and a few minutes.
MAX_CPU_PARAMS = 700_000_000


def family_of(name: str) -> str:
    """timm's module for the architecture (``resnet``, ``vision_transformer``, ...)."""
    import timm

    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:500]


@contextlib.contextmanager
def _scratch_prediction_cache() -> Iterator[None]:
    """Point ``$GHN_INIT_CACHE`` at a temporary folder: a coverage run must not leave a predicted file
    per architecture (hundreds of GB over timm) in the user's cache."""
    previous = os.environ.get("GHN_INIT_CACHE")
    with tempfile.TemporaryDirectory(prefix="ghn-coverage-") as scratch:
        os.environ["GHN_INIT_CACHE"] = scratch
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop("GHN_INIT_CACHE", None)
            else:
                os.environ["GHN_INIT_CACHE"] = previous


def _differences(model: Any, expected: Iterable[tuple[str, Any, Any]], compare_kept: bool = True) -> list[str]:
    """Names whose tensors in ``model`` differ from the predicted entries ``expected``, in order.

    ``compare_kept=False`` leaves out the tensors a GHN keeps at the model's own (random) init.
    """
    import torch

    state = model.state_dict()
    different = []
    for name, tensor, note in expected:
        value = state.pop(name, None)
        if note is not None and not compare_kept:
            continue
        if value is None or value.dtype != tensor.dtype or not torch.equal(value, tensor):
            different.append(name)
    return different + sorted(f"{name} (not predicted)" for name in state)


def _check_apply(name: str, ghn: Any, num_classes: int) -> dict[str, Any]:
    """``ghn.apply_`` on a CPU-built model keeps every Parameter object, then a forward pass gives finite outputs.

    The forward runs in train mode, as training from the prediction starts.
    """
    import timm
    import torch

    from .graph import _output_tensors

    model = timm.create_model(name, num_classes=num_classes)
    before = {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)}
    report = ghn.apply_(model)
    after = dict(model.named_parameters(remove_duplicate=False))
    replaced = sorted(n for n in before.keys() | after.keys() if n not in after or id(after[n]) != before.get(n))
    if replaced:
        raise RuntimeError(f"apply_ replaced {len(replaced)} parameter objects: {replaced[:5]}")
    unfilled = sorted(set(report.skipped) & set(after))
    if unfilled and getattr(ghn, "predicts_on_meta", True):  # published GHNs keep some, reported with why
        raise RuntimeError(f"apply_ left {len(unfilled)} parameters unpredicted: {unfilled[:5]}")
    input_size = tuple(timm.data.resolve_model_data_config(model)["input_size"])
    model.train()
    x = torch.randn((2, *input_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = list(_output_tensors(model(x)))
    if not outputs or not all(bool(t.isfinite().all()) for t in outputs):
        raise ValueError(f"train-mode forward pass at input size {input_size}: outputs missing or not finite")
    return {"input_size": list(input_size)}


def _check_create_model(name: str, ghn: Any, num_classes: int, expected: Callable[[], Iterable]) -> dict[str, Any]:
    """``ghn_init.create_model``: timm's pretrained path loads exactly the prediction."""
    from .pretrained import create_model

    with _scratch_prediction_cache():
        model = create_model(name, ghn, num_classes=num_classes)
    different = _differences(model, expected(), compare_kept=getattr(ghn, "predicts_on_meta", True))
    if different:
        raise ValueError(f"{len(different)} tensors differ from the prediction: {different[:5]}")
    return {}


def _check_export(name: str, ghn: Any, num_classes: int, expected: Callable[[], Iterable]) -> dict[str, Any]:
    """The folder ``ghn-init predict`` writes, loaded by plain ``timm.create_model("local-dir:...")``."""
    import timm

    from .export import save_predicted

    with tempfile.TemporaryDirectory(prefix="ghn-coverage-") as scratch:
        folder = save_predicted(name, Path(scratch) / "predicted", ghn, num_classes=num_classes)
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    different = _differences(model, expected(), compare_kept=getattr(ghn, "predicts_on_meta", True))
    if different:
        raise ValueError(f"{len(different)} tensors differ from the prediction: {different[:5]}")
    return {}


def check_architecture(name: str, ghn: Any, num_classes: int = 10, *, user_paths: bool = True,
                       max_cpu_params: int = MAX_CPU_PARAMS,
                       on_check: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run :data:`CHECKS` on timm's ``name`` built with its default config; failures are recorded, not raised.

    ``user_paths=False`` keeps only the meta-device ``predict`` check (fast: no model is materialized).
    Models over ``max_cpu_params`` get the CPU checks reported as skipped, with the reason.
    ``on_check(check, done)`` is called as each check starts, with the results so far (the pool uses it
    to report a model that a time limit killed: which check was running, what had passed).
    """
    from .export import create_meta_model, create_target_model, input_size_for
    from .graph import build_graph

    row: dict[str, Any] = {"name": name, "family": None, "checks": {}}
    checks: dict[str, dict[str, Any]] = row["checks"]
    model = None
    if on_check:
        on_check("predict", {})
    started = time.perf_counter()
    try:
        model, _ = create_meta_model(name, num_classes=num_classes)
        row["family"] = family_of(name)
        row["create_s"] = round(time.perf_counter() - started, 4)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        started_graph = time.perf_counter()
        if getattr(ghn, "predicts_on_meta", True):
            graph = build_graph(model, name=name)
            row["nodes"] = graph.num_nodes
            row["other_ops"] = sum(node.op == "other" for node in graph.nodes)
        row["graph_s"] = round(time.perf_counter() - started_graph, 4)
        row["graph_built"] = True
        started_predict = time.perf_counter()
        kept, tensors = {}, 0
        if getattr(ghn, "predicts_on_meta", True):
            for tensor_name, _, note in ghn._stream(model, None, graph):  # one tensor in memory at a time
                tensors += 1
                if note is not None:
                    kept[tensor_name] = note
        else:  # published GHNs keep some tensors at the model's init: report which, and why, on the meta model
            report = ghn.report(model)
            kept, tensors = report.skipped, len(report.predicted) + len(report.skipped)
        row["predict_s"] = round(time.perf_counter() - started_predict, 4)
        parameter_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        row["tensors"] = tensors
        row["predicted"] = tensors - len(kept)
        # parameters not predicted (the goal: none); constant buffers (index tables) are copied by design
        row["skipped"] = {n: note for n, note in kept.items() if n in parameter_names}
        row["copied_buffers"] = sorted(set(kept) - parameter_names)
        checks["predict"] = {"status": "ok", "s": round(time.perf_counter() - started, 3)}
    except Exception as err:  # noqa: BLE001 - a failing architecture is a result, not a crash
        row["graph_built"] = row.get("graph_built", False)
        checks["predict"] = {"status": "failed", "s": round(time.perf_counter() - started, 3), "error": _error(err)}

    if user_paths:
        parameters = row.get("parameters")
        if parameters is None:
            reason = "timm could not build the model on the meta device"
        elif parameters > max_cpu_params:
            reason = f"{parameters / 1e6:,.0f}M parameters, over the {max_cpu_params / 1e6:,.0f}M bound for CPU builds"
        else:
            reason = None
        export_graph: list[Any] = []

        def expected() -> Iterable[tuple[str, Any, Any]]:
            """The prediction ``ghn-init predict`` and ``create_model`` make: graph at the export's input size,
            BatchNorm statistics calibrated without data as they are."""
            from .batchnorm import calibrate_predicted

            target = model
            if not getattr(ghn, "predicts_on_meta", True):
                target = create_target_model(name, ghn, num_classes=num_classes)[0]
                entries = list(ghn._stream(target, input_size_for(target, ghn, None)))
            else:
                if not export_graph:
                    export_graph.append(build_graph(model, input_size_for(model, ghn, None), name=name))
                entries = list(ghn._stream(model, None, export_graph[0]))
            calibrate_predicted(target, {n: t for n, t, _ in entries}, input_size_for(target, ghn, None),
                                ghn.data_config)
            return entries

        runners = {"apply": lambda: _check_apply(name, ghn, num_classes),
                   "create_model": lambda: _check_create_model(name, ghn, num_classes, expected),
                   "export": lambda: _check_export(name, ghn, num_classes, expected)}
        for check, runner in runners.items():
            if reason is not None:
                checks[check] = {"status": "skipped", "reason": reason}
                continue
            if on_check:
                on_check(check, dict(checks))
            started = time.perf_counter()
            try:
                checks[check] = {"status": "ok", **runner()}
            except Exception as err:  # noqa: BLE001 - recorded per check
                checks[check] = {"status": "failed", "error": _error(err)}
            checks[check]["s"] = round(time.perf_counter() - started, 3)
            gc.collect()  # the CPU-built model goes before the next check builds another

    failed = [(check, result["error"]) for check, result in checks.items() if result["status"] == "failed"]
    row["ok"] = not failed
    if failed:
        row["error"] = "; ".join(f"{check}: {error}" for check, error in failed)[:1000]
    return row


def check_counts(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per check: how many architectures passed, failed or were skipped, and the summed seconds."""
    counts = {check: {"ok": 0, "failed": 0, "skipped": 0, "s": 0.0} for check in CHECKS}
    for row in rows:
        for check, result in (row.get("checks") or {}).items():
            counts[check][result["status"]] += 1
            counts[check]["s"] = round(counts[check]["s"] + result.get("s", 0.0), 1)
    return counts


def exit_when_orphaned(parent: int, every_s: float = 2.0) -> None:
    """End this worker process once the process that started it is gone (killed, even by SIGKILL or a
    plain ``kill``): spawned workers otherwise keep running, and keep the machine busy, after their parent.
    Run it in a daemon thread of the worker."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def _worker(tasks: Any, results: Any, ghn_ref: str | None, options: dict[str, Any], parent: int) -> None:
    import torch

    from .hub import load

    threading.Thread(target=exit_when_orphaned, args=(parent,), daemon=True).start()
    torch.set_num_threads(1)
    ghn = load(ghn_ref)
    while True:
        name = tasks.get()
        if name is None:
            return
        on_check = functools.partial(_report_check, results, name)
        results.put(check_architecture(name, ghn, on_check=on_check, **options))


def _report_check(results: Any, name: str, check: str, done: dict[str, Any]) -> None:
    results.put({"name": name, "running": check, "checks": done})


def run_coverage(names: Iterable[str], ghn_ref: str | None = None, workers: int = 2, timeout_s: float = 600.0,
                 progress: Callable[[dict[str, Any]], None] | None = None, *, user_paths: bool = True,
                 max_cpu_params: int = MAX_CPU_PARAMS) -> list[dict[str, Any]]:
    """Check ``names`` in ``workers`` processes; a model over ``timeout_s`` is killed and reported
    (under the check it was running). ``user_paths`` and ``max_cpu_params`` as in :func:`check_architecture`."""
    options = {"user_paths": user_paths, "max_cpu_params": max_cpu_params}
    context = multiprocessing.get_context("spawn")
    pending = list(names)
    results_q = context.Queue()
    rows: dict[str, dict[str, Any]] = {}
    slots: list[dict[str, Any]] = []

    def start_slot() -> dict[str, Any]:
        tasks = context.Queue()
        process = context.Process(target=_worker, args=(tasks, results_q, ghn_ref, options, os.getpid()),
                                  daemon=True)
        process.start()
        return {"process": process, "tasks": tasks, "name": None, "since": 0.0, "done": {}, "running": None}

    def assign(slot: dict[str, Any]) -> None:
        slot["name"] = pending.pop(0) if pending else None
        slot["since"] = time.monotonic()
        slot["running"], slot["done"] = None, {}
        if slot["name"] is not None:
            slot["tasks"].put(slot["name"])

    def record(row: dict[str, Any], since: float) -> None:
        row["wall_s"] = round(time.monotonic() - since, 2)  # the time the architecture held its worker
        rows[row["name"]] = row
        if progress:
            progress(row)

    for _ in range(min(workers, len(pending))):
        slot = start_slot()
        slots.append(slot)
        assign(slot)
    while any(slot["name"] is not None for slot in slots):
        try:
            row = results_q.get(timeout=1.0)
        except queue.Empty:
            row = None
        slot = next((s for s in slots if row is not None and s["name"] == row["name"]), None)
        if slot is not None and "running" in row:
            slot["running"], slot["done"] = row["running"], row["checks"]
            continue
        if slot is not None:  # (a late result of a killed worker has no slot any more)
            record(row, slot["since"])
            assign(slot)
            continue
        for i, slot in enumerate(slots):
            name = slot["name"]
            if name is None:
                continue
            alive = slot["process"].is_alive()
            if alive and time.monotonic() - slot["since"] < timeout_s:
                continue
            slot["process"].kill()
            reason = f"over the {timeout_s:.0f} s limit" if alive else f"worker died (exit {slot['process'].exitcode})"
            check = slot["running"] or "predict"
            after = CHECKS[CHECKS.index(check) + 1:] if user_paths else ()
            checks = {**slot["done"], check: {"status": "failed", "error": reason},
                      **{c: {"status": "skipped", "reason": f"not run: killed in {check}"} for c in after}}
            record({"name": name, "family": family_of(name), "ok": False, "graph_built": check != "predict",
                    "checks": checks, "error": f"{check}: {reason}"}, slot["since"])
            slots[i] = start_slot()
            assign(slots[i])
    for slot in slots:
        slot["tasks"].put(None)
        slot["process"].join(timeout=10)
    return [rows[n] for n in sorted(rows)]


def select_models(pattern: str | None = None, limit: int | None = None) -> list[str]:
    """timm architectures matching a glob (all of ``timm.list_models()`` by default)."""
    import timm

    names = timm.list_models()
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names[:limit] if limit else names

