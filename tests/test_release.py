"""hub/release.py: the fine-tuning section of a GHN release card."""

import importlib.util
import json
from pathlib import Path

import pytest

RELEASE = Path(__file__).resolve().parents[1] / "hub" / "release.py"


def _release():
    spec = importlib.util.spec_from_file_location("release", RELEASE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(ghn: float, default: float, mean: float, error: float) -> dict:
    return {"kwargs": {}, "ghn": {"accuracy": ghn}, "default": {"accuracy": default},
            "ghn_minus_default": {"mean": mean, "standard_error": error}}


def test_finetune_section_says_where_timm_init_measured_better(tmp_path):
    result = {"setup": {"split": "balanced test", "recipe": {"steps": 200, "lr": 0.05, "batch_size": 64,
                                                             "seeds": [0, 1, 2]}},
              "architectures": {"resnet18": _row(0.463, 0.380, 0.083, 0.007),
                                "vit_tiny_patch16_224": _row(0.3097, 0.3098, -0.0001, 0.006),
                                "mixer_s16_224": _row(0.398, 0.448, -0.050, 0.003)}}
    path = tmp_path / "finetune.json"
    path.write_text(json.dumps(result))
    text = _release().finetune_markdown(path)
    assert "| resnet18 | `{}` | 46.3% | 38.0% | +8.3 ± 0.7 |" in text
    assert "Level within two standard errors: vit_tiny_patch16_224." in text
    assert "Better started from timm's own init: mixer_s16_224." in text
    assert "--seeds 0 1 2" in text


def test_finetune_section_needs_both_inits_over_several_seeds(tmp_path):
    row = {"kwargs": {}, "ghn": {"accuracy": 0.46}}
    path = tmp_path / "finetune.json"
    path.write_text(json.dumps({"setup": {"recipe": {"seeds": [0]}}, "architectures": {"resnet18": row}}))
    with pytest.raises(SystemExit, match="resnet18.*--inits ghn default --seeds"):
        _release().finetune_markdown(path)


def test_committed_card_is_what_release_generates():
    """hub/ghn2-cifar10/README.md is regenerated, never hand-edited: the command is in release.py's docstring."""
    from ghn_init.hub import load_folder

    root = RELEASE.parents[1]
    results = root / "benchmarks" / "results"
    card = _release().release_card(
        load_folder(root / "hub" / "ghn2-cifar10"),
        [results / "default_ghn_quality.json", results / "default_ghn_quality_full.json"],
        finetune=results / "finetune.json", notes=root / "hub" / "notes" / "ghn2-cifar10.md")
    assert card == (root / "hub" / "ghn2-cifar10" / "README.md").read_text()
