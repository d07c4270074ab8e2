"""Vectorized clients (``--vectorize``): a round's clients that train the same model are
trained together, as one batched computation.

:class:`VectorizedGrid` answers the train messages of one ``push_messages`` call itself
and hands every other message (and the clients of a model it cannot batch) to a fallback
grid, :class:`~fedge.simulations.workers.WorkerGrid` or
:class:`~fedge.simulations.inprocess.InProcessGrid`, built only when first needed. Its
replies are the ClientApp's (:func:`fedge.client.app.train_reply`): the same arrays, the
same metrics.

:func:`train_together` trains ``K`` clients as sequential training would
(:func:`fedge.client.training.train_locally`), step for step:

- **Stacked weights.** Every trainable parameter ``w`` becomes a tensor ``W`` of shape
  ``(K, *w.shape)`` (what ``torch.func.stack_module_state`` builds from ``K`` copies);
  ``vmap(functional_call)`` runs the model once for all clients, ``randomness="different"``
  giving each client its own dropout masks. Frozen parameters and buffers stay shared.
- **Same samples, same order.** Client ``k``'s samples, train/validation split and
  mini-batch order are those of the sequential path (the same seeds, the same
  :func:`~fedge.client.training.shuffled_batches`).
- **The task's loss.** ``ℓ_i`` is sample ``i``'s loss for the spec's task
  (:func:`fedge.models.tasks.loss` with ``reduction="none"``, against
  :func:`~fedge.models.tasks.targets`): cross-entropy, binary cross-entropy with logits,
  per label, or regression's loss in standard units.
- **Unequal sizes.** Step ``s`` of an epoch takes batch ``s`` of every client that still
  has one; a shorter batch is padded to the batch size ``B`` with weights ``m_i = 0``, and
  client ``k``'s loss is ``L_k = Σ_i m_i ℓ_i / Σ_i m_i c_i``, exactly its mean over its real
  samples (``c_i``: the weight of sample ``i``'s class for weighted cross-entropy, as
  ``reduction="mean"`` divides by it; else 1). The clients optimize
  ``Σ_k (L_k + μ/2 ||W_k − w_global||²)``, whose gradient with respect to ``W_k`` is
  client ``k``'s own (FedProx's term against the round's global weights).
- **Masked updates.** Only the clients with a batch in this step (and not stopped or
  failed) are updated: their rows of ``W`` and of the optimizer state are gathered,
  stepped and written back; every other client's parameters and optimizer state stay
  unchanged, its Adam step count included.
- **Optimizers** as torch.optim computes them (no weight decay), per client ``k`` with
  its own step count ``t_k``::

      Adam:  m ← lerp(m, g, 1 − β₁);  v ← β₂ v + (1 − β₂) g²
             w ← w − (lr / (1 − β₁^t)) · m / (√v / √(1 − β₂^t) + ε)
      SGD:   b ← g (first step), else b ← 0.9 b + g;  w ← w − lr · b

- **Local early stopping** per client on its own validation split, as
  :class:`~fedge.client.training.EarlyStopping` decides from its loss and the task's
  measures (:func:`~fedge.client.training.local_measures`): a client whose monitored
  measure has not improved for ``patience`` epochs stops and keeps its best weights, while
  the others go on; a client whose training loss is no longer finite fails alone, as
  sequentially.

On the CPU with one torch thread the results match sequential training within
:data:`TOLERANCE` (relative) for a deterministic model: batched kernels sum in another
order, so the last digits differ. With dropout the masks differ from sequential ones,
so results agree statistically. A model whose training updates buffers in place
(BatchNorm's running statistics; frozen BatchNorm layers, in eval mode, update none), or
that ``vmap`` cannot run, trains in the fallback grid, with one warning line that says
why.
"""

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Error, Message
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from torch import nn
from torch.func import functional_call, vmap

from fedge.client.app import (
    DataLoaderFn,
    client_key,
    federation_model,
    fit_to_model,
    train_reply,
    training_settings,
)
from fedge.client.data import LocalData
from fedge.client.training import (
    ADAM_BETAS,
    ADAM_EPS,
    SGD_MOMENTUM,
    EarlyStopping,
    LocalTraining,
    TrainReport,
    diverged,
    local_monitor,
    pick_device,
    shuffled_batches,
    training_inputs,
)
from fedge.config import RunConfig, TrainingSettings, default
from fedge.errors import FedgeError
from fedge.models import tasks
from fedge.models.exchange import frozen_from_config
from fedge.models.hf import is_pretrained
from fedge.models.measures import SCALARS, measures
from fedge.models.program import ProgramModel
from fedge.models.registry import ModelSpec, as_input_tensor
from fedge.protocol import ARRAYS, CONFIG
from fedge.simulations.inprocess import (
    CLIENT_APP_ERROR,
    FIRST_CLIENT_NODE_ID,
    SimulatedNodes,
    node_context,
)

log = logging.getLogger("fedge.simulations")

# Relative difference from sequential training (CPU, one torch thread, dropout 0) within
# which vectorized losses and weights agree; tests/test_vectorized.py holds it to this.
TOLERANCE = 1e-5
# Adam's weights agree less closely: in its first steps w moves by ≈ lr · g/|g| whatever
# |g|, so a gradient that is rounding noise (terms that cancel) moves its weight by up to
# ±lr in either direction. Sequential training itself moves as much between 1 and 2 torch
# threads; losses still agree within TOLERANCE.
ADAM_WEIGHT_TOLERANCE = 1e-3
EVAL_SAMPLES = 1 << 16  # validation samples evaluated in one batched call, at most
# Clients trained in one batched computation, at most: memory follows this many clients'
# weights, optimizer states and batches, however many a round samples (beyond about a
# hundred small clients, bigger batches were no faster per client on a CPU).
MAX_TOGETHER = 128


def check_vectorize(config: RunConfig, record_wire: Path | None = None) -> None:
    """``vectorize`` trains plain clients in this process; the settings that change what a
    client does beyond plain training are refused, by name, before anything starts."""
    if not config.simulation.vectorize:
        return
    if config.simulation.backend != "inprocess":
        raise FedgeError("vectorize needs backend inprocess: Ray's workers train each "
                         "client on its own")
    refused = [
        (config.privacy.secagg, "secagg", "SecAgg+ masks each client's update in its own stages"),
        (config.privacy.dp_clip_norm is not None, "dp_clip_norm",
         "clients clip their own updates"),
        (config.simulation.byzantine > 0 or config.simulation.attack is not None,
         "byzantine/attack", "attackers change their own data or updates"),
        (config.training.compress != "none", "compress", "clients quantize their own updates"),
        (record_wire is not None, "record_wire", "it records each client's own messages"),
        (is_pretrained(config.model.name), "a Hugging Face model",
         "its transformer trains one client at a time"),
    ]
    for given, setting, why in refused:
        if given:
            raise FedgeError(f"vectorize does not work with {setting} ({why}); drop one "
                             "of them")


class VectorizedGrid(SimulatedNodes):
    """Nodes ``1001 … 1000 + num_nodes``, whose train messages are trained together (see
    the module docstring) on samples from ``load_data``, on ``device``; every other
    message goes to the grid ``fallback()`` builds when first needed (``fallback_name``:
    how the log line names it)."""

    def __init__(self, fallback: Callable[[], Grid], num_nodes: int, load_data: DataLoaderFn,
                 device: str = default("device"), fallback_name: str = "in workers",
                 run_id: int = 1) -> None:
        super().__init__(num_nodes, run_id)
        self._make_fallback, self._fallback = fallback, None
        self.load_data, self.device, self.fallback_name = load_data, device, fallback_name
        self._replies: dict[str, Message] = {}
        self._problems: dict[tuple, str | None] = {}  # model → why vmap cannot batch it

    # --- Grid ---------------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        super().set_run(run)
        if self._fallback is not None:
            self._fallback.set_run(run)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Train the train messages of each model together, now; hand the others on."""
        messages = list(messages)
        groups: dict[tuple, list[int]] = {}
        others = []
        for position, message in enumerate(messages):
            if message.metadata.message_type == MessageType.TRAIN and not message.has_error():
                groups.setdefault(_model_key(message), []).append(position)
            else:
                others.append(position)
        ids: list[str | None] = [None] * len(messages)
        for positions in groups.values():
            group = [messages[p] for p in positions]
            if self._train_group(group):
                for p, message in zip(positions, group, strict=True):
                    ids[p] = message.metadata.message_id
            else:
                others.extend(positions)
        others.sort()
        if others:
            handed = self._grid().push_messages([messages[p] for p in others])
            for p, message_id in zip(others, handed, strict=True):
                ids[p] = message_id
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        mine = {i: self._replies.pop(i) for i in message_ids if i in self._replies}
        rest = [i for i in message_ids if i not in mine]
        if rest and self._fallback is not None:
            for reply in self._fallback.pull_messages(rest):
                mine[reply.metadata.reply_to_message_id] = reply
        return [mine[i] for i in message_ids if i in mine]

    def close(self) -> None:
        close = getattr(self._fallback, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "VectorizedGrid":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- training -----------------------------------------------------------------------

    def _grid(self) -> Grid:
        if self._fallback is None:
            self._fallback = self._make_fallback()
            self._fallback.set_run(self._run)
        return self._fallback

    def _train_group(self, group: list[Message]) -> bool:
        """Answer ``group`` (train messages for one model, with the same weights and
        settings) by training it together; False: the model cannot be batched."""
        for message in group:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        content = group[0].content
        config = content[CONFIG]
        try:
            spec, model = federation_model(config)
        except FedgeError as error:
            for message in group:
                self._fail(message, error)
            return True
        frozen = frozen_from_config(config)
        model.load_state_dict(content[ARRAYS].to_torch_state_dict())
        device = pick_device(self.device)
        key = (spec.to_json(), tuple(sorted(frozen)))
        if key not in self._problems:
            self._problems[key] = problem = batching_problem(model, spec, frozen, device)
            if problem:
                log.warning("--vectorize: model cannot be batched by vmap (%s); training "
                            "clients %s", problem, self.fallback_name)
        if self._problems[key]:
            return False
        trained, datas, settings, keys = [], [], [], []
        for message in group:
            node = message.metadata.dst_node_id
            if not 0 <= node - FIRST_CLIENT_NODE_ID < self.num_nodes:
                self._replies[message.metadata.message_id] = Message(
                    Error(CLIENT_APP_ERROR, f"no node {node}"), reply_to=message)
                continue
            context = node_context(node, self.num_nodes, self._run_id)
            try:
                data = fit_to_model(spec, self.load_data(context))
                setting = training_settings(config, context)
            except Exception as error:  # a failing client must not end the round
                self._fail(message, error)
                continue
            trained.append(message)
            datas.append(data)
            settings.append(setting)
            keys.append(client_key(context))
        if not trained:
            return True
        started = time.perf_counter()
        results = []
        for start in range(0, len(trained), MAX_TOGETHER):
            chunk = slice(start, start + MAX_TOGETHER)
            results += train_together(model, spec, datas[chunk], settings[chunk], frozen,
                                      device)
        seconds = time.perf_counter() - started  # they trained at once: the round took this
        for message, data, key, result in zip(trained, datas, keys, results, strict=True):
            if isinstance(result, Exception):
                self._fail(message, result)
                continue
            report, state = result
            self._replies[message.metadata.message_id] = Message(
                train_reply(state, frozen, len(data.train_x), report, seconds, key),
                reply_to=message)
        return True

    def _fail(self, message: Message, error: Exception) -> None:
        self._replies[message.metadata.message_id] = Message(
            Error(CLIENT_APP_ERROR, f"{type(error).__name__}: {error}"), reply_to=message)


def _model_key(message: Message) -> tuple:
    """Messages with equal keys train the same model from the same weights and settings
    (a round's messages share them; bytes hash once per object)."""
    config = tuple(sorted((name, tuple(value) if isinstance(value, list) else value)
                          for name, value in message.content[CONFIG].items()))
    arrays = tuple((name, array.dtype, tuple(array.shape), array.data)
                   for name, array in message.content[ARRAYS].items())
    return config, arrays


# --- the model as functions of its weights ------------------------------------------------

def _module(model: nn.Module | ProgramModel, training: bool) -> nn.Module:
    """The module that runs ``model`` in train or eval mode (a program has one of each)."""
    if isinstance(model, ProgramModel):
        return model.module(training)
    return model.train(training)


def _trainable(model: nn.Module | ProgramModel, frozen: set[str]) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in _module(model, True).named_parameters()
            if name not in frozen}


def batching_problem(model: nn.Module | ProgramModel, spec: ModelSpec, frozen: set[str],
                     device: torch.device) -> str | None:
    """Why ``vmap`` cannot train clients of ``model`` together, or None: a training step
    that updates buffers in place (one set of buffers cannot follow K clients), or any
    error of a batched training step and evaluation on a probe batch of zeros."""
    model.to(device)
    probe = torch.zeros((2, *spec.input_shape), dtype=as_input_tensor(spec, np.zeros(1)).dtype,
                        device=device)
    module = _module(model, True)
    buffers = dict(module.named_buffers())
    before = {name: value.clone() for name, value in buffers.items()}
    try:
        with torch.no_grad():
            module(probe)
    except Exception as error:
        return _first_line(error)
    finally:
        changed = [n for n, value in buffers.items() if not torch.equal(value, before[n])]
        with torch.no_grad():
            for name, value in buffers.items():
                value.copy_(before[name])
    if changed:
        if any(n.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
               for n in changed):
            return "BatchNorm updates running statistics in place"
        return f"training updates buffer {changed[0]} in place"
    try:
        stacked = {n: w.expand(2, *w.shape).clone().requires_grad_()
                   for n, w in _trainable(model, frozen).items()}
        batch = probe.expand(2, *probe.shape)
        logits = vmap(lambda w, x: functional_call(module, w, (x,)),
                      randomness="different")(stacked, batch)
        torch.autograd.grad(logits.float().sum(), list(stacked.values()), allow_unused=True)
        evaluation = _module(model, False)
        with torch.no_grad():
            vmap(lambda w, x: functional_call(evaluation, w, (x,)))(stacked, batch)
    except Exception as error:  # vmap's refusals have no common type
        return _first_line(error)
    return None


def _first_line(error: Exception) -> str:
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# --- training K clients together ---------------------------------------------------------

@dataclass
class _StackedSamples:
    """K clients' samples in one tensor; client k's are rows ``offsets[k] + 0..n_k-1``:
    inputs, the task's targets (:func:`fedge.models.tasks.targets`), and each sample's
    share of its mean loss's denominator (:func:`_loss_shares`)."""

    x: torch.Tensor
    y: torch.Tensor
    share: torch.Tensor
    offsets: list[int]
    sizes: list[int]

    @classmethod
    def of(cls, spec: ModelSpec, parts: list[tuple[np.ndarray, np.ndarray]],
           device: torch.device) -> "_StackedSamples":
        sizes = [len(x) for x, _ in parts]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        x = torch.cat([training_inputs(spec, x) for x, _ in parts]).to(device)
        y = torch.cat([tasks.targets(spec, y) for _, y in parts]).to(device)
        return cls(x, y, _loss_shares(spec, y), offsets, sizes)

    def padded(self, clients: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices ``(len(clients), max n_k)`` of these clients' samples in order,
        padded with each client's first row, and the mask of the real ones (0/1)."""
        width = max(self.sizes[k] for k in clients)
        columns = torch.arange(width)
        sizes = torch.tensor([self.sizes[k] for k in clients])
        mask = columns < sizes[:, None]
        rows = torch.tensor([self.offsets[k] for k in clients])[:, None] + columns * mask
        return rows.to(self.x.device), mask.to(self.x.device, torch.float32)


def _loss_shares(spec: ModelSpec, target: torch.Tensor) -> torch.Tensor:
    """What each sample adds to the denominator of a mean loss: the weight of its class for
    weighted cross-entropy (``reduction="mean"`` divides by their sum), else 1."""
    if spec.task == "classification" and spec.class_weights is not None:
        weights = torch.tensor(spec.class_weights, dtype=torch.float32, device=target.device)
        return weights[target]
    return torch.ones(len(target), device=target.device)


def _per_sample_loss(spec: ModelSpec, outputs: torch.Tensor, target: torch.Tensor
                     ) -> torch.Tensor:
    """The task's loss of every sample of ``(clients, samples, ...)`` outputs, shaped
    ``(clients, samples)``."""
    return tasks.loss(spec, outputs.flatten(0, 1), target.flatten(0, 1),
                      reduction="none").view(outputs.shape[:2])


class _Optimizer:
    """Adam or SGD (momentum) as :func:`fedge.client.training._optimizer` configures them,
    over stacked weights, stepping only the clients it is given (module docstring).

    Not ``torch.optim``: its optimizers keep one step count per parameter tensor and step
    the whole tensor, while one stacked tensor here holds ``K`` clients that step at
    different times (a client out of batches, stopped early or failed is not stepped, and
    Adam's bias correction needs each client's own ``t_k``). With ``torch.optim`` each
    client's weights would have to be a tensor of their own, copied into the stacked
    weights at every step. The arithmetic is torch's (the formulas above, in its order of
    operations); tests/test_vectorized.py checks it against ``torch.optim`` through the
    sequential path, which uses it."""

    def __init__(self, weights: dict[str, torch.Tensor], training: TrainingSettings) -> None:
        self.kind, self.lr = training.optimizer, training.lr
        self.steps = [0] * next(iter(weights.values())).shape[0] if weights else []
        self.first = {n: torch.zeros_like(w) for n, w in weights.items()}  # m, or b
        self.second = ({n: torch.zeros_like(w) for n, w in weights.items()}
                       if self.kind == "adam" else {})

    def step(self, weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
             clients: list[int], rows: torch.Tensor) -> None:
        device = rows.device
        if self.kind == "adam":
            beta1, beta2 = ADAM_BETAS
            steps = [self.steps[k] + 1 for k in clients]
            neg_size = torch.tensor([-(self.lr / (1 - beta1 ** t)) for t in steps],
                                    device=device)
            bc2_sqrt = torch.tensor([(1 - beta2 ** t) ** 0.5 for t in steps], device=device)
        for name, g in grads.items():
            shape = (-1,) + (1,) * (g.dim() - 1)
            w = weights[name][rows]
            if self.kind == "adam":
                m = torch.lerp(self.first[name][rows], g, 1 - beta1)
                v = torch.addcmul(self.second[name][rows] * beta2, g, g, value=1 - beta2)
                w = w + neg_size.view(shape) * m / (v.sqrt() / bc2_sqrt.view(shape) + ADAM_EPS)
                self.second[name][rows] = v
            else:
                # b starts at 0, so the first step's 0.9 · 0 + g is exactly torch's b ← g.
                m = torch.add(self.first[name][rows] * SGD_MOMENTUM, g)
                w = torch.add(w, m, alpha=-self.lr)
            self.first[name][rows] = m
            weights[name][rows] = w
        for k in clients:
            self.steps[k] += 1


def _joint_seed(settings: list[LocalTraining]) -> int:
    """One seed for the batched dropout masks, from every client's seed."""
    return int(np.random.SeedSequence([s.seed for s in settings]).generate_state(1)[0])


def train_together(model: nn.Module | ProgramModel, spec: ModelSpec, data: list[LocalData],
                   settings: list[LocalTraining], frozen: set[str], device: torch.device
                   ) -> list[tuple[TrainReport, dict[str, torch.Tensor]] | FedgeError]:
    """Train ``len(data)`` clients of ``model`` (holding the global weights; its frozen
    entries ``frozen``) together, as :func:`~fedge.client.training.train_locally` trains
    each (module docstring); ``settings`` differ only in their seeds. Per client: its
    report and its best weights (the model's state dict, on the CPU), or its error."""
    common, clients = settings[0], len(data)
    training = common.training
    torch.manual_seed(_joint_seed(settings))
    model.to(device)
    anchor = _trainable(model, frozen)
    weights = {n: w.expand(clients, *w.shape).clone() for n, w in anchor.items()}
    best = {n: w.clone() for n, w in weights.items()}
    optimizer = _Optimizer(weights, training)
    train = _StackedSamples.of(spec, [(d.train_x, d.train_y) for d in data], device)
    val = _StackedSamples.of(spec, [(d.val_x, d.val_y) for d in data], device)
    forward = vmap(lambda w, x: functional_call(_module(model, True), w, (x,)),
                   randomness="different")
    batches = [shuffled_batches(n, s) for n, s in zip(train.sizes, settings, strict=True)]

    val_labels = [d.val_y for d in data]
    everyone = list(range(clients))
    initial = _evaluate(model, spec, weights, val, val_labels, everyone)
    stopping = [EarlyStopping(measured, training.local_patience,
                              local_monitor(spec, labels, common.monitor))
                for measured, labels in zip(initial, val_labels, strict=True)]
    errors: dict[int, FedgeError] = {}
    epochs, train_loss = [0] * clients, [float("nan")] * clients
    running = everyone
    size = training.batch_size
    for epoch in range(1, training.local_epochs + 1):
        if not running:
            break
        order, mask = _epoch_order(train, running, [batches[k] for k in running], size)
        loss_sum = torch.zeros(len(running), dtype=torch.float64, device=device)
        for step in range(order.shape[1] // size):
            columns = slice(step * size, (step + 1) * size)
            active = [r for r, k in enumerate(running) if train.sizes[k] > step * size]
            picked = torch.tensor(active, device=device)
            rows = torch.tensor([running[r] for r in active], device=device)
            index, real = order[picked, columns], mask[picked, columns]
            leaves = {n: w[rows].requires_grad_() for n, w in weights.items()}
            per_sample = _per_sample_loss(spec, forward(leaves, train.x[index]),
                                          train.y[index])
            count = real.sum(dim=1)
            losses = (per_sample * real).sum(dim=1) / (train.share[index] * real).sum(dim=1)
            objective = losses.sum()
            if common.proximal_mu > 0:
                objective = objective + common.proximal_mu / 2 * sum(
                    ((leaves[n] - anchor[n]) ** 2).sum() for n in leaves)
            grads = torch.autograd.grad(objective, list(leaves.values()))
            optimizer.step(weights, dict(zip(leaves, grads, strict=True)),
                           [running[r] for r in active], rows)
            loss_sum[picked] += losses.detach().double() * count.double()
        for r, k in enumerate(running):
            epochs[k] = epoch
            train_loss[k] = float(loss_sum[r]) / train.sizes[k]
            if error := diverged(train_loss[k], epoch):
                errors[k] = error
        running = [k for k in running if k not in errors]
        improved, still = [], []
        measured = _evaluate(model, spec, weights, val, val_labels, running)
        for k, found in zip(running, measured, strict=True):
            better, stop = stopping[k].update(epoch, found)
            if better:
                improved.append(k)
            if not stop:
                still.append(k)
        if improved:
            rows = torch.tensor(improved, device=device)
            for n, w in weights.items():
                best[n][rows] = w[rows]
        running = still

    state = {n: v.detach().cpu() for n, v in model.state_dict().items()}
    best = {n: w.cpu() for n, w in best.items()}
    results: list = []
    for k in everyone:
        if k in errors:
            results.append(errors[k])
            continue
        s = stopping[k]
        report = TrainReport(train_loss=train_loss[k], val_loss=s.best["loss"],
                             val_measures={n: v for n, v in s.best.items() if n != "loss"},
                             epochs=epochs[k], best_epoch=s.best_epoch,
                             stopped_early=epochs[k] < training.local_epochs)
        results.append((report, {n: best[n][k] if n in best else v for n, v in state.items()}))
    return results


def _epoch_order(train: _StackedSamples, running: list[int], loaders: list, size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """This epoch's sample rows of each running client in its mini-batch order, padded to
    whole batches of ``size`` (``(len(running), steps · size)``), and their 0/1 mask."""
    steps = max(math.ceil(train.sizes[k] / size) for k in running)
    order = torch.zeros((len(running), steps * size), dtype=torch.int64)
    mask = torch.zeros((len(running), steps * size))
    for r, (k, loader) in enumerate(zip(running, loaders, strict=True)):
        n = train.sizes[k]
        order[r, :n] = torch.cat(list(loader)) + train.offsets[k]
        order[r, n:] = train.offsets[k]
        mask[r, :n] = 1.0
    return order.to(train.x.device), mask.to(train.x.device)


@torch.no_grad()
def _evaluate(model: nn.Module | ProgramModel, spec: ModelSpec,
              weights: dict[str, torch.Tensor], val: _StackedSamples,
              labels: list[np.ndarray], clients: list[int]) -> list[dict[str, float | None]]:
    """Each client's ``loss`` and the task's scalar measures on its validation samples
    (``labels``: every client's own), in eval mode, with its own weights: what
    :func:`fedge.client.training.local_measures` gives sequentially."""
    if not clients:
        return []
    module = _module(model, False)
    forward = vmap(lambda w, x: functional_call(module, w, (x,)))
    chunk = max(1, EVAL_SAMPLES // max(val.sizes[k] for k in clients))
    results = []
    for start in range(0, len(clients), chunk):
        part = clients[start:start + chunk]
        rows, mask = val.padded(part)
        picked = torch.tensor(part, device=rows.device)
        outputs = forward({n: w[picked] for n, w in weights.items()}, val.x[rows])
        per_sample = _per_sample_loss(spec, outputs, val.y[rows])
        loss_sum = (per_sample * mask).sum(dim=1).double().tolist()
        shares = (val.share[rows] * mask).sum(dim=1).double().tolist()
        for j, k in enumerate(part):
            scores = tasks.scores(spec, outputs[j, :val.sizes[k]]).float().cpu().numpy()
            found = measures(spec.task, scores, labels[k], threshold=spec.threshold,
                             names=spec.class_names, where=None)
            loss = loss_sum[j] / shares[j] if shares[j] > 0 else float("nan")
            results.append({"loss": loss, **{name: found.get(name)
                                             for name in SCALARS[spec.task]}})
    return results
