"""A client's local training: mini-batches, dropout, early stopping on local validation."""

import numpy as np
import pytest
import torch

from fedge.client.data import split_train_val
from fedge.client.training import LocalTraining, pick_device, train_locally
from fedge.config import TrainingSettings
from fedge.errors import FedgeError
from fedge.models.metrics import evaluate_classifier
from fedge.models.registry import build_model, spec_from_data
from fedge.simulations.datasets import load_dataset


def _tiny_digits_client(samples: int):
    digits = load_dataset("digits")
    data = split_train_val(digits.x[:samples], digits.y[:samples], val_fraction=0.3, seed=0)
    spec = spec_from_data("cnn", digits.x, 10, dropout=0.2)
    return data, spec


def test_a_client_on_tiny_data_stops_early_and_keeps_its_best_weights():
    data, spec = _tiny_digits_client(samples=30)
    model = build_model(spec)
    settings = LocalTraining(
        TrainingSettings(local_epochs=100, batch_size=8, lr=0.01, local_patience=3), seed=1)

    report = train_locally(model, spec, data, settings, torch.device("cpu"))

    assert report.stopped_early and report.epochs < settings.training.local_epochs
    assert report.epochs - report.best_epoch == settings.training.local_patience
    # The model holds the best epoch's weights, not the last epoch's.
    val_loss, val_accuracy = evaluate_classifier(model, spec, data.val_x, data.val_y)
    assert val_loss == pytest.approx(report.val_loss, abs=1e-6)
    assert val_accuracy == report.val_measures["accuracy"]


def test_weights_are_kept_when_no_epoch_beats_the_received_model():
    data, spec = _tiny_digits_client(samples=30)
    model = build_model(spec)
    received = {k: v.clone() for k, v in model.state_dict().items()}
    settings = LocalTraining(
        TrainingSettings(local_epochs=4, lr=1e3, local_patience=2, optimizer="sgd"))

    report = train_locally(model, spec, data, settings, torch.device("cpu"))

    assert report.best_epoch == 0
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, received[name])


def test_training_without_a_plateau_uses_the_whole_epoch_budget():
    data, spec = _tiny_digits_client(samples=400)
    report = train_locally(build_model(spec), spec, data,
                           LocalTraining(TrainingSettings(local_epochs=2, local_patience=2)),
                           torch.device("cpu"))
    assert report.epochs == 2 and not report.stopped_early
    assert report.val_measures["accuracy"] > 0.5


def test_dropout_is_active_in_training_and_off_in_evaluation():
    _, spec = _tiny_digits_client(samples=30)
    model = build_model(spec.model_copy(update={"dropout": 0.5}))
    x = torch.as_tensor(load_dataset("digits").x[:16])
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_proximal_term_keeps_local_weights_closer_to_the_global_model():
    data, spec = _tiny_digits_client(samples=200)
    start = build_model(spec).state_dict()

    def drift(mu: float) -> float:
        model = build_model(spec)
        model.load_state_dict(start)
        train_locally(model, spec, data, LocalTraining(
            TrainingSettings(local_epochs=3, lr=0.01, local_patience=3), proximal_mu=mu),
            torch.device("cpu"))
        return sum(((model.state_dict()[k] - start[k]) ** 2).sum().item() for k in start)

    assert drift(mu=10.0) < drift(mu=0.0)


def test_local_validation_split_holds_out_at_least_one_sample():
    x, y = np.arange(10, dtype=np.float32)[:, None], np.arange(10) % 2
    data = split_train_val(x, y, val_fraction=0.01)
    assert len(data.val_x) == 1 and len(data.train_x) == 9
    assert sorted(np.concatenate([data.train_x, data.val_x])[:, 0]) == list(range(10))
    with pytest.raises(FedgeError, match="at least 2 samples"):
        split_train_val(x[:1], y[:1], val_fraction=0.2)


def test_device_is_chosen_automatically_and_can_be_overridden():
    expected = "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")
    assert pick_device().type == expected
    assert pick_device("cpu").type == "cpu"


def test_training_that_diverges_is_refused_instead_of_sent():
    data, spec = _tiny_digits_client(samples=60)
    settings = LocalTraining(
        TrainingSettings(local_epochs=3, batch_size=8, lr=1e30, optimizer="sgd"))
    with pytest.raises(FedgeError, match=r"local training diverged: the training loss "
                                         r"became nan in epoch 1"):
        train_locally(build_model(spec), spec, data, settings, torch.device("cpu"))
