"""Your own model as data: torch.export programs that a device trains and evaluates
without the model's source, and without running any Python code it received.

The server, which has the source, exports the model twice with ``torch.export`` (once in
train mode: dropout on, BatchNorm on batch statistics, updating its running statistics,
except the BatchNorm layers whose statistics are frozen, which stay in eval mode; once in
eval mode) and packs both graphs, as torch's JSON serialization of ATen operators, into
one zip archive:

- ``train.json``, ``eval.json``: the two graphs, without weights;
- ``manifest.json``: every state entry's name, shape, dtype and whether it is a
  parameter, plus the program format;
- ``constants.npz``: the model's constants (non-persistent buffers such as fedge's input
  scaling), read with ``allow_pickle=False``.

Weights travel as arrays by name, as for every model. A device reads a program only
after checking that its graphs call nothing but ATen/prims operators and carry no guard
code (the one piece of a serialized program that torch would ``exec``); it never
unpickles anything. torch's (de)serializer of graphs is private: this module is the only
place fedge uses it (torch 2.13, pinned by tests/test_program.py).
"""

import hashlib
import io
import json
import zipfile
from collections.abc import Collection, Iterator

import numpy as np
import torch
from torch import nn

from fedge.errors import FedgeError
from fedge.models.exchange import PROGRAM_FORMAT, program_files, read_manifest
from fedge.models.weights import train_mode

ALLOWED_TARGETS = ("torch.ops.aten.", "torch.ops.prims.", "_operator.getitem")


def export_program(model: nn.Module, sample: torch.Tensor,
                   frozen_statistics: Collection[str] = ()) -> bytes:
    """``model`` (whose own code runs here, on the server) as a program archive, traced on
    ``sample``, a batch of at least two inputs; the batch size stays free. The layers
    ``frozen_statistics`` names (frozen BatchNorm) are in eval mode in the train graph
    too (:func:`fedge.models.weights.frozen_statistics_layers`)."""
    from torch._export.serde import serialize as serde  # 1.5 s: only when exporting

    constants: dict[str, np.ndarray] = {}
    graphs = {}
    was_training = model.training
    try:
        for mode in ("train", "eval"):
            if mode == "train":
                train_mode(model, frozen_statistics)
            else:
                model.eval()
            program = _export(model, sample)
            graphs[mode] = _without_node_metadata(serde.serialize(
                program, serialize_state_dict=False, serialize_constants=False,
                serialize_example_inputs=False).exported_program)
            constants.update({name: value.detach().cpu().numpy()
                              for name, value in program.constants.items()
                              if isinstance(value, torch.Tensor)})
    finally:
        model.train(was_training)
    parameters = {name for name, _ in model.named_parameters()}
    manifest = {
        "format": PROGRAM_FORMAT,
        "entries": {name: {"shape": list(value.shape), "dtype": str(value.dtype).split(".")[-1],
                           "parameter": name in parameters}
                    for name, value in model.state_dict().items()},
    }
    return _pack(graphs, manifest, constants)


def _export(model: nn.Module, sample: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1)
    try:
        return torch.export.export(model, (sample,), dynamic_shapes=({0: batch},))
    except Exception as error:  # torch.export raises many unrelated types
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
        raise FedgeError(f"the model cannot be shipped to devices as a torch.export program "
                         f"(devices run no Python code they receive): "
                         f"{type(error).__name__}: {first}") from error


def _without_node_metadata(graph: bytes) -> bytes:
    """The graph without its nodes' debug metadata: stack traces quote the model's source
    lines and the server's file paths, which devices have no business reading."""
    document = json.loads(graph)
    for node in document["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}
    return json.dumps(document).encode()


def _pack(graphs: dict[str, bytes], manifest: dict, constants: dict[str, np.ndarray]) -> bytes:
    arrays = io.BytesIO()
    np.savez(arrays, **constants)
    archive = io.BytesIO()
    # A fixed timestamp: the same model gives the same bytes, and the same fingerprint.
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name, data in (("train.json", graphs["train"]), ("eval.json", graphs["eval"]),
                           ("manifest.json", json.dumps(manifest).encode()),
                           ("constants.npz", arrays.getvalue())):
            zipped.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return archive.getvalue()


def fingerprint(program: bytes) -> str:
    """A digest of the model's architecture: its two graphs and its state entries (names,
    shapes, dtypes), not its weights."""
    digest = hashlib.sha256()
    files = program_files(program)
    for name in ("train.json", "eval.json", "manifest.json"):
        digest.update(_without_torch_version(files[name]))
    return digest.hexdigest()[:16]


def _without_torch_version(data: bytes) -> bytes:
    """The same model is the same architecture under another torch release."""
    try:
        document = json.loads(data)
    except ValueError:
        return data
    if isinstance(document, dict):
        document.pop("torch_version", None)
    return json.dumps(document, sort_keys=True).encode()


def _checked_graph(data: bytes, mode: str) -> bytes:
    """The serialized graph, once it is known to hold nothing but operator calls."""
    try:
        document = json.loads(data)
        graph = document["graph_module"]["graph"]
        targets = {str(node["target"]) for node in graph["nodes"]}
        guards, custom = document.get("guards_code") or [], graph.get("custom_obj_values") or {}
    except (ValueError, KeyError, TypeError) as error:
        raise FedgeError(f"the model program's {mode} graph is damaged: {error}") from error
    if guards or custom:
        raise FedgeError(f"the model program's {mode} graph carries code or custom objects; "
                         "a device runs only operator graphs, so it refuses this program")
    foreign = sorted(t for t in targets if not t.startswith(ALLOWED_TARGETS))
    if foreign:
        raise FedgeError(f"the model program's {mode} graph calls {', '.join(foreign[:3])}, "
                         "which is not a torch operator; the device refuses it")
    return data


def _load(data: bytes, state: dict[str, torch.Tensor], constants: dict[str, torch.Tensor],
          device: torch.device) -> nn.Module:
    from torch._export.serde import serialize as serde

    try:
        program = serde.deserialize(serde.SerializedArtifact(data, state, constants, b""))
        if device.type != "cpu":
            program = torch.export.passes.move_to_device_pass(program, device)
        return program.module()
    except FedgeError:
        raise
    except Exception as error:  # the deserializer's errors have no common base
        raise FedgeError(f"this device cannot run the model program: "
                         f"{type(error).__name__}: {error}") from error


class ProgramModel:
    """A program archive, run like the ``nn.Module`` it was exported from, for fedge's
    local training and evaluation: ``train()``/``eval()`` pick the graph, both graphs
    share one set of weights, and ``state_dict()`` has the model's own names."""

    def __init__(self, program: bytes, device: torch.device | str = "cpu") -> None:
        self.program, self.device = program, torch.device(device)
        self.entries = read_manifest(program)
        self.training = True
        files = program_files(program)
        self._graphs = {mode: _checked_graph(files[f"{mode}.json"], mode)
                        for mode in ("train", "eval")}
        try:
            with np.load(io.BytesIO(files["constants.npz"]), allow_pickle=False) as saved:
                self._constants = {name: torch.from_numpy(saved[name]) for name in saved.files}
        except (ValueError, OSError) as error:
            raise FedgeError(f"the model program's constants are damaged: {error}") from error
        state = {name: torch.zeros(entry.shape, dtype=getattr(torch, entry.dtype))
                 for name, entry in self.entries.items()}
        self._build(state)

    def _build(self, state: dict[str, torch.Tensor]) -> None:
        device = self.device
        # One tensor per entry, shared by both graphs: training updates what evaluation
        # reads, BatchNorm's running statistics included.
        shared = {name: (nn.Parameter(value.to(device)) if self.entries[name].parameter
                         else value.to(device)) for name, value in state.items()}
        constants = {name: value.to(device) for name, value in self._constants.items()}
        self._modules = {mode: _load(graph, shared, constants, device)
                         for mode, graph in self._graphs.items()}

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._modules["train" if self.training else "eval"](inputs)

    def train(self, mode: bool = True) -> "ProgramModel":
        self.training = mode
        return self

    def eval(self) -> "ProgramModel":
        return self.train(False)

    def to(self, device: torch.device | str) -> "ProgramModel":
        device = torch.device(device)
        if device != self.device:
            state = self.state_dict()
            self.device = device
            self._build(state)
        return self

    def cpu(self) -> "ProgramModel":
        return self.to("cpu")

    def module(self, training: bool) -> nn.Module:
        """The train-mode or eval-mode graph as a module (for ``torch.func``); both hold
        the same tensors by the model's own names."""
        return self._modules["train" if training else "eval"]

    def inference_module(self) -> nn.Module:
        """The eval-mode graph as a module of its own, e.g. for the ONNX exporter."""
        return self._modules["eval"]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self._modules["train"].named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        return (parameter for _, parameter in self.named_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self._modules["train"].state_dict()
        return {name: state[name] for name in self.entries}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.entries) - set(state))
        unexpected = sorted(set(state) - set(self.entries))
        if missing or unexpected:
            raise FedgeError(f"weights do not fit the model program (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        self._modules["train"].load_state_dict(state)
