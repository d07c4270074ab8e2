"""ExecuTorch programs for devices that train without Python or PyTorch (``fedge[edge]``).

For the run's model the server exports two pure functions as ExecuTorch programs, once
per run (weights travel each round as arrays by name, see ``client/device/PROTOCOL.md``):

- **train**: ``(state..., x, y, dropout) → (loss, logits, ∇parameters..., buffers'...)``,
  the task's mean loss over a mini-batch (:func:`fedge.models.tasks.loss`), its gradient
  for every parameter and BatchNorm's updated running statistics (a BatchNorm layer whose
  statistics are frozen normalizes with them, as in evaluation, and returns them
  unchanged);
- **predict**: ``(state..., x) → logits``, in evaluation mode.

The labels ``y`` are what a device holds (:func:`device_labels`), turned into the loss's
targets inside the graph: class ids (int64 ``[b]``) for classification (cross-entropy,
with the spec's class weights); 0/1 (int64 ``[b]``) for binary, cast to float for binary
cross-entropy with logits (``pos_weight``: the positives' weight). A binary model's one
logit ``z`` leaves both programs as the two class logits ``[0, z]``: their softmax is
``(1 − σ(z), σ(z))`` and their cross-entropy is the binary one, so a device evaluates a
binary model as it does any two classes. Multilabel takes int64 0/1 rows ``[b, labels]``;
regression float32 rows ``[b, targets]`` in the user's units (standardized in the graph),
and its predict program answers in the user's units (:func:`fedge.models.tasks.for_export`).
fedge-device and its protocol carry class ids only: :func:`check_edge_task` refuses the
tasks they cannot train before a run starts.

Weights are inputs, not held inside the programs: a program that holds them gives a
second method its own stale copy, and its delegated form diverged after one step (see
the field notes in the README). The gradient is traced with ``torch.func.grad`` and
``make_fx`` into plain ATen operators, so the programs need no training extension.

Two portable kernels of ExecuTorch 1.5.1 are silently wrong, so they never reach a
program: ``max_pool2d_with_indices_backward`` (its output is not zeroed, pytorch/
executorch#21686) is replaced by torch's decomposition, and dropout (whose kernel does
not scale kept values) by ``rand ≥ p`` masks; ``dropout`` is an input so that the same
program trains with dropout and is checked without it. Training-mode BatchNorm is plain
arithmetic, in float64 as PyTorch's CPU kernel accumulates it. Every export is verified
before any device sees it: the runtime's loss, logits, gradients and statistics against
eager PyTorch on real samples, at the largest batch and a ragged one (gradients that
differ, as they may at a ReLU's or a max-pool's kink, on up to three batches). A model
whose program needs a kernel the runtime lacks, or whose program disagrees with PyTorch,
is refused with the operator or the entry at fault.
"""

import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedge.errors import FedgeError
from fedge.files import write_atomic, write_json
from fedge.models import tasks
from fedge.models.registry import ModelSpec, as_input_tensor
from fedge.models.weights import frozen_statistics_layers, train_mode

MANIFEST_FORMAT = 1
# Largest |runtime − eager| allowed, relative to the larger of 1 and the output's scale.
TOLERANCE = 1e-4
RAGGED_BATCH = 3  # the second verification batch: not the size the programs were traced at
REDRAWS = 2  # further batches on which gradients that differed are compared (_verify)


@dataclass(frozen=True)
class EdgePrograms:
    train: bytes
    predict: bytes
    manifest: dict  # what a device needs to call them (PROTOCOL.md, "The programs")


# The tasks fedge-device trains: its protocol carries one class id per sample
# (client/device/PROTOCOL.md), not a row of labels or float targets.
DEVICE_TASKS = ("classification", "binary")


def check_edge_task(task: ModelSpec | str) -> None:
    """Refuse, before anything starts, a task that devices without Python cannot train:
    multilabel and regression need label rows or float targets, which fedge-device and
    its protocol do not carry."""
    name = task.task if isinstance(task, ModelSpec) else task
    if name not in DEVICE_TASKS:
        raise FedgeError(f"devices without Python (edge programs) train classification and "
                         f"binary tasks, not {name}: fedge-device carries one class id per "
                         f"sample; train a {name} task with fedge client")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def runtime_available() -> bool:
    """Whether ``executorch`` (``pip install 'fedge[edge]'``) is installed here."""
    try:
        import executorch.exir  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _executorch_quiet() -> Iterator[None]:
    """ExecuTorch's import, lowering and runtime print what concerns their developers, not
    a fedge operator (torchao's missing CUDA kernels, torch deprecation warnings, the
    runtime's CPU probe, all through Python's stderr): kept off the server's output. A
    lowering pass also logs through the root logger, which then gets Python's default
    handler and prints every Flower line a second time: the root logger is restored."""
    root_handlers = list(logging.root.handlers)
    pytree = logging.getLogger("torch.utils._pytree")  # torch's handler, not sys.stderr
    pytree_level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        pytree.setLevel(pytree_level)
        logging.root.handlers[:] = root_handlers


@_executorch_quiet()
def export_edge_programs(model: nn.Module, spec: ModelSpec, x: np.ndarray, y: np.ndarray,
                         max_batch: int, frozen: Collection[str] = ()) -> EdgePrograms:
    """``model``'s train and predict programs for batches of 1 to ``max_batch`` samples,
    verified on the real samples ``x``, ``y`` (at least ``max_batch`` + 1 would be ideal;
    at least 2), or a :class:`FedgeError` saying why a device could not run them."""
    if not runtime_available():
        raise FedgeError("device programs need ExecuTorch: pip install 'fedge[edge]'")
    if max_batch < 2 or len(x) < 2:
        raise FedgeError(f"device programs need a batch size of at least 2 and 2 samples "
                         f"(batch size {max_batch}, {len(x)} samples)")
    functions = _Functions(model, spec, frozen)
    example = _batch(spec, x, y, 2)
    train = _lower(functions, functions.train_step, (*example, torch.tensor(1.0)), max_batch,
                   spec.name)
    predict = _lower(functions, functions.predict_step, example[:1], max_batch, spec.name)
    verified = _verify(model, functions, train, predict, spec, x, y, max_batch)
    manifest = {
        "format": MANIFEST_FORMAT,
        "model": spec.name,
        "task": spec.task,
        "input": {"shape": list(spec.input_shape), "dtype": str(example[0].dtype)[6:]},
        "num_classes": spec.num_classes,
        "class_names": list(spec.class_names) if spec.class_names else None,
        "max_batch": max_batch,
        "state": [{"name": name, "shape": list(value.shape), "parameter": name in
                   functions.parameters, "frozen": name in functions.frozen}
                  for name, value in functions.state.items()],
        "programs": {"train": {"sha256": sha256(train), "bytes": len(train)},
                     "predict": {"sha256": sha256(predict), "bytes": len(predict)}},
        "verified": verified,
    }
    return EdgePrograms(train, predict, manifest)


PROGRAM_FILES = {"train": "train.pte", "predict": "predict.pte"}
MANIFEST_FILE = "manifest.json"


def write_edge_folder(programs: EdgePrograms, folder: Path) -> None:
    """The programs and their manifest as files (a run folder's ``edge/``), each written
    whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind, name in PROGRAM_FILES.items():
        write_atomic(folder / name, getattr(programs, kind))
    write_json(folder / MANIFEST_FILE, programs.manifest)


def read_edge_folder(folder: Path) -> EdgePrograms:
    """What :func:`write_edge_folder` wrote, its programs checked against the manifest."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        train, predict = ((folder / name).read_bytes() for name in PROGRAM_FILES.values())
    except (OSError, ValueError) as error:
        raise FedgeError(f"{folder} holds no device programs: {error}") from None
    for kind, data in (("train", train), ("predict", predict)):
        if sha256(data) != manifest["programs"][kind]["sha256"]:
            raise FedgeError(f"{folder / PROGRAM_FILES[kind]} does not match its manifest")
    return EdgePrograms(train, predict, manifest)


def device_labels(spec: ModelSpec, y: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Labels as a device passes them to the train program: int64 class ids (classification;
    binary's 0/1), int64 0/1 rows (multilabel), float32 rows in the user's units
    (regression)."""
    if spec.task == "regression":
        return torch.as_tensor(y, dtype=torch.float32).reshape(len(y), spec.outputs).clone()
    return torch.as_tensor(y, dtype=torch.int64).clone()


def _batch(spec: ModelSpec, x: np.ndarray, y: np.ndarray, size: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` samples, densely laid out: numpy's views can have zero strides
    (a broadcast channel axis), which ExecuTorch refuses."""
    return (as_input_tensor(spec, x[:size]).clone(memory_format=torch.contiguous_format),
            device_labels(spec, y[:size]))


# The task's tensors among the programs' constants (keys no state entry can have): a
# tensor a trace creates itself becomes an attribute that torch.export cannot lower.
CLASS_WEIGHTS, TARGET_MEAN, TARGET_STD = "<class_weights>", "<target_mean>", "<target_std>"


def _task_constants(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The loss's class weights (binary: the positives' weight) and regression's target
    mean and standard deviation, as the programs' constants."""
    found = {}
    if spec.class_weights is not None:
        found[CLASS_WEIGHTS] = torch.tensor(spec.class_weights, dtype=torch.float32)
    if spec.task == "regression":
        found[TARGET_MEAN] = torch.tensor(spec.target_mean or (0.0,) * spec.outputs,
                                          dtype=torch.float32)
        found[TARGET_STD] = torch.tensor(spec.target_std or (1.0,) * spec.outputs,
                                         dtype=torch.float32)
    return found


def _graph_loss(spec: ModelSpec, outputs: torch.Tensor, y: torch.Tensor,
                constants: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`fedge.models.tasks.loss` (``reduction="mean"``) of ``outputs`` against the
    device's labels ``y`` (:func:`device_labels`), as :func:`~fedge.models.tasks.targets`
    turns them into targets, with the task's tensors from ``constants``: operations a
    traced graph keeps for any batch size. :func:`_verify` holds every export to
    ``tasks.loss``."""
    weights = constants.get(CLASS_WEIGHTS)
    if spec.task == "classification":
        return F.cross_entropy(outputs, y, weight=weights)
    target = y.to(torch.float32)
    if spec.task == "binary":
        target = target.unsqueeze(-1)
    outputs = outputs.reshape(target.shape)
    if spec.task == "regression":
        target = (target - constants[TARGET_MEAN]) / constants[TARGET_STD]
        per_output = (F.huber_loss(outputs, target, reduction="none") if spec.loss == "huber"
                      else F.mse_loss(outputs, target, reduction="none"))
    else:
        per_output = F.binary_cross_entropy_with_logits(outputs, target, pos_weight=weights,
                                                        reduction="none")
    return per_output.mean(dim=-1).mean()


def _device_logits(spec: ModelSpec, outputs: torch.Tensor) -> torch.Tensor:
    """The network's outputs as the programs give them: binary's one logit ``z`` as the
    two class logits ``[0, z]`` (module docstring), others as they are."""
    if spec.task != "binary":
        return outputs
    return torch.cat([torch.zeros_like(outputs), outputs], dim=1)


class _MaskDropout(nn.Module):
    """Inverted dropout from a uniform draw, switched on and off by a traced input."""

    def __init__(self, p: float, functions: "_Functions") -> None:
        super().__init__()
        self.p, self.functions = p, functions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        rate = self.p * self.functions.dropout_on
        keep = (torch.rand(x.shape, dtype=x.dtype) >= rate).to(x.dtype)
        return x * keep / (1 - rate)


class _Conv1dAs2d(nn.Module):
    """A ``Conv1d`` as a ``Conv2d`` over a height of one (the runtime has no kernel for
    the 1-D convolution's backward); same parameters, same names."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.dilation = (1, conv.stride[0]), (1, conv.dilation[0])
        self.padding, self.groups = (0, conv.padding[0]), conv.groups  # type: ignore[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.unsqueeze(2), self.weight.unsqueeze(2), self.bias, self.stride,
                        self.padding, self.dilation, self.groups).squeeze(2)


def _rewritable_conv1d(module: nn.Module) -> bool:
    return (type(module) is nn.Conv1d and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


class _Functions:
    """``model`` as the pure functions the programs compute, over its float state
    entries (inputs) and its other tensors (constants: input scaling, counters)."""

    def __init__(self, model: nn.Module, spec: ModelSpec, frozen: Collection[str]) -> None:
        self.spec = spec
        self.net = copy.deepcopy(model).cpu()
        self._rewrite(self.net)
        self.dropout_on: torch.Tensor | float = 1.0
        state = self.net.state_dict()
        self.parameters = {name for name, _ in self.net.named_parameters()}
        self.state = {name: value.detach().clone() for name, value in state.items()
                      if value.dtype.is_floating_point}
        self.buffers = [name for name in self.state if name not in self.parameters]
        self.frozen = set(frozen) & set(self.state)
        self.frozen_statistics = frozen_statistics_layers(self.net, frozen)
        everything = {**dict(self.net.named_parameters()), **dict(self.net.named_buffers())}
        self.constants = {name: value.detach().clone() for name, value in everything.items()
                          if name not in self.state}
        self.task_constants = _task_constants(spec)
        self.constants.update(self.task_constants)

    def _rewrite(self, module: nn.Module) -> None:
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, _MaskDropout(child.p, self))
            elif _rewritable_conv1d(child):
                setattr(module, name, _Conv1dAs2d(child))
            else:
                self._rewrite(child)

    def _split(self, args: tuple) -> tuple[dict, dict, dict, tuple]:
        """The traced arguments as state entries, the network's constants, the task's
        constants, and the rest (inputs, labels, dropout)."""
        names, constants = list(self.state), list(self.constants)
        state = dict(zip(names, args[:len(names)], strict=True))
        consts = dict(zip(constants, args[len(names):len(names) + len(constants)], strict=True))
        task = {name: consts.pop(name) for name in self.task_constants}
        return state, consts, task, args[len(names) + len(constants):]

    def train_step(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state, consts, task, (x, y, dropout_on) = self._split(args)
        self.dropout_on = dropout_on
        # Clones, because BatchNorm updates its statistics (and counter) in place.
        others = {name: value.clone() for name, value in {**state, **consts}.items()
                  if name not in self.parameters}
        parameters = {name: state[name].detach().requires_grad_(True) for name in state
                      if name in self.parameters}
        train_mode(self.net, self.frozen_statistics)
        with torch.enable_grad():
            outputs = torch.func.functional_call(self.net, {**parameters, **others}, (x,))
            loss = _graph_loss(self.spec, outputs, y, task)
            grads = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g
                 for p, g in zip(parameters.values(), grads, strict=True)]
        buffers = [others[name] for name in self.buffers]
        logits = _device_logits(self.spec, outputs.detach())
        return (loss.detach(), logits, *grads, *buffers)

    def predict_step(self, *args: torch.Tensor) -> torch.Tensor:
        state, consts, task, (x,) = self._split(args)
        self.net.eval()
        outputs = torch.func.functional_call(self.net, {**state, **consts}, (x,))
        if self.spec.task == "regression":  # the user's units (tasks.for_export)
            return outputs * task[TARGET_STD] + task[TARGET_MEAN]
        return _device_logits(self.spec, outputs)


class _WithConstants(nn.Module):
    """A traced step as a module whose constants are its buffers (inside the program)."""

    def __init__(self, graph: nn.Module, state: int, constants: dict[str, torch.Tensor]
                 ) -> None:
        super().__init__()
        self.graph, self.state_count = graph, state
        for i, value in enumerate(constants.values()):
            self.register_buffer(f"constant_{i}", value)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state, rest = args[:self.state_count], args[self.state_count:]
        return self.graph(*state, *self.buffers(recurse=False), *rest)


def _decompositions() -> dict:
    from torch._decomp import get_decompositions

    aten = torch.ops.aten
    table = get_decompositions([
        # ExecuTorch 1.5.1's portable kernel leaves its output unzeroed (#21686).
        aten.max_pool2d_with_indices_backward,
        aten.native_batch_norm_backward,
    ])
    # Training-mode BatchNorm has no out-variant kernel: plain arithmetic instead.
    forward = get_decompositions([
        aten.native_batch_norm.default, aten._native_batch_norm_legit.default,
        aten._native_batch_norm_legit.no_stats, aten._native_batch_norm_legit_functional.default,
    ])
    return {**table, **{op: _in_float64(decomposition) for op, decomposition in forward.items()}}


def _in_float64(decomposition: Callable) -> Callable:
    """A BatchNorm decomposition that computes in float64 and rounds its outputs back.

    PyTorch's CPU kernel accumulates a batch's statistics in float64 (``at::acc_type``);
    in float32 the runtime's normalized values differed from PyTorch's by up to 1e-5, and
    a value that close to a ReLU's zero lands on the other side of it often enough to
    route a max-pool window's gradient elsewhere (see :func:`_verify`)."""

    def run(input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            *args: object, **kwargs: object) -> tuple:
        wide = [None if t is None else t.double() for t in (input, weight, bias)]
        outputs = decomposition(*wide, *args, **kwargs)
        return tuple(t.to(input.dtype) if isinstance(t, torch.Tensor) else t for t in outputs)

    return run


def _lower(functions: _Functions, step: Callable, example: tuple[torch.Tensor, ...],
           max_batch: int, model_name: str) -> bytes:
    """``step`` as ExecuTorch program bytes, its batch axis free up to ``max_batch``."""
    from executorch.exir import EdgeCompileConfig, to_edge
    from torch.fx.experimental.proxy_tensor import make_fx

    state, constants = list(functions.state.values()), list(functions.constants.values())
    try:
        graph = make_fx(step, tracing_mode="symbolic", decomposition_table=_decompositions()
                        )(*state, *constants, *example)
        module = _WithConstants(graph, len(state), functions.constants)
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        batched = [{0: batch}] * (2 if len(example) > 1 else 1) + [None] * (len(example) - 2)
        exported = torch.export.export(
            module, (*state, *example), dynamic_shapes=((*[None] * len(state), *batched),))
        program = to_edge(exported, compile_config=EdgeCompileConfig(
            _check_ir_validity=False)).to_executorch()
    except Exception as error:  # torch's tracers raise many kinds; all mean "cannot"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise FedgeError(f"model {model_name!r} cannot become a device program: {first}"
                         ) from error
    _check_kernels(program, model_name)
    return program.buffer


def _check_kernels(program: object, model_name: str) -> None:
    from executorch.extension.pybindings.portable_lib import _get_operator_names

    available = set(_get_operator_names())
    needed = {f"{op.name}.{op.overload}" if op.overload else op.name
              for plan in program.executorch_program.execution_plan  # type: ignore[attr-defined]
              for op in plan.operators}
    missing = sorted(needed - available)
    if missing:
        raise FedgeError(f"model {model_name!r} cannot train on devices: the ExecuTorch "
                         f"runtime has no kernel for {', '.join(missing)}")


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """The runtime prints CPU-probing chatter on file descriptor 2 when it loads."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run_program(program: bytes, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The outputs of ``program``'s ``forward`` in the ExecuTorch runtime (copied out)."""
    from executorch.runtime import Runtime

    with _quiet_native_stderr():
        method = Runtime.get().load_program(program).load_method("forward")
    return [value.clone() for value in method.execute(inputs)]


def _eager_reference(model: nn.Module, functions: _Functions, x: torch.Tensor,
                     y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """PyTorch's own loss (the task's, :func:`fedge.models.tasks.loss` against
    :func:`~fedge.models.tasks.targets`), logits, gradients and new statistics (dropout
    off, frozen statistics in eval mode), and its eval-mode predictions (the exported
    model's, :func:`~fedge.models.tasks.for_export`), from an untouched copy of ``model``."""
    spec = functions.spec
    net = train_mode(copy.deepcopy(model).cpu(), functions.frozen_statistics)
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    outputs = net(x)
    loss = tasks.loss(spec, outputs, tasks.targets(spec, y))
    loss.backward()
    named = dict(net.named_parameters())
    state = net.state_dict()
    train = [loss.detach(), _device_logits(spec, outputs.detach()),
             *(named[name].grad if named[name].grad is not None
               else torch.zeros_like(named[name]) for name in functions.state
               if name in functions.parameters),
             *(state[name] for name in functions.buffers)]
    with torch.no_grad():
        fresh = tasks.for_export(copy.deepcopy(model).cpu(), spec).eval()
        return train, _device_logits(spec, fresh(x))


def _verify(model: nn.Module, functions: _Functions, train: bytes, predict: bytes,
            spec: ModelSpec, x: np.ndarray, y: np.ndarray, max_batch: int) -> dict:
    """Runtime against eager at the largest batch the samples allow and a ragged one.

    Loss, logits and statistics are continuous in the inputs: they must agree on every
    batch. Gradients are not: where a ReLU's input, or the gap between a max-pool window's
    two largest values, is within rounding of zero, the runtime and PyTorch can each take
    a side (both valid) and send a window's gradient along different paths. A batch whose
    gradients alone differ is therefore compared again on samples drawn at random, up to
    :data:`REDRAWS` times: a wrong kernel differs on every batch, a kink on few."""
    parameters = [name for name in functions.state if name in functions.parameters]
    names = ["loss", "logits", *(f"the gradient of {name!r}" for name in parameters),
             *(f"the new value of {name!r}" for name in functions.buffers)]
    gradients = range(2, 2 + len(parameters))
    state = list(functions.state.values())
    worst: dict[str, float] = {"train": 0.0, "predict": 0.0}
    redrawn = 0
    sizes = sorted({min(max_batch, len(x)), min(RAGGED_BATCH, len(x))}, reverse=True)
    for size in sizes:
        for draw in range(REDRAWS + 1):
            xb, yb = _drawn_batch(spec, x, y, size, draw)
            expected, expected_logits = _eager_reference(model, functions, xb, yb)
            got = run_program(train, [*state, xb, yb, torch.tensor(0.0)])
            compared = [_compared(a, b, what, size)
                        for what, a, b in zip(names, got, expected, strict=True)]
            off = [i for i, (_, problem) in enumerate(compared) if problem]
            if firm := [i for i in off if i not in gradients]:
                raise _refusal(spec.name, compared[firm[0]][1])
            if off and draw == REDRAWS:
                raise _refusal(spec.name, f"{compared[off[0]][1]}, and its gradients "
                                          f"differed on the {REDRAWS} batches before")
            if not off:
                worst["train"] = max(worst["train"], *(diff for diff, _ in compared))
                break
            redrawn += 1
        (logits,) = run_program(predict, [*state, xb])
        diff, problem = _compared(logits, expected_logits, "the predicted logits", size)
        if problem:
            raise _refusal(spec.name, problem)
        worst["predict"] = max(worst["predict"], diff)
        with_dropout = run_program(train, [*state, xb, yb, torch.tensor(1.0)])
        if not all(torch.isfinite(t).all() for t in with_dropout):
            raise FedgeError(f"model {spec.name!r}: its device train program gives "
                             "non-finite values with dropout on")
    return {"batches": sizes, "tolerance": TOLERANCE, "redrawn": redrawn,
            "max_abs_diff": {k: float(v) for k, v in worst.items()}}


def _drawn_batch(spec: ModelSpec, x: np.ndarray, y: np.ndarray, size: int, draw: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Verification batch ``draw``: the first ``size`` samples, then seeded draws with
    replacement (another batch even where there are only ``size`` samples)."""
    if draw == 0:
        return _batch(spec, x, y, size)
    rows = np.random.default_rng(draw).choice(len(x), size)
    return _batch(spec, x[rows], y[rows], size)


def _compared(got: torch.Tensor, expected: torch.Tensor, what: str, size: int
              ) -> tuple[float, str | None]:
    """The largest difference, and what is wrong with it (None: within tolerance)."""
    expected = expected.detach().to(got.dtype)
    if got.shape != expected.shape:
        return math.inf, (f"the device program's {what} has shape {tuple(got.shape)}, "
                          f"PyTorch's {tuple(expected.shape)}")
    diff = float((got - expected).abs().max()) if got.numel() else 0.0
    scale = max(1.0, float(expected.abs().max()) if expected.numel() else 0.0)
    if diff <= TOLERANCE * scale:  # NaN fails too
        return diff, None
    return diff, (f"the ExecuTorch runtime's {what} differs from PyTorch's by {diff:.3g} on "
                  f"a batch of {size} (tolerance {TOLERANCE:g}×{scale:.3g})")


def _refusal(model_name: str, problem: str) -> FedgeError:
    return FedgeError(f"model {model_name!r}: {problem}; the device programs are refused")
