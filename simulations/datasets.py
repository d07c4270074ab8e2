"""Built-in data sets for simulation, and the server/test hold-outs.

``digits`` and ``breast_cancer`` are real data shipped inside scikit-learn.
``synthetic-sensor`` and ``synthetic-text`` are generated: no real data of that kind
ships with an installed package, and they are labelled synthetic wherever they appear.
All are classification data sets; those of 2 classes serve a binary task too
(:func:`for_task`).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from sklearn.model_selection import train_test_split

from fedge.datafiles import binary_labels
from fedge.errors import FedgeError


@dataclass(frozen=True)
class Dataset:
    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    default_model: str
    synthetic: bool
    vocab_size: int | None = None
    class_names: tuple[str, ...] | None = None  # binary: (negative, positive)


@dataclass(frozen=True)
class FederatedSplit:
    """Samples for the clients, a server validation set, and a test set nobody trains on."""

    clients: tuple[np.ndarray, np.ndarray]
    server_val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None, :, :]  # raw 0..16 intensities, 1×8×8
    return Dataset("digits", x, digits.target.astype(np.int64), 10, "cnn", synthetic=False)


def _breast_cancer(seed: int) -> Dataset:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return Dataset("breast_cancer", data.data.astype(np.float32),
                   data.target.astype(np.int64), 2, "mlp", synthetic=False)


def _synthetic_sensor(seed: int, samples: int = 1600, length: int = 64) -> Dataset:
    """SYNTHETIC machine-health windows: vibration, temperature, motor current.

    Each window comes from a machine at a hidden degradation level d ∈ [0, 1]:
    vibration amplitude and impulse rate, temperature and current ripple rise with d.
    Label 1 (failure imminent) when d > 0.6, else 0 (healthy).
    """
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.0, 1.0, samples)[:, None]
    t = np.arange(length)[None, :]
    phase = rng.uniform(0, 2 * np.pi, (samples, 1))
    impulses = rng.random((samples, length)) < 0.02 + 0.1 * d
    vibration = ((1 + 1.5 * d) * np.sin(2 * np.pi * t / 8 + phase)
                 + 3 * d * impulses + rng.normal(0, 0.6, (samples, length)))
    temperature = 40 + 8 * d + 0.05 * d * t + rng.normal(0, 1.5, (samples, length))
    current = 5 + (0.2 + d) * np.sin(2 * np.pi * t / 16) + rng.normal(0, 0.4, (samples, length))
    x = np.stack([vibration, temperature, current], axis=1).astype(np.float32)
    y = (d[:, 0] > 0.6).astype(np.int64)
    return Dataset("synthetic-sensor", x, y, 2, "sensor1d", synthetic=True)


def _synthetic_text(seed: int, samples: int = 2000, length: int = 16,
                    num_classes: int = 4, vocab_size: int = 64) -> Dataset:
    """SYNTHETIC token sequences: each class has its own keywords amid shared filler.

    Token 0 is padding, 1..39 filler, then six keywords per class. A sequence holds
    2–4 keywords of its class, sometimes one of another class, and is 6–16 tokens long.
    """
    rng = np.random.default_rng(seed)
    filler = np.arange(1, 40)
    keywords = 40 + np.arange(num_classes * 6).reshape(num_classes, 6)
    x = np.zeros((samples, length), dtype=np.int64)
    y = rng.integers(0, num_classes, samples)
    for i, label in enumerate(y):
        size = int(rng.integers(6, length + 1))
        tokens = rng.choice(filler, size)
        slots = rng.choice(size, int(rng.integers(2, 5)), replace=False)
        tokens[slots] = rng.choice(keywords[label], len(slots))
        if rng.random() < 0.3:
            other = (label + int(rng.integers(1, num_classes))) % num_classes
            tokens[rng.integers(size)] = rng.choice(keywords[other])
        x[i, :size] = tokens
    return Dataset("synthetic-text", x, y.astype(np.int64), num_classes, "tinytext",
                   synthetic=True, vocab_size=vocab_size)


DATASETS: dict[str, Callable[[int], Dataset]] = {
    "digits": _digits,
    "breast_cancer": _breast_cancer,
    "synthetic-sensor": _synthetic_sensor,
    "synthetic-text": _synthetic_text,
}


def load_dataset(name: str, seed: int = 0) -> Dataset:
    if name not in DATASETS:
        raise FedgeError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name](seed)


# The class names of the data sets whose classes have names, in id order.
NAMES = {"breast_cancer": ("malignant", "benign")}


def for_task(data: Dataset, task: str, positive: str | None = None) -> Dataset:
    """``data`` for ``task``: as it is for classification; for a binary task its 2 classes
    as 0/1, positive 1 (``positive`` by name or id; by default the rarest class:
    malignant in breast_cancer, failure in synthetic-sensor). Multilabel and regression
    tasks need the user's own data."""
    if task == "classification":
        return data
    if task != "binary":
        raise FedgeError(f"data set {data.name!r} is a classification data set; a {task} "
                         "task needs your own data: give it with --data or --client-data")
    (y,), names = binary_labels([data.y], NAMES.get(data.name), positive, data.y,
                                f"data set {data.name!r}")
    return replace(data, y=y, num_classes=2, class_names=names)


def split_federated(data: Dataset, seed: int, server_fraction: float = 0.15,
                    test_fraction: float = 0.15) -> FederatedSplit:
    """Stratified split into client samples, server validation and test sets."""
    x_rest, x_test, y_rest, y_test = train_test_split(
        data.x, data.y, test_size=test_fraction, stratify=data.y, random_state=seed)
    x_clients, x_val, y_clients, y_val = train_test_split(
        x_rest, y_rest, test_size=server_fraction / (1 - test_fraction), stratify=y_rest,
        random_state=seed)
    return FederatedSplit((x_clients, y_clients), (x_val, y_val), (x_test, y_test))
