"""Loss and accuracy of a classifier on raw samples: what benchmarks (and tests) compare
classifiers by; everything else takes the task's measures (:mod:`fedge.models.tasks`)."""

import numpy as np
import torch
from torch import nn

from fedge.errors import FedgeError
from fedge.models import tasks
from fedge.models.registry import ModelSpec


def evaluate_classifier(model: nn.Module, spec: ModelSpec, x: np.ndarray, y: np.ndarray,
                        device: torch.device | str = "cpu",
                        batch_size: int = 512) -> tuple[float, float]:
    """The mean loss (:func:`fedge.models.tasks.evaluate`: cross-entropy, with the spec's
    class weights if any) and the accuracy of the arg-max, in eval mode (dropout off)."""
    if spec.task != "classification":
        raise FedgeError(f"evaluate_classifier takes a classification model, not a "
                         f"{spec.task} one; use fedge.models.tasks.evaluate_measures")
    loss, scores = tasks.evaluate(model, spec, x, y, device, batch_size)
    hits = scores.argmax(axis=1) == np.asarray(y)
    return loss, float(hits.mean()) if len(hits) else float("nan")
