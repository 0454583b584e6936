"""Model cards say only what their JSON says: every number in a card is found in the files it is generated from."""

import json
import re
from pathlib import Path

import pytest

from ghn_init.cli import main

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "hub" / "ghn2-cifar10"
RESULTS = ROOT / "benchmarks" / "results"

#: A number as a reader sees one: not part of a name such as resnet18, x86_64, CIFAR-10 or arxiv:2110.13100.
_NUMBER = re.compile(r"(?<![\w.,])(?<![A-Za-z]-)(?<![A-Za-z]:)\d+(?:[.,]\d+)*")


def numbers_in(text: str) -> set[str]:
    return set(_NUMBER.findall(text))


def json_numbers(value) -> set[str]:
    """Every number a JSON document holds, as written and as a card prints it (percent or points, 1 decimal)."""
    if isinstance(value, dict):
        return set().union(*(numbers_in(key) | json_numbers(item) for key, item in value.items()))
    if isinstance(value, list):
        return set().union(*(json_numbers(item) for item in value))
    if isinstance(value, str):
        return numbers_in(value)
    if isinstance(value, bool) or value is None:
        return set()
    return {str(value), f"{value:,}", f"{100 * abs(value):.1f}"}


def unsourced(card: str, *sources: Path, derived: set[str] = frozenset()) -> set[str]:
    known = set(derived).union(*(json_numbers(json.loads(path.read_text())) for path in sources))
    return numbers_in(card) - known


def test_every_number_in_the_ghn_card_comes_from_its_json():
    config = json.loads((RELEASE / "config.json").read_text())
    minutes: dict[str, float] = {}
    for stage in config["training"]["stages"]:  # the card totals wall time per kind of device
        kind = stage["device"].split(":")[0]
        minutes[kind] = minutes.get(kind, 0.0) + stage["wall_time_s"] / 60
    card = (RELEASE / "README.md").read_text()
    sources = [RELEASE / "config.json", RESULTS / "default_ghn_quality.json",
               RESULTS / "default_ghn_quality_full.json", RESULTS / "finetune.json"]
    assert unsourced(card, *sources, derived={f"{m:.1f}" for m in minutes.values()}) == set()
    assert "pip install" in card


def test_ghn_card_labels_models_without_batchnorm():
    card = (RELEASE / "README.md").read_text()
    assert "mixer_s16_224 {\"img_size\": 32}: predicted weights, eval mode (no BatchNorm)" in card
    assert "resnet18: predicted weights, BN recalibrated" in card
    assert not re.search(r"(vit_tiny|swin_tiny|mixer_s16|convnext_atto)[^\n]*BN recalibrated", card)


@pytest.fixture(scope="module")
def ghn_config() -> Path:
    return RELEASE / "config.json"


def _predict(tmp_path, name: str, *args: str) -> tuple[str, Path]:
    out = tmp_path / name
    assert main(["predict", name, "--out", str(out), *args]) == 0
    return (out / "README.md").read_text(), out / "config.json"


def test_predicted_card_quotes_the_measured_accuracy(tmp_path, ghn_config):
    card, config = _predict(tmp_path, "resnet18")
    row = json.loads(ghn_config.read_text())["evaluation"][0]["architectures"]["resnet18"]
    assert f"{row['ghn']['acc_bn_calibrated']:.1%} with BatchNorm recalibrated" in card
    assert "`resnet18` (timm's default arguments)" in card and "()" not in card
    assert "pip install" in card
    assert unsourced(card, config, ghn_config) == set()


def test_predicted_card_of_a_model_without_batchnorm(tmp_path, ghn_config):
    card, config = _predict(tmp_path, "vit_tiny_patch16_224", "--img-size", "32", "--kwarg", "patch_size=4")
    row = json.loads(ghn_config.read_text())["evaluation"][0]["architectures"]["vit_tiny_patch16_224"]
    assert f"{row['ghn']['acc_bn_calibrated']:.1%} in eval mode" in card
    assert "BatchNorm statistics are at identity" not in card and "no BatchNorm" in card
    assert unsourced(card, config, ghn_config) == set()


def test_predicted_card_of_a_grayscale_model(tmp_path, ghn_config):
    card, config = _predict(tmp_path, "resnet18", "--kwarg", "in_chans=1")
    cfg = json.loads(config.read_text())["pretrained_cfg"]
    assert cfg["input_size"][0] == 1 and len(cfg["mean"]) == 1 and len(cfg["std"]) == 1
    assert f"mean {cfg['mean']} and std {cfg['std']}" in card
    assert "accuracy is unknown" in card
    assert unsourced(card, config, ghn_config) == set()


def test_predicted_card_with_other_classes_says_the_classifier_is_untrained(tmp_path, ghn_config):
    card, config = _predict(tmp_path, "resnet18", "--num-classes", "100")
    assert "CIFAR-10 (10 classes)" in card and "100-way classifier" in card and "accuracy is unknown" in card
    assert unsourced(card, config, ghn_config) == set()
