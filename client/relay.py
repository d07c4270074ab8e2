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
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

log = logging.getLogger("fedge.client")

Trainer = Callable[[RecordDict, Context], RecordDict]
SOCKET_KEY = "trainer-socket"
AUTHKEY_KEY = "trainer-authkey"


class TrainerFailed(RuntimeError):
    """The warm trainer could not answer; Flower sends the server an error reply."""


def serve_trainer(trainer: Trainer, workdir: Path) -> dict[str, str]:
    """Answer relayed messages with ``trainer`` on a background thread for as long as
    this process lives; returns the node-config entries the relay needs to find it."""
    socket, authkey = workdir / "trainer.sock", workdir / "trainer.key"
    authkey.touch(mode=0o600)
    authkey.write_bytes(secrets.token_bytes(32))
    listener = Listener(str(socket), family="AF_UNIX", authkey=authkey.read_bytes())
    threading.Thread(target=_answer_forever, args=(listener, trainer), daemon=True,
                     name="fedge-trainer").start()
    return {SOCKET_KEY: str(socket), AUTHKEY_KEY: str(authkey)}


def _answer_forever(listener: Listener, trainer: Trainer) -> None:
    while True:
        try:
            connection = listener.accept()
        except (AuthenticationError, OSError) as error:
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


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return Message(relay(msg.content, context), reply_to=msg)
