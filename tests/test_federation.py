"""Federated rounds through Flower's strategies: early stopping, strategies, seeds."""

import json

import numpy as np
import pytest
import torch

from fedge.config import RunConfig
from fedge.server.checkpoint import load_checkpoint
from fedge.simulations.runner import plan_simulation, simulate

SMALL = {"dataset": "digits", "clients": 4, "rounds": 3, "local_epochs": 1,
         "partition": "iid", "patience": 5}


def run(tmp_path, name: str, **overrides):
    config = RunConfig(**{**SMALL, **overrides})
    outcome = simulate(plan_simulation(config), tmp_path / name)
    return outcome, json.loads((tmp_path / name / "metrics.json").read_text())


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt").state_dict


def test_a_plateau_stops_the_run_before_its_round_budget_and_exports_the_best_round(tmp_path):
    outcome, metrics = run(tmp_path, "plateau", dataset="breast_cancer", clients=5,
                           partition="dirichlet:0.5", rounds=40, patience=2, local_epochs=5)

    rounds = metrics["rounds"]
    assert metrics["stopped_early"] and outcome.stopped_early
    assert len(rounds) < 40
    best = metrics["best_round"]
    assert best == 1 + int(np.argmin([r["val_loss"] for r in rounds]))
    assert len(rounds) - best == 2  # exactly `patience` rounds without improvement
    best_checkpoint = load_checkpoint(tmp_path / "plateau" / "best.pt")
    assert best_checkpoint.round == best
    assert json.loads((tmp_path / "plateau" / "onnx_report.json").read_text())["best_round"] == best


def test_min_delta_makes_small_improvements_not_count(tmp_path):
    _, metrics = run(tmp_path, "min_delta", rounds=6, patience=1, min_delta=10.0)
    assert metrics["stopped_early"]
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["best_round"] == 1


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_each_strategy_trains_the_global_model(tmp_path, strategy):
    outcome, metrics = run(tmp_path, strategy, strategy=strategy)
    assert metrics["config"]["strategy"] == strategy
    assert metrics["rounds"][-1]["val_loss"] < metrics["initial"]["val_loss"]
    assert outcome.test_accuracy > 0.5


def test_strategies_change_the_result(tmp_path):
    weights = {}
    for name, overrides in {
        "fedavg": {"strategy": "fedavg"},
        "fedprox": {"strategy": "fedprox", "proximal_mu": 1.0},
        "fedadam": {"strategy": "fedadam"},
    }.items():
        run(tmp_path, name, rounds=2, **overrides)
        weights[name] = final_weights(tmp_path / name)
    for a, b in (("fedavg", "fedprox"), ("fedavg", "fedadam"), ("fedprox", "fedadam")):
        difference = max((weights[a][k] - weights[b][k]).abs().max().item() for k in weights[a])
        assert difference > 1e-4, f"{a} and {b} gave the same model"


def test_fedadam_keeps_its_server_optimizer_state_in_the_checkpoint(tmp_path):
    run(tmp_path, "adam", strategy="fedadam", rounds=2)
    state = load_checkpoint(tmp_path / "adam" / "checkpoint.pt").strategy_state
    assert state["class"] == "FedAdam"
    assert set(state["m_t"]) == set(state["v_t"]) == set(final_weights(tmp_path / "adam"))
    assert any(v.abs().sum() > 0 for v in state["v_t"].values())


def test_client_fraction_and_minimum_set_the_clients_per_round(tmp_path):
    _, metrics = run(tmp_path, "fraction", clients=6, fraction=0.5, min_clients=2, rounds=2)
    assert [r["num_clients"] for r in metrics["rounds"]] == [3, 3]
    _, metrics = run(tmp_path, "minimum", clients=6, fraction=0.1, min_clients=4, rounds=1)
    assert metrics["rounds"][0]["num_clients"] == 4


def _without_timings(metrics: dict) -> list[dict]:
    """The rounds less their wall-clock times, the per-client ``train_seconds`` too."""
    timings = {"seconds", "slowest_client_seconds", "elapsed_seconds", "train_seconds"}

    def untimed(record):
        if isinstance(record, dict):
            return {k: untimed(v) for k, v in record.items() if k not in timings}
        return record
    return [untimed(r) for r in metrics["rounds"]]


def test_the_same_seed_gives_the_same_metrics(tmp_path):
    _, first = run(tmp_path, "first", partition="dirichlet:0.5", fraction=0.5)
    _, second = run(tmp_path, "second", partition="dirichlet:0.5", fraction=0.5)
    _, other = run(tmp_path, "other", partition="dirichlet:0.5", fraction=0.5, seed=1)
    assert _without_timings(first) == _without_timings(second)
    assert first["test"] == second["test"]
    assert _without_timings(first) != _without_timings(other)
