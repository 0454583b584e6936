"""`ghn-init coverage` on a small sample of timm, and its time limit."""

import json

from ghn_init.cli import main
from ghn_init.coverage import check_architecture, run_coverage, select_models


def test_select_models_pattern_and_limit():
    names = select_models("resnet1*", limit=3)
    assert len(names) == 3 and all(n.startswith("resnet1") for n in names)


def test_check_architecture_reports_every_tensor(default_ghn):
    row = check_architecture("mobilenetv3_small_050", default_ghn)
    assert row["ok"] and row["graph_built"] and row["skipped"] == {}
    assert row["family"] == "mobilenetv3" and row["predicted"] == row["tensors"] > 100


def test_check_architecture_reports_failures_instead_of_raising(default_ghn):
    row = check_architecture("not_a_model", default_ghn)
    assert not row["ok"] and "unknown timm architecture" in row["error"]


def test_coverage_command_on_a_sample(tmp_path):
    out = tmp_path / "coverage.json"
    assert main(["coverage", "--pattern", "regnetx_00*", "--limit", "2", "--workers", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["summary"] == {"architectures": 2, "fully_predicted": 2, "failed": []}
    assert [r["name"] for r in report["architectures"]] == ["regnetx_002", "regnetx_004"]


def test_time_limit_kills_slow_architecture():
    rows = run_coverage(["resnet18"], workers=1, timeout_s=0.01)
    assert rows[0]["ok"] is False and "limit" in rows[0]["error"]
