"""Vectorized clients (``--vectorize``): a round's clients trained together as one batched
computation give what training them one by one gives; a model vmap cannot batch trains
one by one, and says so once; settings that change what a client does are refused."""

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

import fedge
from fedge.api import SimulationResult
from fedge.client.data import split_train_val
from fedge.client.training import LocalTraining, train_locally
from fedge.config import TrainingSettings
from fedge.models.registry import ModelSpec, build_model, spec_from_data
from fedge.server.checkpoint import load_checkpoint
from fedge.simulations.datasets import load_dataset
from fedge.simulations.vectorized import (
    ADAM_WEIGHT_TOLERANCE,
    TOLERANCE,
    batching_problem,
    train_together,
)

from conftest import assert_simulation_refused, run_fedge, write_user_model

# Unequal clients (Dirichlet: 168 to 311 training samples, so 6 to 10 mini-batches an
# epoch), FedProx's term, a local patience of 1 that stops every client early within 10
# epochs. Learning rates small enough that training does not amplify rounding: with
# larger steps (Adam 0.01, SGD 0.05) a difference in the last bit of one sum grew to
# 1e-4–1e-1 within two rounds on an AMD EPYC (AVX2): a different trajectory, not a bug.
# (Since clients split their validation samples by label, Adam at 0.003 did so for one
# client in round 1: its sequential training moved 5e-4 between 1 and 2 torch threads.)
EXACT = {"dataset": "digits", "clients": 4, "min_clients": 4, "rounds": 2, "local_epochs": 10,
         "local_patience": 1, "seed": 3, "partition": "dirichlet:0.5", "patience": 5,
         "dropout": 0.0, "strategy": "fedprox", "proximal_mu": 0.5, "workers": 1}
ROUND_METRICS = ("train_loss", "val_loss", "val_accuracy", "client_val_loss",
                 "client_val_accuracy", "client_epochs", "clients_stopped_early")


def single_threaded(**settings) -> SimulationResult:
    """One torch thread: the sequential reference is then reproducible to the bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fedge.simulate(**settings)
    finally:
        torch.set_num_threads(threads)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@pytest.mark.parametrize(("optimizer", "lr"), [("adam", 0.002), ("sgd", 0.02)])
def test_a_deterministic_model_trains_as_it_does_sequentially(tmp_path, optimizer, lr):
    settings = {**EXACT, "optimizer": optimizer, "lr": lr}
    one_by_one = single_threaded(out=tmp_path / "sequential", **settings)
    together = single_threaded(out=tmp_path / "vectorized", vectorize=True, **settings)

    assert len(one_by_one.rounds) == len(together.rounds) == 2
    assert sum(r["clients_stopped_early"] for r in one_by_one.rounds) > 0
    for seq, vec in zip(one_by_one.rounds, together.rounds, strict=True):
        assert (vec["num_clients"], vec["failures"]) == (seq["num_clients"], 0)
        for name in ROUND_METRICS:
            assert relative(seq[name], vec[name]) <= TOLERANCE, (name, seq[name], vec[name])
    # Adam turns gradients that are rounding noise into whole steps (see the constant),
    # so its weights agree less closely than its losses; SGD's agree as closely.
    weights_tolerance = ADAM_WEIGHT_TOLERANCE if optimizer == "adam" else TOLERANCE
    seq_state = load_checkpoint(tmp_path / "sequential" / "checkpoint.pt").state_dict
    vec_state = load_checkpoint(tmp_path / "vectorized" / "checkpoint.pt").state_dict
    for name, value in seq_state.items():
        scale = value.abs().max().clamp(min=1e-12)
        assert ((vec_state[name] - value).abs().max() / scale) <= weights_tolerance, name


def test_with_dropout_the_accuracy_is_statistically_the_same(tmp_path):
    # Dropout masks differ between the paths, so the runs differ. The server's validation
    # set has 270 digits: an accuracy near 0.85 has a standard error of ~0.022 there, and
    # local training adds its own spread; 0.1 is about four standard errors.
    settings = {**EXACT, "dropout": 0.3, "local_patience": 2, "local_epochs": 2}
    one_by_one = fedge.simulate(out=tmp_path / "sequential", **settings)
    together = fedge.simulate(out=tmp_path / "vectorized", vectorize=True, **settings)
    seq, vec = one_by_one.rounds[-1], together.rounds[-1]
    assert vec["val_accuracy"] > 0.6
    assert abs(seq["val_accuracy"] - vec["val_accuracy"]) <= 0.1
    assert abs(one_by_one.test_accuracy - together.test_accuracy) <= 0.1


def test_a_model_with_batchnorm_trains_one_by_one_and_says_why_once(tmp_path, caplog):
    path = write_user_model(tmp_path / "model")  # BatchNorm, dropout
    with caplog.at_level(logging.WARNING, logger="fedge.simulations"):
        result = fedge.simulate(f"{path}:Net", out=tmp_path / "run", dataset="digits",
                                clients=3, rounds=2, local_epochs=1, partition="iid",
                                patience=5, workers=1, vectorize=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "fedge.simulations"]
    assert lines == ["--vectorize: model cannot be batched by vmap (BatchNorm updates running "
                     "statistics in place); training clients one by one in this process"]
    assert [(r["num_clients"], r["failures"]) for r in result.rounds] == [(3, 0), (3, 0)]
    assert result.test_accuracy > 0.3


def test_a_model_whose_batchnorm_is_frozen_is_batched_and_trains_as_sequentially(
        tmp_path, caplog):
    # A frozen BatchNorm layer normalizes with its running statistics and leaves them
    # as they are, in vmap as one by one: nothing is updated in place.
    path = write_user_model(tmp_path / "model")
    settings = {"model": f"{path}:Net", "dataset": "digits", "clients": 3, "rounds": 1,
                "local_epochs": 2, "partition": "iid", "dropout": 0.0, "workers": 1,
                "freeze": ["features.1.*"], "optimizer": "sgd", "lr": 0.05}
    with caplog.at_level(logging.WARNING, logger="fedge.simulations"):
        together = single_threaded(out=tmp_path / "vectorized", vectorize=True, **settings)
    assert [r.getMessage() for r in caplog.records if r.name == "fedge.simulations"] == []
    one_by_one = single_threaded(out=tmp_path / "sequential", **settings)

    seq, vec = one_by_one.rounds[0], together.rounds[0]
    assert (vec["num_clients"], vec["failures"]) == (3, 0)
    for name in ROUND_METRICS:
        assert relative(seq[name], vec[name]) <= TOLERANCE, (name, seq[name], vec[name])
    seq_state = load_checkpoint(tmp_path / "sequential" / "checkpoint.pt").state_dict
    vec_state = load_checkpoint(tmp_path / "vectorized" / "checkpoint.pt").state_dict
    for name, value in seq_state.items():
        scale = value.abs().max().clamp(min=1e-12)
        assert ((vec_state[name] - value).abs().max() / scale) <= TOLERANCE, name


def _task_clients(task: str) -> tuple[ModelSpec, list]:
    """Three unequal clients (48 to 84 samples) of the breast-cancer features, and an MLP's
    spec for ``task``: weighted classes, a binary task whose positives weigh 3 (pos_weight),
    or two regression targets in units far from standard ones."""
    data = load_dataset("breast_cancer")
    x, y = data.x, data.y
    spec = spec_from_data("mlp", x, 2, dropout=0.0)
    if task == "classification":
        spec = spec.model_copy(update={"class_weights": (1.0, 4.0)})
    elif task == "binary":
        spec = spec.model_copy(update={"task": "binary", "class_weights": (3.0,)})
    else:
        y = np.stack([x[:, 0] * 30 + 100, x[:, 1] - x[:, 2] * 0.5], axis=1).astype(np.float32)
        spec = spec.model_copy(update={"task": "regression", "num_classes": 2,
                                       "target_mean": tuple(map(float, y.mean(axis=0))),
                                       "target_std": tuple(map(float, y.std(axis=0)))})
    clients, start = [], 0
    for k, size in enumerate((64, 48, 84)):
        clients.append(split_train_val(x[start:start + size], y[start:start + size],
                                       val_fraction=0.3, seed=k))
        start += size
    return spec, clients


@pytest.mark.parametrize(("task", "monitor"), [("classification", "val_loss"),
                                               ("binary", "val_pr_auc"),
                                               ("regression", "val_mae")])
def test_every_task_trains_together_as_it_does_sequentially(task, monitor):
    spec, clients = _task_clients(task)
    torch.manual_seed(0)
    model = build_model(spec)
    received = {k: v.clone() for k, v in model.state_dict().items()}
    settings = [LocalTraining(TrainingSettings(local_epochs=6, batch_size=16, lr=0.02,
                                               optimizer="sgd", local_patience=1),
                              seed=k + 1, proximal_mu=0.5, monitor=monitor)
                for k in range(len(clients))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        together = train_together(model, spec, clients, settings, set(), torch.device("cpu"))
        one_by_one = []
        for data, setting in zip(clients, settings, strict=True):
            model.load_state_dict(received)
            report = train_locally(model, spec, data, setting, torch.device("cpu"))
            one_by_one.append((report, {k: v.clone() for k, v in model.state_dict().items()}))
    finally:
        torch.set_num_threads(threads)

    for (seq, seq_state), (vec, vec_state) in zip(one_by_one, together, strict=True):
        assert (vec.epochs, vec.best_epoch, vec.stopped_early) == (
            seq.epochs, seq.best_epoch, seq.stopped_early)
        assert relative(seq.train_loss, vec.train_loss) <= TOLERANCE, (seq, vec)
        assert relative(seq.val_loss, vec.val_loss) <= TOLERANCE, (seq, vec)
        assert seq.val_measures.keys() == vec.val_measures.keys()
        for name, value in seq.val_measures.items():
            assert (value is None) == (vec.val_measures[name] is None), name
            if value is not None:
                assert relative(value, vec.val_measures[name]) <= TOLERANCE, name
        for name, value in seq_state.items():
            scale = value.abs().max().clamp(min=1e-12)
            assert ((vec_state[name] - value).abs().max() / scale) <= TOLERANCE, name
    assert any(report.best_epoch > 0 for report, _ in one_by_one)  # it did learn


class Branchy(nn.Module):
    """Python control flow on the values of the data: vmap cannot take one branch for
    some clients and the other for others."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.layer(x)
        return -self.layer(x)


def test_a_model_with_data_dependent_control_flow_cannot_be_batched():
    spec = ModelSpec(name="branchy", input_shape=(4,), num_classes=2, dropout=0.0)
    problem = batching_problem(Branchy(), spec, set(), torch.device("cpu"))
    assert problem is not None and "data-dependent control flow" in problem


def test_plain_models_can_be_batched():
    from fedge.models.registry import build_model

    for name, shape in (("cnn", (1, 8, 8)), ("mlp", (5,)), ("sensor1d", (3, 16))):
        spec = ModelSpec(name=name, input_shape=shape, num_classes=3, dropout=0.2)
        assert batching_problem(build_model(spec), spec, set(), torch.device("cpu")) is None


@pytest.mark.parametrize(("options", "message"), [
    (["--secagg"], "vectorize does not work with secagg"),
    (["--dp-clip-norm", "1.0"], "vectorize does not work with dp_clip_norm"),
    (["--byzantine", "0.25", "--attack", "nan"], "vectorize does not work with byzantine"),
    (["--compress", "int8"], "vectorize does not work with compress"),
    (["--record-wire", "wire"], "vectorize does not work with record_wire"),
    (["--backend", "ray"], "vectorize needs backend inprocess"),
])
def test_settings_that_change_what_a_client_does_are_refused(tmp_path, options, message):
    options = [str(tmp_path / o) if o == "wire" else o for o in options]
    assert_simulation_refused(tmp_path, ["--vectorize", "--clients", "4", *options], message)
    assert not (tmp_path / "wire").exists()


def test_the_cli_runs_vectorized_clients_on_a_simulated_clock(tmp_path):
    # Slow devices miss a deadline of 10⁶ simulated seconds: the clock still works.
    out = tmp_path / "run"
    result = run_fedge("simulate", "--vectorize", "--clients", "4", "--rounds", "2",
                       "--local-epochs", "1", "--partition", "iid", "--slow-fraction", "0.5",
                       "--slowdown", "1e7", "--samples-per-second", "1",
                       "--round-timeout", "1e6", "--out", str(out), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vectorized clients" in result.stdout
    assert "--vectorize:" not in result.stderr  # the CNN is batched: no fallback
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["config"]["vectorize"] is True
    rounds = [(r["num_clients"], r["timeouts"], r["failures"]) for r in metrics["rounds"]]
    assert rounds == [(2, 2, 0), (2, 0, 0)]
    assert np.isfinite(metrics["test"]["accuracy"])
