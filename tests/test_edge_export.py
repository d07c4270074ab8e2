"""The server's ExecuTorch programs for devices: exported once per run, verified against
PyTorch before any device sees them, and refused with the operator at fault."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedge.errors import FedgeError
from fedge.models import tasks
from fedge.models.blob import pack, unpack
from fedge.models.registry import MODELS, ModelSpec, build_model, spec_from_data
from fedge.simulations.datasets import load_dataset

pytest.importorskip("executorch", reason="the device programs need pip install 'fedge[edge]'")
edge = pytest.importorskip("fedge.models.edge")

pytestmark = [pytest.mark.edge, pytest.mark.timeout(300)]

DATA_OF = {"cnn": "digits", "mlp": "breast_cancer", "sensor1d": "synthetic-sensor",
           "tinytext": "synthetic-text"}


def built(name: str, dropout: float = 0.3) -> tuple[nn.Module, ModelSpec, np.ndarray, np.ndarray]:
    data = load_dataset(DATA_OF[name])
    spec = spec_from_data(name, data.x, data.num_classes, dropout,
                          vocab_size=int(data.x.max()) + 1 if name == "tinytext" else None)
    torch.manual_seed(0)
    return build_model(spec), spec, data.x[:40], data.y[:40]


def test_every_built_in_model_is_covered():
    assert set(DATA_OF) == set(MODELS)


@pytest.mark.parametrize("name", sorted(DATA_OF))
def test_each_built_in_models_programs_match_pytorch_on_real_samples(name):
    model, spec, x, y = built(name)
    programs = edge.export_edge_programs(model, spec, x, y, max_batch=16)

    verified = programs.manifest["verified"]
    assert verified["batches"] == [16, edge.RAGGED_BATCH]
    assert max(verified["max_abs_diff"].values()) <= edge.TOLERANCE
    # The manifest describes the inputs a device must pass, in the model's order.
    state = model.state_dict()
    float_entries = [n for n, v in state.items() if v.dtype.is_floating_point]
    assert [e["name"] for e in programs.manifest["state"]] == float_entries
    assert all(e["shape"] == list(state[e["name"]].shape) for e in programs.manifest["state"])
    assert programs.manifest["programs"]["train"]["sha256"] == edge.sha256(programs.train)
    json.dumps(programs.manifest, allow_nan=False)  # strict JSON

    # Dropout on: a different loss than with it off, on the same batch and weights.
    inputs = [*(state[n] for n in float_entries), *edge._batch(spec, x, y, 16)]
    off = edge.run_program(programs.train, [*inputs, torch.tensor(0.0)])[0]
    on = edge.run_program(programs.train, [*inputs, torch.tensor(1.0)])[0]
    assert torch.isfinite(on) and float(on) != float(off)


def test_a_binary_tasks_programs_carry_its_weighted_loss_and_two_class_logits():
    # Devices send 0/1 as int64 class ids; the program casts them for binary cross-entropy
    # with the positives' weight, and answers the class logits [0, z] a device evaluates.
    _, spec, x, y = built("mlp", dropout=0.0)
    spec = spec.model_copy(update={"task": "binary", "class_weights": (3.0,)})
    torch.manual_seed(0)
    model = build_model(spec)
    programs = edge.export_edge_programs(model, spec, x, y, max_batch=8)
    assert programs.manifest["task"] == "binary" and programs.manifest["num_classes"] == 2

    state = [v for v in model.state_dict().values() if v.dtype.is_floating_point]
    xb, yb = edge._batch(spec, x[16:24], y[16:24], 8)
    assert yb.dtype == torch.int64 and 0 < int(yb.sum()) < 8  # both classes in the batch
    loss, logits, *_ = edge.run_program(programs.train, [*state, xb, yb, torch.tensor(0.0)])
    (predicted,) = edge.run_program(programs.predict, [*state, xb])
    with torch.no_grad():
        z = model.eval()(xb)
        expected = tasks.loss(spec, z, tasks.targets(spec, y[16:24]))
    torch.testing.assert_close(loss, expected, rtol=0, atol=edge.TOLERANCE)
    assert float(expected) != pytest.approx(float(tasks.loss(
        spec.model_copy(update={"class_weights": None}), z, tasks.targets(spec, y[16:24]))))
    two_columns = torch.cat([torch.zeros_like(z), z], dim=1)
    for got in (logits, predicted):
        torch.testing.assert_close(got, two_columns, rtol=0, atol=edge.TOLERANCE)


@pytest.mark.parametrize(("task", "refused"), [("classification", False), ("binary", False),
                                               ("multilabel", True), ("regression", True)])
def test_devices_refuse_the_tasks_whose_labels_they_cannot_carry(task, refused):
    spec = ModelSpec(name="mlp", input_shape=(4,), num_classes=2, dropout=0.0, task=task)
    if not refused:
        edge.check_edge_task(spec)
        return
    with pytest.raises(FedgeError, match=f"train classification and binary tasks, not {task}"):
        edge.check_edge_task(task)


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),
                                      nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x / 16.0))


def test_batchnorm_statistics_come_back_from_the_train_program_and_frozen_entries_are_marked():
    data = load_dataset("digits")
    spec = ModelSpec(name="net.py:BatchNormNet", input_shape=(1, 8, 8), num_classes=10,
                     dropout=0.2)
    model = BatchNormNet()
    programs = edge.export_edge_programs(model, spec, data.x[:40], data.y[:40], 16,
                                         frozen=["features.0.weight"])
    state = {e["name"]: e for e in programs.manifest["state"]}
    assert not state["features.1.running_mean"]["parameter"]
    assert "features.1.num_batches_tracked" not in state  # a counter, not a weight
    assert state["features.0.weight"]["frozen"] and not state["head.2.weight"]["frozen"]

    weights = [v for n, v in model.state_dict().items() if n in state]
    outputs = edge.run_program(programs.train, [*weights, *edge._batch(spec, data.x, data.y, 16),
                                                torch.tensor(0.0)])
    new_mean = outputs[-2]  # running_mean, running_var are the last outputs
    reference = BatchNormNet()
    reference.load_state_dict(model.state_dict())
    reference.train()
    reference(torch.as_tensor(data.x[:16]))
    torch.testing.assert_close(new_mean, reference.features[1].running_mean)


def test_a_frozen_batchnorm_layer_trains_on_its_running_statistics_on_devices():
    data = load_dataset("digits")
    spec = ModelSpec(name="net.py:BatchNormNet", input_shape=(1, 8, 8), num_classes=10,
                     dropout=0.2)
    model = BatchNormNet().train()
    with torch.no_grad():  # pretrained statistics, far from the fresh 0 and 1
        model(torch.as_tensor(data.x[:500]))
    frozen = [name for name in model.state_dict() if name.startswith("features.1.")]
    programs = edge.export_edge_programs(model, spec, data.x[:40], data.y[:40], 16,
                                         frozen=frozen)

    state = [v for n, v in model.state_dict().items() if v.dtype.is_floating_point]
    x, y = edge._batch(spec, data.x[500:], data.y[500:], 16)
    loss, logits, *rest = edge.run_program(programs.train, [*state, x, y, torch.tensor(0.0)])
    assert torch.equal(rest[-2], model.features[1].running_mean)
    assert torch.equal(rest[-1], model.features[1].running_var)
    with torch.no_grad():  # the layer normalizes as in evaluation (dropout is off here)
        expected = model.eval()(x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=edge.TOLERANCE)
    torch.testing.assert_close(loss, F.cross_entropy(expected, y), rtol=0,
                               atol=edge.TOLERANCE)


# The README's model: integer-valued digits put BatchNorm's outputs next to a ReLU's zero,
# where float32 rounding decides whether a max-pool window routes its gradient through
# one element or another.
class ReadmeNet(nn.Module):
    def __init__(self, num_classes: int = 10, dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16),
                                      nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(32 * 16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x / 16.0))


def test_the_readme_model_is_accepted_whatever_its_initialization():
    # With seed 1, the digits 32-63 hold a window on which the runtime and PyTorch take
    # different sides of a ReLU's zero (this machine: 4 of 55 batches of the digits did).
    data = load_dataset("digits")
    spec = ModelSpec(name="net.py:Net", input_shape=(1, 8, 8), num_classes=10, dropout=0.1)
    torch.manual_seed(1)
    programs = edge.export_edge_programs(ReadmeNet(), spec, data.x[32:72], data.y[32:72], 32)
    verified = programs.manifest["verified"]
    assert verified["batches"] == [32, edge.RAGGED_BATCH]
    assert max(verified["max_abs_diff"].values()) <= edge.TOLERANCE


class ScrambledGradient(torch.autograd.Function):
    """The identity, whose backward scales the gradient by random factors: a backward
    that differs between any two runs, as a wrong kernel's does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * torch.rand(grad.shape, dtype=grad.dtype)


class WrongGradient(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ScrambledGradient.apply(self.fc(x.flatten(1)))


def test_gradients_that_differ_on_every_batch_are_refused():
    data = load_dataset("digits")
    spec = ModelSpec(name="net.py:WrongGradient", input_shape=(1, 8, 8), num_classes=10,
                     dropout=0.0)
    with pytest.raises(FedgeError, match=r"the gradient of 'fc\.\w+' differs from PyTorch's "
                                         r".* and its gradients differed on the 2 batches "
                                         r"before; the device programs are refused"):
        edge.export_edge_programs(WrongGradient(), spec, data.x[:40], data.y[:40], 16)


class AveragePooling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(1, 4, 3, padding=1), nn.AvgPool2d(2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


def test_a_model_the_runtime_cannot_train_is_refused_naming_the_operator():
    data = load_dataset("digits")
    spec = ModelSpec(name="net.py:AveragePooling", input_shape=(1, 8, 8), num_classes=10,
                     dropout=0.0)
    with pytest.raises(FedgeError, match=r"no kernel for aten::avg_pool2d_backward"):
        edge.export_edge_programs(AveragePooling(), spec, data.x[:20], data.y[:20], 8)


def test_the_programs_folder_refuses_a_program_that_does_not_match_its_manifest(tmp_path):
    model, spec, x, y = built("mlp", dropout=0.0)
    programs = edge.export_edge_programs(model, spec, x, y, 8)
    edge.write_edge_folder(programs, tmp_path)
    assert edge.read_edge_folder(tmp_path).train == programs.train
    (tmp_path / "train.pte").write_bytes(programs.train[:-1] + b"\0")
    with pytest.raises(FedgeError, match="does not match its manifest"):
        edge.read_edge_folder(tmp_path)


def test_blobs_round_trip_and_refuse_what_does_not_add_up():
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.arange(3)}
    header, back = unpack(pack({"round": 3}, arrays))
    assert header["round"] == 3 and list(back) == ["w", "y"]
    np.testing.assert_array_equal(back["w"], arrays["w"])
    assert back["y"].dtype == np.int64
    data = pack({}, arrays)
    with pytest.raises(FedgeError, match="cut short"):
        unpack(data[:-1])
    with pytest.raises(FedgeError, match="after its last array"):
        unpack(data + b"\0")
    with pytest.raises(FedgeError, match="float64"):
        pack({}, {"w": np.zeros(2)})


@pytest.mark.parametrize(("header", "message"), [
    (b'{"arrays": [{"name": "w", "shape": [1.5], "dtype": "float32"}]}',
     "array 'w' has shape [1.5], not a list of at most 32 sizes"),
    (b'{"arrays": [{"name": "w", "shape": [1], "dtype": "<f4"}]}', "array 'w' has dtype '<f4'"),
    (b'{"arrays": [{"name": "w", "shape": [1], "dtype": "float32"}, '
     b'{"name": "w", "shape": [1], "dtype": "float32"}]}', "lists array 'w' twice"),
    (b'{"arrays": [], "loss": NaN}', "not JSON: NaN is not a JSON value"),
    (b'[{"name": "w"}]', 'not a JSON object with a list "arrays"'),
    (b'{"arrays": [{"name": "w", "shape": [0, 4611686018427387904], "dtype": "float32"}]}',
     "larger than any array"),
])
def test_blobs_refuse_headers_that_do_not_describe_arrays(header, message):
    blob = len(header).to_bytes(4, "little") + header + bytes(8)
    with pytest.raises(FedgeError, match=re.escape(message)):
        unpack(blob)
