"""The client's part in differential privacy: clip this device's update when asked.

A DP server (``fedge.server.privacy``) puts the clipping norm ``C`` in the round's
config. :func:`dp_clipping_mod` then runs Flower's ``fixedclipping_mod``, so the reply
carries ``w + Δ · min(1, C / ‖Δ‖₂)`` for the local update ``Δ = w_local − w``, and gives
the update weight 1 in the server's mean (``dp-weight``): one client never moves the
mean by more than ``C/m``. Without that key in the config it does nothing.

It imports Flower and numpy only: it also runs in the per-message relay process, which
must stay free of torch. Put it last among a ClientApp's mods, so that it clips the
update the training produced and any outer mod (e.g. secure aggregation) sees the
clipped one.
"""

import copy

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

# Flower's config key for the clipping norm; it has no public name (flwr 1.42). Both the
# server's DP strategy and fixedclipping_mod read it from here; tests/test_privacy.py
# fails if clients stop clipping.
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedge.models.exchange import exchanged_names, frozen_from_config
from fedge.protocol import DP_WEIGHT_KEY


def _clipping_asked(msg: Message) -> bool:
    return any(KEY_CLIPPING_NORM in config for config in msg.content.config_records.values())


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``fixedclipping_mod`` with uniform weights when the server asks for
    clipping; a pass-through otherwise."""
    if not _clipping_asked(msg):
        return call_next(msg, context)
    # Flower's mod clips the reply against the arrays it was sent, name by name; the
    # reply holds only the exchanged ones. The trainer still gets the whole message.
    reply = fixedclipping_mod(_exchanged_only(msg), context,
                              lambda _, ctx: call_next(msg, ctx))
    if not reply.has_error():
        for metrics in reply.content.metric_records.values():
            metrics[DP_WEIGHT_KEY] = 1
    return reply


def _exchanged_only(msg: Message) -> Message:
    """``msg`` holding only the arrays a client sends back (not frozen, floating-point)."""
    config = next(iter(msg.content.config_records.values()))
    view = copy.copy(msg)
    records = {}
    for key, record in msg.content.items():
        if isinstance(record, ArrayRecord):
            names = exchanged_names({n: a.dtype for n, a in record.items()},
                                    frozen_from_config(config))
            record = ArrayRecord(array_dict={name: record[name] for name in names})
        records[key] = record
    view.content = RecordDict(records)
    return view
