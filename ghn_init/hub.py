"""Where GHNs live: the embedded default, a local folder, or a Hugging Face Hub repo; and how they get there.

A GHN folder holds ``config.json`` (hyper-parameters, op vocabulary, the data it was trained
on), ``model.safetensors`` and a ``README.md`` model card. Only safetensors and JSON are read from
them: nothing is unpickled. Loading is strict: a missing or unexpected tensor is an error. The
authors' published GHN-2/GHN-3 pickles are the one exception, read by an allow-list unpickler
(:mod:`ghn_init.published.formats`) and converted to this layout once.
:func:`push_to_hub` uploads a GHN, :func:`push_predicted` a folder of predicted weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import importlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import safetensors.torch

from .ghn import GHN, GHNConfig
from .graph import OP_TYPES, ROLES

if TYPE_CHECKING:
    from .published.ghn import PublishedGHN
    from .published.release import PublishedRelease

__all__ = ["CONFIG_NAME", "DEFAULT_NAME", "GHNNotFoundError", "WEIGHTS_NAME", "content_hash", "load", "load_folder",
           "push_folder", "push_predicted", "push_to_hub", "remove_stale", "save_pretrained", "staged_folder"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
#: The embedded default GHN: the release folder ``hub/ghn2-cifar10``, shipped in the wheel as ``ghn_init/default``.
DEFAULT_NAME = "ghn-init/ghn2-cifar10"
_FORMAT_VERSION = 1

logger = logging.getLogger(__name__)


class GHNNotFoundError(FileNotFoundError):
    """No GHN could be found for a reference; the message lists every place that was tried."""


def content_hash(ghn: GHN) -> str:
    """SHA-256 over the GHN's tensors and config: names predicted weights after their GHN."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(ghn.config), sort_keys=True).encode())
    for name, tensor in sorted(ghn.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


#: Leftovers of a writer whose process still runs are swept anyway once this old (the PID may have been reused).
STALE_AFTER_S = 24 * 3600


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _last_modified(path: Path) -> float:
    """Newest mtime of ``path`` and, for a folder, its files (a folder's own mtime stops while a file grows)."""
    times = [path.stat().st_mtime]
    if path.is_dir():
        times += [child.stat().st_mtime for child in path.iterdir()]
    return max(times)


def remove_stale(candidates: Iterable[Path], base: str | None = None) -> list[Path]:
    """Delete leftovers named ``<base>.<pid>.<tail>`` whose writing process is gone or that are older than a day.

    Staging folders and ``.partial`` files carry the writer's PID, so a run killed outright (SIGKILL,
    a plain ``kill`` of a library caller, a power cut) is cleaned up by the next run that writes there.
    """
    removed = []
    for path in candidates:
        parts = path.name.rsplit(".", 2)
        if len(parts) != 3 or not parts[1].isdigit() or (base is not None and parts[0] != base):
            continue
        pid = int(parts[1])
        if pid == os.getpid():
            continue
        try:
            if _process_alive(pid) and time.time() - _last_modified(path) < STALE_AFTER_S:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another process swept it first
            continue
        logger.info("removed %s, left behind by process %d", path, pid)
        removed.append(path)
    return removed


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling folder to write into; it replaces ``folder`` only if the block succeeds.

    A failure part-way (an exception, Ctrl-C, or SIGTERM in the ``ghn-init`` command) leaves neither
    partial files nor a half-replaced folder behind; staging folders of killed processes are swept here.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(folder.parent.glob(f".{glob.escape(folder.name)}.*"), base=f".{folder.name}")
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", dir=folder.parent))
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


def load_folder(folder: str | os.PathLike) -> GHN | PublishedGHN:
    """Load a GHN from a folder in the hub layout; strict about tensors and vocabulary."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise GHNNotFoundError(f"{folder} is not a GHN folder: {path.name} is missing")
    try:
        config: dict[str, Any] = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); restore it, e.g. download or save the GHN "
                         "again") from err
    if isinstance(config, dict) and config.get("model_type") == "ghn-published":
        from .published.ghn import load_published_folder

        return load_published_folder(folder, config, weights_path)
    if not isinstance(config, dict) or config.get("model_type") != "ghn":
        kind = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path} does not describe a GHN (model_type={kind!r})")
    saved_ops = tuple(config.get("op_types", ()))
    if saved_ops != OP_TYPES[: len(saved_ops)]:
        raise ValueError(
            f"{folder}: the GHN was trained with another op vocabulary than this ghn_init version; "
            "upgrade ghn-init or use a GHN made for this version"
        )
    ghn = GHN(GHNConfig.from_dict(config["ghn"]))
    structural = ("format_version", "model_type", "ghn", "op_types", "roles")
    ghn.meta = {k: v for k, v in config.items() if k not in structural}
    try:
        state = safetensors.torch.load_file(weights_path)
    except (safetensors.SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path} is not a readable safetensors file ({err}): it is truncated or damaged; "
                         "download or save the GHN again") from err
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


def load(ref: str | os.PathLike | None = None, revision: str | None = None, *,
         token: str | bool | None = None, filename: str | None = None) -> GHN | PublishedGHN:
    """The embedded default (``ref=None`` or its name), a local folder, a Hub repo id, or a published GHN.

    Published GHN-2/GHN-3 files load by short name (``"ghn3-t"``, ``"ghn3-s"``, ``"ghn3-l"``,
    ``"ghn3-xl"``, ``"ghn2"``), as a Hub repo plus ``filename`` (``load("SamsungSAILMontreal/ghn3",
    filename="ghn3tm8.pt")``) or as a local file (ppuda's ``ghn2_cifar10.pt``); they are read with an
    allow-list unpickler, and ``ghn-init convert`` turns them into a safetensors folder once.
    Hub repos go through huggingface_hub's cache, so ``HF_HUB_OFFLINE=1`` and pinned
    ``revision`` behave as everywhere on the Hub. Transient Hub failures (5xx, 429, refused
    connections) are retried a few times with backoff, which huggingface_hub does not do for
    every request.
    """
    from .published.release import PUBLISHED_GHNS

    if ref is None or str(ref) == DEFAULT_NAME:
        return load_folder(_default_folder())
    release = PUBLISHED_GHNS.get(str(ref)) if filename is None else None
    if release is not None:
        ref, filename = release.repo_id, release.filename
    path = Path(ref)
    if filename is None and path.is_file():
        from .published.ghn import PublishedGHN

        return PublishedGHN.from_file(path)
    if filename is None and path.is_dir():
        return load_folder(path)
    try:
        if filename is not None:
            return _load_published(str(ref), filename, revision, token, release)
        snapshot = _download(str(ref), revision, token)
    except Exception as err:  # every Hub failure becomes one actionable line of the report
        if not _is_hub_error(err):
            raise
        what = f"file {filename} of Hub repo {ref}" if filename else f"Hub repo {ref}"
        tried = [f"local folder or file {path.resolve()}: does not exist",
                 f"{what}@{revision or 'main'}: {_explain(err, str(ref), revision)}"]
        published = ", ".join(PUBLISHED_GHNS)
        raise GHNNotFoundError(
            f"no GHN found for {str(ref)!r}. Tried:\n  - " + "\n  - ".join(tried)
            + f"\nUse a folder with {CONFIG_NAME} and {WEIGHTS_NAME}, a Hub repo id, a published GHN "
            f"({published}), or None for the default."
        ) from err
    return load_folder(snapshot)


def _is_hub_error(err: BaseException) -> bool:
    """Failures of finding or fetching (reported as "not found"), as opposed to a file that was found but is bad."""
    from .published.formats import CheckpointFormatError

    return not isinstance(err, (CheckpointFormatError, pickle.UnpicklingError))


def _load_published(repo_id: str, filename: str, revision: str | None, token: str | bool | None,
                    release: PublishedRelease | None) -> PublishedGHN:
    """A published GHN file from a Hub repo, through the Hub cache, read with the allow-list unpickler."""
    from huggingface_hub import hf_hub_download

    from .published.formats import read_checkpoint
    from .published.ghn import PublishedGHN

    file = _with_retries(repo_id, lambda: hf_hub_download(repo_id, filename, revision=revision, token=token))
    kwargs: dict[str, Any] = {"repo_id": repo_id, "revision": revision}
    if release is not None:
        kwargs.update(title=release.title, paper=release.paper, license=release.license, notes=release.notes)
    return PublishedGHN.from_checkpoint(read_checkpoint(file), **kwargs)


#: Attempts and first wait (doubled after each failure) of :func:`load` on transient Hub failures.
HUB_ATTEMPTS = 3
HUB_RETRY_WAIT_S = 1.0
_TRANSIENT_STATUS = (429, 500, 502, 503, 504)


def _with_retries(repo_id: str, fetch: Any) -> Path:
    """``fetch()`` from the Hub, retried with backoff on transient failures."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    for attempt in range(1, HUB_ATTEMPTS + 1):
        try:
            return Path(fetch())
        except Exception as err:
            if attempt == HUB_ATTEMPTS or not _is_transient(err):
                raise
            wait = HUB_RETRY_WAIT_S * 2 ** (attempt - 1)
            logger.warning("Hub repo %s: %s; retrying in %.1f s (attempt %d of %d)", repo_id,
                           _first_line(err), wait, attempt + 1, HUB_ATTEMPTS)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _download(repo_id: str, revision: str | None, token: str | bool | None) -> Path:
    """``snapshot_download`` of the GHN files, retried on transient failures; checks the files are there."""
    from huggingface_hub import snapshot_download

    snapshot = _with_retries(repo_id, lambda: snapshot_download(
        repo_id, revision=revision, token=token, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]))
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (snapshot / name).is_file()]
    if missing:
        raise GHNNotFoundError(f"the repo has no {' and no '.join(missing)} at commit {snapshot.name}")
    return snapshot


def _error_chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Refused or reset connections of the HTTP client huggingface_hub uses (httpx2 from 2.x, httpx in 1.x).

    Timeouts are left out on purpose: huggingface_hub already waits long for them, and
    retrying would multiply that wait when the machine has no network at all.
    """
    classes: list[type[BaseException]] = [ConnectionRefusedError, ConnectionResetError]
    for module_name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        classes += [module.ConnectError, module.RemoteProtocolError, module.ReadError]
    return tuple(classes)


def _offline(err: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    return any(isinstance(e, OfflineModeIsEnabled) for e in _error_chain(err))


def _unreachable(err: BaseException) -> bool:
    """No answer from the Hub at all: refused, reset, timed out or unresolvable, in any HTTP client."""
    classes: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            classes.append(importlib.import_module(module_name).TransportError)
    return any(isinstance(e, tuple(classes)) for e in _error_chain(err))


def _is_transient(err: BaseException) -> bool:
    """Worth another try: a 5xx/429 answer or a refused connection, and not ``HF_HUB_OFFLINE`` at work."""
    from huggingface_hub.errors import HfHubHTTPError

    if _offline(err):
        return False
    chain = list(_error_chain(err))
    for e in chain:
        if isinstance(e, HfHubHTTPError) and getattr(e.response, "status_code", None) in _TRANSIENT_STATUS:
            return True
    return any(isinstance(e, _transport_errors()) for e in chain)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _explain(err: BaseException, repo_id: str, revision: str | None) -> str:
    """One line saying what went wrong with a Hub repo and what to do about it."""
    from huggingface_hub.errors import (
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = list(_error_chain(err))
    if isinstance(err, GHNNotFoundError):
        return (f"{err}: it is not a GHN repo or its upload is incomplete; push a GHN with "
                f"ghn_init.hub.push_to_hub(ghn, {repo_id!r})")
    if isinstance(err, HFValidationError):
        return f"not a valid repo id ({_first_line(err)})"
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return ("the repo does not exist, or it is private or gated: check the id, or log in with "
                "`hf auth login` (or pass token=...) as a user who can read it")
    if any(isinstance(e, RevisionNotFoundError) for e in chain):
        return f"no branch, tag or commit {revision!r}: pass one that exists, or revision=None for main"
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return ("not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it: "
                "run once with HF_HUB_OFFLINE unset to cache it")
    if _is_transient(err):
        return (f"the Hub did not answer after {HUB_ATTEMPTS} attempts ({_first_line(err)}); try again later, "
                "or check HF_ENDPOINT and your network")
    return _first_line(err)


def push_folder(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                token: str | bool | None = None, commit_message: str = "Upload with ghn-init") -> str:
    """Upload a Hub-layout folder (config.json, model.safetensors, README.md) to ``repo_id``; returns the commit URL.

    Creates the repo (and the branch ``revision``) when missing; only the Hub-layout files are sent.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {' and no '.join(missing)}: nothing to push to {repo_id}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message,
                                 allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        hint = ("log in with `hf auth login` (or pass token=...) as a user with write access to it"
                if status in (401, 403) else "check the repo id and your network, then push again")
        raise RuntimeError(f"could not push {folder} to the Hub repo {repo_id}: {_first_line(err)}; {hint}") from err
    except Exception as err:
        if _offline(err):
            raise RuntimeError(f"could not push {folder} to the Hub repo {repo_id}: HF_HUB_OFFLINE=1 forbids "
                               "uploads; unset it and push again") from err
        if _unreachable(err):
            raise RuntimeError(f"could not push {folder} to the Hub repo {repo_id}: the Hub did not answer "
                               f"({_first_line(err)}); check your network and HF_ENDPOINT, then push again") from err
        raise
    logger.info("pushed %s to %s", folder, info.commit_url)
    return info.commit_url


def push_to_hub(ghn: GHN, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                token: str | bool | None = None, commit_message: str = "Upload GHN with ghn-init",
                model_card: str | None = None) -> str:
    """Save ``ghn`` (with ``model_card``, or a card built from its meta) and upload it; returns the commit URL.

    ``ghn_init.load(repo_id, revision=...)`` loads it back.
    """
    from .cards import ghn_card

    with tempfile.TemporaryDirectory(prefix="ghn-push-") as tmp:
        folder = save_pretrained(ghn, Path(tmp) / "ghn", model_card=model_card or ghn_card(ghn, repo_id=repo_id))
        return push_folder(folder, repo_id, revision=revision, private=private, token=token,
                           commit_message=commit_message)


def push_predicted(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None,
                   private: bool | None = None, token: str | bool | None = None,
                   commit_message: str | None = None) -> str:
    """Upload a folder of predicted weights (``ghn-init predict``) to ``repo_id``; returns the commit URL.

    Plain timm then loads it with ``timm.create_model("hf-hub:<repo_id>", pretrained=True)``.
    """
    config_path = Path(folder) / CONFIG_NAME
    architecture = json.loads(config_path.read_text()).get("architecture") if config_path.is_file() else None
    if not architecture:
        raise ValueError(f"{folder} is not a folder of predicted weights (no {CONFIG_NAME} naming an architecture); "
                         "write one with `ghn-init predict` or ghn_init.export.save_predicted")
    return push_folder(folder, repo_id, revision=revision, private=private, token=token,
                       commit_message=commit_message or f"Add {architecture} weights predicted by a GHN (ghn-init)")
