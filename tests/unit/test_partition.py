"""Splitting client samples across simulated clients."""

import numpy as np
import pytest

from fedge.client.data import label_strata
from fedge.errors import FedgeError
from fedge.simulations.datasets import load_dataset, split_federated
from fedge.simulations.partition import PartitionSpec, partition_indices

LABELS = split_federated(load_dataset("digits"), seed=0).clients[1]


def _label_entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels, minlength=10) / len(labels)
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


@pytest.mark.parametrize("text, expected", [
    ("iid", PartitionSpec("iid")),
    ("dirichlet:0.5", PartitionSpec("dirichlet", alpha=0.5)),
    ("dirichlet:1e-1", PartitionSpec("dirichlet", alpha=0.1)),
    ("shards:2", PartitionSpec("shards", shards=2)),
])
def test_partition_specs_parse(text, expected):
    assert PartitionSpec.parse(text) == expected


@pytest.mark.parametrize("text", ["", "dirichlet", "dirichlet:", "dirichlet:abc",
                                  "dirichlet:-1", "dirichlet:0", "shards:0", "shards:x",
                                  "iid:3", "random"])
def test_malformed_partition_specs_are_rejected_with_the_accepted_forms(text):
    with pytest.raises(FedgeError, match=r"iid.*dirichlet:ALPHA.*shards:K"):
        PartitionSpec.parse(text)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "dirichlet:0.1"])
def test_every_sample_goes_to_exactly_one_client(spec):
    parts = partition_indices(LABELS, 10, PartitionSpec.parse(spec), seed=0)
    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert sorted(joined) == list(range(len(LABELS)))


def test_iid_clients_are_equal_sized_and_label_balanced():
    parts = partition_indices(LABELS, 10, PartitionSpec.parse("iid"), seed=0)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert min(_label_entropy(LABELS[p]) for p in parts) > 0.9 * np.log(10)


def test_smaller_dirichlet_alpha_means_more_label_skew():
    def mean_entropy(alpha: float) -> float:
        parts = partition_indices(LABELS, 10, PartitionSpec("dirichlet", alpha=alpha), seed=0)
        return float(np.mean([_label_entropy(LABELS[p]) for p in parts]))

    assert mean_entropy(0.1) < mean_entropy(0.5) < mean_entropy(100.0)


def test_label_shards_give_each_client_few_labels():
    parts = partition_indices(LABELS, 10, PartitionSpec.parse("shards:2"), seed=0)
    assert all(len(np.unique(LABELS[p])) <= 4 for p in parts)
    assert np.mean([len(np.unique(LABELS[p])) for p in parts]) < 3.5


def test_partitions_depend_on_the_seed_only():
    spec = PartitionSpec.parse("dirichlet:0.5")
    first, again, other = (partition_indices(LABELS, 10, spec, seed=s) for s in (0, 0, 1))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_more_clients_than_samples_is_an_error():
    with pytest.raises(FedgeError, match="clients but only"):
        partition_indices(LABELS[:5], 10, PartitionSpec.parse("iid"), seed=0)


def test_held_out_sets_are_stratified_and_disjoint_from_client_samples():
    data = load_dataset("digits")
    split = split_federated(data, seed=0)
    sizes = [len(part[1]) for part in (split.clients, split.server_val, split.test)]
    assert sum(sizes) == len(data.y)
    assert sizes[1] == sizes[2] == pytest.approx(0.15 * len(data.y), abs=2)
    for _, labels in (split.server_val, split.test):
        assert set(labels) == set(range(10))


def test_multilabel_and_regression_labels_skew_clients_by_their_strata():
    rng = np.random.default_rng(0)
    targets = rng.normal(size=(300, 2)).astype(np.float32)
    labels = (rng.random((300, 4)) < [0.5, 0.3, 0.1, 0.02]).astype(np.int64)
    for y in (targets, labels):
        strata = label_strata(y)
        assert strata.shape == (300,) and strata.dtype == np.int64
        parts = partition_indices(strata, 5, PartitionSpec.parse("dirichlet:0.5"), seed=0)
        assert sorted(np.concatenate(parts)) == list(range(300))
    assert set(label_strata(targets).tolist()) == set(range(10))  # deciles of the first
    rarest = label_strata(labels)
    assert (rarest[labels[:, 3] == 1] == 3).all()
    assert (rarest[labels.sum(axis=1) == 0] == 4).all()  # no label: a stratum of its own
