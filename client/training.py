"""Local training: mini-batches, dropout, and early stopping on local validation (loss,
or the measure the server monitors where this client's split defines it)."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedge.client.data import LocalData
from fedge.config import TrainingSettings
from fedge.errors import FedgeError
from fedge.models import tasks
from fedge.models.measures import SCALARS, improves, measures
from fedge.models.registry import ModelSpec, as_input_tensor


@dataclass(frozen=True)
class LocalTraining:
    """One round's local training: the run's training section as the server sent it, this
    node's seed for the round, FedProx's μ when the strategy sends one, and the measure
    the server monitors (``val_loss``, ``val_pr_auc``, ...)."""

    training: TrainingSettings = field(default_factory=TrainingSettings)
    seed: int = 0
    proximal_mu: float = 0.0
    monitor: str = "val_loss"


@dataclass(frozen=True)
class TrainReport:
    train_loss: float  # mean over the last epoch's mini-batches, dropout on
    val_loss: float
    # The task's scalar measures on the local validation split at the best epoch (None:
    # undefined there, e.g. a recall without positives).
    val_measures: dict[str, float | None]
    epochs: int
    best_epoch: int
    stopped_early: bool


def check_device(preference: str) -> None:
    """A clear error, before any training, for a device torch cannot use here."""
    if preference == "auto":
        return
    try:
        device = torch.device(preference)
    except (RuntimeError, ValueError):
        raise FedgeError(f"unknown device {preference!r}; use auto, cpu, cuda, cuda:N or "
                         "mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise FedgeError(f"device {preference!r} is not available on this machine "
                         "(--device auto picks what is)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise FedgeError(f"device {preference!r} does not exist: this machine has "
                         f"{torch.cuda.device_count()} CUDA devices")


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` takes CUDA, then Apple MPS, then the CPU; anything else is used as given."""
    if preference != "auto":
        check_device(preference)
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# The optimizers' settings, shared with the vectorized clients (fedge.simulations.vectorized).
SGD_MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def training_inputs(spec: ModelSpec, x: np.ndarray) -> torch.Tensor:
    """Samples as the model's input tensor, in plain row-major strides: a mini-batch taken
    from it by index then has the strides of one collated from single samples (a size-1
    channel axis with other strides would make convolutions pick another memory format,
    and other last digits)."""
    return as_input_tensor(spec, x).clone(memory_format=torch.contiguous_format)


def shuffled_batches(num_samples: int, settings: LocalTraining) -> DataLoader:
    """Each epoch's mini-batches as index tensors, reshuffled every time the loader is
    iterated, from a generator seeded by ``settings.seed``: one loader per client, kept
    across its epochs, gives the same order wherever that client trains."""
    return DataLoader(range(num_samples), batch_size=settings.training.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(settings.seed))


def local_measures(spec: ModelSpec, model: nn.Module, x: np.ndarray, y: np.ndarray,
                   device: torch.device) -> dict[str, float | None]:
    """``loss`` and the task's scalar measures on local samples (quietly: a client without
    some class is normal)."""
    loss, scores = tasks.evaluate(model, spec, x, y, device)
    found = measures(spec.task, scores, y, threshold=spec.threshold, names=spec.class_names,
                     where=None)
    return {"loss": loss, **{name: found.get(name) for name in SCALARS[spec.task]}}


# A local split's measure of classes (recall, PR-AUC, ...) needs this many samples of
# each class (positives and negatives per label): on fewer it is too coarse to stop on.
MIN_SAMPLES_PER_CLASS = 5


def local_monitor(spec: ModelSpec, val_y: np.ndarray, monitor: str) -> str:
    """What a client stops early on: the server's ``monitor`` where its validation split
    allows it (every class, or each label's positives and negatives, at least
    :data:`MIN_SAMPLES_PER_CLASS` times; any split for a regression measure), else
    ``val_loss``."""
    if monitor == "val_loss" or spec.task == "regression":
        return monitor
    y = np.asarray(val_y)
    if spec.task == "multilabel":
        positives = y.sum(axis=0)
        fewest = min(int(positives.min()), int((len(y) - positives).min()))
    else:
        fewest = int(np.bincount(y.astype(np.int64), minlength=spec.num_classes).min())
    return monitor if fewest >= MIN_SAMPLES_PER_CLASS else "val_loss"


class EarlyStopping:
    """Local early stopping: the received weights count as epoch 0; a client stops once its
    ``monitor``ed measure (:func:`local_monitor`) has not improved for ``patience``
    epochs, ties broken by the validation loss; on the validation loss when the measure
    is undefined at epoch 0."""

    def __init__(self, initial: dict[str, float | None], patience: int,
                 monitor: str = "val_loss") -> None:
        name = monitor.removeprefix("val_")
        self.measure = name if initial.get(name) is not None else "loss"
        self.best, self.best_epoch, self.patience = initial, 0, patience

    def update(self, epoch: int, measured: dict[str, float | None]) -> tuple[bool, bool]:
        """After ``epoch``: (its weights are the best so far, the client stops now)."""
        value = measured.get(self.measure)
        if value is not None and improves(self.measure, value, self.best.get(self.measure),
                                          loss=measured["loss"], best_loss=self.best["loss"]):
            self.best, self.best_epoch = measured, epoch
            return True, False
        return False, epoch - self.best_epoch >= self.patience


def diverged(train_loss: float, epoch: int) -> FedgeError | None:
    """The error for an epoch whose training loss is no longer finite, or None."""
    if math.isfinite(train_loss):
        return None
    return FedgeError(f"local training diverged: the training loss became {train_loss} in "
                      f"epoch {epoch}; a lower learning rate (lr) may help")


def _proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """``||w - w_global||²`` over all trainable parameters (FedProx)."""
    return sum(((w - w0) ** 2).sum() for w, w0 in zip(model.parameters(), anchor, strict=True))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as they are now, detached from further training steps."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _optimizer(model: nn.Module, settings: LocalTraining) -> torch.optim.Optimizer:
    """Over the trainable parameters: frozen ones (``--freeze``) do not require grad."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if settings.training.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=settings.training.lr, momentum=SGD_MOMENTUM)
    return torch.optim.Adam(trainable, lr=settings.training.lr, betas=ADAM_BETAS, eps=ADAM_EPS)


# Told after each local epoch: its number, its training loss, the local validation measures.
OnEpoch = Callable[[int, float, dict[str, float | None]], None]


def train_locally(model: nn.Module, spec: ModelSpec, data: LocalData, settings: LocalTraining,
                  device: torch.device, on_epoch: OnEpoch | None = None) -> TrainReport:
    """Train ``model`` in place on the task's loss (:mod:`fedge.models.tasks`) and leave it
    holding the weights with the best local validation measure (:class:`EarlyStopping`;
    the received weights count as epoch 0).

    Stops once it has not improved for ``settings.training.local_patience`` epochs, and
    refuses to go on (FedgeError) once the training loss is no longer finite.
    With ``proximal_mu > 0`` the loss gains ``mu/2 · ||w - w_global||²`` (FedProx).
    ``on_epoch`` hears every epoch (a device's own tracker, :mod:`fedge.client.tracking`).
    """
    torch.manual_seed(settings.seed)
    model.to(device)
    train_x = training_inputs(spec, data.train_x)
    train_y = tasks.targets(spec, data.train_y)
    batches = shuffled_batches(len(train_x), settings)
    anchor = [p.detach().clone() for p in model.parameters()]
    optimizer = _optimizer(model, settings)

    def validate() -> dict[str, float | None]:
        return local_measures(spec, model, data.val_x, data.val_y, device)

    stopping = EarlyStopping(validate(), settings.training.local_patience,
                             local_monitor(spec, data.val_y, settings.monitor))
    best_state = _snapshot(model)
    epoch, train_loss = 0, float("nan")
    for epoch in range(1, settings.training.local_epochs + 1):
        model.train()
        loss_sum, seen = 0.0, 0
        for batch in batches:
            inputs, labels = train_x[batch].to(device), train_y[batch].to(device)
            loss = tasks.loss(spec, model(inputs), labels)
            loss_sum, seen = loss_sum + loss.item() * len(labels), seen + len(labels)
            if settings.proximal_mu > 0:
                loss = loss + settings.proximal_mu / 2 * _proximal_term(model, anchor)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        train_loss = loss_sum / seen
        if error := diverged(train_loss, epoch):  # its weights would only dilute the average
            raise error
        measured = validate()
        if on_epoch is not None:
            on_epoch(epoch, train_loss, measured)
        improved, stop = stopping.update(epoch, measured)
        if improved:
            best_state = _snapshot(model)
        elif stop:
            break
    model.load_state_dict(best_state)
    return TrainReport(
        train_loss=train_loss, val_loss=stopping.best["loss"],
        val_measures={k: v for k, v in stopping.best.items() if k != "loss"}, epochs=epoch,
        best_epoch=stopping.best_epoch, stopped_early=epoch < settings.training.local_epochs,
    )
