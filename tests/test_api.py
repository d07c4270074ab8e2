"""The Python API: fedge.simulate, fedge.export and fedge.predict on a model class and
arrays, as a notebook would use them."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import fedge
from fedge.errors import FedgeError

WORDS = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                  "nine"])


class Net(nn.Module):
    """A user's network, defined in their own code: fedge gets the class itself."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        (features,) = input_shape
        self.layers = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Dropout(0.1),
                                    nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x / 16.0)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.data.astype(np.float32), WORDS[data.target]


@pytest.fixture(scope="module")
def result(digits, tmp_path_factory):
    x, y = digits
    return fedge.simulate(model=Net, data=(x[:1500], y[:1500]), clients=4, rounds=4,
                          local_epochs=3, lr=0.01, partition="iid",
                          out=tmp_path_factory.mktemp("api") / "run")


def test_simulate_takes_a_model_class_and_arrays_and_returns_the_run(result):
    assert (result.run_dir / "metrics.json").is_file() and result.onnx_model.is_file()
    assert result.rounds_run == len(result.rounds) == 4
    assert result.initial["round"] == 0
    assert result.test_accuracy > 0.8
    assert result.test_accuracy > result.initial["val_accuracy"] + 0.5


def test_predict_gives_the_names_of_the_labels_the_run_was_given(result, digits):
    x, y = digits
    names = fedge.predict(result.onnx_model, x[1500:1600])
    assert set(names) <= set(WORDS)
    assert np.mean(np.array(names) == y[1500:1600]) > 0.8
    ids = fedge.predict(result.onnx_model, x[1500:1600], output="ids")
    assert [sorted(WORDS)[i] for i in ids] == names  # ids follow the sorted names
    probabilities = fedge.predict(result.onnx_model, x[1500:1510], output="probabilities")
    assert probabilities.shape == (10, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_export_writes_a_verified_onnx_model_of_a_checkpoint(result, tmp_path, digits):
    report = fedge.export(result.run_dir / "best.pt", tmp_path / "model.onnx")
    assert report["max_abs_diff"] <= report["tolerance"]
    assert report["round"] == result.best_round
    x, _ = digits
    assert fedge.predict(tmp_path / "model.onnx", x[:20]) == fedge.predict(
        result.onnx_model, x[:20])


def test_bad_input_raises_the_error_the_command_line_prints(digits, tmp_path):
    x, y = digits

    def needs_more(input_shape, num_classes, depth):
        return Net(input_shape, num_classes)

    with pytest.raises(FedgeError, match="needs argument depth, which fedge cannot give"):
        fedge.simulate(model=needs_more, data=(x, y), out=tmp_path / "run")
    with pytest.raises(FedgeError, match="1500 samples but 10 labels"):
        fedge.simulate(model=Net, data=(x[:1500], y[:10]), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
