"""`ghn-init coverage` on a sample of timm: prediction on meta, the paths users call, the time limit."""

import json

import pytest

from ghn_init.cli import main
from ghn_init.coverage import CHECKS, check_architecture, run_coverage, select_models


def test_select_models_pattern_and_limit():
    names = select_models("resnet1*", limit=3)
    assert len(names) == 3 and all(n.startswith("resnet1") for n in names)


def test_check_architecture_meta_only_reports_every_tensor(default_ghn):
    row = check_architecture("mobilenetv3_small_050", default_ghn, user_paths=False)
    assert row["ok"] and row["graph_built"] and row["skipped"] == {}
    assert row["family"] == "mobilenetv3" and row["predicted"] == row["tensors"] > 100
    assert list(row["checks"]) == ["predict"] and row["checks"]["predict"]["status"] == "ok"


# coat_lite_tiny shares modules and only runs at 224x224; levit_128s caches attention biases per size
@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "coat_lite_tiny", "levit_128s"])
def test_check_architecture_runs_the_user_paths(default_ghn, name):
    row = check_architecture(name, default_ghn)
    assert row["ok"], row.get("error")
    assert list(row["checks"]) == list(CHECKS)
    assert all(c["status"] == "ok" and c["s"] > 0 for c in row["checks"].values())
    assert row["checks"]["apply"]["input_size"] == [3, 224, 224]


def test_large_models_skip_the_cpu_checks_with_a_reason(default_ghn):
    row = check_architecture("regnetx_002", default_ghn, max_cpu_params=1_000_000)  # 2.3M parameters
    assert row["ok"] and row["checks"]["predict"]["status"] == "ok"
    for check in CHECKS[1:]:
        assert row["checks"][check]["status"] == "skipped"
        assert "over the 1M bound" in row["checks"][check]["reason"]


def test_check_architecture_reports_failures_instead_of_raising(default_ghn):
    row = check_architecture("not_a_model", default_ghn)
    assert not row["ok"] and "unknown timm architecture" in row["error"]
    assert row["checks"]["predict"]["status"] == "failed"
    assert all(row["checks"][c]["status"] == "skipped" for c in CHECKS[1:])


def test_coverage_command_on_a_sample(tmp_path):
    out = tmp_path / "coverage.json"
    assert main(["coverage", "--pattern", "regnetx_00*", "--limit", "2", "--workers", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["architectures"] == 2 and summary["fully_predicted"] == 2 and summary["failed"] == []
    assert all(summary["checks"][c]["ok"] == 2 for c in CHECKS)
    assert [r["name"] for r in report["architectures"]] == ["regnetx_002", "regnetx_004"]


def test_coverage_command_meta_only(tmp_path):
    out = tmp_path / "coverage.json"
    assert main(["coverage", "--pattern", "regnetx_002", "--meta-only", "--workers", "1", "--out", str(out)]) == 0
    counts = json.loads(out.read_text())["summary"]["checks"]
    assert counts["predict"]["ok"] == 1 and all(sum(counts[c][k] for k in ("ok", "failed", "skipped")) == 0
                                                 for c in CHECKS[1:])


def test_time_limit_kills_slow_architecture():
    rows = run_coverage(["resnet18"], workers=1, timeout_s=0.01)
    assert rows[0]["ok"] is False and "limit" in rows[0]["error"]
    killed = [c for c, result in rows[0]["checks"].items() if result["status"] == "failed"]
    assert len(killed) == 1 and rows[0]["error"].startswith(killed[0])
