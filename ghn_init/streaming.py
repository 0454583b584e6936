"""Write a safetensors file one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once; predicted weights of a
billion-parameter model are made one tensor at a time, so they are written as they come: the
header is known up front (names, dtypes and shapes are those of the meta-device model), then
each tensor's bytes are appended. Peak memory is the largest tensor, not the model.

Readers may still hold a whole file: ``accelerate.load_checkpoint_and_dispatch`` reads a single
file completely whatever its ``max_memory``, but a sharded checkpoint one shard at a time, so
:func:`write_safetensors_shards` writes the Hugging Face layout of shards plus an index.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["SHARD_INDEX", "write_safetensors", "write_safetensors_shards"]

#: Index of a sharded checkpoint, named as transformers, accelerate and huggingface_hub expect it.
SHARD_INDEX = "model.safetensors.index.json"

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def _header(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        size = math.prod(shape) * dtype.itemsize
        entries[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    return header + b" " * (-len(header) % 8)  # the data starts 8-byte aligned


def write_safetensors(path: str | os.PathLike, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (in the order and with the dtypes and shapes of ``specs``) to ``path``.

    Every tensor of ``specs`` must arrive exactly once and match its spec; otherwise the partial
    file is removed and the error names the tensor.
    """
    path = Path(path)
    header = _header(specs, metadata)
    expected = iter(specs.items())
    try:
        with open(path, "wb") as file:
            file.write(len(header).to_bytes(8, "little"))
            file.write(header)
            for name, tensor in tensors:
                want_name, (dtype, shape) = next(expected, (None, (None, None)))
                if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(
                        f"tensor {name!r} ({tensor.dtype}, {tuple(tensor.shape)}) does not match the header's "
                        f"next entry {want_name!r} ({dtype}, {shape})"
                    )
                data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                file.write(memoryview(data.numpy()))
            missing = [name for name, _ in expected]
            if missing:
                raise ValueError(f"{len(missing)} tensors never arrived, first {missing[:3]}")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _shard_plan(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list[str]]:
    """Consecutive names in groups of at most ``max_bytes``; a tensor larger than that is a group of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (dtype, shape) in specs.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors_shards(folder: str | os.PathLike, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                             tensors: Iterable[tuple[str, torch.Tensor]], max_shard_size: int | str = "1GB",
                             metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` into ``folder`` as ``model-00001-of-0000N.safetensors`` shards plus :data:`SHARD_INDEX`.

    ``max_shard_size`` is bytes or a string such as ``"500MB"`` or ``"2GiB"``; a tensor larger than it
    gets a shard of its own. Returns the index path. On any error the files written so far are removed.
    """
    if isinstance(max_shard_size, str):
        from accelerate.utils import convert_file_size_to_int

        max_shard_size = convert_file_size_to_int(max_shard_size)
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = _shard_plan(specs, max_shard_size)
    files = [folder / f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    index = folder / SHARD_INDEX
    stream = iter(tensors)
    try:
        for names, path in zip(plan, files):
            write_safetensors(path, {name: specs[name] for name in names}, itertools.islice(stream, len(names)),
                              metadata)
        extra = next(stream, None)
        if extra is not None:
            raise ValueError(f"tensor {extra[0]!r} arrived after every tensor of the header was written")
        total = sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs.values())
        weight_map = {name: path.name for names, path in zip(plan, files) for name in names}
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    except BaseException:
        for path in [*files, index]:
            path.unlink(missing_ok=True)
        raise
    return index
