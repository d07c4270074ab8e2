"""The Python API: fedge.simulate, fedge.export and fedge.predict on a model class and
arrays, as a notebook would use them."""

import re

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


def _existing_file(folder):
    (folder / "mine.onnx").write_bytes(b"keep me")
    return folder / "mine.onnx"


# Every argument of the public API, wrong in the ways a script gets it wrong: each is a
# FedgeError naming it, raised before anything is read, run or written.
BAD_CALLS = [
    ("predict", {"output": "bogus"},
     "output must be one of 'names', 'ids', 'probabilities', not 'bogus'"),
    ("predict", {"output": None}, "output must be one of"),
    ("predict", {"label_column": 5}, "label_column must be a column name, not 5"),
    ("predict", {"ignore_columns": "device"},
     "ignore_columns must be a list of column names, not 'device'"),
    ("predict", {"model": None}, "model must be a path (str or pathlib.Path), not None"),
    ("predict", {"inputs": {"a": 1}}, "inputs must be samples (an array of numbers) or the "
                                      "path of"),
    ("predict", {"inputs": np.array([["1"] * 64])}, "inputs must be samples"),
    ("predict", {"inputs": np.float32(3)}, "inputs must be samples"),
    ("export", {"quantize": "int4"}, "quantize must be one of 'int8', 'int8-dynamic', not "
                                     "'int4'"),
    ("export", {"quantize": "INT8"}, "quantize must be one of"),
    ("export", {"overwrite": "no", "output": _existing_file},
     "overwrite must be True or False, not 'no'"),
    ("export", {"checkpoint": None}, "checkpoint must be a path"),
    ("export", {"output": None}, "output must be a path"),
    ("export", {"quantize": "int8", "eval_data": 123}, "eval_data must be a path"),
    ("simulate", {"overwrite": "no"}, "overwrite must be True or False, not 'no'"),
    ("simulate", {"resume": "yes"}, "resume must be True or False, not 'yes'"),
    ("simulate", {"verbose": "no"}, "verbose must be True or False, not 'no'"),
    ("simulate", {"on_round": "print"}, "on_round must be a function (or None), not 'print'"),
    ("simulate", {"on_plan": 5}, "on_plan must be a function (or None), not 5"),
    ("simulate", {"out": 5}, "out must be a path"),
    ("simulate", {"config": 5}, "config must be a path"),
    ("simulate", {"record_wire": 5}, "record_wire must be a path"),
    ("simulate", {"model": Net((64,), 10)}, "the model is an instance of Net; give the class"),
    ("simulate", {"data": 5}, "data must be a path or a pair of arrays (x, y)"),
    ("simulate", {"clients": "ten"}, "clients: Input should be a valid integer"),
    ("simulate", {"lr_rate": 0.1}, "lr_rate: Extra inputs are not permitted"),
    ("simulate", {"freeze": "layers.*"}, "freeze: Input should be a valid list"),
]


@pytest.mark.parametrize("function, arguments, message", BAD_CALLS,
                         ids=[f"{f}-{'-'.join(a)}" for f, a, _ in BAD_CALLS])
def test_every_bad_argument_is_refused_before_anything_is_written(result, digits, tmp_path,
                                                                  function, arguments,
                                                                  message):
    x, y = digits
    given = {"predict": {"model": result.onnx_model, "inputs": x[:3]},
             "export": {"checkpoint": result.run_dir / "best.pt",
                        "output": tmp_path / "model.onnx"},
             "simulate": {"model": Net, "data": (x[:400], y[:400]), "out": tmp_path / "run",
                          "clients": 2, "rounds": 1, "local_epochs": 1}}[function]
    given.update(arguments)
    if callable(given.get("output")):  # a file there already
        given["output"] = given["output"](tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    with pytest.raises(FedgeError, match=re.escape(message)):
        getattr(fedge, function)(**given)

    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert [p for p in tmp_path.rglob("*") if p.is_dir()] == []
