"""`ghn-init predict` folders load in plain timm; bad input fails cleanly and leaves nothing behind."""

import argparse
import json
import os
import signal
import subprocess
import sys

import pytest
import slow_writer
import timm
import torch
from safetensors.torch import load_file

import ghn_init
from ghn_init.cli import build_parser, main


def test_predict_roundtrip_through_timm_local_dir(tmp_path, default_ghn):
    out = tmp_path / "vit"
    assert main(["predict", "vit_tiny_patch16_224", "--num-classes", "10", "--img-size", "32",
                 "--kwarg", "patch_size=4", "--kwarg", "drop_rate=0.0", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"] == {"patch_size": 4, "drop_rate": 0.0, "img_size": 32}
    assert config["ghn_init"]["sha256"] and config["pretrained_cfg"]["description"].startswith("weights predicted")
    assert config["pretrained_cfg"]["tag"] == timm.models.get_pretrained_cfg("vit_tiny_patch16_224").tag
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


# Careless inputs: each gets one clear line on stderr, exit status 2, and leaves nothing behind.


def test_num_classes_defaults_to_the_ghns_and_the_card_agrees(tmp_path, capsys, default_ghn):
    out = tmp_path / "r18"
    assert main(["predict", "resnet18", "--out", str(out)]) == 0
    classes = default_ghn.data_config["num_classes"]
    assert json.loads((out / "config.json").read_text())["num_classes"] == classes
    assert f"CIFAR-10 ({classes} classes)" in (out / "README.md").read_text()
    _help("predict")
    assert "default: the classes the GHN was trained on" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("value", ["-3", "0", "ten"])
def test_num_classes_must_be_positive(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "resnet18", "--num-classes", value, "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2 and "positive integer" in capsys.readouterr().err
    assert main(["predict", "resnet18", "--kwarg", f"num_classes={value}", "--out", str(tmp_path / "o")]) == 2
    assert "num_classes must be a positive integer" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_num_classes_and_img_size_as_kwargs(tmp_path, capsys):
    out = tmp_path / "vit"
    assert main(["predict", "vit_tiny_patch16_224", "--kwarg", "img_size=32", "--kwarg", "patch_size=4",
                 "--kwarg", "num_classes=5", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 5 and config["model_args"] == {"patch_size": 4, "img_size": 32}
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert main(["predict", "resnet18", "--num-classes", "10", "--kwarg", "num_classes=5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "given twice" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_wrong_kwarg_value_is_not_blamed_on_the_input_size(tmp_path, capsys):
    assert main(["predict", "resnet18", "--kwarg", "drop_rate=abc", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'abc'" in err and "--kwarg" in err and "--img-size" not in err
    assert list(tmp_path.iterdir()) == []


def test_misspelled_architecture_gets_a_suggestion(tmp_path, capsys):
    assert main(["predict", "resnett18", "--out", str(tmp_path / "o")]) == 2
    assert "did you mean resnet18" in capsys.readouterr().err


def test_output_that_cannot_be_a_folder(tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    assert main(["predict", "resnet18", "--out", str(afile)]) == 2
    assert f"{afile} is a file" in capsys.readouterr().err
    assert main(["predict", "resnet18", "--out", str(afile / "sub")]) == 2
    err = capsys.readouterr().err
    assert f"{afile} is a file" in err and "File exists" not in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["predict", "resnet18", "--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "pass overwrite=True" not in err
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt", "full"]


def test_unwritable_folder(tmp_path, capsys, monkeypatch):
    import tempfile

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)  # as root, chmod cannot make a folder unwritable
    assert main(["predict", "resnet18", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"Permission denied: {tmp_path}" in err and "Traceback" not in err


def test_damaged_ghn_files_are_named(tmp_path, capsys, default_ghn):
    truncated = default_ghn.save_pretrained(tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    assert main(["predict", "resnet18", "--ghn", str(truncated), "--out", str(tmp_path / "o")]) == 2
    assert f"{weights} is not a readable safetensors file" in capsys.readouterr().err
    broken = default_ghn.save_pretrained(tmp_path / "broken")
    (broken / "config.json").write_text("{\n")
    assert main(["predict", "resnet18", "--ghn", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert f"{broken / 'config.json'} is not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_push_to_hub_offline_fails_before_any_work(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["predict", "resnet18", "--out", str(tmp_path / "o"), "--push-to-hub", "org/r18"]) == 2
    assert "HF_HUB_OFFLINE=1" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_push_to_unreachable_hub_says_so_and_keeps_the_folder(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    out = tmp_path / "o"
    assert main(["predict", "resnet18", "--out", str(out), "--push-to-hub", "org/r18"]) == 2
    err = capsys.readouterr().err
    assert "the Hub did not answer" in err and "push_predicted" in err and "Traceback" not in err
    assert (out / "model.safetensors").is_file()


def _help(*command):
    with pytest.raises(SystemExit):
        main([*command, "--help"])


def test_help_shows_defaults_and_no_markup(capsys):
    _help()
    text = capsys.readouterr().out
    assert "``" not in text and "predict" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"ghn-init {ghn_init.__version__}"
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        assert all(action.help for action in sub._actions), f"an option of {name} has no help"
    _help("eval")
    text = capsys.readouterr().out
    assert "CIFAR-10" in text and "GHN_INIT_DATA" in text and "(default: 500)" in text
    _help("coverage")
    assert "(default: 600.0)" in capsys.readouterr().out


def test_eval_prints_a_table(capsys, monkeypatch):
    import train_ghn.data
    import train_ghn.evaluate

    row = {"ghn": {"acc_bn_calibrated": 0.335, "acc_batch_stats": 0.346}, "default_init": {"acc_bn_calibrated": 0.082},
           "sgd": {"100": {"default_init": {"acc": 0.25}, "ghn": {"acc": 0.31}}}}
    result = {"setup": {"split": "balanced test"}, "architectures": {"resnet18": row},
              "mean_ghn_acc_bn_calibrated": 0.335}
    monkeypatch.setattr(train_ghn.data, "load_cifar10", lambda *args, **kwargs: None)
    monkeypatch.setattr(train_ghn.evaluate, "main", lambda argv: result)
    assert main(["eval", "resnet18"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["architecture", "GHN,"]
    assert lines[2].split() == ["resnet18", "33.5%", "34.6%", "8.2%", "25.0%", "31.0%"]
    assert lines[3].split() == ["mean", "33.5%"]


def test_eval_without_cifar10_says_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GHN_INIT_DATA", str(tmp_path))
    assert main(["eval", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert "needs the CIFAR-10 copy" in err and str(tmp_path) in err


# Interrupts: Ctrl-C and a plain `kill` stop cleanly; what a killed process left is swept by the next run.

_CLI = "import sys\nfrom ghn_init.cli import main\nsys.exit(main(sys.argv[1:]))\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_write_leaves_nothing_behind(tmp_path, signum):
    out = tmp_path / "r18"
    child = slow_writer.start(_CLI, "predict", "resnet18", "--out", str(out))
    slow_writer.wait_for(lambda: any(tmp_path.glob(".r18.*/model.safetensors")), child)
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signum, err
    assert "Traceback" not in err and f"stopped by {signal.Signals(signum).name}" in err
    assert list(tmp_path.iterdir()) == []


def test_staging_folders_of_dead_processes_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        stale = tmp_path / f".r18.{dead.pid}.abcd1234"
        running = tmp_path / f".r18.{alive.pid}.efgh5678"
        other = tmp_path / f".r18-v2.{dead.pid}.ijkl9012"
        for folder in (stale, running, other):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"partial")
        assert main(["predict", "resnet18", "--out", str(tmp_path / "r18")]) == 0
        assert not stale.exists() and running.exists() and other.exists()
    finally:
        alive.kill()
        alive.wait()
