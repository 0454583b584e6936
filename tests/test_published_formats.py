"""Safe reading of the published GHN checkpoint formats (joblib pickles, torch.save zips and legacy streams)."""

import bz2
import collections
import gzip
import json
import lzma
import os
import pickle
import zlib

import pytest
import torch

from ghn_init.published.formats import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    infer_ghn3_config,
    read_checkpoint,
)


class _RunsCode:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _NestedStorage:
    """A storage whose nested torch.save stream (the Hub's joblib layout) carries ``payload``."""

    def __init__(self, payload):
        self.payload = payload

    def __reduce__(self):
        header = b"".join(pickle.dumps(x, protocol=2) for x in (
            0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}))
        return torch.storage._load_from_bytes, (header + pickle.dumps(self.payload, protocol=2),)


def _state_dict():
    torch.manual_seed(0)
    return collections.OrderedDict(
        w=torch.randn(4, 3), p=torch.nn.Parameter(torch.randn(5)), t=torch.arange(6.0).view(2, 3).t(),
        h=torch.randn(2, 2).half(), i=torch.arange(3),
    )


def _assert_same(read, expected):
    assert list(read) == list(expected)
    for key, tensor in expected.items():
        assert torch.equal(read[key], tensor.detach()) and read[key].dtype == tensor.dtype, key


@pytest.mark.parametrize("compress", [None, zlib.compress, gzip.compress, bz2.compress, lzma.compress])
def test_joblib_layout_round_trip(tmp_path, compress):
    """The Hub files are pickles whose storages are nested torch.save streams, optionally compressed by joblib."""
    state = _state_dict()
    data = pickle.dumps(state, protocol=4)
    (tmp_path / "ghn.pt").write_bytes(compress(data) if compress else data)
    ckpt = read_checkpoint(tmp_path / "ghn.pt")
    assert ckpt.container == "joblib" and ckpt.code == "ghn3"
    _assert_same(ckpt.state_dict, state)


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_save_round_trip(tmp_path, zip_format):
    state = _state_dict()
    config = {"max_shape": (64, 64, 11, 11), "num_classes": 10, "hypernet": "gatedgnn", "decoder": "conv",
              "weight_norm": True, "ve": True, "layernorm": True, "hid": 32}
    state["gnn.gru.weight"] = torch.randn(2)
    torch.save({"state_dict": state, "epoch": 7, "config": config, "optimzer": {"state": {0: {"step": 3}}}},
               tmp_path / "ghn2.pt", _use_new_zipfile_serialization=zip_format)
    ckpt = read_checkpoint(tmp_path / "ghn2.pt")
    assert ckpt.container == ("torch-zip" if zip_format else "torch-legacy")
    assert (ckpt.family, ckpt.code, ckpt.extra) == ("ghn2", "ppuda", {"epoch": 7})
    assert ckpt.config == config
    _assert_same(ckpt.state_dict, state)


def test_old_archive_prefix(tmp_path):
    """torch <= 1.x wrote zips under 'archive/'; the reader finds '<folder>/data.pkl' whatever the folder."""
    import zipfile

    torch.save({"state_dict": _state_dict()}, tmp_path / "new.pt")
    with zipfile.ZipFile(tmp_path / "new.pt") as src, zipfile.ZipFile(tmp_path / "old.pt", "w") as dst:
        for info in src.infolist():
            dst.writestr("archive/" + info.filename.split("/", 1)[1], src.read(info))
    _assert_same(read_checkpoint(tmp_path / "old.pt", code="ghn3").state_dict, _state_dict())


@pytest.mark.parametrize("where", ["top", "nested", "zip"])
def test_code_in_the_file_is_refused_and_never_runs(tmp_path, where):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    if where == "top":
        path.write_bytes(pickle.dumps({"w": _RunsCode(marker)}, protocol=4))
    elif where == "nested":
        path.write_bytes(pickle.dumps({"w": _NestedStorage(_RunsCode(marker))}, protocol=4))
    else:
        torch.save({"state_dict": {"w": _RunsCode(marker)}}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt.*(posix|os)\.system.*refusing"):
        read_checkpoint(path)
    assert not marker.exists()


def test_damaged_and_foreign_files_name_the_file(tmp_path):
    path = tmp_path / "cut.pt"
    data = pickle.dumps(_state_dict(), protocol=4)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="cut.pt"):
        read_checkpoint(path)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="text.pt"):
        read_checkpoint(tmp_path / "text.pt")
    (tmp_path / "list.pt").write_bytes(pickle.dumps([1, 2], protocol=4))
    with pytest.raises(CheckpointFormatError, match="list.pt.*not a GHN state dict"):
        read_checkpoint(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_checkpoint(tmp_path / "missing.pt")


def test_ppuda_config_with_foreign_keys_is_refused(tmp_path):
    torch.save({"state_dict": {"gnn.gru.w": torch.zeros(1)}, "config": {"max_shape": (1, 1, 1, 1), "lr": 1}},
               tmp_path / "odd.pt")
    with pytest.raises(CheckpointFormatError, match=r"\['lr'\]"):
        read_checkpoint(tmp_path / "odd.pt")


def test_infer_ghn3_config_as_the_authors_loader():
    shapes = {"embed.weight": (15, 64), "ln.weight": (64,), "decoder.conv.2.weight": (4096, 512),
              "shape_enc.embed_spatial.weight": (11, 16), "class_layer_predictor.1.weight": (1000, 64),
              **{f"gnn.{i}.ln1.weight": (64,) for i in range(3)}, "centrality_embed_in.weight": (101, 64)}
    config = infer_ghn3_config({k: torch.zeros(s) for k, s in shapes.items()})
    assert config == {"hid": 64, "max_shape": (64, 64, 16, 16), "num_classes": 1000, "heads": 8, "layers": 3,
                      "is_ghn2": False, "weight_norm": True, "ve": True, "layernorm": True}
    shapes.update({"embed.weight": (15, 128), "shape_enc.embed_spatial.weight": (9, 16), "gnn.gru.x": (1,)})
    config = infer_ghn3_config({k: torch.zeros(s) for k, s in shapes.items()})
    assert (config["heads"], config["max_shape"][2:], config["is_ghn2"]) == (16, (11, 11), True)


@pytest.mark.fixtures
@pytest.mark.parametrize("name,file", [("ghn3-tm8-random", "ghn3-tm8-random.joblib"),
                                       ("ghn2-imagenet-random", "ghn2-imagenet-random.pt"),
                                       ("ghn2-cifar10-random", "ghn2-cifar10-random.pt")])
def test_reference_files(reference_fixtures, name, file):
    meta = json.loads((reference_fixtures / "ghn-meta.json").read_text())["ghns"][name]
    manifest = {f: digest for f, _, digest in json.loads((reference_fixtures / "manifest.json").read_text())["files"]}
    ckpt = read_checkpoint(reference_fixtures / file)
    assert ckpt.sha256 == manifest[file]
    assert json.loads(json.dumps(ckpt.config)) == meta["config"]
    if file.endswith(".pt"):  # torch's own allow-list loader reads these too: bit-identical tensors
        _assert_same(ckpt.state_dict, torch.load(reference_fixtures / file, weights_only=True)["state_dict"])
    else:
        assert [[k, list(v.shape)] for k, v in ckpt.state_dict.items()] == meta["state_dict_keys_shapes"]
        assert all(v.dtype == torch.float32 for v in ckpt.state_dict.values())


@pytest.mark.fixtures
def test_ghn2_file_through_ghn3_code(reference_fixtures):
    meta = json.loads((reference_fixtures / "ghn-meta.json").read_text())["ghns"]["ghn2-imagenet-random.ghn3code"]
    ckpt = read_checkpoint(reference_fixtures / "ghn2-imagenet-random.pt", code="ghn3")
    assert json.loads(json.dumps(ckpt.config)) == meta["config_rebuilt"]
