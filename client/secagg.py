"""The client's side of secure aggregation: Flower's ``secaggplus_mod`` around fedge's
trainer.

A server that aggregates securely (``secagg = true``) speaks Flower's SecAgg+ protocol,
which Flower 1.42 offers only in its legacy message format: four train messages a round,
each with a ``secaggplus_configs`` record naming the stage. ``secaggplus_mod`` answers
the key-exchange and unmasking stages itself. In the stage that collects masked weights
it asks the app to train on a legacy fit message (``fitins.parameters``: the global
weights as unnamed arrays, ``fitins.config``: the round's config) and expects a legacy
fit reply (``fitres.*``), whose weights it scales, quantizes and masks; the weights
themselves never leave the device. :func:`secagg_mod` translates both ways, so that
fedge's trainer gets the same records as in a plaintext round (``arrays`` and ``config``
in, ``arrays`` and ``metrics`` out), and passes every other message through: one
ClientApp serves plaintext and secure servers alike.

This module imports Flower and numpy only: the relay's ClientApp, started afresh for
every message, uses it. SecAgg+'s keys and shares live in ``context.state``, which
Flower's SuperNode keeps between the messages of a run.
"""

import copy
import io
import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitRes,
    NDArrays,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedge.errors import FedgeError
from fedge.protocol import (
    ARRAY_NAMES,
    ARRAYS,
    CONFIG,
    FIXED_ARRAYS,
    FROZEN_KEY,
    METRICS,
    SECAGG_CLIPPING_RANGE,
    SECAGG_MAX_WEIGHT,
    WEIGHT_KEY,
)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower client mod: SecAgg+ for the messages of that protocol, nothing for others."""
    if (msg.metadata.message_type != MessageType.TRAIN
            or RECORD_KEY_CONFIGS not in msg.content.config_records):
        return call_next(msg, context)
    return secaggplus_mod(msg, context,
                          lambda fit, fit_context: _train(fit, fit_context, call_next))


def _train(fit: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A legacy fit message through fedge's train handler, answered by a legacy fit reply."""
    fit_ins = compat.recorddict_to_fitins(fit.content, keep_input=True)
    config = dict(fit_ins.config)
    names = json.loads(str(config[ARRAY_NAMES]))
    weights = parameters_to_ndarrays(fit_ins.parameters)
    arrays = {name: Array(w) for name, w in zip(names, weights, strict=True)}
    if isinstance(config.get(FROZEN_KEY), str):  # the legacy format carries no lists
        config[FROZEN_KEY] = json.loads(config[FROZEN_KEY])
    fixed = config.pop(FIXED_ARRAYS, None)
    if isinstance(fixed, bytes):
        with np.load(io.BytesIO(fixed), allow_pickle=False) as saved:
            arrays.update({name: Array(saved[name]) for name in saved.files})
    train = copy.copy(fit)  # outer mods keep seeing the message as it arrived
    train.content = RecordDict({
        ARRAYS: ArrayRecord(array_dict=arrays),
        CONFIG: ConfigRecord(config),
    })
    reply = call_next(train, context)
    if reply.has_error():
        raise FedgeError(reply.error.reason)
    trained = reply.content[ARRAYS].to_numpy_ndarrays()
    metrics = dict(reply.content[METRICS])
    examples = int(metrics[WEIGHT_KEY])
    _check_maskable(trained, examples, float(config[SECAGG_MAX_WEIGHT]),
                    float(config[SECAGG_CLIPPING_RANGE]))
    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(trained), examples, metrics)
    return Message(compat.fitres_to_recorddict(fit_res, keep_input=False), reply_to=fit)


def _check_maskable(weights: NDArrays, examples: int, max_weight: float,
                    clipping_range: float) -> None:
    """SecAgg+ sends ``w · n / max_weight`` clipped to ``±clipping_range``: refuse what it
    would silently clip, overflow or turn into garbage, and say which setting to raise."""
    if examples > max_weight:
        raise FedgeError(f"this client trains on {examples} samples, more than the server's "
                         f"secagg_max_weight ({max_weight:g}) that SecAgg+ can weight; the "
                         "server must raise secagg_max_weight")
    scaled = max((float(np.abs(w).max()) for w in weights if w.size), default=0.0)
    scaled *= examples / max_weight
    if not np.isfinite(scaled):
        raise FedgeError("training produced non-finite weights, which SecAgg+ cannot sum")
    if scaled > clipping_range:
        raise FedgeError(f"a weight times samples / secagg_max_weight reaches {scaled:.3g}, "
                         f"beyond secagg_clipping_range ({clipping_range:g}), where SecAgg+ "
                         "would clip it; the server must raise secagg_clipping_range")
