"""Split client samples across simulated clients with flwr-datasets' partitioners."""

import math
import re
import warnings
from dataclasses import dataclass

import numpy as np

from fedge.errors import FedgeError

_SPEC = re.compile(r"^(?:(iid)|dirichlet:(?P<alpha>[0-9.eE+-]+)|shards:(?P<shards>[0-9]+)"
                   r"|column:(?P<column>.+))$")


@dataclass(frozen=True)
class PartitionSpec:
    """``iid``, ``dirichlet:ALPHA`` (label skew, smaller is more skewed), ``shards:K``
    (each client holds K label-sorted shards) or ``column:NAME`` (natural partitions: one
    client per value of a CSV column, such as a device id)."""

    kind: str
    alpha: float | None = None
    shards: int | None = None
    column: str | None = None

    @classmethod
    def parse(cls, text: str) -> "PartitionSpec":
        match = _SPEC.match(text.strip())
        alpha = float(match["alpha"]) if match and match["alpha"] else None
        shards = int(match["shards"]) if match and match["shards"] else None
        column = match["column"].strip() if match and match["column"] else None
        if (not match or (alpha is not None and not alpha > 0) or shards == 0
                or column == ""):
            raise FedgeError(f"malformed partition {text!r}: use 'iid', 'dirichlet:ALPHA' "
                             "with ALPHA > 0, 'shards:K' with K >= 1, or 'column:NAME'")
        if column is not None:
            return cls("column", column=column)
        kind = "iid" if match[1] else "dirichlet" if alpha is not None else "shards"
        return cls(kind, alpha, shards)


def natural_partitions(groups: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """One partition per distinct value of ``groups`` (text): the values in order (by
    number when every value is a finite number, else sorted as text) and each one's
    indices into ``groups``."""
    values = sorted(set(groups.tolist()))
    try:
        numbers = {value: float(value) for value in values}
    except ValueError:
        numbers = {}
    if numbers and all(math.isfinite(number) for number in numbers.values()):
        values.sort(key=lambda value: (numbers[value], value))
    return values, [np.flatnonzero(groups == value) for value in values]


def partition_indices(labels: np.ndarray, num_partitions: int, spec: PartitionSpec,
                      seed: int) -> list[np.ndarray]:
    """Indices into ``labels`` for each of ``num_partitions`` clients."""
    # flwr-datasets pulls in pandas/pyarrow; import it only when partitioning.
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    if spec.kind == "column":
        raise FedgeError(f"partition column:{spec.column} splits a CSV file by its "
                         "column; it needs --data with such a file")
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
