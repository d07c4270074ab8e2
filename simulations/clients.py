"""Simulated clients: each node's private samples, derived from its partition id.

Only this small description travels to workers (Ray pickles the ClientApp for every
message). Inside each process the data set and one index array per partition are cached;
a client's ``LocalData`` is rebuilt from them for every message and dropped after it, so
memory grows with the clients sampled in a round, not with the clients registered.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from flwr.app import Context

from fedge.client.data import LocalData, split_train_val
from fedge.simulations.datasets import load_dataset, split_federated
from fedge.simulations.partition import PartitionSpec, partition_indices


@dataclass(frozen=True)
class SimulatedClients:
    dataset: str
    partition: str
    num_clients: int
    seed: int
    val_fraction: float

    def local_data(self, context: Context) -> LocalData:
        return _local_data(self, int(context.node_config["partition-id"]))

    def partition_sizes(self) -> list[int]:
        return [len(p) for p in _partitions(self)]


@lru_cache(maxsize=4)
def _client_samples(dataset: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return split_federated(load_dataset(dataset, seed), seed).clients


@lru_cache(maxsize=4)
def _partitions(clients: SimulatedClients) -> list[np.ndarray]:
    _, y = _client_samples(clients.dataset, clients.seed)
    return partition_indices(y, clients.num_clients, PartitionSpec.parse(clients.partition),
                             clients.seed)


def _local_data(clients: SimulatedClients, partition_id: int) -> LocalData:
    x, y = _client_samples(clients.dataset, clients.seed)
    rows = _partitions(clients)[partition_id]
    return split_train_val(x[rows], y[rows], clients.val_fraction,
                           seed=clients.seed + partition_id)
