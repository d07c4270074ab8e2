"""What a network learns, as its spec says (:attr:`ModelSpec.task`): the targets its loss
compares it with, the loss, and its outputs in the user's terms.

- classification: one logit per class; cross-entropy, with class weights if given.
- binary: one logit, the positive class's; binary cross-entropy with logits
  (``pos_weight``: the positives' weight).
- multilabel: one logit per label, each its own binary cross-entropy (``pos_weight``
  per label).
- regression: one output per target, trained in standard units: ``(y − mean) / std`` of
  the server's validation targets; MSE, or Huber's loss. :func:`scores` (and the exported
  model) turn outputs back into the user's units: ``output · std + mean``.
"""

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedge.config import TaskSettings
from fedge.errors import FedgeError
from fedge.models.measures import measures, monitorable
from fedge.models.registry import ModelSpec, as_input_tensor

log = logging.getLogger("fedge")


def _stats(spec: ModelSpec, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    mean = spec.target_mean or (0.0,) * spec.outputs
    std = spec.target_std or (1.0,) * spec.outputs
    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


def targets(spec: ModelSpec, y: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Labels as the loss takes them: class ids (int64), or float32 rows of one value per
    output (regression's in standard units)."""
    if spec.task == "classification":
        return torch.as_tensor(y, dtype=torch.int64)
    rows = torch.as_tensor(y, dtype=torch.float32).reshape(len(y), spec.outputs)
    if spec.task == "regression":
        mean, std = _stats(spec, rows.device)
        rows = (rows - mean) / std
    return rows


def loss(spec: ModelSpec, outputs: torch.Tensor, target: torch.Tensor,
         reduction: str = "mean") -> torch.Tensor:
    """The task's loss of ``outputs`` against :func:`targets`; ``reduction="none"`` gives
    one loss per sample (the mean over its outputs)."""
    weights = (None if spec.class_weights is None else
               torch.tensor(spec.class_weights, dtype=torch.float32, device=outputs.device))
    if spec.task == "classification":
        return F.cross_entropy(outputs, target, weight=weights, reduction=reduction)
    outputs = outputs.reshape(target.shape)
    if spec.task == "regression":
        per_output = (F.huber_loss(outputs, target, reduction="none") if spec.loss == "huber"
                      else F.mse_loss(outputs, target, reduction="none"))
    else:
        per_output = F.binary_cross_entropy_with_logits(outputs, target, pos_weight=weights,
                                                        reduction="none")
    per_sample = per_output.mean(dim=-1)
    return per_sample if reduction == "none" else (
        per_sample.sum() if reduction == "sum" else per_sample.mean())


def scores(spec: ModelSpec, outputs: torch.Tensor) -> torch.Tensor:
    """Outputs as the user reads them: class probabilities, the positive class's
    probability (binary, one per sample), each label's probability, or predictions in the
    user's units (regression)."""
    if spec.task == "classification":
        return torch.softmax(outputs, dim=-1)
    if spec.task == "binary":
        return torch.sigmoid(outputs.reshape(-1))
    if spec.task == "multilabel":
        return torch.sigmoid(outputs)
    mean, std = _stats(spec, outputs.device)
    return outputs * std + mean


class InUserUnits(nn.Module):
    """A regression network whose outputs are in the user's units: what is exported."""

    def __init__(self, network: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.network = network
        mean, std = _stats(spec, "cpu")
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x) * self.std + self.mean


def for_export(network: nn.Module, spec: ModelSpec) -> nn.Module:
    """The module an exported model runs: logits for the tasks with classes and labels
    (a device takes the arg-max, or compares the sigmoid with the stored threshold), the
    user's units for regression."""
    return InUserUnits(network, spec) if spec.task == "regression" else network


def _loss_weight(spec: ModelSpec, target: torch.Tensor) -> float:
    """What a batch adds to the denominator of the mean loss: its samples, or for weighted
    cross-entropy their weights (as ``reduction="mean"`` divides in training)."""
    if spec.task == "classification" and spec.class_weights is not None:
        return float(torch.tensor(spec.class_weights)[target.cpu()].sum())
    return float(len(target))


@torch.no_grad()
def evaluate(model: nn.Module, spec: ModelSpec, x: np.ndarray, y: np.ndarray,
             device: torch.device | str = "cpu", batch_size: int | None = None
             ) -> tuple[float, np.ndarray]:
    """The mean loss over ``x`` (as training averages it) and every sample's
    :func:`scores`, in eval mode (dropout off), ``batch_size`` samples at a time (default
    512; 32 for a pretrained transformer, whose activations per sample are large: a
    device evaluating its split must not need more memory than training does)."""
    batch_size = batch_size or (32 if spec.pretrained is not None else 512)
    model.eval()
    total, weight, all_scores = 0.0, 0.0, []
    for start in range(0, len(x), batch_size):
        inputs = as_input_tensor(spec, x[start:start + batch_size]).to(device)
        outputs = model(inputs)
        target = targets(spec, y[start:start + batch_size]).to(device)
        total += loss(spec, outputs, target, reduction="sum").item()
        weight += _loss_weight(spec, target)
        all_scores.append(scores(spec, outputs).float().cpu().numpy())
    if not all_scores:
        return float("nan"), np.zeros((0, spec.outputs), dtype=np.float32)
    return total / weight, np.concatenate(all_scores)


def evaluate_measures(model: nn.Module, spec: ModelSpec, x: np.ndarray, y: np.ndarray,
                      device: torch.device | str = "cpu", where: str = "the data") -> dict:
    """``loss`` and every measure of the task (:func:`fedge.models.measures.measures`) at
    the spec's threshold."""
    mean_loss, all_scores = evaluate(model, spec, x, y, device)
    return {"loss": mean_loss,
            **measures(spec.task, all_scores, y, threshold=spec.threshold,
                       names=spec.class_names, where=where)}


def check_task_settings(task: TaskSettings) -> None:
    """Task settings that contradict each other: one clear error, before anything starts."""
    name = task.name
    if task.positive is not None and name != "binary":
        raise FedgeError(f"--positive names binary's positive class, but the task is {name}")
    if task.threshold is not None and name not in ("binary", "multilabel"):
        raise FedgeError(f"--threshold is for binary and multilabel tasks, not {name}")
    if task.loss != "auto" and name != "regression":
        raise FedgeError(f"--loss {task.loss} is a regression loss; a {name} task trains with "
                         "cross-entropy (--loss auto)")
    if task.class_weights != "none" and name == "regression":
        raise FedgeError("--class-weights weighs classes; a regression task has none")
    if task.monitor not in monitorable(name):
        raise FedgeError(f"--monitor {task.monitor} is no measure of a {name} task; choose "
                         f"one of: {', '.join(monitorable(name))}")


def with_task(spec: ModelSpec, task: TaskSettings, val_y: np.ndarray) -> ModelSpec:
    """``spec`` learning ``task``: its loss, its class weights (``balanced``: from the
    server's validation labels, so that no client's class counts leave the client), and
    for regression the validation targets' mean and spread."""
    check_task_settings(task)
    update: dict[str, object] = {"task": task.name, "loss": task.loss}
    learning = spec.model_copy(update=update)
    if task.name == "regression":
        rows = np.asarray(val_y, dtype=np.float64).reshape(len(val_y), -1)
        std = rows.std(axis=0)
        update |= {"target_mean": tuple(rows.mean(axis=0).tolist()),
                   "target_std": tuple(np.where(std > 1e-12, std, 1.0).tolist())}
    elif task.class_weights != "none":
        update["class_weights"] = _class_weights(learning, task.class_weights, val_y)
    return spec.model_copy(update=update)


def _class_weights(spec: ModelSpec, given: str, val_y: np.ndarray) -> tuple[float, ...]:
    """The loss's weights: one per class (classification), the positives' weight
    (binary: one; multilabel: one per label)."""
    if given == "balanced":
        return _balanced(spec, np.asarray(val_y))
    weights = tuple(float(w) for w in given.split(","))
    if spec.task == "binary" and len(weights) == 2:  # negatives', positives' → pos_weight
        return (weights[1] / weights[0],)
    if len(weights) != spec.outputs:
        what = {"classification": "one per class", "binary": "the positives' weight (or "
                "the negatives' and the positives')", "multilabel": "one per label"}
        raise FedgeError(f"--class-weights gives {len(weights)} weights, but a {spec.task} "
                         f"task with {spec.num_classes} "
                         f"{'labels' if spec.task == 'multilabel' else 'classes'} takes "
                         f"{what[spec.task]}")
    return weights


def _balanced(spec: ModelSpec, y: np.ndarray) -> tuple[float, ...]:
    """``n / (classes · n_c)`` per class, or ``negatives / positives`` per output, counted
    in the server's validation labels; a class they lack keeps weight 1."""
    names = spec.class_names or tuple(str(k) for k in range(spec.num_classes))
    if spec.task == "classification":
        counts = np.bincount(y.astype(np.int64), minlength=spec.num_classes)
        weights = [len(y) / (spec.num_classes * c) if c else 1.0 for c in counts]
        lacking = [names[k] for k, c in enumerate(counts) if c == 0]
    else:
        positives = y.reshape(len(y), -1).sum(axis=0)
        weights = [(len(y) - p) / p if 0 < p < len(y) else 1.0 for p in positives]
        lacking = [names[-1] if spec.task == "binary" else names[k]
                   for k, p in enumerate(positives) if not 0 < p < len(y)]
    if lacking:
        log.warning("warning: --class-weights balanced: the server's validation data lacks "
                    "(or holds only) %s; weight 1 for it", ", ".join(map(repr, lacking)))
    return tuple(float(w) for w in weights)
