"""Meta-training: samplers, a few real steps, checkpoints and exact resume, in one process and
in two gloo processes started by ``accelerate launch``; the ImageFolder data path."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image

import ghn_init
from train_ghn.__main__ import main as train_main
from train_ghn.data import ImageFolderBatches, data_root, load_image_folder
from train_ghn.samplers import FAMILIES, ArchitectureSampler, build_architecture
from train_ghn.trainer import TrainConfig, Trainer

SMOKE = "train_ghn/configs/smoke.yaml"


@pytest.mark.parametrize("family", FAMILIES)
def test_families_build_deterministically_for_32px(family):
    with torch.device("meta"):
        a, b, c = (build_architecture(family, s) for s in (3, 3, 4))
    shapes = [[(n, tuple(p.shape)) for n, p in m.named_parameters()] for m in (a, b, c)]
    assert shapes[0] == shapes[1]
    out = build_architecture(family, 3)(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_sampler_follows_mix_and_is_reproducible():
    draws = ArchitectureSampler({"resnet": 1.0, "vit": 0.0}, pool_size=5, seed=0).draw(20)
    assert {f for f, _ in draws} == {"resnet"} and all(0 <= s < 5 for _, s in draws)
    assert draws == ArchitectureSampler({"resnet": 1.0, "vit": 0.0}, pool_size=5, seed=0).draw(20)
    with pytest.raises(ValueError, match="unknown families"):
        ArchitectureSampler({"lstm": 1.0}, pool_size=5, seed=0)


def test_config_rejects_unknown_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_step: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ValueError, match="shard"):
        TrainConfig(shard="layers")
    with pytest.raises(ValueError, match="data_dir"):
        TrainConfig(dataset="imagenet")


@pytest.mark.data
def test_training_steps_on_cifar10_lower_the_loss():
    config = TrainConfig.from_yaml(SMOKE)
    config.mix, config.pool_size, config.lr, config.warmup_steps = {"resnet": 1.0}, 1, 3e-3, 1
    trainer = Trainer(config, "unused", device="cpu")
    fixed_x, fixed_y = trainer.batches.next()
    model, graph = trainer.architecture("resnet", 0)

    def loss():
        with torch.no_grad():
            logits = trainer._logits(model, trainer.ghn([graph])[0], fixed_x)
        return float(torch.nn.functional.cross_entropy(logits, fixed_y))

    before = loss()
    for _ in range(12):
        trainer.train_step()
    assert loss() < before - 0.05


@pytest.mark.data
def test_stop_and_resume_is_bit_identical(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_main(["--config", SMOKE, "--out", str(straight)])
    config = TrainConfig.from_yaml(SMOKE)
    Trainer(config, resumed).run(max_steps=4)  # a stop after step 4 ...
    assert json.loads((resumed / "checkpoint" / "state.json").read_text())["step"] == 4
    Trainer(TrainConfig.from_yaml(SMOKE), resumed).run()  # ... and a fresh process resuming it
    a = safetensors.torch.load_file(straight / "final" / "model.safetensors")
    b = safetensors.torch.load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))
    ghn = ghn_init.load(str(straight / "final"))
    assert ghn.meta["training"]["steps"] == 8
    assert "Total: 8 meta-training steps" in (straight / "final" / "README.md").read_text()


@pytest.mark.data
def test_a_run_killed_before_its_first_checkpoint_starts_its_log_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    config = TrainConfig.from_yaml(SMOKE)
    config.max_steps, config.eval_every = 2, 0
    Trainer(config, out).run()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] != 9.0 for r in log)


@pytest.mark.data
def test_stopping_past_the_schedule_is_refused(tmp_path):
    config = TrainConfig.from_yaml(SMOKE)
    with pytest.raises(ValueError, match="past the schedule's max_steps 8.*raise max_steps"):
        Trainer(config, tmp_path / "run").run(max_steps=9)
    assert not (tmp_path / "run").exists(), "refused before anything was written"


@pytest.mark.data
def test_norm_penalty_shrinks_predicted_norms():
    """GHN-3's penalty on the Frobenius norms of predicted tensors enters the loss and its gradient."""
    first, last = {}, {}
    for penalty in (0.0, 0.05):
        config = TrainConfig.from_yaml(SMOKE)
        config.mix, config.pool_size, config.meta_batch, config.warmup_steps = {"resnet": 1.0}, 1, 1, 1
        config.norm_penalty, config.lr = penalty, 3e-3
        trainer = Trainer(config, "unused", device="cpu")
        first[penalty] = trainer.train_step()
        for _ in range(3):
            last[penalty] = trainer.train_step()["pred_norm"]
    assert first[0.05]["loss"] == pytest.approx(first[0.0]["loss"] + 0.05 * first[0.0]["pred_norm"])
    assert last[0.05] < 0.99 * last[0.0]


@pytest.mark.data
def test_non_finite_step_is_skipped_and_counted(monkeypatch):
    config = TrainConfig.from_yaml(SMOKE)
    config.mix, config.pool_size, config.meta_batch = {"resnet": 1.0}, 1, 1
    trainer = Trainer(config, "unused", device="cpu")
    before = {k: v.clone() for k, v in trainer.ghn.state_dict().items()}
    logits = trainer._logits
    monkeypatch.setattr(trainer, "_logits", lambda *args: logits(*args) * float("nan"))
    metrics = trainer.train_step()
    assert trainer.skipped_steps == 1 and trainer.step == 1 and metrics["grad_norm"] != metrics["grad_norm"]
    assert all(torch.equal(before[k], v) for k, v in trainer.ghn.state_dict().items())
    monkeypatch.setattr(trainer, "_logits", logits)
    trainer.train_step()
    assert trainer.skipped_steps == 1
    assert not all(torch.equal(before[k], v) for k, v in trainer.ghn.state_dict().items())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_ranks(config: Path, out: Path, *extra: str) -> None:
    """``accelerate launch`` with two gloo CPU processes, one thread each, as a user would run it."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()),
               "-m", "train_ghn", "--config", str(config), "--out", str(out), "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GHN_INIT_DATA": str(data_root().resolve())}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _records(log: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in log.read_text().splitlines()]


@pytest.mark.data
def test_two_processes_train_deterministically_and_resume_exactly(tmp_path):
    """Two gloo ranks (each runs both architectures on half the images): one log, one checkpoint,
    the final GHN, and a stop + resume that matches an uninterrupted run bit for bit."""
    settings = yaml.safe_load(Path(SMOKE).read_text())
    settings.update(mix={"resnet": 0.5, "vit": 0.5}, pool_size=1, max_steps=3, train_images=64, norm_penalty=3e-5,
                    checkpoint_every=2, eval_every=3, eval_images=32, prebuild_workers=1, shard="images")
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(settings))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _launch_two_ranks(config, straight)
    _launch_two_ranks(config, resumed, "--stop-after", "1")
    assert json.loads((resumed / "checkpoint" / "state.json").read_text())["step"] == 1
    _launch_two_ranks(config, resumed)
    assert sorted(p.name for p in straight.iterdir()) == ["checkpoint", "final", "log.jsonl", "log.png"]
    log = _records(straight / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3] and "val_acc" in log[-1]
    assert _records(resumed / "log.jsonl") == log
    a = safetensors.torch.load_file(straight / "final" / "model.safetensors")
    b = safetensors.torch.load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = ghn_init.load(str(straight / "final")).meta
    assert meta["training"]["steps"] == 3 and meta["training"]["stages"][0]["device"].startswith("2 x cpu")


def _fake_image_folder(root: Path, classes: tuple[str, ...], per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(24, 64, size=2)
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder_batches_and_training(tmp_path):
    """The minimal ImageNet path: an ImageFolder tree, resumable batches, two training steps."""
    classes = ("cat", "dog", "fish")
    _fake_image_folder(tmp_path / "train", classes, per_class=4, seed=0)
    _fake_image_folder(tmp_path / "val", classes, per_class=2, seed=1)
    batches = ImageFolderBatches(tmp_path / "train", image_size=40, batch_size=5, seed=0)
    x, y = batches.next()
    assert x.shape == (5, 3, 40, 40) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1, 2}
    state = batches.state_dict()
    expected = [batches.next() for _ in range(3)]  # crosses an epoch boundary (12 images)
    batches.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, (batches.next()
                                                                                             for _ in range(3))))
    images, labels, names = load_image_folder(tmp_path / "val", image_size=40, count=3)
    assert images.shape == (3, 3, 40, 40) and images.dtype == torch.uint8 and labels.tolist() == [0, 1, 2]
    assert names == list(classes)

    config = TrainConfig(dataset="imagenet", data_dir=str(tmp_path), image_size=40, mix={"resnet": 1.0},
                         pool_size=1, batch_size=4, meta_batch=1, max_steps=2, warmup_steps=1, log_every=1,
                         eval_every=2, eval_images=6, checkpoint_every=2, data_workers=2,
                         ghn={"hidden": 16, "rounds": 1, "latent": 8, "block": 8, "block_1x1": 8, "vector": 8})
    final = Trainer(config, tmp_path / "run", device="cpu").run()
    ghn = ghn_init.load(str(final))
    assert ghn.meta["data"]["dataset"] == "imagenet" and ghn.meta["data"]["num_classes"] == 3
    assert ghn.meta["data"]["input_size"] == [3, 40, 40]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and 0 <= log[-1]["val_acc"] <= 1


@pytest.mark.parametrize("path", sorted(Path("train_ghn/configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    from ghn_init import GHNConfig

    config = TrainConfig.from_yaml(path)
    GHNConfig.from_dict(config.ghn)
    ArchitectureSampler(config.mix, config.pool_size, seed=config.seed)
    if config.init_from and not config.init_from.startswith("runs/"):  # runs/: an earlier stage's output
        assert Path(config.init_from, "config.json").is_file(), f"{path.name}: init_from {config.init_from} is missing"


@pytest.mark.data
def test_gpu_config_runs_on_the_cpu_from_the_default_with_staged_data(tmp_path, monkeypatch):
    """default-gpu-10min.yaml, shrunk to two steps on the CPU (bf16 autocast there too), from the
    embedded default and the train-only CIFAR-10 copy the GPU machine gets."""
    from train_ghn.data import load_cifar10, stage_training_data

    staged = stage_training_data(tmp_path / "data")
    assert staged.stat().st_size <= 42 * 2**20, "the repo (22 MB) and the data must fit 64 MiB of carry"
    rows = np.array([0, 17, 44_999])
    full_images, full_labels = load_cifar10("train", indices=rows)
    monkeypatch.setenv("GHN_INIT_DATA", str(tmp_path / "data"))
    images, labels = load_cifar10("train", indices=rows)
    assert torch.equal(images, full_images) and torch.equal(labels, full_labels)
    assert len(load_cifar10("train")[1]) == 45_000
    for split in ("val", "test"):
        with pytest.raises(FileNotFoundError, match=f"holds the train split only.*for '{split}'"):
            load_cifar10(split)
    config = TrainConfig.from_yaml("train_ghn/configs/default-gpu-10min.yaml")
    default = ghn_init.load()
    assert config.ghn == {k: v for k, v in vars(default.config).items() if k in config.ghn}
    for key, value in dict(pool_size=1, prebuild_workers=2, batch_size=16, meta_batch=2, max_steps=2,
                           train_images=128, time_limit_min=None, checkpoint_every=2).items():
        setattr(config, key, value)
    final = Trainer(config, tmp_path / "run", device="cpu").run()
    trained = ghn_init.load(str(final))
    stages = trained.meta["training"]["stages"]
    assert len(stages) == len(default.meta["training"]["stages"]) + 1 and stages[-1]["steps"] == 2
    assert stages[-1]["config"]["amp"] == "bf16"
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, default.state_dict()[k])]
    assert changed, "two steps moved the GHN"


@pytest.mark.data
def test_run_gives_the_deterministic_setting_back(tmp_path):
    """smoke.yaml runs with deterministic algorithms; the process must not keep them (they change what
    later graph builds and evaluations trace)."""
    config = TrainConfig.from_yaml(SMOKE)
    config.max_steps, config.eval_every = 1, 0
    assert config.deterministic and not torch.are_deterministic_algorithms_enabled()
    Trainer(config, tmp_path / "run").run()
    assert not torch.are_deterministic_algorithms_enabled()
