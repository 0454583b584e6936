"""benchmarks/learning_curve.py on the smoke config: points at budget fractions, resume after a kill, merged runs."""

import json
from pathlib import Path

import pytest
import yaml

from train_ghn.trainer import Trainer

pytestmark = pytest.mark.data

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "train_ghn" / "configs" / "smoke.yaml"
ARCHS = ["resnet18", "vit_tiny_patch16_224"]


class Killed(Exception):
    """Stands in for a benchmark process killed in the middle of training."""


@pytest.fixture
def benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import learning_curve

    return learning_curve


@pytest.fixture
def trained_steps(monkeypatch):
    """The steps trained, in order; a step number put in ``kill_at`` raises ``Killed`` instead of training it."""
    steps, kill_at = [], set()
    train_step = Trainer.train_step

    def counted(self):
        if self.step + 1 in kill_at:
            raise Killed
        steps.append(self.step + 1)
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", counted)
    return steps, kill_at


def _command(tmp_path, *extra):
    return ["--configs", str(SMOKE), "--points", "2", "--out-dir", str(tmp_path / "results"),
            "--runs", str(tmp_path / "runs"), "--test-per-class", "5", "--calibrate-bn", "20", *extra]


def test_points_resume_after_a_kill_and_runs_merge(tmp_path, benchmark, trained_steps):
    steps, kill_at = trained_steps
    command = _command(tmp_path, "--steps", "4")
    out = tmp_path / "results" / "learning_curve.json"

    kill_at.add(3)  # killed while training towards the second point
    with pytest.raises(Killed):
        benchmark.main(command)
    assert steps == [1, 2]
    first = json.loads(out.read_text())["runs"]["smoke-s0"]["curve"]
    assert [p["step"] for p in first] == [2]

    kill_at.clear()
    steps.clear()
    results = benchmark.main(command)
    assert steps == [3, 4], "resumes from the checkpoint at the first point"
    run = results["runs"]["smoke-s0"]
    curve = run["curve"]
    assert curve[0] == first[0]
    assert [p["step"] for p in curve] == [2, 4]
    assert 0 < curve[0]["cpu_min"] < curve[1]["cpu_min"] and 0 < curve[0]["wall_min"] < curve[1]["wall_min"]
    for point in curve:
        assert set(point["acc"]) == set(ARCHS) and all(0 <= a <= 1 for a in point["acc"].values())
        assert point["mean"] == pytest.approx(sum(point["acc"].values()) / 2)
        assert point["loss"] > 0
    logged = [json.loads(line)["step"] for line in (tmp_path / "runs" / "smoke-s0" / "log.jsonl").open()]
    assert logged == [1, 2, 3, 4], "each step logged once across the kill"
    assert run["seed"] == 0 and run["budget"] == {"steps": 4} and run["threads"] == 1 and run["done"]
    assert run["yaml"] == SMOKE.read_text() and run["lr_schedule_steps"] == 8
    assert (tmp_path / "results" / "learning_curve.png").stat().st_size > 0

    steps.clear()
    assert benchmark.main(command)["runs"]["smoke-s0"] == run
    assert steps == [], "a complete run is not trained again"

    merged = benchmark.main([*command, "--label-suffix", "b"])
    assert steps == [1, 2, 3, 4]
    assert list(merged["runs"]) == ["smoke-s0", "smoke-s0-b"] and merged["runs"]["smoke-s0"] == run
    straight = merged["runs"]["smoke-s0-b"]["curve"]
    assert [(p["step"], p["loss"], p["acc"]) for p in straight] == [(p["step"], p["loss"], p["acc"]) for p in curve], \
        "the killed and resumed run trains exactly as a straight one"
    table = benchmark.markdown(merged, "learning_curve")
    assert "| smoke-s0 | 2/2 | 4 |" in table and "| smoke-s0-b | 1/2 | 2 |" in table


def test_cpu_minute_points_and_the_schedule_end(tmp_path, benchmark, trained_steps):
    steps, _ = trained_steps
    result = benchmark.main(_command(tmp_path, "--minutes", "0.05"))
    run = result["runs"]["smoke-s0"]
    log = [json.loads(line) for line in (tmp_path / "runs" / "smoke-s0" / "log.jsonl").open()]
    cpu_s = {r["step"]: r["cpu_s"] for r in log}
    assert len(run["curve"]) == 2 and "note" not in run
    for k, point in enumerate(run["curve"], 1):
        target = 3 * k / 2
        assert cpu_s[point["step"]] >= target > cpu_s.get(point["step"] - 1, 0), "the first step past it"

    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump({**yaml.safe_load(SMOKE.read_text()), "max_steps": 2}))
    steps.clear()
    result = benchmark.main([*_command(tmp_path, "--minutes", "5"), "--configs", str(short)])
    run = result["runs"]["short-s0"]
    assert steps == [1, 2] and [p["step"] for p in run["curve"]] == [2] and "max_steps 2" in run["note"]
    assert list(result["runs"]) == ["smoke-s0", "short-s0"]

    with pytest.raises(SystemExit):
        benchmark.main(_command(tmp_path, "--steps", "9"))  # past smoke's max_steps (8), where its lr schedule ends
