"""A client's private samples, split into local training and validation sets."""

from dataclasses import dataclass

import numpy as np
from flwr.app import Context

from fedge.errors import FedgeError


@dataclass(frozen=True)
class LocalData:
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    # The names the ids in train_y/val_y stand for, in id order (None: unnamed ids). A
    # deployed device's own names (sorted, from its files); the federation's may differ.
    class_names: tuple[str, ...] | None = None


def split_train_val(x: np.ndarray, y: np.ndarray, val_fraction: float,
                    seed: int = 0, class_names: tuple[str, ...] | None = None) -> LocalData:
    """Hold out ``val_fraction`` of the samples (at least one) for local early stopping."""
    if len(x) != len(y):
        raise FedgeError(f"{len(x)} samples but {len(y)} labels")
    if len(x) < 2:
        raise FedgeError(f"a client needs at least 2 samples (train + validation), has {len(x)}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = min(max(1, round(val_fraction * len(x))), len(x) - 1)
    val, train = order[:n_val], order[n_val:]
    return LocalData(x[train], y[train], x[val], y[val], class_names)


def node_seed(base_seed: int, server_round: int, context: Context) -> int:
    """Distinct, reproducible randomness for every client in every round: its shuffling
    and dropout, and the rounding of its compressed update."""
    node = int(context.node_config.get("partition-id", context.node_id))
    return int(np.random.SeedSequence([base_seed, server_round, node]).generate_state(1)[0])
