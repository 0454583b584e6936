"""Where GHNs live: the embedded default, a local folder, or a Hugging Face Hub repo.

A GHN folder holds ``config.json`` (hyper-parameters, op vocabulary, the data it was trained
on), ``model.safetensors`` and a ``README.md`` model card. Only safetensors and JSON are read:
nothing is unpickled. Loading is strict: a missing or unexpected tensor is an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors.torch

from .ghn import GHN, GHNConfig
from .graph import OP_TYPES, ROLES

__all__ = ["CONFIG_NAME", "DEFAULT_NAME", "GHNNotFoundError", "WEIGHTS_NAME", "content_hash", "load",
           "load_folder", "save_pretrained", "staged_folder"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
#: The embedded default GHN: the release folder ``hub/ghn2-cifar10``, shipped in the wheel as ``ghn_init/default``.
DEFAULT_NAME = "ghn-init/ghn2-cifar10"
_FORMAT_VERSION = 1


class GHNNotFoundError(FileNotFoundError):
    """No GHN could be found for a reference; the message lists every place that was tried."""


def content_hash(ghn: GHN) -> str:
    """SHA-256 over the GHN's tensors and config: names predicted weights after their GHN."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(ghn.config), sort_keys=True).encode())
    for name, tensor in sorted(ghn.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling folder to write into; it replaces ``folder`` only if the block succeeds.

    A failure part-way leaves neither partial files nor a half-replaced folder behind.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield staging
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def save_pretrained(ghn: GHN, folder: str | os.PathLike, model_card: str | None = None) -> Path:
    """Write ``ghn`` as a Hub-ready folder (config.json, model.safetensors, README.md), atomically."""
    with staged_folder(folder) as staging:
        config = {
            "format_version": _FORMAT_VERSION,
            "model_type": "ghn",
            "name": ghn.meta.get("name", "ghn"),
            "ghn": dataclasses.asdict(ghn.config),
            "op_types": list(OP_TYPES),
            "roles": list(ROLES),
            **{k: v for k, v in ghn.meta.items() if k != "name"},
        }
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {k: v.detach().cpu().contiguous() for k, v in ghn.state_dict().items()}
        safetensors.torch.save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        if model_card is not None:
            (staging / CARD_NAME).write_text(model_card)
    return Path(folder)


def load_folder(folder: str | os.PathLike) -> GHN:
    """Load a GHN from a folder in the hub layout; strict about tensors and vocabulary."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise GHNNotFoundError(f"{folder} is not a GHN folder: {path.name} is missing")
    config: dict[str, Any] = json.loads(config_path.read_text())
    if config.get("model_type") != "ghn":
        raise ValueError(f"{config_path} does not describe a GHN (model_type={config.get('model_type')!r})")
    saved_ops = tuple(config.get("op_types", ()))
    if saved_ops != OP_TYPES[: len(saved_ops)]:
        raise ValueError(
            f"{folder}: the GHN was trained with another op vocabulary than this ghn_init version; "
            "upgrade ghn-init or use a GHN made for this version"
        )
    ghn = GHN(GHNConfig.from_dict(config["ghn"]))
    structural = ("format_version", "model_type", "ghn", "op_types", "roles")
    ghn.meta = {k: v for k, v in config.items() if k not in structural}
    state = safetensors.torch.load_file(weights_path)
    missing, unexpected = ghn.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not match its config: missing tensors {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    ghn.eval()
    return ghn


def _default_folder() -> Path:
    """Inside an installed wheel: ``ghn_init/default``; in a source checkout: ``hub/<release>``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "default", here.parent / "hub" / DEFAULT_NAME.split("/")[-1]):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise GHNNotFoundError(f"the embedded default GHN is missing from {here / 'default'}; reinstall ghn-init")


def load(ref: str | os.PathLike | None = None, revision: str | None = None) -> GHN:
    """The embedded default (``ref=None`` or its name), a local folder, or a Hub repo id.

    Hub repos go through huggingface_hub's cache, so ``HF_HUB_OFFLINE=1`` and pinned
    ``revision`` behave as everywhere on the Hub.
    """
    if ref is None or str(ref) == DEFAULT_NAME:
        return load_folder(_default_folder())
    tried = []
    path = Path(ref)
    if path.is_dir():
        return load_folder(path)
    tried.append(f"local folder {path.resolve()}: does not exist")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(str(ref))
        snapshot = snapshot_download(str(ref), revision=revision,
                                     allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
        return load_folder(snapshot)
    except GHNNotFoundError as err:
        tried.append(f"Hub repo {ref}@{revision or 'main'}: {err}")
    except Exception as err:  # noqa: BLE001 - every Hub failure becomes one line of the report
        tried.append(f"Hub repo {ref}@{revision or 'main'}: {type(err).__name__}: {str(err).splitlines()[0]}")
    raise GHNNotFoundError(
        f"no GHN found for {str(ref)!r}. Tried:\n  - " + "\n  - ".join(tried)
        + f"\nUse a folder with {CONFIG_NAME} and {WEIGHTS_NAME}, a Hub repo id, or None for the default."
    )
