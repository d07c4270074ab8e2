"""Local training: mini-batches, dropout, and early stopping on local validation loss."""

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedge.client.data import LocalData
from fedge.errors import FedgeError
from fedge.models.metrics import evaluate_classifier
from fedge.models.registry import ModelSpec, as_input_tensor


@dataclass(frozen=True)
class LocalTraining:
    """One round's local-training settings, as sent by the server."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.003
    optimizer: Literal["adam", "sgd"] = "adam"
    patience: int = 2
    proximal_mu: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class TrainReport:
    train_loss: float  # mean over the last epoch's mini-batches, dropout on
    val_loss: float
    val_accuracy: float
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


def _proximal_term(model: nn.Module, anchor: list[torch.Tensor]) -> torch.Tensor:
    """``||w - w_global||²`` over all trainable parameters (FedProx)."""
    return sum(((w - w0) ** 2).sum() for w, w0 in zip(model.parameters(), anchor, strict=True))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as they are now, detached from further training steps."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _optimizer(model: nn.Module, settings: LocalTraining) -> torch.optim.Optimizer:
    """Over the trainable parameters: frozen ones (``--freeze``) do not require grad."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=settings.lr, momentum=0.9)
    return torch.optim.Adam(trainable, lr=settings.lr)


def train_locally(model: nn.Module, spec: ModelSpec, data: LocalData, settings: LocalTraining,
                  device: torch.device) -> TrainReport:
    """Train ``model`` in place and leave it holding the weights with the best local
    validation loss (the received weights count as epoch 0).

    Stops once validation loss has not improved for ``settings.patience`` epochs, and
    refuses to go on (FedgeError) once the training loss is no longer finite.
    With ``proximal_mu > 0`` the loss gains ``mu/2 · ||w - w_global||²`` (FedProx).
    """
    torch.manual_seed(settings.seed)
    model.to(device)
    loader = DataLoader(
        TensorDataset(as_input_tensor(spec, data.train_x), torch.as_tensor(data.train_y)),
        batch_size=settings.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    anchor = [p.detach().clone() for p in model.parameters()]
    optimizer = _optimizer(model, settings)

    best_val_loss, best_val_acc = evaluate_classifier(model, spec, data.val_x, data.val_y, device)
    best_state, best_epoch = _snapshot(model), 0
    epoch, train_loss = 0, float("nan")
    for epoch in range(1, settings.epochs + 1):
        model.train()
        loss_sum, seen = 0.0, 0
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            loss = F.cross_entropy(model(inputs), labels)
            loss_sum, seen = loss_sum + loss.item() * len(labels), seen + len(labels)
            if settings.proximal_mu > 0:
                loss = loss + settings.proximal_mu / 2 * _proximal_term(model, anchor)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        train_loss = loss_sum / seen
        if not math.isfinite(train_loss):  # its weights would only dilute the average
            raise FedgeError(f"local training diverged: the training loss became "
                             f"{train_loss} in epoch {epoch}; a lower learning rate (lr) "
                             "may help")
        val_loss, val_acc = evaluate_classifier(model, spec, data.val_x, data.val_y, device)
        if val_loss < best_val_loss:
            best_val_loss, best_val_acc, best_epoch = val_loss, val_acc, epoch
            best_state = _snapshot(model)
        elif epoch - best_epoch >= settings.patience:
            break
    model.load_state_dict(best_state)
    return TrainReport(
        train_loss=train_loss, val_loss=best_val_loss, val_accuracy=best_val_acc,
        epochs=epoch, best_epoch=best_epoch, stopped_early=epoch < settings.epochs,
    )
