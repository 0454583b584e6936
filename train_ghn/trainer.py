"""Meta-training: a GHN predicts the weights of a meta-batch of architectures that share one
image batch; their classification loss trains the GHN.

Predicted tensors are plugged in with ``torch.func.functional_call`` so gradients flow back
into the GHN. The same loop runs in one process or in several started by ``accelerate launch``
(or torchrun): every rank draws the same meta-batch and image batch, computes its share of them
(``TrainConfig.shard``), and one all-reduce per step sums the GHN gradients and the step's
statistics, so every rank takes the same optimizer step. Checkpoints hold everything a resumed
run needs (GHN, optimizer, sampler and data RNG states) as safetensors + JSON, written
atomically by rank 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast, gather_object
from torch import nn
from tqdm.auto import tqdm

from ghn_init.cards import ghn_card
from ghn_init.ghn import GHN, GHNConfig
from ghn_init.graph import ArchGraph, build_graph
from ghn_init.hub import load_folder

from .data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageBatches,
    ImageFolderBatches,
    load_cifar10,
    load_image_folder,
    normalize,
)
from .samplers import ArchitectureSampler, build_architecture

__all__ = ["TrainConfig", "Trainer", "deterministic_algorithms"]

logger = get_logger(__name__)


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
    shard: str = "archs"          # how several processes split a step: "archs" or "images" (see Trainer)
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    max_steps: int = 1000
    grad_clip: float = 5.0
    label_smoothing: float = 0.1
    norm_penalty: float = 0.0     # GHN-3: adds this x the sum of Frobenius norms of the predicted tensors
    amp: str = "none"             # "bf16": target networks under bf16 autocast (GPU or CPU); GHN in fp32
    dataset: str = "cifar10"      # or "imagenet": an ImageFolder tree with train/ and val/ under data_dir
    data_dir: str | None = None
    image_size: int = 32          # input size of the target networks (CIFAR-10 is 32)
    data_workers: int = 8         # threads decoding ImageFolder batches
    train_images: int | None = None  # use only the first N CIFAR-10 train images (smoke tests)
    log_every: int = 10
    checkpoint_every: int = 200
    eval_every: int = 500
    eval_images: int = 1000
    time_limit_min: float | None = None
    prebuild_workers: int = 0     # >0: build the whole architecture pool up front in this many processes
    init_from: str | None = None  # start from this GHN folder's weights (ignored when resuming)
    deterministic: bool = False   # torch.use_deterministic_algorithms: bit-exact reruns, slower on GPU

    def __post_init__(self) -> None:
        choices = {"shard": ("archs", "images"), "amp": ("none", "bf16"), "dataset": ("cifar10", "imagenet")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: {getattr(self, key)!r} is not one of {allowed}")
        if self.dataset == "imagenet" and not self.data_dir:
            raise ValueError("dataset: imagenet needs data_dir, a folder holding train/ and val/ ImageFolder trees")
        if self.dataset == "cifar10" and self.image_size != 32:
            raise ValueError(f"CIFAR-10 images are 32x32; image_size {self.image_size} needs dataset: imagenet")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**data)


#: Held-out architectures whose validation accuracy is logged during training (those of families in
#: the mix; families not listed here are represented by their held-out seed 0).
_VALIDATION_ARCHS = (("deepnets", 0), ("deepnets", 1), ("resnet", 0), ("vit", 0), ("convnext", 0))
_VALIDATION_BATCH = 250


def _build(family: str, seed: int, split: str, cutoff: int, input_size: tuple[int, int, int] = (3, 32, 32),
           num_classes: int = 10) -> tuple[nn.Module, ArchGraph]:
    """A pool architecture on the meta device and its graph, virtual edges included.

    Pure function of its arguments, so worker processes and other ranks can run it (meta modules
    pickle cheaply).
    """
    with torch.device("meta"):
        model = build_architecture(family, seed, split=split, num_classes=num_classes)
    graph = build_graph(model, input_size, name=f"{family}/{split}/{seed}")
    graph.virtual_edges(cutoff)
    return model, graph


def _materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """Allocate a meta-built model on ``device`` without initializing parameters.

    Only buffers need values (the GHN predicts every parameter): norm statistics are reset and
    timm's computed buffers (``init_non_persistent_buffers``) recomputed; any other buffer
    means the architecture needs a real build.
    """
    model.to_empty(device=device)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.reset_running_stats()
        elif hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
        elif any(True for _ in module.buffers(recurse=False)):
            raise ValueError(f"{type(model).__name__}.{name} has buffers the trainer cannot initialize")
    return model.train()


def _explicit_attention(model: nn.Module) -> None:
    """Switch timm attention to its explicit matmul-softmax path: on the CPU under bf16 autocast,
    PyTorch's fused attention kernel is 2-6x slower for the token counts of 32x32 ViTs."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` (warn only) for a run, and the process's setting back after it."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


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


def plot_log(log_path: Path, png_path: Path) -> Path:
    """Training loss and validation accuracy against the step, from a run's ``log.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_acc"]) for r in records if "val_acc" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    if train:
        left.plot(*zip(*train), lw=1)
    left.set(xlabel="step", ylabel="meta-batch loss", title="training loss")
    if val:
        right.plot(*zip(*val), marker="o")
    right.set(xlabel="step", ylabel="accuracy", title="validation accuracy of predicted weights")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


class Trainer:
    """One meta-training run writing checkpoints, a JSONL log and the final GHN to ``out``.

    With several processes every rank draws the same architectures and images; ``config.shard``
    says which part each computes. ``"archs"``: rank r predicts and runs the architectures
    r, r + R, ... on the whole image batch (suits GPUs, where small image batches leave the
    device idle; a step waits for the rank with the costliest architectures). ``"images"``:
    every rank predicts all architectures and runs them on its 1/R slice of the image batch
    (suits CPUs, where time scales with images: the work splits evenly whatever the
    architectures cost; BatchNorm then normalizes over the slice). Gradients are summed with one
    explicit all-reduce rather than DDP, because ranks push different graphs through the GHN
    and which GHN parameters receive a gradient varies by rank and step.
    """

    def __init__(self, config: TrainConfig, out: str | os.PathLike, device: str | None = None) -> None:
        self.config = cfg = config
        self.out = Path(out)
        self.accelerator = Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        single = self.world == 1 and device not in (None, "cpu")
        self.device = torch.device(device) if single else self.accelerator.device
        if cfg.shard == "images" and cfg.batch_size < self.world:
            raise ValueError(f"shard: images needs batch_size ({cfg.batch_size}) >= processes ({self.world})")
        if cfg.shard == "archs" and cfg.meta_batch % self.world:
            logger.warning("meta_batch %d does not split evenly over %d processes: some ranks idle each step",
                           cfg.meta_batch, self.world)
        torch.manual_seed(cfg.seed)
        self.ghn = GHN(GHNConfig.from_dict(cfg.ghn)).to(self.device)
        # fused: one kernel for all GHN tensors instead of about ten operators per tensor
        self.optimizer = torch.optim.AdamW(self.ghn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.sampler = ArchitectureSampler(cfg.mix, cfg.pool_size, seed=cfg.seed)
        self._load_training_data()
        self.step = 0
        self.earlier_stages: list[dict[str, Any]] = []  # training of the GHN this run started from
        self.skipped_steps = 0
        self.wall_time = 0.0
        self._pool: dict[tuple[str, str, int], tuple[nn.Module, ArchGraph]] = {}
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None

    def _load_training_data(self) -> None:
        cfg = self.config
        if cfg.dataset == "imagenet":
            self.batches: ImageBatches = ImageFolderBatches(
                Path(cfg.data_dir) / "train", cfg.image_size, cfg.batch_size, seed=cfg.seed, device=self.device,
                workers=cfg.data_workers)
            self.num_classes = len(self.batches.classes)
            self.data_config = {"dataset": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                "crop_pct": 0.875}
        else:
            indices = None if cfg.train_images is None else torch.arange(cfg.train_images).numpy()
            with self.accelerator.main_process_first():  # a torchvision download happens once
                images, labels = load_cifar10("train", indices=indices, download=True)
            self.batches = ImageBatches(images.to(self.device), labels.to(self.device), cfg.batch_size, seed=cfg.seed)
            self.num_classes = 10
            self.data_config = {"dataset": "cifar10", "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD),
                                "crop_pct": 1.0}
        self.data_config.update(input_size=list(self.input_size), num_classes=self.num_classes,
                                interpolation="bilinear")

    @property
    def input_size(self) -> tuple[int, int, int]:
        return 3, self.config.image_size, self.config.image_size

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
            self._add_to_pool(key, self._build(key))
        return self._pool[key]

    def _build(self, key: tuple[str, str, int]) -> tuple[nn.Module, ArchGraph]:
        family, split, seed = key
        return _build(family, seed, split, self.ghn.config.virtual_cutoff, self.input_size, self.num_classes)

    def _add_to_pool(self, key: tuple[str, str, int], built: tuple[nn.Module, ArchGraph]) -> None:
        model, graph = built
        if self.config.amp == "bf16" and self.device.type == "cpu":
            _explicit_attention(model)
        self._pool[key] = (_materialize(model, self.device), graph)

    def validation_archs(self) -> list[tuple[str, int]]:
        """Held-out ``(family, seed)`` pairs of the families in the mix."""
        families = self.sampler.families
        listed = {f for f, _ in _VALIDATION_ARCHS}
        return [(f, s) for f, s in _VALIDATION_ARCHS if f in families] + [(f, 0) for f in families if f not in listed]

    def prebuild(self, workers: int) -> None:
        """Build the whole architecture pool before training.

        Ranks build disjoint shares (each with its share of ``workers`` processes; one means in
        process) and exchange them, so several ranks take less time than one, not more.
        """
        keys = [(f, "train", s) for f in self.sampler.families for s in range(self.config.pool_size)]
        keys += [(f, "val", s) for f, s in self.validation_archs()]
        keys = [k for k in keys if k not in self._pool]
        mine = keys[self.rank::self.world]
        workers = max(1, workers // int(os.environ.get("LOCAL_WORLD_SIZE", self.world)))
        bar = tqdm(total=len(mine), desc="architecture pool", disable=not self.accelerator.is_main_process)
        built: list[tuple[tuple[str, str, int], tuple[nn.Module, ArchGraph]]] = []
        if workers == 1:
            for key in mine:
                built.append((key, self._build(key)))
                bar.update(1)
        else:
            families, splits, seeds = zip(*mine) if mine else ((), (), ())
            extra = ([self.ghn.config.virtual_cutoff] * len(mine), [self.input_size] * len(mine),
                     [self.num_classes] * len(mine))
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for key, result in zip(mine, pool.map(_build, families, seeds, splits, *extra, chunksize=4)):
                    built.append((key, result))
                    bar.update(1)
        bar.close()
        if self.world > 1:
            built = gather_object(built)
        for key, result in built:
            self._add_to_pool(key, result)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp == "bf16")

    def _logits(self, model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return torch.func.functional_call(model, params, (x,), strict=False).float()

    def _units(self, batch: int) -> list[tuple[int, slice]]:
        """The (meta-batch slot, image rows) pairs this rank computes; see the class docstring."""
        slots = range(self.config.meta_batch)
        if self.world == 1:
            return [(slot, slice(0, batch)) for slot in slots]
        if self.config.shard == "archs":
            return [(slot, slice(0, batch)) for slot in slots[self.rank::self.world]]
        rows = slice(batch * self.rank // self.world, batch * (self.rank + 1) // self.world)
        return [(slot, rows) for slot in slots]

    def _seed_unit(self, slot: int, first_row: int) -> None:
        """Reseed the global RNG (dropout, drop-path in target networks) from the step and the unit,
        so that no rank carries RNG state a checkpoint would have to hold."""
        torch.manual_seed(((self.config.seed * 1_000_003 + self.step) * 1024 + slot) * 65536 + first_row)

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        draws = self.sampler.draw(cfg.meta_batch)
        x, y = self.batches.next()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        units = self._units(len(y))
        slots = sorted({slot for slot, _ in units})
        archs = {slot: self.architecture(*draws[slot]) for slot in slots}
        # summed over this rank's units, each weighted by its share of the meta-batch loss:
        # cross-entropy, accuracy, predicted-tensor norm, and a non-finite-loss flag
        stats = torch.zeros(4, device=self.device)
        if units:
            prediction = self.ghn.predict_batch([archs[slot][1] for slot in slots])  # one pass, all slots
            loss = torch.zeros((), device=self.device)
            for slot, rows in units:
                model, params = archs[slot][0], prediction.params[slots.index(slot)]
                weight = (rows.stop - rows.start) / len(y) / cfg.meta_batch
                self._seed_unit(slot, rows.start)
                logits = self._logits(model, params, x[rows])
                ce = F.cross_entropy(logits, y[rows], label_smoothing=cfg.label_smoothing)
                norm = prediction.norms[slots.index(slot)]  # GHN-3's penalty; aliases counted once
                loss = loss + weight * (ce + (cfg.norm_penalty * norm if cfg.norm_penalty else 0.0))
                hits = (logits.argmax(1) == y[rows]).sum() / (len(y) * cfg.meta_batch)
                stats += torch.stack([weight * ce.detach(), hits, weight * norm.detach(), torch.zeros_like(hits)])
            stats[3] = (~torch.isfinite(loss)).float()
            loss.backward()
        ce, acc, norm, bad = self._all_reduce(stats).tolist()
        if bad:  # every rank sees the same reduced flag and skips together
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            grad_norm = float("nan")
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.ghn.parameters(), cfg.grad_clip, foreach=True))
            if math.isfinite(grad_norm):
                self.optimizer.step()
            else:
                self.skipped_steps += 1
        self.step += 1
        return {"loss": ce + cfg.norm_penalty * norm, "train_acc": acc, "pred_norm": norm, "grad_norm": grad_norm,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def _all_reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """Sum the GHN gradients and ``stats`` over ranks in one collective.

        Each rank's loss is already weighted by its share, so the sums are the meta-batch
        gradient. A parameter that no rank used keeps ``grad=None``, as in one process, so
        AdamW leaves it alone either way.
        """
        if self.world == 1:
            return stats
        params = list(self.ghn.parameters())
        used = torch.tensor([p.grad is not None for p in params], dtype=stats.dtype, device=stats.device)
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        flat = self.accelerator.reduce(torch.cat([stats, used, *grads]), reduction="sum")
        stats, used, flat = flat.split([len(stats), len(params), flat.numel() - len(stats) - len(params)])
        for p, u, g in zip(params, used.tolist(), flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p) if u else None
        return stats

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any (decisions that must not diverge)."""
        if self.world == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), reduction="sum") > 0)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Accuracy of predicted weights (batch statistics) on validation images, per held-out arch.

        Ranks share the (architecture, batch of 250 images) pairs and sum the hits.
        """
        x, y = self._validation_data()
        archs = self.validation_archs()
        batches = list(zip(x.split(_VALIDATION_BATCH), y.split(_VALIDATION_BATCH)))
        units = [(a, b) for a in range(len(archs)) for b in range(len(batches))][self.rank::self.world]
        self.ghn.eval()
        needed = sorted({a for a, _ in units})
        predicted = {a: self.ghn([self.architecture(*archs[a], split="val")[1]])[0] for a in needed}
        hits = torch.zeros(len(archs), device=self.device)
        for a, b in units:
            model, _ = self.architecture(*archs[a], split="val")
            xb, yb = batches[b]
            hits[a] += (self._logits(model, predicted[a], xb).argmax(1) == yb).sum()
        self.ghn.train()
        if self.world > 1:
            hits = self.accelerator.reduce(hits, reduction="sum")
        scores = {f"val_acc/{family}{seed}": h / len(y) for (family, seed), h in zip(archs, hits.tolist())}
        scores["val_acc"] = sum(scores.values()) / len(scores)
        return scores

    def _validation_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._val is None:
            cfg = self.config
            if cfg.dataset == "imagenet":
                images, labels, _ = load_image_folder(Path(cfg.data_dir) / "val", cfg.image_size,
                                                      count=cfg.eval_images, workers=cfg.data_workers)
                self._val = normalize(images.to(self.device), IMAGENET_MEAN, IMAGENET_STD), labels.to(self.device)
            else:
                with self.accelerator.main_process_first():
                    images, labels = load_cifar10("val", indices=torch.arange(cfg.eval_images).numpy(), download=True)
                self._val = normalize(images.to(self.device)), labels.to(self.device)
        return self._val

    # ----------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def _check_in_sync(self) -> None:
        """Fail loudly if the ranks' GHN weights have drifted apart (they must stay bit-identical)."""
        if self.world == 1:
            return
        digest = hashlib.sha256()
        for tensor in self.ghn.state_dict().values():
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests = gather_object([digest.hexdigest()])
        if len(set(digests)) > 1:
            raise RuntimeError(f"GHN weights differ across ranks after step {self.step}: {digests}")

    def save_checkpoint(self) -> None:
        """Atomic: written by rank 0 beside the old checkpoint, then swapped in.

        Sampler and data states are the same on every rank and nothing else carries RNG state
        (see ``_seed_unit``), so one checkpoint serves any number of ranks.
        """
        self._check_in_sync()
        if not self.accelerator.is_main_process:
            return
        tensors = {f"ghn.{k}": v.detach().cpu().contiguous() for k, v in self.ghn.state_dict().items()}
        optim = self.optimizer.state_dict()
        for pid, state in optim["state"].items():
            for key, value in state.items():
                tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        state = {
            "step": self.step, "skipped_steps": self.skipped_steps, "wall_time": self.wall_time,
            "earlier_stages": self.earlier_stages, "processes": self.world,
            "param_groups": optim["param_groups"], "sampler": self.sampler.state_dict(),
            "batches": self.batches.state_dict(), "config": dataclasses.asdict(self.config),
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
        self.step, self.skipped_steps, self.wall_time = state["step"], state["skipped_steps"], state["wall_time"]
        self.earlier_stages = state.get("earlier_stages", [])
        if self.accelerator.is_main_process:
            _truncate_log(self.out / "log.jsonl", self.step)
        return True

    # ----------------------------------------------------------------- the run
    def start(self) -> bool:
        """What a run does before its first step: resume from ``out/checkpoint``, or start fresh (from
        ``init_from`` if set, with the log of any run killed before its first checkpoint dropped).
        Returns whether it resumed."""
        cfg = self.config
        main = self.accelerator.is_main_process
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.load_checkpoint()
        if resumed:
            logger.info("resumed from %s at step %d", self.checkpoint_dir, self.step)
        elif main:
            _truncate_log(self.out / "log.jsonl", 0)
        if not resumed and cfg.init_from:
            earlier = load_folder(cfg.init_from)
            self.ghn.load_state_dict(earlier.state_dict())
            self.earlier_stages = training_stages(earlier.meta)
            logger.info("initialized the GHN from %s", cfg.init_from)
        if self.world > 1:
            broadcast(list(self.ghn.state_dict().values()))
            logger.info("%d processes, shard: %s, device %s", self.world, cfg.shard, self.device)
        return resumed

    def run(self, max_steps: int | None = None) -> Path:
        """Train until ``max_steps`` (or the time limit), checkpointing; returns ``out/final``.

        ``max_steps`` stops early without changing the schedule, which follows ``config.max_steps``.
        The recorded wall time counts training steps only, not validation or checkpoints.
        """
        cfg = self.config
        max_steps = max_steps or cfg.max_steps
        if max_steps > cfg.max_steps:
            raise ValueError(f"stopping after step {max_steps} is past the schedule's max_steps {cfg.max_steps}: "
                             "those steps would train at learning rate 0; raise max_steps instead")
        with deterministic_algorithms(cfg.deterministic):
            return self._run(max_steps)

    def _run(self, max_steps: int) -> Path:
        cfg = self.config
        main = self.accelerator.is_main_process
        self.start()
        if cfg.prebuild_workers > 0:
            self.prebuild(cfg.prebuild_workers)
        deadline = time.monotonic() + 60 * cfg.time_limit_min if cfg.time_limit_min else math.inf
        log_path = self.out / "log.jsonl"
        log = log_path.open("a") if main else None
        bar = tqdm(total=max_steps, initial=self.step, desc="meta-training", dynamic_ncols=True, disable=not main)
        try:
            while self.step < max_steps and not (deadline < math.inf and self._any_rank(time.monotonic() >= deadline)):
                started = time.monotonic()
                metrics = self.train_step()
                self.wall_time += time.monotonic() - started
                bar.update(1)
                record: dict[str, Any] = {}
                if self.step % cfg.log_every == 0 or self.step == max_steps:
                    record.update(metrics)
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    record.update(self.validate())
                if record and log is not None:
                    record.update(step=self.step, time_s=round(self.wall_time, 2), skipped_steps=self.skipped_steps)
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['train_acc']:.3f}")
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
            if log is not None:
                log.close()
        self.save_checkpoint()
        return self.save_final()

    def save_final(self) -> Path:
        """Rank 0 writes the GHN in the Hub layout and a plot of the log; every rank returns its path."""
        final = self.out / "final"
        if self.accelerator.is_main_process:
            cfg = self.config
            on_gpu = self.device.type == "cuda"
            device_name = (torch.cuda.get_device_name(self.device) if on_gpu
                           else f"{platform.machine()}, {torch.get_num_threads()} threads")
            processes = f"{self.world} x " if self.world > 1 else ""
            self.ghn.meta = {"name": cfg.name, "data": dict(self.data_config)}
            stage = {"steps": self.step, "skipped_steps": self.skipped_steps, "wall_time_s": round(self.wall_time, 1),
                     "device": f"{processes}{self.device.type}: {device_name}", "torch": torch.__version__,
                     "config": dataclasses.asdict(cfg)}
            self.ghn.meta["training"] = summarize_stages([*self.earlier_stages, stage])
            self.ghn.save_pretrained(final, model_card=ghn_card(self.ghn))
            log_path = self.out / "log.jsonl"
            try:
                plot_log(log_path, log_path.with_suffix(".png"))
            except ImportError:
                logger.warning("matplotlib is not installed: no %s", log_path.with_suffix(".png").name)
        self.accelerator.wait_for_everyone()
        return final
