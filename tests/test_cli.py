"""`ghn-init predict` folders load in plain timm; bad input fails cleanly and leaves nothing behind."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from ghn_init.cli import main


def test_predict_roundtrip_through_timm_local_dir(tmp_path, default_ghn):
    out = tmp_path / "vit"
    assert main(["predict", "vit_tiny_patch16_224", "--num-classes", "10", "--img-size", "32",
                 "--kwarg", "patch_size=4", "--kwarg", "drop_rate=0.0", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"] == {"patch_size": 4, "drop_rate": 0.0, "img_size": 32}
    assert config["ghn_init"]["sha256"] and "tag" not in config["pretrained_cfg"]
    assert "license" not in config["pretrained_cfg"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    data = timm.data.resolve_model_data_config(model)
    assert tuple(data["input_size"]) == (3, 32, 32)
    assert data["mean"] == pytest.approx(default_ghn.data_config["mean"])
    assert data["std"] == pytest.approx(default_ghn.data_config["std"])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_timm_loads_folder_without_ghn_init_installed(tmp_path):
    out = tmp_path / "r18"
    assert main(["predict", "resnet18", "--num-classes", "10", "--out", str(out)]) == 0
    code = ("import sys; sys.modules['ghn_init'] = None; import timm;"
            f"m = timm.create_model('local-dir:{out}', pretrained=True); print(m.num_classes)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "10"


def test_forward_failure_names_model_and_size_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "bad"
    code = main(["predict", "vit_tiny_patch16_224", "--img-size", "8", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "vit_tiny_patch16_224" in err and "3x8x8" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_no_partial_folder(tmp_path, monkeypatch):
    import ghn_init.export as export

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "predicted_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        main_args = ["predict", "resnet18", "--out", str(tmp_path / "r18")]
        from ghn_init.cli import build_parser

        args = build_parser().parse_args(main_args)
        args.run(args)
    assert list(tmp_path.iterdir()) == []


def test_unknown_ghn_reference(tmp_path, capsys):
    assert main(["predict", "resnet18", "--ghn", str(tmp_path / "missing-ghn"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Tried" in err and "local folder" in err and "Hub repo" in err
    assert not (tmp_path / "o").exists()


def test_unknown_architecture_and_existing_output(tmp_path, capsys):
    assert main(["predict", "resnet_does_not_exist", "--out", str(tmp_path / "o")]) == 2
    assert "unknown timm architecture" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["predict", "resnet18", "--out", str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_kwarg_values_parse_as_json():
    from ghn_init.cli import _kwarg

    assert _kwarg("drop_rate=0.1") == ("drop_rate", 0.1)
    assert _kwarg("act_layer=gelu") == ("act_layer", "gelu")
    assert _kwarg("depths=[1,2]") == ("depths", [1, 2])


def test_graph_command_writes_json(tmp_path):
    out = tmp_path / "g.json"
    assert main(["graph", "resnet18", "--out", str(out)]) == 0
    graph = json.loads(out.read_text())
    assert graph["nodes"][1]["op"] == "conv" and len(graph["edges"]) > 60


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_graph_command_draws_picture(tmp_path, suffix):
    out = tmp_path / f"g{suffix}"
    assert main(["graph", "convnext_atto", "--out", str(out)]) == 0
    head = out.read_bytes()[:200]
    assert head.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in out.read_bytes()[:2000]
    assert main(["graph", "convnext_atto", "--out", str(tmp_path / "g.txt")]) == 2
