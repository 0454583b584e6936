"""Published GHNs end to end: loaded as users load them, with ghn-init's own graph builder and interface.

The fixture tests replay every case the authors' code completed (reference fixtures) through
``ghn_init.load(file).predict(model)``; the others check conversion, the Hub cache, the timm and CLI
paths and the report of tensors the published GHNs do not predict.
"""

from __future__ import annotations

import functools
import json
import pickle
import shutil
from pathlib import Path

import pytest
import timm
import torch
from published_cases import CASES, RUNS, check_prediction, fixture_model

import ghn_init
from ghn_init.cli import main
from ghn_init.published.ghn import PublishedGHN

pytestmark = pytest.mark.fixtures


@functools.cache
def _ghn(folder: Path, run: str) -> PublishedGHN:
    file, code, _, _ = RUNS[run]
    ghn = ghn_init.load(folder / file) if code != "ghn3" or file.endswith(".joblib") else \
        PublishedGHN.from_file(folder / file, code="ghn3")
    assert isinstance(ghn, PublishedGHN) and ghn.config.code == code
    return ghn


@pytest.mark.parametrize(("run", "source", "name"), CASES, ids=["/".join(c) for c in CASES])
def test_predict_matches_authors_code(reference_fixtures, run, source, name):
    _, _, builder, num_classes = RUNS[run]
    ref = json.loads((reference_fixtures / "preds" / run / f"{source}-{name}.json").read_text())
    model = fixture_model(source, name, num_classes, builder == "ppuda-cifar10")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ghn = _ghn(reference_fixtures, run)
    state = ghn.predict(model)
    assert list(state) == list(before) and all(state[k].shape == v.shape for k, v in before.items())
    check_prediction(state, ref)
    for entry in ref["not_predicted"]:  # kept at the model's own init, as in the authors' code
        assert torch.equal(state[entry["name"]], before[entry["name"]]), entry["name"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # predict leaves the model alone


def test_apply_reports_what_is_kept_and_why(reference_fixtures):
    ghn = _ghn(reference_fixtures, "ghn3-tm8-random")
    model = fixture_model("torchvision", "convnext_tiny", 1000, cifar=False)
    report = ghn.apply_(model)
    scales = sorted(n for n in report.skipped if "layer_scale" in n)
    assert len(scales) == 18 and all("layer scale" in report.skipped[n] for n in scales)
    assert "features.0.0.weight" in report.predicted
    meta = timm.create_model("vit_tiny_patch16_224", device="meta")
    with pytest.raises(ValueError, match=r"cls_token.*meta device.*build the model on the CPU"):
        ghn.predict(meta)


def test_same_tensors_on_cpu_and_meta_models_with_any_thread_count(reference_fixtures):
    ghn = _ghn(reference_fixtures, "ghn3-tm8-random")
    cpu = ghn.predict(timm.create_model("resnet18", num_classes=10))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        meta = ghn.predict(timm.create_model("resnet18", num_classes=10, device="meta"))
    finally:
        torch.set_num_threads(threads)
    assert cpu.keys() == meta.keys() and all(torch.equal(cpu[k], meta[k]) for k in cpu)


def test_convert_round_trip_is_bit_identical_and_needs_no_pickle(reference_fixtures, tmp_path, monkeypatch, capsys):
    source = reference_fixtures / "ghn3-tm8-random.joblib"
    assert main(["convert", str(source), "--out", str(tmp_path / "ghn3-t")]) == 0
    assert "wrote" in capsys.readouterr().out
    card = (tmp_path / "ghn3-t" / "README.md").read_text()
    digest = json.loads((reference_fixtures / "manifest.json").read_text())["files"]
    assert [d for f, _, d in digest if f == source.name][0] in card
    assert "arxiv.org/abs/2303.04143" in card and "license: mit" in card and "reported by the authors" in card.lower()
    original = _ghn(reference_fixtures, "ghn3-tm8-random")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a converted GHN must load without unpickling anything")

    from ghn_init.published import formats

    for owner, attr in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (formats._AllowListUnpickler, "load")):
        monkeypatch.setattr(owner, attr, no_unpickling)
    converted = ghn_init.load(tmp_path / "ghn3-t")
    assert isinstance(converted, PublishedGHN)
    assert converted.meta["source"]["sha256"] == original.meta["source"]["sha256"]
    assert ghn_init.content_hash(converted) == ghn_init.content_hash(original)
    for name in ("resnet18", "vit_tiny_patch16_224"):
        model = timm.create_model(name, num_classes=10)
        a, b = original.predict(model), converted.predict(model)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_convert_refuses_what_is_not_a_published_ghn(tmp_path, capsys):
    (tmp_path / "evil.pt").write_bytes(b"\x80\x04cposix\nsystem\n\x8c\x04true\x85R.")
    assert main(["convert", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "out")]) == 2
    assert "posix.system" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["convert", "ghn-init/ghn2-cifar10", "--out", str(tmp_path / "out")]) == 2
    assert "nothing to convert" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _hub_cache(root: Path, repo_id: str, files: dict[str, Path]) -> None:
    """A huggingface_hub cache holding ``files`` at one commit of ``repo_id`` (what a download leaves)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for name, path in files.items():
        shutil.copy(path, repo / "snapshots" / sha / name)


def test_short_names_and_hub_files_load_from_the_cache_offline(reference_fixtures, tmp_path, monkeypatch):
    from huggingface_hub import constants

    files = {"ghn3tm8.pt": reference_fixtures / "ghn3-tm8-random.joblib"}
    _hub_cache(tmp_path / "hub", "SamsungSAILMontreal/ghn3", files)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    by_name = ghn_init.load("ghn3-t")
    by_file = ghn_init.load("SamsungSAILMontreal/ghn3", filename="ghn3tm8.pt")
    assert by_name.meta["title"] == "GHN-3-T/m8" and by_name.meta["source"]["repo_id"] == "SamsungSAILMontreal/ghn3"
    assert ghn_init.content_hash(by_name) == ghn_init.content_hash(by_file)
    with pytest.raises(ghn_init.GHNNotFoundError, match=r"ghn3xlm16.pt.*HF_HUB_OFFLINE"):
        ghn_init.load("ghn3-xl")


def test_timm_and_cli_paths_take_a_published_ghn(reference_fixtures, tmp_path, monkeypatch):
    monkeypatch.setenv("GHN_INIT_CACHE", str(tmp_path / "cache"))
    ghn = _ghn(reference_fixtures, "ghn2-cifar10-random")
    expected = ghn.predict(timm.create_model("resnet18", num_classes=10))
    model = ghn_init.create_model("resnet18", ghn=ghn, num_classes=10)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items() if "running" not in k)
    out = tmp_path / "r18"
    assert main(["predict", "resnet18", "--ghn", str(reference_fixtures / "ghn2-cifar10-random.pt"),
                 "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 10 and config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items() if "running" not in k)


def test_timm_one_liner_takes_a_published_ghn(reference_fixtures, tmp_path, monkeypatch):
    monkeypatch.setenv("GHN_INIT_CACHE", str(tmp_path / "cache"))
    ghn = _ghn(reference_fixtures, "ghn3-tm8-random")
    model = timm.create_model("resnet18", pretrained_cfg=ghn, num_classes=10)
    expected = ghn.predict(timm.create_model("resnet18", num_classes=10, device="meta"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items() if "running" not in k)


def test_apply_on_shared_modules_keeps_parameters_and_sharing(reference_fixtures):
    """CoaT registers its conv position encodings under two names: the graph's forward pass must restore
    them, and apply_ fill each shared parameter once, in place."""
    ghn = _ghn(reference_fixtures, "ghn3-tm8-random")
    model = timm.create_model("coat_lite_tiny", num_classes=10)
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    report = ghn.apply_(model)
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[n] is p and not p.is_meta for n, p in before.items())
    assert model.cpe1.proj.weight is model.serial_blocks1[0].cpe.proj.weight
    assert "cpe1.proj.weight" in report.predicted
