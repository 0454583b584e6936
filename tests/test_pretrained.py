"""timm integration: pretrained_cfg / create_model give exactly ghn.predict's tensors; Hub cache loading."""

import signal

import slow_writer
import timm
import torch

import ghn_init


def _equal(state, model):
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_three_ways_give_identical_tensors(tmp_path, monkeypatch, default_ghn):
    monkeypatch.setenv("GHN_INIT_CACHE", str(tmp_path))
    expected = default_ghn.predict(timm.create_model("convnext_atto", num_classes=7, device="meta"))
    a = ghn_init.create_model("convnext_atto", num_classes=7)
    cfg = ghn_init.pretrained_cfg("convnext_atto", num_classes=7)
    b = timm.create_model("convnext_atto", pretrained=True, pretrained_cfg=cfg, num_classes=7)
    assert _equal(expected, a) and _equal(expected, b)
    assert cfg.classifier == "head.fc" and cfg.first_conv == "stem.0" and cfg.license is None
    assert tuple(cfg.mean) == tuple(default_ghn.data_config["mean"])
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1, "one cache entry per (GHN, architecture, kwargs)"
    stamp = files[0].stat().st_mtime_ns
    ghn_init.pretrained_cfg("convnext_atto", num_classes=7)
    assert files[0].stat().st_mtime_ns == stamp, "cached prediction reused"
    monkeypatch.setattr(ghn_init.pretrained, "__version__", "0.0.0")
    older = ghn_init.pretrained.predicted_file("convnext_atto", num_classes=7)
    assert older != files[0] and older.is_file(), "another ghn_init release predicts its own file"


def test_other_num_classes_at_load_drops_the_head_like_timm(tmp_path, monkeypatch, default_ghn):
    monkeypatch.setenv("GHN_INIT_CACHE", str(tmp_path))
    cfg = ghn_init.pretrained_cfg("resnet18", num_classes=10)
    model = timm.create_model("resnet18", pretrained=True, pretrained_cfg=cfg, num_classes=5)
    expected = default_ghn.predict(timm.create_model("resnet18", num_classes=10, device="meta"), (3, 32, 32))
    assert model.fc.weight.shape == (5, 512)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(expected[k], v) for k, v in body.items())


def test_load_from_hand_built_hub_cache_offline(tmp_path, monkeypatch, default_ghn):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-ghn"
    default_ghn.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ghn = ghn_init.load("someone/tiny-ghn")
    model = timm.create_model("convnext_atto", num_classes=7, device="meta")
    expected = default_ghn.predict(model)
    assert all(torch.equal(expected[k], v) for k, v in ghn.predict(model).items())


def test_partial_file_of_a_killed_process_is_swept(tmp_path, monkeypatch):
    code = "import ghn_init\nghn_init.create_model('resnet18', num_classes=10)\n"
    child = slow_writer.start(code, env={"GHN_INIT_CACHE": str(tmp_path)})
    slow_writer.wait_for(lambda: any(tmp_path.rglob("*.partial")), child)
    child.send_signal(signal.SIGTERM)  # a library caller has no handler: the process dies mid-write
    child.communicate(timeout=120)
    assert child.returncode == -signal.SIGTERM
    [partial] = tmp_path.rglob("*.partial")
    monkeypatch.setenv("GHN_INIT_CACHE", str(tmp_path))
    path = ghn_init.pretrained.predicted_file("resnet18", num_classes=10)
    assert path.is_file() and not partial.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]
