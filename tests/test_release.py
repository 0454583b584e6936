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
    assert "| resnet18 | `{}` | 200 | 46.3% | 38.0% | +8.3 ± 0.7 | 3 |" in text
    assert ("- 200 steps: level within two standard errors: vit_tiny_patch16_224; better started from timm's own "
            "init: mixer_s16_224.") in text
    assert "--seeds 0 1 2" in text


def test_finetune_section_per_budget(tmp_path):
    """benchmarks/finetune.py's per-budget file: a row per budget, verdicts per budget, none from one seed."""
    def cell(ghn, default, mean, error, n):
        return {**_row(ghn, default, mean, error), "ghn_minus_default": {"mean": mean, "standard_error": error, "n": n}}

    rows = {"rexnet_100": {"kwargs": {}, "steps": {"200": cell(0.301, 0.262, 0.039, 0.004, 3),
                                                   "1000": cell(0.450, 0.509, -0.059, 0.010, 3),
                                                   "3000": cell(0.60, 0.62, -0.02, None, 1)}}}
    path = tmp_path / "finetune.json"
    path.write_text(json.dumps({"setup": {"split": "balanced test", "recipe": {"lr": 0.05, "batch_size": 64}},
                                "architectures": rows}))
    text = _release().finetune_markdown(path)
    assert "| rexnet_100 | `{}` | 1,000 | 45.0% | 50.9% | -5.9 ± 1.0 | 3 |" in text
    assert "| rexnet_100 | `{}` | 3,000 | 60.0% | 62.0% | -2.0 | 1 |" in text
    assert "- 200 steps: level within two standard errors: none; better started from timm's own init: none." in text
    assert ("- 1,000 steps: level within two standard errors: none; better started from timm's own init: "
            "rexnet_100.") in text
    assert "- 3,000 steps: level within two standard errors: none; better started from timm's own init: none." in text
    assert "--steps 200 1000 3000 --seeds 0 1 2 --seeds-at 3000=0`" in text


def test_finetune_section_needs_both_inits_over_several_seeds(tmp_path):
    row = {"kwargs": {}, "ghn": {"accuracy": 0.46}}
    path = tmp_path / "finetune.json"
    path.write_text(json.dumps({"setup": {"recipe": {"seeds": [0], "steps": 200}}, "architectures": {"resnet18": row}}))
    with pytest.raises(SystemExit, match="resnet18 .200 steps.*--inits ghn default --seeds"):
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
