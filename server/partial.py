"""Partial updates: clients train and send only part of the model.

Clients receive all of the global state w and send back only its exchanged entries E
(floating-point entries that are not frozen: :mod:`fedge.models.exchange`). The wrapped
strategy, and every wrapper inside it (decoding, screening, privacy), sees only E:

    w_E ← strategy(w_E, {w_k,E}),    w_F ← w_F  (F: the frozen and integer entries)

so frozen parameters are neither trained, sent nor aggregated, and ``bytes_per_client``
counts only what is sent.
"""

from collections.abc import Collection, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedge.models.exchange import exchanged_names
from fedge.server.strategies import StrategyWrapper


def has_fixed_entries(arrays: ArrayRecord, frozen: Collection[str]) -> bool:
    """Whether some entries of ``arrays`` stay out of the clients' updates."""
    return len(exchanged_names(_dtypes(arrays), frozen)) < len(arrays)


def _dtypes(arrays: ArrayRecord) -> dict[str, str]:
    return {name: array.dtype for name, array in arrays.items()}


class PartialUpdates(StrategyWrapper):
    """``strategy`` on the exchanged entries only; the others keep their global values."""

    def __init__(self, strategy: Strategy, frozen: Collection[str]) -> None:
        super().__init__(strategy)
        self.frozen = frozenset(frozen)
        self.full = ArrayRecord()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.full = arrays
        names = exchanged_names(_dtypes(arrays), self.frozen)
        exchanged = ArrayRecord(array_dict={name: arrays[name] for name in names})
        messages = list(self.strategy.configure_train(server_round, exchanged, config, grid))
        for message in messages:  # every client needs the whole model to train
            for key in list(message.content.array_records):
                message.content[key] = arrays
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        aggregated, metrics = self.strategy.aggregate_train(server_round, replies)
        if aggregated is None:
            return None, metrics
        return ArrayRecord(array_dict={
            name: aggregated.get(name, array)
            for name, array in self.full.items()}), metrics
