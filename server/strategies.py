"""Flower's strategies by name, configured as data.

Every strategy samples ``max(fraction · connected, min_clients)`` clients per round and
skips Flower's separate evaluate round-trip: clients report local validation metrics in
their train replies and the server evaluates the global model on its own held-out set.

- ``fedavg``:  w ← Σ_k (n_k / n) · w_k
- ``fedprox``: FedAvg on the server; clients minimise ``loss + μ/2 · ||w − w_global||²``
  (μ = ``proximal_mu``, sent to clients as ``proximal-mu``)
- ``fedadam``: Δ = FedAvg(w_k) − w;  m ← β₁m + (1−β₁)Δ;  v ← β₂v + (1−β₂)Δ²;
  w ← w + η · m / (√v + τ)  (η = ``server_lr``)

Byzantine-robust aggregation of the K updates of a round, up to f of them malicious
(unweighted: a liar could claim any ``num-examples``):

- ``fedmedian``: w ← median_k w_k, coordinate by coordinate; holds while f < K/2
- ``fedtrimmedavg``: per coordinate, drop the ⌊β·K⌋ largest and the ⌊β·K⌋ smallest of
  the K values and average the rest (β = ``trimmed_fraction`` < 0.5); holds while
  f ≤ ⌊β·K⌋
- ``krum``: score(k) = Σ_{j ∈ N_k} ‖w_k − w_j‖², N_k the K − f − 2 updates nearest to
  w_k; w ← the w_k with the lowest score (f = ``krum_byzantine``; needs K ≥ 2f + 3)
- ``multikrum``: w ← FedAvg of the m lowest-scoring w_k (m = ``multikrum_select``,
  default: clients per round − f)

With ``dp_clip_norm`` set, ``fedavg`` and ``fedprox`` run as DP-FedAvg: clipped updates,
equal weights, Gaussian noise on the mean (:mod:`fedge.server.privacy`).
"""

from collections.abc import Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, RdpAccountant
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from fedge.config import RunConfig, StrategySettings, server_learning_rate
from fedge.errors import FedgeError
from fedge.server.privacy import clients_per_round, private_sampling, with_privacy

MetricsAggregator = Callable[[list[RecordDict], str], MetricRecord]


def _sampling(strategy: StrategySettings) -> dict:
    return {
        "fraction_train": strategy.fraction,
        "fraction_evaluate": 0.0,
        "min_train_nodes": strategy.min_clients,
        "min_available_nodes": strategy.min_clients,
    }


STRATEGIES: dict[str, Callable[[RunConfig], dict]] = {
    "fedavg": lambda c: {"cls": FedAvg},
    "fedprox": lambda c: {"cls": FedProx, "proximal_mu": c.strategy.proximal_mu},
    "fedadam": lambda c: {"cls": FedAdam, "eta": server_learning_rate(c.strategy),
                          "eta_l": c.training.lr},
    "fedmedian": lambda c: {"cls": FedMedian},
    "fedtrimmedavg": lambda c: {"cls": FedTrimmedAvg, "beta": c.strategy.trimmed_fraction},
    "krum": lambda c: {"cls": Krum, "num_malicious_nodes": c.strategy.krum_byzantine},
    "multikrum": lambda c: {"cls": MultiKrum, "num_malicious_nodes": c.strategy.krum_byzantine,
                            "num_nodes_to_select": _multikrum_select(c.strategy)},
}


def _multikrum_select(strategy: StrategySettings) -> int:
    """m, by default K less f."""
    if strategy.multikrum_select is not None:
        return strategy.multikrum_select
    return max(1, clients_per_round(strategy) - strategy.krum_byzantine)


# Asynchronous, without rounds: fedge.server.fedbuff, not a Flower strategy.
STRATEGY_NAMES = (*STRATEGIES, "fedbuff")


def check_strategy_name(name: str) -> None:
    if name not in STRATEGY_NAMES:
        raise FedgeError(f"unknown strategy {name!r}; choose one of: "
                         f"{', '.join(STRATEGY_NAMES)}")


def check_strategy(strategy: StrategySettings) -> None:
    """The strategy exists and can hold with its settings (Krum needs K ≥ 2f + 3)."""
    check_strategy_name(strategy.name)
    if strategy.name not in ("krum", "multikrum"):
        return
    per_round, byzantine = clients_per_round(strategy), strategy.krum_byzantine
    if per_round < 2 * byzantine + 3:
        raise FedgeError(f"{strategy.name} with krum_byzantine {byzantine} needs at least "
                         f"{2 * byzantine + 3} clients a round, but a round samples "
                         f"{per_round}; lower krum_byzantine or sample more clients")
    if strategy.name == "multikrum" and _multikrum_select(strategy) > per_round:
        raise FedgeError(f"multikrum_select {strategy.multikrum_select} is more than the "
                         f"{per_round} clients a round samples")


def build_strategy(config: RunConfig, train_metrics_aggr_fn: MetricsAggregator) -> Strategy:
    check_strategy_name(config.strategy.name)
    params = STRATEGIES[config.strategy.name](config)
    cls = params.pop("cls")
    sampling = {**_sampling(config.strategy), **private_sampling(config)}
    strategy = cls(**sampling, train_metrics_aggr_fn=train_metrics_aggr_fn, **params)
    return with_privacy(strategy, config)


def strategy_state(strategy: Strategy) -> dict:
    """The strategy's attributes (FedAdam's moments included) in checkpointable form; a
    wrapped strategy's too, and a privacy accountant's ledger (its own ``state_dict``).
    A strategy with a ``state_dict`` of its own (FedBuff) gives that."""
    state: dict = {"class": type(strategy).__name__}
    if hasattr(strategy, "state_dict"):
        return {**state, **strategy.state_dict()}
    for name, value in vars(strategy).items():
        if isinstance(value, Strategy):
            state[name] = strategy_state(value)
        elif isinstance(value, RdpAccountant):
            state[name] = value.state_dict()
        elif isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
            state[name] = {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
        elif value is None or isinstance(value, bool | int | float | str):
            state[name] = value
    return state


def restore_strategy_state(strategy: Strategy, state: dict) -> None:
    """Put the attributes saved by :func:`strategy_state` back (e.g. FedAdam's moments)."""
    if state.get("class") != type(strategy).__name__:
        raise FedgeError(f"the checkpoint was written by {state.get('class')}, but this run "
                         f"uses {type(strategy).__name__}")
    if hasattr(strategy, "load_state_dict"):
        strategy.load_state_dict({k: v for k, v in state.items() if k != "class"})
        return
    for name, value in state.items():
        if name == "class":
            continue
        current = getattr(strategy, name, None)
        if isinstance(current, Strategy):
            restore_strategy_state(current, value)
            continue
        if isinstance(current, RdpAccountant):
            current.load_state_dict(value)
            continue
        if isinstance(value, dict):
            value = {k: v.numpy() for k, v in value.items()}
        setattr(strategy, name, value)


class StrategyWrapper(Strategy):
    """Delegates everything to ``strategy``; subclasses change what they need. The global
    arrays of the latest train round are kept as :attr:`sent` for the subclasses that
    compare replies with them."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.sent: dict[str, np.ndarray] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.sent = {name: array.numpy() for name, array in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()


class ContinuedRounds(StrategyWrapper):
    """``strategy`` with round numbers that continue after ``offset`` completed rounds.

    ``Strategy.start`` always counts rounds from 1; a resumed run must not restart the
    round counter that FedAdam's bias correction and the clients' seeds depend on.
    """

    def __init__(self, strategy: Strategy, offset: int) -> None:
        super().__init__(strategy)
        self.offset = offset

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return super().configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)
