"""The server's part in update compression: decode quantized updates, count the bytes.

With ``compress`` set (``fp16`` | ``int8``) the server asks every client, in the train
config, to send its update Δ̂ ≈ w_k − w quantized instead of its weights w_k
(``fedge.client.compression`` has the schemes and their error bounds). A reply that says
so in its ``compression`` record is decoded back to weights before anything else sees
it:

    w_k ≈ w + Δ̂,   Δ̂ = fp16 values as they are, or q · s for int8 levels q and scale s

so the update screen and the strategy work on weights as without compression. Every
round records ``bytes_per_client``: the mean, over the round's replies, of the bytes of
the arrays each client actually sent (as serialised in the message), compressed or not.
A reply that cannot be decoded loses its arrays, so the screen rejects it.
"""

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedge.config import RunConfig
from fedge.errors import FedgeError
from fedge.protocol import COMPRESSION_RECORD
from fedge.server.strategies import StrategyWrapper

log = logging.getLogger("fedge.server")

SCHEMES = ("fp16", "int8")


def check_compression(config: RunConfig) -> None:
    """A clear error for settings that cannot compress updates."""
    if config.training.compress != "none" and config.privacy.secagg:
        raise FedgeError(f"--compress {config.training.compress} cannot be combined with --secagg: "
                         "SecAgg+ quantizes the masked weights itself; drop one of them")
    if config.training.compress != "none" and config.privacy.dp_clip_norm is not None:
        # Quantizing a clipped update can push its norm past C, and the accountant's ε
        # assumes it never exceeds C.
        raise FedgeError(f"--compress {config.training.compress} cannot be combined with "
                         "differential privacy: quantization error could take a clipped "
                         "update past --dp-clip-norm; drop one of them")


def decode_update(quantized: np.ndarray, scale: float) -> np.ndarray:
    """Δ̂ as float64: fp16 values as they are, int8 levels times their ``scale``."""
    if quantized.dtype == np.int8:
        return quantized.astype(np.float64) * scale
    return quantized.astype(np.float64)


def decompress_arrays(encoded: ArrayRecord, how: ConfigRecord,
                      global_arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """The weights w + Δ̂ in the global model's dtypes; ValueError if ``encoded`` does not
    fit ``how`` or the global model."""
    scheme, scales = how.get("scheme"), how.get("scales")
    if scheme not in SCHEMES or not isinstance(scales, list) or len(scales) != len(encoded):
        raise ValueError(f"unknown compression scheme {scheme!r} or wrong scales")
    decoded = ArrayRecord()
    for (name, array), scale in zip(encoded.items(), scales, strict=True):
        value = array.numpy()
        sent = global_arrays.get(name)
        if sent is None or sent.dtype.kind != "f":
            decoded[name] = array
            continue
        if value.shape != sent.shape:
            raise ValueError(f"array {name!r} has shape {value.shape}, not {sent.shape}")
        decoded[name] = Array((sent + decode_update(value, float(scale))).astype(sent.dtype))
    return decoded


def sent_bytes(reply: Message) -> int:
    """Bytes of the arrays in ``reply`` as serialised for the wire."""
    return sum(len(array.data) for record in reply.content.array_records.values()
               for array in record.values())


class DecodeUpdates(StrategyWrapper):
    """``strategy`` that receives every train reply as weights: compressed replies are
    decoded first. ``on_bytes(mean)`` hears each round's mean bytes sent per reply."""

    def __init__(self, strategy: Strategy, on_bytes: Callable[[float | None], None]) -> None:
        super().__init__(strategy)
        self.on_bytes = on_bytes

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        answered = [reply for reply in replies if not reply.has_error()]
        self.on_bytes(float(np.mean([sent_bytes(r) for r in answered])) if answered else None)
        for reply in answered:
            if COMPRESSION_RECORD in reply.content:
                reply.content = decoded_content(reply, self.sent)
        return self.strategy.aggregate_train(server_round, replies)


def decoded_content(reply: Message, sent: dict[str, np.ndarray]) -> RecordDict:
    """A compressed reply's records with its update decoded to weights w + Δ̂ (``sent``:
    the arrays w it was sent); without arrays if it cannot be decoded."""
    content = reply.content
    records = {name: record for name, record in content.items() if name != COMPRESSION_RECORD}
    how = content[COMPRESSION_RECORD]
    arrays = [name for name in records if isinstance(records[name], ArrayRecord)]
    try:
        if not isinstance(how, ConfigRecord) or len(arrays) != 1:
            raise ValueError("expected one ArrayRecord and a compression ConfigRecord")
        records[arrays[0]] = decompress_arrays(records[arrays[0]], how, sent)
    except Exception as error:  # whatever a client sent, the round goes on
        log.warning("cannot decode the compressed update of client node %d: %s",
                    reply.metadata.src_node_id, error)
        records = {n: r for n, r in records.items() if not isinstance(r, ArrayRecord)}
    return RecordDict(records)
