"""Meta-training: samplers, a few real steps, checkpoints and exact resume."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import ghn_init
from train_ghn.__main__ import main as train_main
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


@pytest.mark.parametrize("path", sorted(Path("train_ghn/configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    from ghn_init import GHNConfig

    config = TrainConfig.from_yaml(path)
    GHNConfig.from_dict(config.ghn)
    ArchitectureSampler(config.mix, config.pool_size, seed=config.seed)
    assert config.init_from is None or config.init_from.startswith("runs/")
