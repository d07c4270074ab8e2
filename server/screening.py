"""Update screening: the server refuses client updates that cannot be honest before any
aggregation sees them.

Let w be the global arrays sent in a round and w_k the arrays client k sends back. A
reply is rejected, logged with its node id and the reason, and counted in the round's
``rejected`` when:

1. it is malformed: not exactly one ArrayRecord and one MetricRecord, no positive finite
   ``num-examples`` (FedAvg's weight n_k), or other metric names than most replies carry
   (Flower's strategies would stop the whole run on such a reply);
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

What is left goes to the wrapped strategy unchanged; a round in which every reply is
rejected keeps the global model, as one without replies does.
"""

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedge.server.strategies import StrategyWrapper

log = logging.getLogger("fedge.server")

WEIGHT_KEY = "num-examples"  # the weight Flower's strategies average by


class Unfit(Exception):
    """A reply that must not reach aggregation; the message says why."""


@dataclass(frozen=True)
class Rejection:
    node_id: int
    reason: str


def screen_replies(global_arrays: dict[str, np.ndarray], replies: list[Message],
                   max_norm_ratio: float) -> tuple[list[Message], list[Rejection]]:
    """The replies that may be aggregated, in their order, and why the others may not.

    Error replies pass through: the grid has counted them and the strategy skips them.
    """
    metric_names = _usual_metric_names(replies)
    norms: dict[int, float] = {}
    rejections: list[Rejection] = []
    for position, reply in enumerate(replies):
        if reply.has_error():
            continue
        try:
            norms[position] = _update_norm(reply.content, global_arrays, metric_names)
        except Unfit as problem:
            rejections.append(Rejection(reply.metadata.src_node_id, str(problem)))
    too_large = _norm_outliers(norms, max_norm_ratio)
    rejections += [Rejection(replies[p].metadata.src_node_id, reason)
                   for p, reason in too_large.items()]
    kept = [reply for position, reply in enumerate(replies)
            if reply.has_error() or (position in norms and position not in too_large)]
    return kept, rejections


def _usual_metric_names(replies: list[Message]) -> frozenset[str] | None:
    names = Counter(frozenset(metrics.keys()) for reply in replies if not reply.has_error()
                    for metrics in reply.content.metric_records.values())
    return names.most_common(1)[0][0] if names else None


def _update_norm(content: RecordDict, global_arrays: dict[str, np.ndarray],
                 metric_names: frozenset[str] | None) -> float:
    """‖w_k − w‖₂ of a well-formed reply; :class:`Unfit` for any other."""
    arrays, metrics = list(content.array_records.values()), list(
        content.metric_records.values())
    if len(arrays) != 1 or len(metrics) != 1:
        raise Unfit(f"expected one ArrayRecord and one MetricRecord, got {len(arrays)} and "
                    f"{len(metrics)}")
    _check_metrics(metrics[0], metric_names)
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


def _check_metrics(metrics: MetricRecord, usual_names: frozenset[str] | None) -> None:
    weight = metrics.get(WEIGHT_KEY)
    if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        raise Unfit(f"{WEIGHT_KEY} is {weight!r}, not a positive number")
    if frozenset(metrics.keys()) != usual_names:
        raise Unfit(f"metric names {sorted(metrics.keys())} differ from the other "
                    f"clients' {sorted(usual_names or ())}")


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


def _norm_outliers(norms: dict[int, float], max_norm_ratio: float) -> dict[int, str]:
    """Positions whose update norm exceeds ``max_norm_ratio`` × the median, with reasons."""
    if max_norm_ratio == 0 or not norms:
        return {}
    median = float(np.median(list(norms.values())))
    if median == 0:
        return {}
    limit = max_norm_ratio * median
    return {position: f"update norm {norm:.3g} is {norm / median:.1f}× the round's median "
                      f"{median:.3g} (limit {max_norm_ratio:g}×)"
            for position, norm in norms.items() if norm > limit}


class UpdateScreen(StrategyWrapper):
    """``strategy`` with every round's train replies screened before it aggregates them.

    ``on_screened(rejected)`` is told how many replies each round rejected; log lines
    number rounds after ``round_offset`` completed ones, as a resumed run does.
    """

    def __init__(self, strategy: Strategy, max_norm_ratio: float,
                 on_screened: Callable[[int], None], round_offset: int = 0) -> None:
        super().__init__(strategy)
        self.max_norm_ratio = max_norm_ratio
        self.on_screened, self.round_offset = on_screened, round_offset

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept, rejections = screen_replies(self.sent, list(replies), self.max_norm_ratio)
        for rejection in rejections:
            log.warning("round %d: rejected the update of client node %d: %s",
                        server_round + self.round_offset, rejection.node_id, rejection.reason)
        self.on_screened(len(rejections))
        return self.strategy.aggregate_train(server_round, kept)

