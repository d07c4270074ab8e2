"""The client's part in update compression: send the update, quantized, not the weights.

When the round's config names a scheme under ``compress`` (the server's ``--compress``),
:func:`compression_mod` replaces the weights w_local of the reply with the update

    Δ = w_local − w        (w: the global weights the client received)

quantized array by array (floating-point arrays only; others travel unchanged):

- ``fp16``: Δ̂ = fp16(Δ), 2 bytes a value; relative error ≤ 2⁻¹¹ (|Δ| ≥ 2⁻¹⁴), absolute
  error ≤ 2⁻²⁵ below that.
- ``int8``: symmetric linear quantization with one scale per array and stochastic
  rounding,
  s = max|Δ| / 127,  q = ⌊Δ / s + u⌋ ∈ [−127, 127], u ~ U[0, 1) (int8, 1 byte a value),
  Δ̂ = q · s;  so E[Δ̂] = Δ and |Δ − Δ̂| < s, one quantization step. Rounding to the
  nearest level would halve the worst error, but its errors are a fixed function of Δ
  and need not cancel; unbiased errors average out over the clients the server
  averages (QSGD's argument). The draws are seeded per client and round, so runs stay
  reproducible. Zero stays exactly zero.

The reply then carries a ConfigRecord ``compression`` naming the scheme and the int8
scales (in the order of the arrays); the server (``fedge.server.compression``) adds Δ̂
back to w before any screening or aggregation. Without ``compress`` in the config the
mod does nothing. Numpy and Flower only: it also runs in the relay ClientApp, which must
stay free of torch. Put it between the wire recorder (outermost, it records the
compressed reply) and DP clipping (innermost, it clips the trainer's update).
"""

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedge.client.data import node_seed
from fedge.errors import FedgeError
from fedge.protocol import COMPRESS_KEY, COMPRESSION_RECORD, SEED, SERVER_ROUND

SCHEMES = ("fp16", "int8")
INT8_LEVELS = 127


def encode_update(update: np.ndarray, scheme: str,
                  rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """``update`` quantized with ``scheme``, and its scale (1.0 for fp16); ``rng`` draws
    int8's stochastic rounding.

    A non-finite update gets scale NaN, so that it decodes to NaN and the server's screen
    refuses it, as it would the uncompressed reply.
    """
    if scheme == "fp16":
        return update.astype(np.float16), 1.0
    if scheme != "int8":
        raise FedgeError(f"unknown update compression {scheme!r}; choose one of: "
                         f"{', '.join(SCHEMES)}")
    if not np.isfinite(update).all():
        return np.zeros(update.shape, dtype=np.int8), float("nan")
    largest = float(np.max(np.abs(update), initial=0.0))
    scale = largest / INT8_LEVELS
    if scale == 0.0:
        return np.zeros(update.shape, dtype=np.int8), 0.0
    levels = np.clip(np.floor(update / scale + rng.random(update.shape)),
                     -INT8_LEVELS, INT8_LEVELS)
    return levels.astype(np.int8), scale


def compress_arrays(local: ArrayRecord, received: ArrayRecord, scheme: str,
                    rng: np.random.Generator) -> tuple[ArrayRecord, ConfigRecord]:
    """The quantized updates of ``local`` against ``received``, and the record that says
    how to decode them."""
    encoded, scales = ArrayRecord(), []
    for name, array in local.items():
        value = array.numpy()
        if value.dtype.kind != "f" or name not in received:
            encoded[name] = array
            scales.append(1.0)
            continue
        update = value.astype(np.float64) - received[name].numpy().astype(np.float64)
        quantized, scale = encode_update(update, scheme, rng)
        encoded[name] = Array(quantized)
        scales.append(scale)
    return encoded, ConfigRecord({"scheme": scheme, "scales": scales})


def _compression_config(msg: Message) -> ConfigRecord | None:
    """The server's train config, if it asks for compression."""
    return next((c for c in msg.content.config_records.values()
                 if c.get(COMPRESS_KEY, "none") != "none"), None)


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Send the reply's weights as quantized updates when the server asks; a
    pass-through otherwise."""
    config = _compression_config(msg)
    if config is None:
        return call_next(msg, context)
    scheme = str(config[COMPRESS_KEY])
    if scheme not in SCHEMES:
        raise FedgeError(f"the server asked for update compression {scheme!r}; this client "
                         f"knows {', '.join(SCHEMES)}")
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    received = next(iter(msg.content.array_records.values()))
    content = reply.content
    rng = np.random.default_rng(node_seed(int(config.get(SEED, 0)),
                                          int(config.get(SERVER_ROUND, 0)), context))
    for name, local in list(content.array_records.items()):
        content[name], content[COMPRESSION_RECORD] = compress_arrays(local, received, scheme, rng)
    return reply
