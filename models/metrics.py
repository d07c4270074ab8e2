"""Loss and accuracy of a classifier on raw samples, shared by clients and server."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedge.models.registry import ModelSpec, as_input_tensor


@torch.no_grad()
def evaluate_classifier(model: nn.Module, spec: ModelSpec, x: np.ndarray, y: np.ndarray,
                        device: torch.device | str = "cpu",
                        batch_size: int = 512) -> tuple[float, float]:
    """Mean cross-entropy and accuracy, in eval mode (dropout off)."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        inputs = as_input_tensor(spec, x[start:start + batch_size]).to(device)
        labels = torch.as_tensor(y[start:start + batch_size], dtype=torch.int64, device=device)
        logits = model(inputs)
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
    return total_loss / len(x), correct / len(x)
