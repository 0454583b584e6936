"""Which timm architectures a GHN covers: graph built, every tensor predicted, how fast.

Each architecture runs in a worker process with a time limit, so one model that hangs or eats
memory costs one slot, not the run. Workers import timm and load the GHN once.
"""

from __future__ import annotations

import fnmatch
import multiprocessing
import queue
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["check_architecture", "family_of", "run_coverage", "select_models"]


def family_of(name: str) -> str:
    """timm's module for the architecture (``resnet``, ``vision_transformer``, ...)."""
    import timm

    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def check_architecture(name: str, ghn: Any, num_classes: int = 10) -> dict[str, Any]:
    """Build ``name`` with its default config, extract its graph and predict every tensor."""
    from .export import create_meta_model
    from .graph import build_graph

    row: dict[str, Any] = {"name": name, "family": None}
    try:
        started = time.perf_counter()
        model, _ = create_meta_model(name, num_classes=num_classes)
        row["family"] = family_of(name)
        row["create_s"] = round(time.perf_counter() - started, 4)
        started = time.perf_counter()
        graph = build_graph(model, name=name)
        row["graph_s"] = round(time.perf_counter() - started, 4)
        row["nodes"] = graph.num_nodes
        row["other_ops"] = sum(node.op == "other" for node in graph.nodes)
        row["graph_built"] = True
        started = time.perf_counter()
        kept, tensors = {}, 0
        for tensor_name, _, note in ghn._stream(model, None, graph):  # one tensor in memory at a time
            tensors += 1
            if note is not None:
                kept[tensor_name] = note
        row["predict_s"] = round(time.perf_counter() - started, 4)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        parameter_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        row["tensors"] = tensors
        row["predicted"] = tensors - len(kept)
        # parameters not predicted (the goal: none); constant buffers (index tables) are copied by design
        row["skipped"] = {n: note for n, note in kept.items() if n in parameter_names}
        row["copied_buffers"] = sorted(set(kept) - parameter_names)
        row["ok"] = True
    except Exception as err:  # noqa: BLE001 - a failing architecture is a result, not a crash
        row.update(ok=False, graph_built=row.get("graph_built", False), error=f"{type(err).__name__}: {err}"[:500])
    return row


def _worker(tasks: Any, results: Any, ghn_ref: str | None) -> None:
    import torch

    from .hub import load

    torch.set_num_threads(1)
    ghn = load(ghn_ref)
    while True:
        name = tasks.get()
        if name is None:
            return
        results.put(check_architecture(name, ghn))


def run_coverage(names: Iterable[str], ghn_ref: str | None = None, workers: int = 2, timeout_s: float = 120.0,
                 progress: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Check ``names`` in ``workers`` processes; a model over ``timeout_s`` is killed and reported."""
    context = multiprocessing.get_context("spawn")
    pending = list(names)
    results_q = context.Queue()
    rows: dict[str, dict[str, Any]] = {}
    slots: list[dict[str, Any]] = []

    def start_slot() -> dict[str, Any]:
        tasks = context.Queue()
        process = context.Process(target=_worker, args=(tasks, results_q, ghn_ref), daemon=True)
        process.start()
        return {"process": process, "tasks": tasks, "name": None, "since": 0.0}

    def assign(slot: dict[str, Any]) -> None:
        slot["name"] = pending.pop(0) if pending else None
        slot["since"] = time.monotonic()
        if slot["name"] is not None:
            slot["tasks"].put(slot["name"])

    def record(row: dict[str, Any]) -> None:
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
        if slot is not None:  # (a late result of a killed worker has no slot any more)
            record(row)
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
            record({"name": name, "family": family_of(name), "ok": False, "graph_built": False, "error": reason})
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

