"""Safe readers for the published GHN checkpoint files, which are pickles.

GHN-3's Hub files (``SamsungSAILMontreal/ghn3``: ``ghn3tm8.pt`` ... and the GHN-2 ``ghn2.pt``) are
``joblib.dump`` pickles of a state dict whose storages are nested legacy ``torch.save`` streams;
ppuda's GHN-2 files (``ghn2_cifar10.pt``, ``ghn2_imagenet.pt``) are ``torch.save`` zip archives of
``{'state_dict', 'epoch', 'config'}``. The authors load both with unrestricted unpickling, which runs
whatever the file names. Here every global a file references is looked up in an allow-list of
containers, tensor rebuilds and storage types, each answered by our own code (never by torch's
loaders, which would unpickle the nested streams freely); anything else stops the read with
:class:`UnsafeCheckpointError` before it can run. The GHN config is then inferred from the tensors
the way the authors' loaders do (``ghn3.nn.from_pretrained``; ppuda ``GHN.load`` reads it from the file).
"""

from __future__ import annotations

import bz2
import collections
import dataclasses
import gzip
import hashlib
import io
import lzma
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = ["Checkpoint", "CheckpointFormatError", "UnsafeCheckpointError", "infer_ghn3_config", "read_checkpoint"]

#: Code base whose semantics a checkpoint follows: GHN-3's (Hub files) or ppuda's (GHN-2 ``.pt`` files).
Code = Literal["ghn3", "ppuda"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
#: Keywords of ppuda's ``GHN.__init__``: a ppuda checkpoint's ``config`` may hold only these.
PPUDA_CONFIG_KEYS = frozenset(
    {"max_shape", "num_classes", "hypernet", "decoder", "weight_norm", "ve", "layernorm", "hid", "debug_level"}
)

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file references an object outside the allow-list; nothing it names was imported or run."""


class CheckpointFormatError(ValueError):
    """The file is not a GHN checkpoint in a format we read (or it is damaged)."""


@dataclasses.dataclass
class Checkpoint:
    """A published GHN file, read: its tensors as stored, the config its authors' loader would use."""

    path: Path
    sha256: str
    container: Literal["joblib", "torch-zip", "torch-legacy"]
    family: Literal["ghn2", "ghn3"]   # GHN-2 (gated GNN) or GHN-3 (graph transformer) weights
    code: Code                        # whose code defines how the weights are used
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. ppuda's 'epoch'


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """What an allow-listed ``torch.<X>Storage`` global unpickles to: only its dtype."""

    name: str
    dtype: torch.dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> torch.Tensor:
    """Our answer to ``torch._utils._rebuild_tensor(_v2)``: a strided view of a 1-D storage tensor."""
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    """Our answer to ``torch._utils._rebuild_parameter(_with_state)``: parameters load as plain tensors."""
    return data


def _as_tuple(*args: Any) -> tuple[Any, ...]:
    """``torch.Size`` pickles as a call with one tuple argument."""
    return tuple(args[0]) if len(args) == 1 else tuple(args)


class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler that resolves only allow-listed globals, each to our own implementation."""

    def __init__(self, file: Any, source: str, persistent_load: Callable[[Any], Any] | None = None,
                 storage_from_bytes: Callable[[bytes], torch.Tensor] | None = None) -> None:
        super().__init__(file)
        self._source = source
        self._persistent = persistent_load
        self._allowed: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
            ("torch", "Size"): _as_tuple,
            **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
        }
        if storage_from_bytes is not None:
            self._allowed[("torch.storage", "_load_from_bytes")] = storage_from_bytes

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._source} references {module}.{name}, which is not a tensor, storage or plain value; "
                "refusing to load it (nothing in the file was run). Published GHN checkpoints hold only "
                "tensors and config values: check where this file came from."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise CheckpointFormatError(f"{self._source}: unexpected persistent id {pid!r} in this pickle")
        return self._persistent(pid)


def _storage_type(pid: Any, source: str) -> tuple[_StorageType, str, int]:
    """Check a ``('storage', type, key, location, numel, ...)`` persistent id and unpack it."""
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
        raise CheckpointFormatError(f"{source}: unsupported persistent id {pid!r}; expected a typed torch storage")
    if len(pid) > 5 and pid[5] is not None:
        raise CheckpointFormatError(f"{source}: storage views (legacy torch < 0.4 files) are not supported")
    return pid[1], str(pid[2]), int(pid[4])


def _read_legacy_stream(stream: io.BufferedIOBase | io.BytesIO, source: str) -> Any:
    """A legacy (pre-zip) ``torch.save`` stream: header pickles, the object, storage keys, raw data."""

    def load(persistent: Callable[[Any], Any] | None = None) -> Any:
        return _AllowListUnpickler(stream, source, persistent).load()

    if load() != _LEGACY_MAGIC or load() != _LEGACY_PROTOCOL:
        raise CheckpointFormatError(f"{source}: not a torch.save stream (bad magic number or protocol)")
    sys_info = load()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise CheckpointFormatError(f"{source}: big-endian or unknown torch.save stream ({sys_info!r})")
    storages: dict[str, torch.Tensor] = {}

    def persistent(pid: Any) -> torch.Tensor:
        kind, key, numel = _storage_type(pid, source)
        if key not in storages:  # filled in place below: tensors already built on it are views
            storages[key] = torch.empty(numel, dtype=kind.dtype)
        return storages[key]

    result = load(persistent)
    for key in load():
        storage = storages[str(key)]
        (numel,) = struct.unpack("<q", stream.read(8))
        nbytes = numel * storage.element_size()
        data = stream.read(nbytes)
        if numel != storage.numel() or len(data) != nbytes:
            raise CheckpointFormatError(f"{source}: storage {key} is truncated or does not match its header")
        storage.copy_(torch.frombuffer(bytearray(data), dtype=storage.dtype))
    return result


def _read_torch_zip(path: Path, data: bytes) -> Any:
    """A ``torch.save`` zip: ``<prefix>/data.pkl`` with storages in ``<prefix>/data/<key>``."""
    source = str(path)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{source}: a torch zip checkpoint needs one '<folder>/data.pkl', "
                                        f"found {pickles or 'none'}")
        prefix = pickles[0][: -len("data.pkl")]
        order = prefix + "byteorder"
        if order in archive.namelist() and archive.read(order).strip() != b"little":
            raise CheckpointFormatError(f"{source}: big-endian checkpoints are not supported")

        def persistent(pid: Any) -> torch.Tensor:
            kind, key, numel = _storage_type(pid, source)
            try:
                raw = archive.read(f"{prefix}data/{key}")
            except KeyError:
                raise CheckpointFormatError(f"{source}: storage {key} is missing from the archive") from None
            storage = torch.frombuffer(bytearray(raw), dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)
            if storage.numel() != numel:
                raise CheckpointFormatError(f"{source}: storage {key} holds {storage.numel()} values, expected {numel}")
            return storage

        with archive.open(pickles[0]) as stream:
            return _AllowListUnpickler(stream, source, persistent).load()


def _decompress(data: bytes, source: str) -> bytes:
    """Undo joblib's optional compression (zlib, gzip, bz2, xz, lzma), detected by magic bytes."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00" or data[:3] == b"\x5d\x00\x00":
        return lzma.decompress(data)
    if data[:1] == b"\x78" and (data[0] * 256 + data[1]) % 31 == 0:
        return zlib.decompress(data)
    if data[:4] == b"\x04\x22\x4d\x18":
        raise CheckpointFormatError(f"{source} is lz4-compressed joblib; decompress it first "
                                    "(e.g. with the lz4 package) and load the result")
    return data


def _read_file(path: Path) -> tuple[Any, str, str]:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    source = str(path)
    if data[:4] == b"PK\x03\x04":
        return _read_torch_zip(path, data), "torch-zip", digest
    data = _decompress(data, source)
    if data[:1] != b"\x80":
        raise CheckpointFormatError(f"{source} is neither a torch.save zip nor a (joblib) pickle")
    stream = io.BytesIO(data)
    first = _AllowListUnpickler(stream, source, storage_from_bytes=lambda blob: _read_legacy_stream(
        io.BytesIO(blob), f"{source} (nested storage)"))
    obj = first.load()
    if obj == _LEGACY_MAGIC:  # a legacy torch.save file rather than a joblib pickle
        stream.seek(0)
        return _read_legacy_stream(stream, source), "torch-legacy", digest
    return obj, "joblib", digest


def _state_dict(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
    """Split a loaded object into (state dict, stored config or None, other entries)."""
    if isinstance(obj, dict) and "state_dict" in obj:
        extra = {k: v for k, v in obj.items() if k in ("epoch",)}
        return obj["state_dict"], obj.get("config"), extra
    if isinstance(obj, dict):
        return obj, None, {}
    raise CheckpointFormatError(f"{source} holds a {type(obj).__name__}, not a GHN state dict")


def infer_ghn3_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The GHN config ``ghn3.nn.from_pretrained`` infers from a state dict's keys and shapes."""
    num_classes = next((len(t) for k, t in state_dict.items() if "class_layer_predictor" in k), 10)
    spatial = 16 if num_classes >= 1000 else 11
    hid, max_ch, layers, layernorm = 32, 64, 0, False
    for key, tensor in state_dict.items():
        if key.endswith("ln.weight"):
            layernorm = True
        elif key.endswith("embed.weight"):
            hid = tensor.shape[-1]
        elif key.endswith("decoder.conv.2.weight"):
            max_ch = int(len(tensor) ** 0.5)
        elif key.endswith("shape_enc.embed_spatial.weight"):
            spatial = 11 if len(tensor) == 9 else 16
        elif key.endswith("ln1.weight") and "gnn." in key:
            layers += 1
    return {
        "hid": hid, "max_shape": (max_ch, max_ch, spatial, spatial), "num_classes": num_classes,
        "heads": 16 if hid > 64 else 8, "layers": layers, "is_ghn2": any("gnn.gru." in k for k in state_dict),
        "weight_norm": True, "ve": True, "layernorm": layernorm,
    }


def read_checkpoint(path: str | Path, code: Code | None = None) -> Checkpoint:
    """Read a published GHN file safely; ``code`` overrides whose semantics apply.

    By default a file with a stored ``config`` (ppuda's ``torch.save`` checkpoints) follows ppuda's
    code, and a bare state dict (the Hub's joblib files) follows GHN-3's code, as their authors load them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GHN checkpoint {path} does not exist")
    try:
        obj, container, digest = _read_file(path)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, OSError, zlib.error,
            lzma.LZMAError) as err:
        if isinstance(err, UnsafeCheckpointError):
            raise
        raise CheckpointFormatError(f"{path} is damaged or not a GHN checkpoint: {err}") from err
    state_dict, stored_config, extra = _state_dict(obj, str(path))
    bad = [k for k, v in state_dict.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad or not state_dict:
        raise CheckpointFormatError(f"{path}: the state dict must map names to tensors; offending keys {bad[:5]}")
    state_dict = {k: v.contiguous() for k, v in state_dict.items()}
    family = "ghn2" if any("gnn.gru." in k for k in state_dict) else "ghn3"
    code = code or ("ppuda" if stored_config is not None else "ghn3")
    if code == "ppuda":
        if family != "ghn2":
            raise CheckpointFormatError(f"{path} holds GHN-3 weights, which only GHN-3's code can use (code='ghn3')")
        if stored_config is None:
            raise CheckpointFormatError(f"{path} has no stored config, which ppuda's loader needs; use code='ghn3'")
        unknown = set(stored_config) - PPUDA_CONFIG_KEYS
        if unknown:
            raise CheckpointFormatError(f"{path}: config keys {sorted(unknown)} are not ppuda GHN arguments")
        config = {k: v for k, v in stored_config.items() if k != "debug_level"}
        config["max_shape"] = tuple(config["max_shape"])
    elif stored_config is not None:  # ghn3's loader uses a stored config as it is, adding is_ghn2
        config = {"hid": stored_config.get("hid", 32), "max_shape": tuple(stored_config["max_shape"]),
                  "num_classes": stored_config["num_classes"], "heads": stored_config.get("heads"),
                  "layers": stored_config.get("layers"), "is_ghn2": family == "ghn2",
                  "weight_norm": stored_config.get("weight_norm", False), "ve": stored_config.get("ve", False),
                  "layernorm": stored_config.get("layernorm", False)}
    else:
        config = infer_ghn3_config(state_dict)
    return Checkpoint(path=path, sha256=digest, container=container, family=family, code=code,
                      state_dict=state_dict, config=config, extra=extra)
