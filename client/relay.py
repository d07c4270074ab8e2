"""A light ClientApp that hands each message to the device's warm trainer.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message. Importing
torch, reading the data and torch's first-use set-up in that process cost seconds per
round on a small device, so ``fedge client`` keeps one trainer process warm instead:
the ClientApp Flower starts (:data:`app`, which imports Flower and nothing heavier)
forwards the message's records to it over a Unix socket in the client's private working
folder, authenticated with a key only that folder holds, and returns the reply. Both
ends of that hand-off live here; the trainer itself is passed in.
"""

import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedge.client.compression import compression_mod
from fedge.client.privacy import dp_clipping_mod
from fedge.client.secagg import secagg_mod
from fedge.client.wire import WireRecorder

log = logging.getLogger("fedge.client")

Trainer = Callable[[RecordDict, Context], RecordDict]
SOCKET_KEY = "trainer-socket"
AUTHKEY_KEY = "trainer-authkey"


class TrainerFailed(RuntimeError):
    """The warm trainer could not answer; Flower sends the server an error reply."""


@contextmanager
def serve_trainer(trainer: Trainer, workdir: Path) -> Iterator[dict[str, str]]:
    """Answer relayed messages with ``trainer`` on a background thread until the block
    ends; yields the node-config entries the relay needs to find it."""
    socket, authkey = workdir / "trainer.sock", workdir / "trainer.key"
    authkey.touch(mode=0o600)
    authkey.write_bytes(secrets.token_bytes(32))
    listener = Listener(str(socket), family="AF_UNIX", authkey=authkey.read_bytes())
    stopping = threading.Event()
    threading.Thread(target=_answer_until_stopped, args=(listener, trainer, stopping),
                     daemon=True, name="fedge-trainer").start()
    try:
        yield {SOCKET_KEY: str(socket), AUTHKEY_KEY: str(authkey)}
    finally:
        stopping.set()
        listener.close()  # removes the socket while its folder still exists


def _answer_until_stopped(listener: Listener, trainer: Trainer,
                          stopping: threading.Event) -> None:
    while not stopping.is_set():
        try:
            connection = listener.accept()
        except (AuthenticationError, OSError) as error:
            if not stopping.is_set():
                log.warning("refused a connection to the trainer: %s", error)
            continue
        with connection:
            content, context = connection.recv()
            try:
                connection.send((True, trainer(content, context)))
            except Exception as error:  # the device's user and the server both hear why
                log.error("training failed: %s", error)
                connection.send((False, f"{type(error).__name__}: {error}"))


def relay(content: RecordDict, context: Context) -> RecordDict:
    """The warm trainer's reply to ``content``, found through the node config."""
    authkey = Path(str(context.node_config[AUTHKEY_KEY])).read_bytes()
    with Client(str(context.node_config[SOCKET_KEY]), family="AF_UNIX",
                authkey=authkey) as connection:
        connection.send((content, context))
        ok, answer = connection.recv()
    if not ok:
        raise TrainerFailed(answer)
    return answer


# The wire recorder is the first mod, the outermost: it records what leaves the device
# after every other mod (`fedge client --record-wire` names its folder in the node config).
# DP clipping is the last, the innermost: it clips the trainer's reply when the server asks.
# SecAgg+ answers a secure server's rounds (masking what the trainer sent), nothing else.
# Compression sends the clipped update quantized when the server's config asks for it.
app = ClientApp(mods=[WireRecorder(), secagg_mod, compression_mod, dp_clipping_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(relay(msg.content, context), reply_to=msg)
