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

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import MetricRecord, RecordDict
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
