"""A client's private samples, split into local training and validation sets, and the
strata that keep such splits honest: every class (label, range of targets) on both sides
when there are samples enough."""

from dataclasses import dataclass

import numpy as np
from flwr.app import Context
from sklearn.model_selection import train_test_split

from fedge.errors import FedgeError

QUANTILE_BINS = 10  # regression: strata of the first target, before rare ones merge


@dataclass(frozen=True)
class LocalData:
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    # The names the labels in train_y/val_y stand for: classes in id order, or a
    # multilabel task's labels, a regression's targets in column order (None: unnamed).
    # A deployed device's own names (from its files); the federation's may differ.
    class_names: tuple[str, ...] | None = None


def split_train_val(x: np.ndarray, y: np.ndarray, val_fraction: float,
                    seed: int = 0, class_names: tuple[str, ...] | None = None) -> LocalData:
    """Hold out ``val_fraction`` of the samples (at least one) for local early stopping,
    stratified by label (:func:`label_strata`: class ids, a multilabel sample's rarest
    label; regression's targets are split at random) when the strata allow it, else at
    random; both seeded."""
    if len(x) != len(y):
        raise FedgeError(f"{len(x)} samples but {len(y)} labels")
    if len(x) < 2:
        raise FedgeError(f"a client needs at least 2 samples (train + validation), has {len(x)}")
    n_val = min(max(1, round(val_fraction * len(x))), len(x) - 1)
    rows = np.arange(len(x))
    strata = None if np.asarray(y).dtype.kind == "f" else label_strata(y)
    if strata is not None and np.asarray(y).ndim == 2:  # derived strata: merge to fit
        strata = merged_strata(strata, min(n_val, len(x) - n_val))
    elif strata is not None:
        strata = pooled_singletons(strata)
    try:
        train, val = train_test_split(rows, test_size=n_val, stratify=strata, random_state=seed)
    except ValueError:  # a lone sample of a class, or more classes than validation samples
        order = np.random.default_rng(seed).permutation(len(x))
        val, train = order[:n_val], order[n_val:]
    return LocalData(x[train], y[train], x[val], y[val], class_names)


def label_strata(y: np.ndarray, bins: int = QUANTILE_BINS) -> np.ndarray:
    """Each sample's stratum, an int: its class id (labels of shape (n,)); for a 0/1
    matrix (multilabel) the rarest label it has, ``L`` when it has none; for float
    targets (regression) the quantile bin of its first target, of ``bins`` bins."""
    y = np.asarray(y)
    if y.ndim == 1:
        return y.astype(np.int64)
    if y.dtype.kind == "f":
        first = y[:, 0]
        edges = np.unique(np.quantile(first, np.linspace(0, 1, bins + 1)[1:-1]))
        return np.searchsorted(edges, first, side="right").astype(np.int64)
    counts = y.sum(axis=0)
    rarity = np.where(y > 0, counts[None, :], np.iinfo(np.int64).max)
    rarest = np.argmin(rarity, axis=1)
    return np.where(y.any(axis=1), rarest, y.shape[1]).astype(np.int64)


def pooled_singletons(strata: np.ndarray) -> np.ndarray:
    """``strata`` with the strata of a single sample pooled into one, when there are at
    least two such samples: a stratified split needs 2 samples of every stratum. A lone
    one is left alone, for the split to refuse."""
    values, codes, counts = np.unique(strata, return_inverse=True, return_counts=True)
    single = counts == 1
    if single.sum() < 2:
        return strata
    pooled = np.where(single, len(values), np.arange(len(values)))
    return pooled[codes.reshape(-1)]


def merged_strata(strata: np.ndarray, most: int) -> np.ndarray:
    """``strata`` the labels defined (a multilabel sample's rarest label, a target's
    quantile bin), merged until every stratum holds 2 samples or more and at most
    ``most`` strata remain (a stratified split puts a sample of each on both sides):
    the smallest stratum joins the next smallest, repeatedly. One stratum at least."""
    _, codes, counts = np.unique(strata, return_inverse=True, return_counts=True)
    owner = np.arange(len(counts))  # each original stratum's merged stratum
    sizes = {k: int(c) for k, c in enumerate(counts)}
    while len(sizes) > 1 and (min(sizes.values()) < 2 or len(sizes) > max(most, 1)):
        smallest, next_smallest = sorted(sizes, key=lambda k: (sizes[k], k))[:2]
        sizes[next_smallest] += sizes.pop(smallest)
        owner[owner == smallest] = next_smallest
    return owner[codes.reshape(-1)]


def node_seed(base_seed: int, server_round: int, context: Context) -> int:
    """Distinct, reproducible randomness for every client in every round: its shuffling
    and dropout, and the rounding of its compressed update."""
    node = int(context.node_config.get("partition-id", context.node_id))
    return int(np.random.SeedSequence([base_seed, server_round, node]).generate_state(1)[0])
