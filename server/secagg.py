"""Secure aggregation: the rounds' FedAvg through Flower's SecAgg+ protocol.

With SecAgg+ the server learns the weighted sum of the clients' weights but no client's
own. Each client k sends only its weights ``w_k`` scaled by ``r_k = n_k / W`` (``n_k`` its
training samples, ``W = secagg_max_weight``), clipped to ``±c`` (``secagg_clipping_range``)
and stochastically rounded to one of ``Q`` integer levels (``secagg_quantization_range``),
plus random masks that cancel only in the sum over all clients; a dropped client's masks
are rebuilt from ``secagg_threshold`` of the ``secagg_num_shares`` secret shares held by
its neighbours. The server unmasks the sum and divides:

    w ← Σ_k r_k w_k / Σ_k r_k  =  Σ_k n_k w_k / Σ_k n_k   (FedAvg)

up to quantization: each client's term is off by at most one level, ``2c / Q``, so
``|w − FedAvg(w_k)| ≤ K · 2c/Q · W / Σ_k n_k`` for K clients (plus the rounding of r_k).

Flower 1.42 offers SecAgg+ only in its legacy workflow API. :func:`run_secure_rounds` runs
Flower's ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with Flower's legacy
``FedAvg`` and maps fedge's round bookkeeping onto it: the legacy strategy's
``evaluate_fn`` is fedge's evaluation (which checkpoints and stops the run early), its
``on_fit_config_fn`` sends fedge's train config, its metrics aggregation reports the
clients' metrics, which travel unmasked next to the masked weights.
"""

import io
import json
import logging
from collections.abc import Callable, Collection

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import (
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedge.config import RunConfig
from fedge.errors import FedgeError
from fedge.models.exchange import exchanged_names
from fedge.protocol import (
    ARRAY_NAMES,
    FIXED_ARRAYS,
    FROZEN_KEY,
    METRICS,
    PROXIMAL_MU,
    SECAGG_CLIPPING_RANGE,
    SECAGG_MAX_WEIGHT,
    SERVER_ROUND,
    WEIGHT_KEY,
)
from fedge.server.grid import NotEnoughClients, RoundGrid, RoundStats
from fedge.server.rounds import GlobalEarlyStop, RoundTracker

log = logging.getLogger("fedge.server")

# Strategies whose aggregate is the weighted average SecAgg+ computes. A median or Krum
# needs each client's update, which secure aggregation exists to hide; FedAdam would need
# Flower's legacy FedAdam, whose moments fedge's checkpoints do not hold.
SECURE_STRATEGIES = ("fedavg", "fedprox")
MODULUS_RANGE = 2**32  # Flower's default and maximum range of the masks


def check_secagg(config: RunConfig) -> None:
    """Refuse settings under which secure aggregation cannot work, before any file is
    written."""
    privacy, strategy = config.privacy, config.strategy
    if not privacy.secagg:
        return
    if strategy.name not in SECURE_STRATEGIES:
        raise FedgeError(f"secagg works with strategy {' or '.join(SECURE_STRATEGIES)}, not "
                         f"{strategy.name!r}: with SecAgg+ the server gets the clients' "
                         "FedAvg average and never one client's update")
    if privacy.secagg_threshold >= privacy.secagg_num_shares:
        raise FedgeError(f"secagg_threshold ({privacy.secagg_threshold}) must be smaller than "
                         f"secagg_num_shares ({privacy.secagg_num_shares})")
    if strategy.min_clients < privacy.secagg_threshold:
        raise FedgeError(f"secagg needs at least secagg_threshold ({privacy.secagg_threshold}) "
                         f"clients per round, but min_clients is {strategy.min_clients}")
    if config.strategy.clients * privacy.secagg_quantization_range >= MODULUS_RANGE:
        raise FedgeError(f"{config.strategy.clients} clients × secagg_quantization_range "
                         f"({privacy.secagg_quantization_range}) must stay below 2**32, the "
                         "range of SecAgg+'s masked sums")


def secure_round_stats(grid: RoundGrid) -> Callable[[], RoundStats]:
    """A secure round's four exchanges (keys, shares, masked weights, unmasking) as one
    :class:`RoundStats`: what failed or timed out in any of them. Each call covers the
    exchanges since the previous call, as :class:`RoundTracker` calls it once a round."""
    seen = 0

    def round_stats() -> RoundStats:
        nonlocal seen
        stages, seen = grid.stats[seen:], len(grid.stats)
        if not stages:
            return RoundStats()
        return RoundStats(sent=stages[0].sent, replies=stages[-1].replies,
                          failures=sum(s.failures for s in stages),
                          timeouts=sum(s.timeouts for s in stages),
                          discarded=any(s.discarded for s in stages))

    return round_stats


def run_secure_rounds(config: RunConfig, grid: Grid, arrays: ArrayRecord, rounds: int,
                      tracker: RoundTracker, train_config: ConfigRecord,
                      frozen: Collection[str] = ()) -> None:
    """``rounds`` rounds from ``arrays``, numbered after ``tracker``'s completed rounds,
    each aggregated by SecAgg+. Raises :class:`GlobalEarlyStop` when ``tracker`` stopped
    the run, once Flower's workflow has wound down."""
    if config.strategy.max_norm_ratio > 0:
        log.info("update screening (max_norm_ratio) does not apply: SecAgg+ hides each update")
    strategy = _SecureFedAvg(config, arrays, tracker, train_config, frozen)
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                run_config={}),
        config=ServerConfig(num_rounds=rounds), strategy=strategy,
        client_manager=_BoundedClientManager(config.strategy.join_timeout))
    privacy = config.privacy
    secure_fit = SecAggPlusWorkflow(
        num_shares=privacy.secagg_num_shares, reconstruction_threshold=privacy.secagg_threshold,
        max_weight=privacy.secagg_max_weight, clipping_range=privacy.secagg_clipping_range,
        quantization_range=privacy.secagg_quantization_range, modulus_range=MODULUS_RANGE,
        timeout=config.strategy.round_timeout)
    DefaultWorkflow(fit_workflow=secure_fit)(grid, context)
    if strategy.early_stop is not None:
        raise strategy.early_stop


class _SecureFedAvg(FedAvg):
    """Flower's legacy FedAvg wired to fedge's rounds.

    Early stopping cannot end Flower's legacy workflow from inside (an exception would
    leave its node-polling thread running), so once ``tracker`` stops the run, the
    remaining rounds sample no clients and evaluate nothing.
    """

    def __init__(self, config: RunConfig, arrays: ArrayRecord, tracker: RoundTracker,
                 train_config: ConfigRecord, frozen: Collection[str]) -> None:
        self.tracker, self.offset = tracker, tracker.completed_rounds
        self.all_names = list(arrays.keys())
        self.names = exchanged_names({n: a.dtype for n, a in arrays.items()}, frozen)
        self.fixed = {n: arrays[n].numpy() for n in self.all_names if n not in self.names}
        exchanged = [arrays[n].numpy() for n in self.names]
        self.dtypes = [a.dtype for a in exchanged]
        self.early_stop: GlobalEarlyStop | None = None
        fit_config: dict[str, Scalar] = {
            **train_config, ARRAY_NAMES: json.dumps(self.names),
            SECAGG_MAX_WEIGHT: config.privacy.secagg_max_weight,
            SECAGG_CLIPPING_RANGE: config.privacy.secagg_clipping_range,
        }
        if FROZEN_KEY in fit_config:  # the legacy format carries no lists
            fit_config[FROZEN_KEY] = json.dumps(list(fit_config[FROZEN_KEY]))
        if self.fixed:
            archive = io.BytesIO()
            np.savez(archive, **self.fixed)
            fit_config[FIXED_ARRAYS] = archive.getvalue()
        if config.strategy.name == "fedprox":  # as Flower's FedProx sends it
            fit_config[PROXIMAL_MU] = config.strategy.proximal_mu
        super().__init__(
            fraction_fit=config.strategy.fraction, fraction_evaluate=0.0,
            min_fit_clients=config.strategy.min_clients,
            min_available_clients=config.strategy.min_clients,
            initial_parameters=ndarrays_to_parameters(exchanged),
            on_fit_config_fn=lambda server_round: {
                **fit_config, SERVER_ROUND: server_round + self.offset},
            evaluate_fn=self._evaluate, fit_metrics_aggregation_fn=self._client_metrics,
        )

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list:
        if self.early_stop is not None:
            return []
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Every result carries the unmasked average already; keep the model's dtypes
        (SecAgg+ dequantizes to float64)."""
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is None:
            return None, metrics
        weights = parameters_to_ndarrays(parameters)
        return ndarrays_to_parameters(
            [w.astype(d, copy=False) for w, d in zip(weights, self.dtypes, strict=True)]
        ), metrics

    def _evaluate(self, server_round: int, weights: NDArrays, _: dict
                  ) -> tuple[float, dict[str, Scalar]] | None:
        if self.early_stop is not None:
            return None
        trained = {name: np.asarray(w, dtype=d)
                   for name, w, d in zip(self.names, weights, self.dtypes, strict=True)}
        arrays = ArrayRecord(array_dict={
            name: Array(trained[name] if name in trained else self.fixed[name])
            for name in self.all_names})
        try:
            metrics = self.tracker.evaluate(server_round + self.offset, arrays)
        except GlobalEarlyStop as stop:
            self.early_stop = stop
            return None
        return float(metrics["val_loss"]), dict(metrics)

    def _client_metrics(self, results: list[tuple[int, dict[str, Scalar]]]
                        ) -> dict[str, Scalar]:
        replies = [RecordDict({METRICS: MetricRecord({**metrics, WEIGHT_KEY: examples})})
                   for examples, metrics in results]
        return dict(self.tracker.aggregate_train_metrics(replies, WEIGHT_KEY))


class _BoundedClientManager(SimpleClientManager):
    """Flower's client manager, but waiting at most ``join_timeout`` seconds for the
    clients a round needs (Flower's waits a day)."""

    def __init__(self, join_timeout: float) -> None:
        super().__init__()
        self.join_timeout = join_timeout

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        if not super().wait_for(num_clients, timeout=min(timeout, self.join_timeout)):
            raise NotEnoughClients(
                f"only {len(self)} of the {num_clients} clients a round needs stayed "
                f"connected for {self.join_timeout:.0f} s; the last checkpoint is kept")
        return True
