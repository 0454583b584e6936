"""Meta-training: a GHN predicts the weights of a meta-batch of architectures that share one
image batch; their classification loss trains the GHN.

Predicted tensors are plugged in with ``torch.func.functional_call`` so gradients flow back
into the GHN. Checkpoints hold everything a resumed run needs (GHN, optimizer, sampler and data
RNG states) as safetensors + JSON, written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import platform
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

from ghn_init.cards import ghn_card
from ghn_init.ghn import GHN, GHNConfig
from ghn_init.graph import ArchGraph, build_graph
from ghn_init.hub import load_folder

from .data import CIFAR10_MEAN, CIFAR10_STD, ImageBatches, load_cifar10, normalize
from .samplers import ArchitectureSampler, build_architecture

__all__ = ["TrainConfig", "Trainer"]

logger = logging.getLogger(__name__)
_INPUT_SIZE = (3, 32, 32)


@dataclasses.dataclass
class TrainConfig:
    """A meta-training run; loaded from the YAML files in ``train_ghn/configs``."""

    name: str = "ghn2-cifar10"
    seed: int = 0
    ghn: dict[str, Any] = dataclasses.field(default_factory=dict)
    mix: dict[str, float] = dataclasses.field(default_factory=lambda: {"deepnets": 1.0})
    pool_size: int = 500          # distinct architectures per family (each built once, reused)
    batch_size: int = 64
    meta_batch: int = 8           # architectures sharing each image batch
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    max_steps: int = 1000
    grad_clip: float = 5.0
    label_smoothing: float = 0.1
    amp: str = "none"             # "bf16": target networks under bf16 autocast (GPU); GHN in fp32
    train_images: int | None = None  # use only the first N train images (smoke tests)
    log_every: int = 10
    checkpoint_every: int = 200
    eval_every: int = 500
    eval_images: int = 1000
    time_limit_min: float | None = None
    prebuild_workers: int = 0     # >0: build the whole architecture pool up front in this many processes
    init_from: str | None = None  # start from this GHN folder's weights (ignored when resuming)
    deterministic: bool = False   # torch.use_deterministic_algorithms: bit-exact reruns, slower on GPU

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**data)


#: Held-out architectures whose validation accuracy is logged during training.
_VALIDATION_ARCHS = (("deepnets", 0), ("deepnets", 1), ("resnet", 0), ("vit", 0), ("convnext", 0))


def _build(family: str, seed: int, split: str, cutoff: int) -> tuple[nn.Module, ArchGraph]:
    """A pool architecture on the meta device and its graph, virtual edges included.

    Pure function of its arguments, so worker processes can run it (meta modules pickle cheaply).
    """
    with torch.device("meta"):
        model = build_architecture(family, seed, split=split)
    graph = build_graph(model, _INPUT_SIZE, name=f"{family}/{split}/{seed}")
    graph.virtual_edges(cutoff)
    return model, graph


def _materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """Allocate a meta-built model on ``device`` without initializing parameters.

    Only norm statistics need values (the GHN predicts every parameter); any other buffer
    means the architecture needs a real build.
    """
    model.to_empty(device=device)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.reset_running_stats()
        elif any(True for _ in module.buffers(recurse=False)):
            raise ValueError(f"{type(model).__name__}.{name} has buffers the trainer cannot initialize")
    return model.train()


def training_stages(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The training stages recorded in a GHN's metadata (a GHN may be trained in several runs)."""
    training = meta.get("training")
    if not training:
        return []
    return training.get("stages") or [training]


def summarize_stages(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over all stages, plus the stages themselves (what a model card reports)."""
    return {"steps": sum(s["steps"] for s in stages), "skipped_steps": sum(s.get("skipped_steps", 0) for s in stages),
            "wall_time_s": round(sum(s["wall_time_s"] for s in stages), 1), "stages": stages}


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records past the checkpoint a run resumes from, so each step is logged once."""
    if path.is_file():
        lines = path.read_text().splitlines()
        path.write_text("".join(f"{line}\n" for line in lines if json.loads(line).get("step", 0) <= step))


class Trainer:
    """One meta-training run writing checkpoints, a JSONL log and the final GHN to ``out``."""

    def __init__(self, config: TrainConfig, out: str | os.PathLike, device: str | None = None) -> None:
        self.config = cfg = config
        self.out = Path(out)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(cfg.seed)
        self.ghn = GHN(GHNConfig.from_dict(cfg.ghn)).to(self.device)
        self.optimizer = torch.optim.AdamW(self.ghn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sampler = ArchitectureSampler(cfg.mix, cfg.pool_size, seed=cfg.seed)
        indices = None if cfg.train_images is None else torch.arange(cfg.train_images).numpy()
        images, labels = load_cifar10("train", indices=indices, download=True)
        self.batches = ImageBatches(images.to(self.device), labels.to(self.device), cfg.batch_size, seed=cfg.seed)
        self.step = 0
        self.earlier_stages: list[dict[str, Any]] = []  # training of the GHN this run started from
        self.skipped_steps = 0
        self.wall_time = 0.0
        self._pool: dict[tuple[str, str, int], tuple[nn.Module, ArchGraph]] = {}
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None

    # ----------------------------------------------------------------- pieces of a step
    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to zero at ``max_steps``."""
        cfg = self.config
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def architecture(self, family: str, seed: int, split: str = "train") -> tuple[nn.Module, ArchGraph]:
        """Built once per run: parameters stay uninitialized (the GHN supplies them)."""
        key = (family, split, seed)
        if key not in self._pool:
            self._add_to_pool(key, _build(family, seed, split, self.ghn.config.virtual_cutoff))
        return self._pool[key]

    def _add_to_pool(self, key: tuple[str, str, int], built: tuple[nn.Module, ArchGraph]) -> None:
        model, graph = built
        self._pool[key] = (_materialize(model, self.device), graph)

    def prebuild(self, workers: int) -> None:
        """Build the whole architecture pool in ``workers`` processes before training starts."""
        keys = [(f, "train", s) for f in self.sampler.families for s in range(self.config.pool_size)]
        keys += [(f, "val", s) for f, s in _VALIDATION_ARCHS]
        keys = [k for k in keys if k not in self._pool]
        families, splits, seeds = zip(*keys)
        cutoffs = [self.ghn.config.virtual_cutoff] * len(keys)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            built = pool.map(_build, families, seeds, splits, cutoffs, chunksize=4)
            for key, result in tqdm(zip(keys, built), total=len(keys), desc="architecture pool"):
                self._add_to_pool(key, result)

    def _autocast(self):
        enabled = self.config.amp == "bf16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _logits(self, model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return torch.func.functional_call(model, params, (x,), strict=False).float()

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        archs = [self.architecture(f, s) for f, s in self.sampler.draw(cfg.meta_batch)]
        x, y = self.batches.next()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        predicted = self.ghn([graph for _, graph in archs])
        losses, correct = [], 0.0
        for (model, _), params in zip(archs, predicted):
            logits = self._logits(model, params, x)
            losses.append(F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing))
            correct += (logits.argmax(1) == y).float().mean().item()
        loss = torch.stack(losses).mean()
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            grad_norm = float("nan")
        else:
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.ghn.parameters(), cfg.grad_clip))
            if math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                self.skipped_steps += 1
        self.step += 1
        return {"loss": loss.item(), "train_acc": correct / len(archs), "grad_norm": grad_norm,
                "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Accuracy of predicted weights (batch statistics) on validation images, per held-out arch."""
        if self._val is None:
            images, labels = load_cifar10("val", indices=torch.arange(self.config.eval_images).numpy(),
                                          download=True)
            self._val = normalize(images.to(self.device)), labels.to(self.device)
        x, y = self._val
        self.ghn.eval()
        scores = {}
        for family, seed in _VALIDATION_ARCHS:
            model, graph = self.architecture(family, seed, split="val")
            params = self.ghn([graph])[0]
            hits = sum(int((self._logits(model, params, xb).argmax(1) == yb).sum())
                       for xb, yb in zip(x.split(250), y.split(250)))
            scores[f"val_acc/{family}{seed}"] = hits / len(y)
        self.ghn.train()
        scores["val_acc"] = sum(scores.values()) / len(scores)
        return scores

    # ----------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def save_checkpoint(self) -> None:
        """Atomic: written beside the old checkpoint, then swapped in."""
        tensors = {f"ghn.{k}": v.detach().cpu().contiguous() for k, v in self.ghn.state_dict().items()}
        optim = self.optimizer.state_dict()
        for pid, state in optim["state"].items():
            for key, value in state.items():
                tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        state = {
            "step": self.step, "skipped_steps": self.skipped_steps, "wall_time": self.wall_time,
            "earlier_stages": self.earlier_stages,
            "param_groups": optim["param_groups"], "sampler": self.sampler.state_dict(),
            "batches": self.batches.state_dict(), "torch_rng": torch.get_rng_state().tolist(),
            "config": dataclasses.asdict(self.config),
        }
        staging = self.out / "checkpoint.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        safetensors.torch.save_file(tensors, staging / "state.safetensors")
        (staging / "state.json").write_text(json.dumps(state))
        old = self.out / "checkpoint.old"
        if self.checkpoint_dir.exists():
            self.checkpoint_dir.rename(old)
        staging.rename(self.checkpoint_dir)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> bool:
        """Resume from ``out/checkpoint`` if present (or a half-swapped ``checkpoint.old``)."""
        folder = self.checkpoint_dir
        if not (folder / "state.json").is_file():
            folder = self.out / "checkpoint.old"
            if not (folder / "state.json").is_file():
                return False
        state = json.loads((folder / "state.json").read_text())
        tensors = safetensors.torch.load_file(folder / "state.safetensors")
        self.ghn.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ghn.")})
        optim_state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                optim_state.setdefault(int(pid), {})[name] = value
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": state["param_groups"]})
        self.sampler.load_state_dict(state["sampler"])
        self.batches.load_state_dict(state["batches"])
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        self.step, self.skipped_steps, self.wall_time = state["step"], state["skipped_steps"], state["wall_time"]
        self.earlier_stages = state.get("earlier_stages", [])
        _truncate_log(self.out / "log.jsonl", self.step)
        return True

    # ----------------------------------------------------------------- the run
    def run(self, max_steps: int | None = None) -> Path:
        """Train until ``max_steps`` (or the time limit), checkpointing; returns ``out/final``."""
        cfg = self.config
        max_steps = max_steps or cfg.max_steps
        self.out.mkdir(parents=True, exist_ok=True)
        torch.use_deterministic_algorithms(cfg.deterministic, warn_only=True)
        if self.load_checkpoint():
            logger.info("resumed from %s at step %d", self.checkpoint_dir, self.step)
        elif cfg.init_from:
            earlier = load_folder(cfg.init_from)
            self.ghn.load_state_dict(earlier.state_dict())
            self.earlier_stages = training_stages(earlier.meta)
            logger.info("initialized the GHN from %s", cfg.init_from)
        if cfg.prebuild_workers > 0:
            self.prebuild(cfg.prebuild_workers)
        deadline = time.monotonic() + 60 * cfg.time_limit_min if cfg.time_limit_min else math.inf
        log_path = self.out / "log.jsonl"
        bar = tqdm(total=max_steps, initial=self.step, desc="meta-training", dynamic_ncols=True)
        started = time.monotonic() - self.wall_time
        with log_path.open("a") as log:
            while self.step < max_steps and time.monotonic() < deadline:
                metrics = self.train_step()
                self.wall_time = time.monotonic() - started
                bar.update(1)
                record: dict[str, Any] = {}
                if self.step % cfg.log_every == 0 or self.step == max_steps:
                    record.update(metrics)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    record.update(self.validate())
                if record:
                    record.update(step=self.step, time_s=round(self.wall_time, 2), skipped_steps=self.skipped_steps)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['train_acc']:.3f}")
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        return self.save_final()

    def save_final(self) -> Path:
        cfg = self.config
        on_gpu = self.device.type == "cuda"
        device_name = (torch.cuda.get_device_name(self.device) if on_gpu
                       else f"{platform.machine()}, {torch.get_num_threads()} threads")
        self.ghn.meta = {
            "name": cfg.name,
            "data": {"dataset": "cifar10", "input_size": list(_INPUT_SIZE), "mean": list(CIFAR10_MEAN),
                     "std": list(CIFAR10_STD), "num_classes": 10, "interpolation": "bilinear", "crop_pct": 1.0},
        }
        stage = {"steps": self.step, "skipped_steps": self.skipped_steps, "wall_time_s": round(self.wall_time, 1),
                 "device": f"{self.device.type}: {device_name}", "torch": torch.__version__,
                 "config": dataclasses.asdict(cfg)}
        self.ghn.meta["training"] = summarize_stages([*self.earlier_stages, stage])
        return self.ghn.save_pretrained(self.out / "final", model_card=ghn_card(self.ghn))
