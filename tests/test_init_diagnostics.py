"""benchmarks/init_diagnostics.py: per-layer statistics of both inits while they train, the GHN init without
untie noise, the learning-rate and weight-decay sweeps, and measuring that leaves training as it was."""

import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def diagnostics(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import init_diagnostics

    return init_diagnostics


def test_effective_rank_of_known_matrices(diagnostics):
    assert diagnostics.effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))) == pytest.approx(2.0)
    assert diagnostics.effective_rank(torch.eye(5)) == pytest.approx(5.0)
    assert diagnostics.effective_rank(torch.ones(3, 4)) == pytest.approx(1.0)
    # singular values 3 and 1: p = (3/4, 1/4)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert diagnostics.effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(entropy))
    assert diagnostics.effective_rank(torch.zeros(2, 3)) == 0.0


def test_copy_cosine_sees_tile_copies(diagnostics):
    block = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert diagnostics.copy_cosine(block.repeat(3, 2, 1, 1), 4) == pytest.approx(1.0)
    assert diagnostics.copy_cosine(block, 4) is None  # no dim longer than a tile: no copies
    assert abs(diagnostics.copy_cosine(torch.randn(300, 300, generator=torch.Generator().manual_seed(1)), 128)) < 0.05


def test_record_steps_must_lie_within_the_run(diagnostics):
    with pytest.raises(SystemExit):
        diagnostics.main(["--steps", "4", "--record-at", "0", "5"])


@pytest.mark.data
def test_measured_runs_noiseless_init_and_sweeps(diagnostics, monkeypatch, tmp_path, capsys):
    import finetune

    from train_ghn.sgd import SGDRecipe

    monkeypatch.setattr(diagnostics, "RESULTS", tmp_path)
    name = "mobilenetv3_small_100"
    diagnostics.main(["--archs", name, "--steps", "4", "--record-at", "0", "2", "4", "--test-per-class", "5",
                      "--probe-batches", "1", "--lr-sweep", "0.02", "0.05", "--wd-sweep", "5e-3"])
    out = capsys.readouterr().out
    assert "7 jobs" in out  # three measured (ghn, default, ghn at untie noise 0); the recipe's lr and wd are those
    assert f"| {name} | ghn, untie noise 0 | 0 |" in out and f"| {name} | lr 0.05 (recipe) |" in out
    assert (tmp_path / "init_diagnostics.png").stat().st_size > 0
    result = json.loads((tmp_path / "init_diagnostics.json").read_text())
    assert result["setup"]["record_at"] == [0, 2, 4] and result["invocation"]["jobs"] == 7
    row = result["architectures"][name]
    runs = row["runs"]
    assert set(runs) == {"ghn", "default", "ghn_untie_noise_0"}
    assert list(runs["ghn_untie_noise_0"]["steps"]) == ["0"]
    for init in ("ghn", "default"):
        run = runs[init]
        assert list(run["steps"]) == ["0", "2", "4"]
        assert run["steps"]["4"]["test_accuracy"] == run["accuracy"]  # measured as the benchmark tests
        assert all(math.isfinite(model["train_loss"]) for model in run["steps"].values())
        kinds = {layer["kind"] for layer in run["layers"].values()}
        assert {"stem", "depthwise", "pointwise", "linear", "norm"} <= kinds
        for layer in run["layers"].values():
            start, *later = (layer["steps"][step] for step in ("0", "2", "4"))
            assert start["drift"] == 0 and start["rel_drift"] == 0
            assert all(stats["rel_drift"] > 0 and stats["grad_norm"] > 0 for stats in later)
            if layer["kind"] != "norm":
                assert all(0 < stats["erank_fraction"] <= 1 for stats in (start, *later))
        summary = run["summary"]
        assert set(summary) >= {"weights", "stem", "depthwise", "pointwise", "linear", "norm"}
        assert summary["weights"]["0"]["rel_drift"] == 0 and summary["weights"]["4"]["rel_drift"] > 0
        assert summary["norm"]["0"]["layers"] == sum(layer["kind"] == "norm" for layer in run["layers"].values())
    ghn, default, quiet = (runs[init]["layers"] for init in ("ghn", "default", "ghn_untie_noise_0"))
    assert set(ghn) == set(default) == set(quiet)
    weights = [key for key, layer in ghn.items() if layer["kind"] != "norm"]
    assert all(ghn[key]["steps"]["0"]["norm"] != default[key]["steps"]["0"]["norm"] for key in weights)
    tiled = [key for key in weights if ghn[key]["steps"]["0"]["copy_cosine"] is not None]
    assert tiled and all(quiet[key]["steps"]["0"]["copy_cosine"] == pytest.approx(1.0, abs=1e-5) for key in tiled)
    assert 0.4 < runs["ghn"]["summary"]["weights"]["0"]["copy_cosine"] < 0.6  # untie noise 1.0 x RMS
    assert any(quiet[key]["steps"]["0"]["erank_fraction"] != ghn[key]["steps"]["0"]["erank_fraction"] for key in tiled)
    same = ("norm", "rms", "erank_fraction", "sigma_ratio")  # of the weight alone: the gradient sees the whole net
    assert all(quiet[key]["steps"]["0"][stat] == ghn[key]["steps"]["0"][stat] for key in weights if key not in tiled
               for stat in same)
    assert list(row["lr_sweep"]) == ["0.02", "0.05"] and list(row["weight_decay_sweep"]) == ["0.0005", "0.005"]
    assert row["lr_sweep"]["0.05"] == row["weight_decay_sweep"]["0.0005"] == {
        init: runs[init]["accuracy"] for init in ("ghn", "default")}
    assert set(row["weight_decay_sweep"]["0.005"]) == {"ghn", "default"}

    # measuring leaves training as it was: the same weights and norm statistics as the benchmark's own run
    plan = diagnostics.Plan(4, (0, 2, 4), 0, None, 1, (64, 128), 0.1)
    measured, plain = (diagnostics._build(name, "ghn", plan) for _ in range(2))
    diagnostics.train_and_record(measured, plan, SGDRecipe(), set())
    example, (train, test), accelerator = (finetune.job_state[key] for key in ("example", "data", "accelerator"))
    example.finetune(plain, train, test, accelerator, steps=4, recipe=SGDRecipe(), progress=False)
    expected = plain.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in measured.state_dict().items())
