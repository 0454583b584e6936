"""A published GHN (GHN-2 or GHN-3) behind the same interface as ghn-init's own :class:`~ghn_init.GHN`.

``predict``, ``predict_tensors``, ``apply_``, ``save_pretrained`` and ``push_to_hub`` work as for our
GHN, so everything downstream (``create_model``, ``pretrained_cfg``, the CLI) takes either. The
prediction itself follows the authors' code (:mod:`.legacy_graph`, :mod:`.networks`); parameters the
published GHNs do not predict (layer scales, relative-position bias tables, class tokens) keep the
model's own values and are reported with the reason, never hidden.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from torch import nn

from ..ghn import PredictionReport, _one_thread, fill_, norm_statistics
from ..graph import _default_input_size
from .formats import Checkpoint, Code, read_checkpoint
from .legacy_graph import LegacyGraph, build_legacy_graph
from .networks import build_network
from .release import data_config_for, published_card

__all__ = ["MODEL_TYPE", "PublishedConfig", "PublishedGHN", "load_published_folder"]

logger = logging.getLogger(__name__)

#: ``model_type`` in the config.json of a converted published GHN.
MODEL_TYPE = "ghn-published"
_FORMAT_VERSION = 1


@dataclasses.dataclass
class PublishedConfig:
    """How a published GHN is used: its authors' network config and the code base whose semantics apply."""

    family: Literal["ghn2", "ghn3"]
    code: Code
    network: dict[str, Any]
    #: ghn-init's own prediction settings (see :class:`~ghn_init.GHNConfig`) are off for published GHNs,
    #: so that they predict exactly what their authors' code predicts.
    untie_noise: float = 0.0
    residual_branch_gain: float = 1.0

    def __post_init__(self) -> None:
        if self.untie_noise != 0.0 or self.residual_branch_gain != 1.0:
            raise ValueError("published GHNs predict as their authors' code does: untie_noise must be 0 and "
                             "residual_branch_gain 1 (ghn-init's own settings apply to ghn-init GHNs only)")
        self.network = {k: list(v) if isinstance(v, tuple) else v for k, v in self.network.items()}


class PublishedGHN(nn.Module):
    """A GHN-2 or GHN-3 from its authors' published files; see :func:`ghn_init.load`."""

    #: Some tensors keep the model's own init (layer scales, class tokens), so their values must exist:
    #: callers that build the target model (``ghn_init.create_model``, ``ghn-init predict``) build it on the CPU.
    predicts_on_meta = False

    def __init__(self, config: PublishedConfig, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.meta: dict[str, Any] = dict(meta or {})
        self.network = build_network(dict(config.network), code=config.code)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, *, repo_id: str | None = None, revision: str | None = None,
                        title: str | None = None, paper: tuple[str, str] | None = None, license: str | None = None,
                        notes: str = "") -> PublishedGHN:
        """Build from a file read by :func:`~ghn_init.published.formats.read_checkpoint`, with its provenance."""
        from .. import __version__
        from .release import GHN2_PAPER, GHN3_PAPER

        config = PublishedConfig(family=checkpoint.family, code=checkpoint.code, network=dict(checkpoint.config))
        name = title or f"{checkpoint.family.upper()} ({checkpoint.path.name})"
        meta = {
            "name": name, "title": name, "data": data_config_for(int(checkpoint.config["num_classes"])),
            "paper": list(paper or (GHN2_PAPER if checkpoint.family == "ghn2" else GHN3_PAPER)),
            "license": license or "mit", "ghn_init": __version__, "notes": notes,
            "source": {"repo_id": repo_id, "revision": revision, "filename": checkpoint.path.name,
                       "sha256": checkpoint.sha256, "container": checkpoint.container, **checkpoint.extra},
        }
        ghn = cls(config, meta)
        ghn.network.load_official_state_dict(checkpoint.state_dict)
        return ghn.eval()

    @classmethod
    def from_file(cls, path: str | os.PathLike, code: Code | None = None) -> PublishedGHN:
        """A published file on disk (ppuda's ``.pt``, or a Hub file already downloaded)."""
        return cls.from_checkpoint(read_checkpoint(path, code=code))

    # ------------------------------------------------------------------ prediction
    @property
    def data_config(self) -> dict[str, Any]:
        return self.meta.get("data", {})

    def _input_size(self, model: nn.Module) -> tuple[int, ...]:
        """The size a fixed-size model (ViT, Mixer) was built for, else the size the GHN was trained at."""
        channels = int(getattr(model, "in_chans", None) or 3)
        embed = getattr(model, "patch_embed", None) or getattr(model, "stem", None)
        built_for = getattr(embed, "img_size", None)
        if isinstance(built_for, (tuple, list)) and len(built_for) == 2 and all(built_for):
            return channels, *built_for
        trained = self.data_config.get("input_size", (3, 224, 224))
        return channels, trained[1], trained[2]

    @torch.no_grad()
    def predict(self, model: nn.Module, input_size: Sequence[int] | None = None, *,
                calibrate_bn: bool = True) -> dict[str, torch.Tensor]:
        """A state dict for ``model``: predicted where the GHN predicts, the model's own values elsewhere.

        BatchNorm running statistics are calibrated data-free, as for ghn-init's GHNs, so eval mode works
        out of the box (the authors' code instead runs BatchNorm on batch statistics);
        ``calibrate_bn=False`` leaves them at identity. Parameters are what the authors' code predicts.
        """
        state = dict(self.predict_tensors(model, input_size))
        if calibrate_bn:
            self._calibrate(model, state, input_size)
        return state

    def _calibrate(self, model: nn.Module, state: dict[str, torch.Tensor] | None,
                   input_size: Sequence[int] | None) -> None:
        from ..batchnorm import calibrate_predicted

        calibrate_predicted(model, state, input_size or self._input_size(model), self.data_config)

    def predict_tensors(self, model: nn.Module,
                        input_size: Sequence[int] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every state-dict entry in order."""
        for name, tensor, _ in self._stream(model, input_size):
            yield name, tensor

    def _graph(self, model: nn.Module, input_size: Sequence[int] | None) -> LegacyGraph:
        """The graph at ``input_size``; by default at the GHN's size, or the model's own size where the
        model cannot run at the GHN's (timm models built for 256 or 384 pixels, window sizes)."""
        if input_size is not None:
            return build_legacy_graph(model, self.config.code, tuple(input_size))
        size = self._input_size(model)
        try:
            return build_legacy_graph(model, self.config.code, size)
        except RuntimeError as err:
            own = tuple(_default_input_size(model))
            if own[1:] == size[1:]:
                raise
            logger.warning("%s does not run at %s's %dx%d inputs, so its graph is built at its own size %dx%d: %s",
                           type(model).__name__, self.meta.get("name", "the GHN"), size[1], size[2], own[1],
                           own[2], err)
            return build_legacy_graph(model, self.config.code, (size[0], *own[1:]))

    def _plan(self, model: nn.Module, input_size: Sequence[int] | None, values: bool = True,
              ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str | None]]:
        """The network's prediction, why the rest is kept, and each state-dict entry's source:
        the predicted name it reads (a shared parameter reads its first name), or ``None``."""
        graph = self._graph(model, input_size)
        with _one_thread():  # the same tensors whatever the thread count, as for ghn-init's own GHNs
            predicted, kept = self.network.predict(model, graph, code=self.config.code, values=values)
        owner = {id(p): n for n, p in model.named_parameters(remove_duplicate=False) if n in predicted}
        sources = {name: name if name in predicted else owner.get(id(ref))
                   for name, ref in model.state_dict(keep_vars=True).items()}
        return predicted, kept, sources

    @torch.no_grad()
    def report(self, model: nn.Module, input_size: Sequence[int] | None = None) -> PredictionReport:
        """What :meth:`apply_` would do, without any tensor values: works on meta-device models."""
        _, kept, sources = self._plan(model, input_size, values=False)
        statistics = norm_statistics(model)
        predicted = [n for n, source in sources.items() if source is not None or n in statistics]
        return PredictionReport(predicted=predicted, skipped={
            n: kept.get(n, "buffer copied from the model (constants, not weights)") for n in sources
            if n not in predicted})

    @torch.no_grad()
    def _stream(self, model: nn.Module,
                input_size: Sequence[int] | None) -> Iterator[tuple[str, torch.Tensor, str | None]]:
        """State-dict entries with a note: ``None`` when predicted, else why the model's value was kept."""
        predicted, kept, sources = self._plan(model, input_size)
        statistics = norm_statistics(model)
        entries = model.state_dict(keep_vars=True)
        unknown = [name for name, ref in entries.items()
                   if ref.device.type == "meta" and sources[name] is None and name not in statistics]
        if unknown:  # before the first tensor is handed out: a caller writing a file gets nothing partial
            raise ValueError(
                f"{type(model).__name__}: {self.meta.get('name', 'this GHN')} does not predict {unknown[:5]}"
                f"{'...' if len(unknown) > 5 else ''} ({kept.get(unknown[0], 'a buffer')}), and the model lives "
                "on the meta device, so their initial values are unknown; build the model on the CPU."
            )
        for name, ref in entries.items():
            source = sources[name]
            if source is not None:
                yield name, predicted[source].to(ref.dtype), None
            elif name in statistics:
                yield name, statistics[name](ref), None
            else:
                reason = kept.get(name, "buffer copied from the model (constants, not weights)")
                yield name, ref.detach().to("cpu", copy=True), reason

    def apply_(self, model: nn.Module, input_size: Sequence[int] | None = None) -> PredictionReport:
        """Fill ``model`` in place (shared parameters stay shared); the report lists what was predicted and
        what was kept, with why."""
        report = fill_(model, self._stream(model, input_size))
        self._calibrate(model, None, input_size)  # BatchNorm statistics as predict() makes them
        return report

    # ------------------------------------------------------------------ life cycle
    def model_card(self, load_ref: str | None = None) -> str:
        """The Hub card: provenance, use (``ghn_init.load(load_ref)``), the authors' reported results."""
        meta = {**self.meta, **({"load_ref": load_ref} if load_ref else {})}
        return published_card(meta, self.config.network, self.config.code)

    def save_pretrained(self, folder: str | os.PathLike, model_card: str | None = None) -> Path:
        """Write config.json, model.safetensors and README.md: the converted GHN, loadable with no pickle."""
        from ..hub import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, staged_folder

        with staged_folder(folder) as staging:
            config = {"format_version": _FORMAT_VERSION, "model_type": MODEL_TYPE,
                      "published": dataclasses.asdict(self.config), **self.meta}
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
            safetensors.torch.save_file(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
            (staging / CARD_NAME).write_text(model_card or self.model_card())
        return Path(folder)

    def push_to_hub(self, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, commit_message: str = "Upload converted GHN with ghn-init",
                    model_card: str | None = None) -> str:
        """Upload the converted GHN to a Hub model repo (created if missing); returns the commit URL."""
        import tempfile

        from ..hub import push_folder

        with tempfile.TemporaryDirectory(prefix="ghn-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "ghn", model_card=model_card or self.model_card(repo_id))
            return push_folder(folder, repo_id, revision=revision, private=private, token=token,
                               commit_message=commit_message)


def load_published_folder(folder: Path, config: dict[str, Any], weights: Path) -> PublishedGHN:
    """A converted published GHN (``model_type`` ``ghn-published``): safetensors + JSON, strict."""
    published = PublishedConfig(**config["published"])
    meta = {k: v for k, v in config.items() if k not in ("format_version", "model_type", "published")}
    ghn = PublishedGHN(published, meta)
    state = safetensors.torch.load_file(weights)
    missing, unexpected = ghn.network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match its config: missing tensors {missing[:5]}, "
                         f"unexpected tensors {unexpected[:5]}")
    return ghn.eval()
