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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedge.models.measures import measures
from fedge.models.registry import ModelSpec, as_input_tensor


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
             device: torch.device | str = "cpu", batch_size: int = 512
             ) -> tuple[float, np.ndarray]:
    """The mean loss over ``x`` (as training averages it) and every sample's
    :func:`scores`, in eval mode (dropout off)."""
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
