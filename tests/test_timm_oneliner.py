"""timm.create_model(name, pretrained_cfg=ghn_init), or pretrained_cfg=a GHN: ghn.predict's tensors for that very model.

``GHN_INIT_OLD_TIMM=/path`` (a ``pip install --no-deps --target`` of the oldest timm pyproject.toml
allows) reruns this file on that timm in a subprocess; skipped when unset.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import PretrainedCfg, _factory

import ghn_init
from ghn_init import timm_hook

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GHN_INIT_CACHE", str(tmp_path / "ghn-cache"))


@pytest.fixture(scope="module")
def tiny_ghn():
    """Not the default GHN, with its own normalization: shows the instance passed is the one used."""
    torch.manual_seed(0)
    ghn = ghn_init.GHN(ghn_init.GHNConfig(hidden=16, rounds=1, latent=8, block=8, block_1x1=8, vector=8))
    ghn.meta = {"name": "tiny", "data": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}}
    return ghn


def _twin_prediction(ghn, name, **kwargs):
    twin = timm.create_model(name, device="meta", **kwargs)
    size = kwargs.get("img_size", 32)
    return ghn.predict(twin, (kwargs.get("in_chans", 3), size, size))


def _assert_state(expected, model):
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(expected[k], v) for k, v in state.items())


@pytest.mark.parametrize("pretrained", [False, True])
@pytest.mark.parametrize("which", ["module", "instance"])
def test_ghn_as_pretrained_cfg_predicts_for_the_model_built(which, pretrained, default_ghn, tiny_ghn):
    ghn, value = (default_ghn, ghn_init) if which == "module" else (tiny_ghn, tiny_ghn)
    kwargs = {"num_classes": 10, "in_chans": 2, "drop_rate": 0.25}
    model = timm.create_model("resnet18", pretrained=pretrained, pretrained_cfg=value, **kwargs)
    assert model.conv1.weight.shape == (64, 2, 7, 7) and model.fc.out_features == 10 and model.drop_rate == 0.25
    _assert_state(_twin_prediction(ghn, "resnet18", **kwargs), model)
    cfg = model.pretrained_cfg
    assert cfg["tag"] == timm.models.get_pretrained_cfg("resnet18").tag, "the registry's tag is kept"
    assert cfg["description"].startswith("weights predicted by the GHN")
    assert cfg["architecture"] == "resnet18" and cfg["num_classes"] == 10
    assert tuple(cfg["input_size"]) == (2, 32, 32), "the stem was predicted for 2 channels: nothing to adapt"
    assert tuple(cfg["mean"]) == tuple(ghn.data_config["mean"])


def test_vit_img_size_and_model_kwargs(default_ghn):
    kwargs = {"img_size": 32, "patch_size": 4, "num_classes": 10, "embed_dim": 96, "depth": 2, "num_heads": 3}
    model = timm.create_model("vit_tiny_patch16_224", pretrained_cfg=ghn_init, **kwargs)
    assert model.patch_embed.img_size == (32, 32) and len(model.blocks) == 2
    _assert_state(_twin_prediction(default_ghn, "vit_tiny_patch16_224", **kwargs), model)
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 32, 32)
    again = timm.create_model("vit_tiny_patch16_224", pretrained_cfg=ghn_init, **{**kwargs, "depth": 1})
    assert len(again.blocks) == 1, "other kwargs, another prediction"
    assert len(list(Path(os.environ["GHN_INIT_CACHE"]).rglob("*.safetensors"))) == 2


def test_builders_that_read_the_tag_build_the_registry_architecture(tiny_ghn, tmp_path, monkeypatch):
    """qwen3/deepseek encoders look their output width up by the cfg's tag; ours must not break that."""
    if "qwen3_vit_88m_enc" not in timm.list_models():
        pytest.skip(f"timm {timm.__version__} has no qwen3_vit encoders")
    monkeypatch.setattr(ghn_init.pretrained, "predicted_file", lambda *args, **kwargs: tmp_path / "unused")
    cfg = ghn_init.pretrained_cfg("qwen3_vit_88m_enc", tiny_ghn)
    ours = timm.create_model("qwen3_vit_88m_enc", pretrained_cfg=cfg, device="meta")
    registry = timm.create_model("qwen3_vit_88m_enc", device="meta")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in registry.state_dict().items()}


def _build_both_ways(monkeypatch, seed, *args, **kwargs):
    """(hooked, plain timm) models from the same call and the same random seed."""
    torch.manual_seed(seed)
    hooked = timm.create_model(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(_factory, "model_entrypoint", _factory.model_entrypoint.__wrapped__)
        torch.manual_seed(seed)
        plain = timm.create_model(*args, **kwargs)
    return hooked, plain


@pytest.mark.parametrize("value", [None, "a1_in1k", {"architecture": "resnet18", "num_classes": 7, "tag": "mine"},
                                   PretrainedCfg(architecture="resnet18", num_classes=5, mean=(0.1, 0.2, 0.3))])
def test_other_pretrained_cfg_values_reach_timm_unchanged(value, monkeypatch):
    hooked, plain = _build_both_ways(monkeypatch, 0, "resnet18", pretrained_cfg=value, num_classes=3)
    assert hooked.pretrained_cfg == plain.pretrained_cfg
    _assert_state(plain.state_dict(), hooked)
    assert not Path(os.environ["GHN_INIT_CACHE"]).exists(), "nothing was predicted"


def test_file_pretrained_cfg_loads_the_file_not_a_prediction(tmp_path, monkeypatch):
    torch.manual_seed(1)
    state = timm.create_model("resnet18", num_classes=4).state_dict()
    weights = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    save_file(weights, tmp_path / "w.safetensors")
    cfg = PretrainedCfg(architecture="resnet18", file=str(tmp_path / "w.safetensors"), num_classes=4)
    hooked, plain = _build_both_ways(monkeypatch, 0, "resnet18", pretrained=True, pretrained_cfg=cfg)
    _assert_state(weights, hooked)
    assert hooked.pretrained_cfg == plain.pretrained_cfg
    assert not Path(os.environ["GHN_INIT_CACHE"]).exists()


def _without_global_lookup(model_name, pretrained=False, pretrained_cfg=None, **kwargs):
    from timm.models import _registry

    return _registry.model_entrypoint(model_name)(pretrained=pretrained, pretrained_cfg=pretrained_cfg, **kwargs)


@pytest.mark.parametrize("change", ["lookup removed", "create_model no longer uses it"])
def test_a_timm_without_the_hooked_internal_says_what_to_use(change, monkeypatch, tiny_ghn):
    monkeypatch.setattr(timm_hook, "_unavailable", None)
    for namespace in (timm, timm.models):
        monkeypatch.setattr(namespace, "create_model", namespace.create_model)
    if change == "lookup removed":
        monkeypatch.delattr(_factory, "model_entrypoint")
    else:
        monkeypatch.setattr(_factory, "model_entrypoint", _factory.model_entrypoint.__wrapped__)
        for namespace in (timm, timm.models, _factory):
            monkeypatch.setattr(namespace, "create_model", _without_global_lookup)
    assert timm_hook.register() is False
    for value in (ghn_init, tiny_ghn):
        with pytest.raises(ghn_init.TimmHookError, match=r"ghn_init\.create_model\(name, \*\*kwargs\)"):
            timm.create_model("resnet18", pretrained_cfg=value)
        with pytest.raises(ghn_init.TimmHookError, match="changed the internals"):
            timm.models.create_model("resnet18", pretrained=True, pretrained_cfg=value)
    if change != "lookup removed":
        assert timm.create_model("resnet18", num_classes=3).fc.out_features == 3, "other calls unaffected"
        with pytest.raises(AttributeError, match=r"changed the internals.*ghn_init\.pretrained_cfg\(name"):
            _without_global_lookup("resnet18", pretrained_cfg=ghn_init)  # a caller holding timm's original


def test_entrypoint_called_directly_says_what_to_use():
    with pytest.raises(AttributeError, match=r"only in timm\.create_model; use ghn_init\.create_model"):
        timm.models.resnet18(pretrained_cfg=ghn_init)
    with pytest.raises(AttributeError, match=r"^module 'ghn_init' has no attribute 'no_such_name'$"):
        ghn_init.no_such_name  # noqa: B018


def test_register_is_idempotent():
    hooked = _factory.model_entrypoint
    assert timm_hook.register() is True and timm_hook.register() is True
    assert _factory.model_entrypoint is hooked and not hasattr(hooked.__wrapped__, "ghn_init_hook")


@pytest.mark.skipif(not os.environ.get("GHN_INIT_OLD_TIMM"), reason="GHN_INIT_OLD_TIMM names no old-timm target")
def test_on_the_oldest_supported_timm():
    floor = re.search(r'"timm>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ["GHN_INIT_OLD_TIMM"]]),
           "GHN_INIT_OLD_TIMM": ""}
    version = subprocess.run([sys.executable, "-c", "import timm; print(timm.__version__)"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == floor, f"GHN_INIT_OLD_TIMM holds timm {version}, pyproject.toml's floor is {floor}"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, f"on timm {version}:\n{run.stdout[-4000:]}{run.stderr[-2000:]}"
