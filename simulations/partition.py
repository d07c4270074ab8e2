"""Split client samples across simulated clients with flwr-datasets' partitioners."""

import re
import warnings
from dataclasses import dataclass

import numpy as np

from fedge.errors import FedgeError

_SPEC = re.compile(r"^(?:(iid)|dirichlet:(?P<alpha>[0-9.eE+-]+)|shards:(?P<shards>[0-9]+))$")


@dataclass(frozen=True)
class PartitionSpec:
    """``iid``, ``dirichlet:ALPHA`` (label skew, smaller is more skewed) or ``shards:K``
    (each client holds K label-sorted shards)."""

    kind: str
    alpha: float | None = None
    shards: int | None = None

    @classmethod
    def parse(cls, text: str) -> "PartitionSpec":
        match = _SPEC.match(text.strip())
        alpha = float(match["alpha"]) if match and match["alpha"] else None
        shards = int(match["shards"]) if match and match["shards"] else None
        if not match or (alpha is not None and not alpha > 0) or shards == 0:
            raise FedgeError(f"malformed partition {text!r}: use 'iid', 'dirichlet:ALPHA' "
                             "with ALPHA > 0, or 'shards:K' with K >= 1")
        kind = "iid" if match[1] else "dirichlet" if alpha is not None else "shards"
        return cls(kind, alpha, shards)


def partition_indices(labels: np.ndarray, num_partitions: int, spec: PartitionSpec,
                      seed: int) -> list[np.ndarray]:
    """Indices into ``labels`` for each of ``num_partitions`` clients."""
    # flwr-datasets pulls in pandas/pyarrow; import it only when partitioning.
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    if num_partitions > len(labels):
        raise FedgeError(f"{num_partitions} clients but only {len(labels)} client samples")
    if spec.kind == "shards" and num_partitions * spec.shards > len(labels):
        raise FedgeError(f"shards:{spec.shards} for {num_partitions} clients needs "
                         f"{num_partitions * spec.shards} shards of at least one sample, "
                         f"but there are {len(labels)} client samples")
    order = np.random.default_rng(seed).permutation(len(labels))
    table = datasets.Dataset.from_dict({"label": labels[order], "index": order})
    if spec.kind == "iid":
        partitioner = IidPartitioner(num_partitions)
    elif spec.kind == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions, "label", spec.alpha,
                                           min_partition_size=2, self_balancing=True,
                                           seed=seed)
    else:
        partitioner = ShardPartitioner(num_partitions, "label",
                                       num_shards_per_partition=spec.shards, seed=seed)
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():  # pyarrow deprecations inside flwr-datasets
            warnings.simplefilter("ignore", FutureWarning)
            return [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
                    for i in range(num_partitions)]
    except ValueError as error:
        raise FedgeError(f"cannot partition {len(labels)} samples into {num_partitions} "
                         f"clients with {spec.kind}: {error}") from error
