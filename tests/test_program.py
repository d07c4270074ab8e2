"""Your own model as a program: what a device runs instead of the model's source.

Pins torch's private graph (de)serializer (torch._export.serde, torch 2.13), which only
fedge.models.program uses."""

import io
import json
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedge.errors import FedgeError
from fedge.models.exchange import exchanged_names, read_manifest
from fedge.models.program import ProgramModel, export_program, fingerprint


class Net(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width),
                                      nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(width * 64, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _program(model: nn.Module) -> bytes:
    torch.manual_seed(0)
    return export_program(model, torch.randn(4, 1, 8, 8))


def test_a_program_computes_what_its_model_computes_and_trains_like_it():
    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    program = ProgramModel(_program(model))
    program.load_state_dict(model.state_dict())
    assert torch.allclose(program.eval()(x), model.eval()(x), atol=1e-6)

    program.train()
    optimizer = torch.optim.SGD(program.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(program(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # The train graph updated BatchNorm's running statistics, which the eval graph reads.
    trained = program.state_dict()
    assert not torch.equal(trained["features.1.running_mean"], torch.zeros(4))
    model.load_state_dict(trained)
    assert torch.allclose(program.eval()(x), model.eval()(x), atol=1e-5)


def test_dropout_is_on_in_the_train_graph_only():
    model = Net()
    program = ProgramModel(_program(model))
    program.load_state_dict(model.state_dict())
    x = torch.randn(8, 1, 8, 8)
    assert torch.equal(program.eval()(x), program(x))
    assert not torch.equal(program.train()(x), program(x))


def test_the_manifest_names_every_entry_and_integers_are_not_exchanged():
    model = Net()
    entries = read_manifest(_program(model))
    assert list(entries) == list(model.state_dict())
    assert entries["features.1.num_batches_tracked"].dtype == "int64"
    assert not entries["features.1.running_mean"].parameter
    exchanged = exchanged_names({n: e.dtype for n, e in entries.items()}, {"head.2.bias"})
    assert "features.1.num_batches_tracked" not in exchanged and "head.2.bias" not in exchanged
    assert "features.1.running_mean" in exchanged


def test_the_fingerprint_tells_architectures_apart_but_not_weights():
    assert fingerprint(_program(Net())) == fingerprint(_program(Net()))
    assert fingerprint(_program(Net())) != fingerprint(_program(Net(width=5)))


def test_the_program_carries_no_source_lines_or_server_paths():
    with zipfile.ZipFile(io.BytesIO(_program(Net()))) as archive:
        graph = archive.read("train.json").decode()
    assert __file__ not in graph and "stack_trace" not in graph


def _tampered(program: bytes, member: str, change) -> bytes:
    with zipfile.ZipFile(io.BytesIO(program)) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    files[member] = change(files[member])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return out.getvalue()


def _with_json(change):
    def apply(data: bytes) -> bytes:
        document = json.loads(data)
        change(document)
        return json.dumps(document).encode()
    return apply


def _call_python(document: dict) -> None:
    document["graph_module"]["graph"]["nodes"][0]["target"] = "builtins.exec"


def _guard_code(document: dict) -> None:
    document["guards_code"] = ["__import__('os').system('echo owned')"]


def _pickled_constants(_: bytes) -> bytes:
    out = io.BytesIO()
    np.savez(out, evil=np.array([object()], dtype=object))
    return out.getvalue()


@pytest.mark.parametrize("member, change, message", [
    ("train.json", _with_json(_call_python), "calls builtins.exec, which is not a torch "
                                             "operator"),
    ("eval.json", _with_json(_guard_code), "carries code or custom objects"),
    ("constants.npz", _pickled_constants, "the model program's constants are damaged"),
    ("manifest.json", lambda data: b"{", "manifest is damaged"),
])
def test_a_device_refuses_a_program_that_would_run_python(member, change, message):
    tampered = _tampered(_program(Net()), member, change)
    with pytest.raises(FedgeError, match=message):
        ProgramModel(tampered)


def test_a_damaged_archive_is_a_clear_error():
    with pytest.raises(FedgeError, match="the model program is damaged"):
        ProgramModel(b"not a zip")
