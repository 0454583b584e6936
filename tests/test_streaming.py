"""Predicted weights written one tensor at a time: same file as safetensors' own writer, bounded memory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ghn_init.batchnorm import DATA_FREE
from ghn_init.export import write_predicted, write_predicted_shards
from ghn_init.streaming import SHARD_INDEX, write_safetensors, write_safetensors_shards


def test_streamed_file_loads_with_safetensors(default_ghn, tmp_path):
    model = timm.create_model("convnext_atto", num_classes=10, device="meta").to(torch.bfloat16)
    write_predicted(default_ghn, model, (3, 32, 32), tmp_path / "w.safetensors", metadata={"format": "pt"})
    loaded = load_file(tmp_path / "w.safetensors")
    expected = default_ghn.predict(model, (3, 32, 32))
    assert list(loaded) == list(expected)
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in expected.items())


@pytest.mark.parametrize("bad", ["shape", "missing"])
def test_mismatch_names_the_tensor_and_leaves_no_file(tmp_path, bad):
    specs = {"a": (torch.float32, (2, 3)), "b": (torch.int64, (4,))}
    tensors = [("a", torch.zeros(2, 3)), ("b", torch.zeros(5, dtype=torch.int64) if bad == "shape" else None)]
    stream = [t for t in tensors if t[1] is not None]
    with pytest.raises(ValueError, match="'b'" if bad == "shape" else "never arrived"):
        write_safetensors(tmp_path / "x.safetensors", specs, stream)
    assert not (tmp_path / "x.safetensors").exists()


_MEMORY_PROBE = """
import json, resource, sys, timm, torch, ghn_init
from ghn_init.export import write_predicted
torch.set_num_threads(1)
ghn = ghn_init.load()
model = timm.create_model("vit_base_patch16_224", num_classes=10, device="meta")
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if sys.argv[1] == "file":
    write_predicted(ghn, model, (3, 224, 224), sys.argv[2])
else:
    state = ghn.predict(model, (3, 224, 224))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"weights": weights, "extra": after - before}))
"""


@pytest.mark.parametrize("mode, limit", [("file", 0.25), ("dict", 1.5)])
def test_peak_memory_of_a_large_prediction(tmp_path, mode, limit):
    """vit_base (344 MB of weights): streamed to a file it never holds the model; as a dict, one copy."""
    run = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, mode, str(tmp_path / "w.safetensors")],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    probe = json.loads(run.stdout.strip().splitlines()[-1])
    assert probe["extra"] <= limit * probe["weights"], probe


def test_shards_split_at_the_size_limit_and_load_as_one_state(default_ghn, tmp_path):
    model = timm.create_model("resnet18", num_classes=10, device="meta")
    index = write_predicted_shards(default_ghn, model, (3, 32, 32), tmp_path, max_shard_size="5MB")
    expected = default_ghn.predict(model, (3, 32, 32))
    layout = json.loads(index.read_text())
    files = sorted(set(layout["weight_map"].values()))
    assert index.name == SHARD_INDEX and list(layout["weight_map"]) == list(expected)
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert layout["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    loaded = {}
    for name in files:
        shard = load_file(tmp_path / name)
        too_big = [k for k in shard if expected[k].numel() * expected[k].element_size() > 5e6]
        assert sum(t.numel() * t.element_size() for t in shard.values()) <= 5e6 or too_big == list(shard), name
        assert all(layout["weight_map"][k] == name for k in shard)
        loaded.update(shard)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], v) for k, v in expected.items())
    with safe_open(tmp_path / files[0], "pt") as f:
        assert f.metadata()["format"] == "pt" and json.loads(f.metadata()["bn_calibration"])["method"] == DATA_FREE


@pytest.mark.parametrize("bad", ["short", "long"])
def test_shard_stream_mismatch_leaves_no_files(tmp_path, bad):
    specs = {"a": (torch.float32, (4,)), "b": (torch.float32, (4,)), "c": (torch.float32, (4,))}
    tensors = [(k, torch.zeros(4)) for k in specs] + [("d", torch.zeros(4))]
    stream = tensors[:2] if bad == "short" else tensors
    with pytest.raises(ValueError, match="never arrived" if bad == "short" else "'d' arrived after"):
        write_safetensors_shards(tmp_path, specs, stream, max_shard_size=20)
    assert list(tmp_path.iterdir()) == []
