"""Flower's strategies by name, configured as data.

Every strategy samples ``max(fraction · connected, min_clients)`` clients per round and
skips Flower's separate evaluate round-trip: clients report local validation metrics in
their train replies and the server evaluates the global model on its own held-out set.

- ``fedavg``:  w ← Σ_k (n_k / n) · w_k
- ``fedprox``: FedAvg on the server; clients minimise ``loss + μ/2 · ||w − w_global||²``
  (μ = ``proximal_mu``, sent to clients as ``proximal-mu``)
- ``fedadam``: Δ = FedAvg(w_k) − w;  m ← β₁m + (1−β₁)Δ;  v ← β₂v + (1−β₂)Δ²;
  w ← w + η · m / (√v + τ)  (η = ``server_lr``)
"""

from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from fedge.config import RunConfig
from fedge.errors import FedgeError

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]


def _sampling(config: RunConfig) -> dict:
    return {
        "fraction_train": config.fraction,
        "fraction_evaluate": 0.0,
        "min_train_nodes": config.min_clients,
        "min_available_nodes": config.min_clients,
    }


STRATEGIES: dict[str, Callable[[RunConfig], dict]] = {
    "fedavg": lambda c: {"cls": FedAvg},
    "fedprox": lambda c: {"cls": FedProx, "proximal_mu": c.proximal_mu},
    "fedadam": lambda c: {"cls": FedAdam, "eta": c.server_lr, "eta_l": c.lr},
}


def check_strategy_name(name: str) -> None:
    if name not in STRATEGIES:
        raise FedgeError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")


def build_strategy(config: RunConfig, train_metrics_aggr_fn: MetricsAggregator) -> Strategy:
    check_strategy_name(config.strategy)
    params = STRATEGIES[config.strategy](config)
    cls = params.pop("cls")
    return cls(**_sampling(config), train_metrics_aggr_fn=train_metrics_aggr_fn, **params)


def strategy_state(strategy: Strategy) -> dict:
    """The strategy's attributes (FedAdam's moments included) in checkpointable form."""
    state: dict = {"class": type(strategy).__name__}
    for name, value in vars(strategy).items():
        if isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
            state[name] = {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
        elif value is None or isinstance(value, bool | int | float | str):
            state[name] = value
    return state


def restore_strategy_state(strategy: Strategy, state: dict) -> None:
    """Put the attributes saved by :func:`strategy_state` back (e.g. FedAdam's moments)."""
    if state.get("class") != type(strategy).__name__:
        raise FedgeError(f"the checkpoint was written by {state.get('class')}, but this run "
                         f"uses {type(strategy).__name__}")
    for name, value in state.items():
        if name == "class":
            continue
        if isinstance(value, dict):
            value = {k: v.numpy() for k, v in value.items()}
        setattr(strategy, name, value)


class ContinuedRounds(Strategy):
    """``strategy`` with round numbers that continue after ``offset`` completed rounds.

    ``Strategy.start`` always counts rounds from 1; a resumed run must not restart the
    round counter that FedAdam's bias correction and the clients' seeds depend on.
    """

    def __init__(self, strategy: Strategy, offset: int) -> None:
        self.strategy, self.offset = strategy, offset

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.strategy.summary()
