"""Update screening: the server refuses client updates that cannot be honest before any
aggregation sees them, and hands the rest on in the one form Flower's strategies accept.

Let w be the global arrays sent in a round and w_k the arrays client k sends back. A
reply is rejected, logged with its node id and the reason, and counted in the round's
``rejected`` when:

1. it is malformed: not exactly one ArrayRecord and one MetricRecord, or no positive
   finite ``num-examples`` (FedAvg's weight n_k), nor the strategy's own weight where it
   averages by another (``dp-weight`` in a differentially private run);
2. w_k does not fit w: other array names, another shape, or another dtype kind (float
   weights must stay float; precision may differ, e.g. FedAdam's float64 global and the
   clients' float32 models);
3. w_k holds a NaN or ±Inf;
4. its update is far larger than the round's others:

       ‖w_k − w‖₂  >  ρ · median_j ‖w_j − w‖₂

   over the replies that passed 1–3 (ρ = ``max_norm_ratio``; ρ = 0 turns this check off).
   While fewer than half of the replies are malicious the median is an honest update's
   norm, so a scaled (w + s·Δ) or sign-flipped (w − s·Δ) update with s ≫ ρ is refused,
   while honest updates, whose norms vary with data size and epochs run, pass. With
   fewer than three replies the median protects nothing.

Which other metrics a reply reports is its client's business: a standard Flower
ClientApp that reports only ``num-examples`` is aggregated like `fedge client`. Flower's
strategies stop the whole run on replies whose records or metric names differ
(``InconsistentMessageReplies``), so every reply that passed reaches the wrapped strategy
as ``arrays`` (its ArrayRecord), ``metrics`` (its weights only) and its full metrics in
the ConfigRecord :data:`CLIENT_METRICS`; :func:`average_client_metrics` averages each of
those over the replies that report it. A round in which every reply is rejected keeps
the global model, as one without replies does.
"""

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedge.files import finite_number
from fedge.protocol import ARRAYS, CLIENT_KEY, METRICS, WEIGHT_KEY
from fedge.server.strategies import StrategyWrapper

log = logging.getLogger("fedge.server")

CLIENT_METRICS = "client-metrics"  # a screened reply's own metrics, all of them
# The train config's EXPECTED_CLIENT_KEY entry.
EXPECTED_CLIENT = (
    "this federation's devices run `fedge client --server HOST:PORT --data FILE`; another "
    "ClientApp takes part when its train reply holds one ArrayRecord with the arrays it "
    "was sent, trained (same names, shapes and dtype kinds), and one MetricRecord with a "
    f"positive {WEIGHT_KEY}")


class Unfit(Exception):
    """A reply that must not reach aggregation; the message says why."""


@dataclass(frozen=True)
class Rejection:
    node_id: int
    reason: str


def screen_replies(global_arrays: dict[str, np.ndarray], replies: list[Message],
                   max_norm_ratio: float, weight_keys: Sequence[str] = (WEIGHT_KEY,)
                   ) -> tuple[list[Message], list[Rejection]]:
    """The replies that may be aggregated, in their order, and why the others may not;
    each must report every one of ``weight_keys`` as a positive finite number.

    Error replies pass through: the grid has counted them and the strategy skips them.
    """
    norms: dict[int, float] = {}
    rejections: list[Rejection] = []
    for position, reply in enumerate(replies):
        if reply.has_error():
            continue
        try:
            norms[position] = _update_norm(reply.content, global_arrays, weight_keys)
        except Unfit as problem:
            rejections.append(Rejection(reply.metadata.src_node_id, str(problem)))
    too_large = norm_outliers(norms, max_norm_ratio)
    rejections += [Rejection(replies[p].metadata.src_node_id, reason)
                   for p, reason in too_large.items()]
    kept = [reply for position, reply in enumerate(replies)
            if reply.has_error() or (position in norms and position not in too_large)]
    return kept, rejections


def _update_norm(content: RecordDict, global_arrays: dict[str, np.ndarray],
                 weight_keys: Sequence[str]) -> float:
    """‖w_k − w‖₂ of a well-formed reply; :class:`Unfit` for any other."""
    arrays, metrics = list(content.array_records.values()), list(
        content.metric_records.values())
    if len(arrays) != 1 or len(metrics) != 1:
        raise Unfit(f"expected one ArrayRecord and one MetricRecord, got {len(arrays)} and "
                    f"{len(metrics)}")
    for key in weight_keys:
        weight = metrics[0].get(key)
        if weight is None:
            raise Unfit(f"no {key} in its metrics: the weight this federation averages "
                        f"updates by")
        if not finite_number(weight) or weight <= 0:
            raise Unfit(f"{key} is {weight!r}, not a positive number")
    received = arrays[0]
    if set(received.keys()) != set(global_arrays):
        missing = sorted(set(global_arrays) - set(received.keys()))
        unexpected = sorted(set(received.keys()) - set(global_arrays))
        raise Unfit(f"array names differ from the global model's (missing {missing}, "
                    f"unexpected {unexpected})")
    squared = 0.0
    for name, sent in global_arrays.items():
        update = _fitting(name, received[name], sent).astype(np.float64) - sent
        squared += float(np.sum(update * update))
    return math.sqrt(squared)


def _fitting(name: str, array: Array, sent: np.ndarray) -> np.ndarray:
    """The received array ``name`` if it can stand in for the global one ``sent``."""
    try:
        # The decoded array, not the shape and dtype the message claims: aggregation
        # decodes the same bytes.
        value = array.numpy()
    except Exception as error:  # whatever bytes a client sent, the round goes on
        raise Unfit(f"array {name!r} is unreadable ({type(error).__name__})") from error
    if value.shape != sent.shape:
        raise Unfit(f"array {name!r} has shape {value.shape}, the global model's "
                    f"{sent.shape}")
    if value.dtype.kind != sent.dtype.kind:
        raise Unfit(f"array {name!r} has dtype {value.dtype}, the global model's {sent.dtype}")
    if not np.isfinite(value).all():
        raise Unfit(f"array {name!r} holds NaN or Inf")
    return value


def norm_outliers(norms: dict[int, float], max_norm_ratio: float,
                  reference: Sequence[float] = (), over: str = "the round's") -> dict[int, str]:
    """Positions whose update norm exceeds ``max_norm_ratio`` × the median of ``norms``
    and the ``reference`` norms of earlier accepted updates, with reasons naming ``over``."""
    if max_norm_ratio == 0 or not norms:
        return {}
    median = float(np.median([*norms.values(), *reference]))
    if median == 0:
        return {}
    limit = max_norm_ratio * median
    return {position: f"update norm {norm:.3g} is {norm / median:.1f}× {over} median "
                      f"{median:.3g} (limit {max_norm_ratio:g}×)"
            for position, norm in norms.items() if norm > limit}


def uniform_content(content: RecordDict, weight_keys: Sequence[str]) -> RecordDict:
    """A screened reply's records as every screened reply has them: its arrays, a
    MetricRecord of its weights only, and all its metrics under :data:`CLIENT_METRICS`."""
    (arrays,) = content.array_records.values()
    (metrics,) = content.metric_records.values()
    return RecordDict({
        ARRAYS: arrays,
        METRICS: MetricRecord({key: metrics[key] for key in weight_keys}),
        CLIENT_METRICS: ConfigRecord(dict(metrics)),
    })


def client_metrics(reply: RecordDict) -> dict:
    """The metrics a client reported in ``reply``: those the screen kept aside, or, for a
    reply that did not pass it (a secure round's), its MetricRecord's."""
    kept = reply.get(CLIENT_METRICS)
    if isinstance(kept, ConfigRecord):
        return dict(kept)
    return {key: value for record in reply.metric_records.values()
            for key, value in record.items()}


def average_client_metrics(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    """Each metric's mean over the replies that report it, weighted by ``weight_key``.

    A reply that lacks a metric, or reports it as a non-finite number, does not count
    for it. A list is averaged element by element only when every reply that reports
    the metric sends a list of one length; a reply's number always outranks another's
    list. ``weight_key`` itself is not averaged (as in Flower's strategies).
    """
    reports = [(metrics, float(metrics[weight_key])) for metrics in map(client_metrics, replies)
               if finite_number(metrics.get(weight_key)) and metrics[weight_key] > 0]
    names = dict.fromkeys(key for metrics, _ in reports for key in metrics)
    names.pop(weight_key, None)
    names.pop(CLIENT_KEY, None)  # who sent a reply: no quantity to average
    averaged = MetricRecord()
    for name in names:
        numbers = [(m[name], w) for m, w in reports if finite_number(m.get(name))]
        lists = [(m[name], w) for m, w in reports if isinstance(m.get(name), list)]
        if numbers:
            total = sum(w for _, w in numbers)
            averaged[name] = sum(v * w for v, w in numbers) / total
        elif lists and len({len(v) for v, _ in lists}) == 1 and all(
                finite_number(x) for v, _ in lists for x in v):
            total = sum(w for _, w in lists)
            averaged[name] = [float(x) for x in
                              sum(np.asarray(v, dtype=np.float64) * w for v, w in lists) / total]
    return averaged


def strategy_weight_key(strategy: Strategy) -> str:
    """The metric ``strategy`` averages by: the ``weighted_by_key`` of the first strategy
    that has one (FedAvg's family) along its chain of wrapped ones (``.strategy``)."""
    while strategy is not None:
        key = getattr(strategy, "weighted_by_key", None)
        if isinstance(key, str):
            return key
        strategy = getattr(strategy, "strategy", None)
    return WEIGHT_KEY


class UpdateScreen(StrategyWrapper):
    """``strategy`` with every round's train replies screened before it aggregates them.

    ``on_screened(rejected)`` is told how many replies each round rejected; log lines
    number rounds after ``round_offset`` completed ones, as a resumed run does. The
    strategy gets the replies that passed in :func:`uniform_content`'s form; aggregate
    client metrics from them with :func:`average_client_metrics`.
    """

    def __init__(self, strategy: Strategy, max_norm_ratio: float,
                 on_screened: Callable[[int], None], round_offset: int = 0) -> None:
        super().__init__(strategy)
        self.max_norm_ratio = max_norm_ratio
        self.on_screened, self.round_offset = on_screened, round_offset
        self.weight_keys = tuple(dict.fromkeys((WEIGHT_KEY, strategy_weight_key(strategy))))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept, rejections = screen_replies(self.sent, list(replies), self.max_norm_ratio,
                                          self.weight_keys)
        for rejection in rejections:
            log.warning("round %d: rejected the update of client node %d: %s",
                        server_round + self.round_offset, rejection.node_id, rejection.reason)
        self.on_screened(len(rejections))
        for reply in kept:
            if not reply.has_error():
                reply.content = uniform_content(reply.content, self.weight_keys)
        return self.strategy.aggregate_train(server_round, kept)
