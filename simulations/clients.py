"""Simulated clients: each node's private samples, derived from its partition id.

Only this small description travels to workers (Ray pickles the ClientApp for every
message). Inside each process the data set (built-in, or your own files: see
:mod:`fedge.simulations.userdata`) and one index array per partition are cached;
a client's ``LocalData`` is rebuilt from them for every message and dropped after it, so
memory grows with the clients sampled in a round, not with the clients registered.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from flwr.app import Context

from fedge.client.data import LocalData, label_strata, split_train_val
from fedge.config import default
from fedge.simulations.datasets import for_task, load_dataset, split_federated
from fedge.simulations.partition import PartitionSpec, partition_indices
from fedge.simulations.userdata import UserData, split_user_data


@dataclass(frozen=True)
class SimulatedClients:
    """A built-in data set (``dataset``, for ``task``), or your own files (``data``, a
    description that holds paths, never arrays, and its task), split among
    ``num_clients``."""

    dataset: str | None
    partition: str
    num_clients: int
    seed: int
    val_fraction: float
    val_share: float = default("val_share")
    test_share: float = default("test_share")
    data: UserData | None = None
    task: str = default("task")
    positive: str | None = default("positive")

    def local_data(self, context: Context) -> LocalData:
        return _local_data(self, int(context.node_config["partition-id"]))

    def partition_sizes(self) -> list[int]:
        return [len(p) for p in _partitions(self)]


@lru_cache(maxsize=4)
def _builtin_client_samples(dataset: str, seed: int, val_share: float, test_share: float,
                            task: str, positive: str | None) -> tuple[np.ndarray, np.ndarray]:
    data = for_task(load_dataset(dataset, seed), task, positive)
    return split_federated(data, seed, val_share, test_share).clients


def _client_samples(clients: SimulatedClients) -> tuple[np.ndarray, np.ndarray]:
    if clients.data is not None:
        split = split_user_data(clients.data)
        return split.x, split.y
    return _builtin_client_samples(clients.dataset, clients.seed, clients.val_share,
                                   clients.test_share, clients.task, clients.positive)


@lru_cache(maxsize=4)
def _partitions(clients: SimulatedClients) -> list[np.ndarray]:
    if clients.data is not None and clients.data.natural:
        return split_user_data(clients.data).partitions
    _, y = _client_samples(clients)
    # Label skew (dirichlet, shards) of a multilabel or regression task: over its strata.
    return partition_indices(label_strata(y), clients.num_clients,
                             PartitionSpec.parse(clients.partition), clients.seed)


def _local_data(clients: SimulatedClients, partition_id: int) -> LocalData:
    x, y = _client_samples(clients)
    rows = _partitions(clients)[partition_id]
    names = None if clients.data is None else split_user_data(clients.data).class_names
    return split_train_val(x[rows], y[rows], clients.val_fraction,
                           seed=clients.seed + partition_id, class_names=names)
