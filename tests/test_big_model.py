"""examples/big_model.py: init_empty_weights + streamed shards + load_checkpoint_and_dispatch give ghn.predict's
tensors, a working forward pass, and memory bounded by the shards, not the model."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from ghn_init.export import write_predicted_shards

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "big_model.py"
MODELS = {
    "resnet18": {"num_classes": 10},
    "vit_tiny_patch16_224": {"num_classes": 10, "img_size": 32, "patch_size": 4},
}
#: RAM for weights: more than the largest block (resnet18: 33 MB) and less than the model (45 MB, 22 MB).
MAX_MEMORY = {"resnet18": 40_000_000, "vit_tiny_patch16_224": 6_000_000}


def _example():
    spec = importlib.util.spec_from_file_location("big_model_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _example()


@pytest.mark.parametrize("name", MODELS)
def test_dispatched_model_holds_the_predicted_tensors(default_ghn, example, tmp_path, name):
    kwargs = MODELS[name]
    expected = default_ghn.predict(timm.create_model(name, device="meta", **kwargs), (3, 32, 32))
    reference = timm.create_model(name, **kwargs).eval()
    reference.load_state_dict(expected)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(x)

    index = write_predicted_shards(default_ghn, example.empty_model(name, **kwargs), (3, 32, 32), tmp_path / "ckpt",
                                   max_shard_size="4MB")
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 2

    in_ram = example.load(example.empty_model(name, **kwargs), index)
    state = in_ram.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], v) and state[k].dtype == v.dtype for k, v in expected.items())
    with torch.no_grad():
        assert torch.equal(in_ram.eval()(x), want)

    offloaded = example.load(example.empty_model(name, **kwargs), index, max_memory=MAX_MEMORY[name],
                             offload_folder=tmp_path / "offload")
    placed = example.placement(offloaded)
    assert placed.keys() == {"cpu", "disk"} and placed["cpu"] <= MAX_MEMORY[name], placed
    resident = {k: v for k, v in offloaded.state_dict().items() if not v.is_meta}
    assert resident and all(torch.equal(v, expected[k]) for k, v in resident.items())
    with torch.no_grad():
        assert torch.equal(offloaded.eval()(x), want)


def test_repeated_blocks_are_never_split(example):
    assert example.repeated_block_classes(timm.create_model("vit_tiny_patch16_224", device="meta")) == ["Block"]
    assert example.repeated_block_classes(timm.create_model("resnet18", device="meta")) == ["BasicBlock"]
    assert example.repeated_block_classes(timm.create_model("convnext_atto", device="meta")) == ["ConvNeXtBlock"]


def test_buffers_no_checkpoint_can_fill_are_named(example):
    with pytest.raises(ValueError, match=r"swin_tiny_patch4_window7_224: constant buffers \['layers.0.blocks.1.attn"):
        example.empty_model("swin_tiny_patch4_window7_224")


def test_too_little_memory_names_the_largest_block(default_ghn, example, tmp_path):
    model = example.empty_model("resnet18", num_classes=10)
    index = write_predicted_shards(default_ghn, model, (3, 32, 32), tmp_path)
    with pytest.raises(ValueError, match=r"largest block \(18 MiB\).*more than that"):
        example.load(model, index, max_memory="10MB", offload_folder=tmp_path / "offload")


def test_load_stage_without_a_checkpoint_says_what_to_run(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "resnet18", "--out", str(tmp_path), "--stage", "load"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "run --stage predict" in done.stderr, done.stderr[-2000:]


def test_offloaded_load_stays_below_the_weights(tmp_path):
    """vit_base (344 MB of weights) with 64 MB of RAM for weights: the load's peak RSS grows by a fraction of the
    weights, which a single-file checkpoint (read whole by accelerate) could not do."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = [sys.executable, str(SCRIPT), "vit_base_patch16_224", "--out", str(tmp_path / "ckpt")]
    subprocess.run([*common, "--stage", "predict", "--max-shard-size", "32MB"], env=env, check=True,
                   capture_output=True)
    done = subprocess.run([*common, "--stage", "load", "--max-memory", "64MB"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["output"] == [1, 1000] and report["placement"]["disk"] > 0.7 * report["weights_bytes"]
    assert report["peak_rss"] - report["peak_rss_after_imports"] < 0.5 * report["weights_bytes"], report
