"""A light ClientApp that hands each message to the device's warm trainer.

Flower 1.42 starts a fresh ``flwr-clientapp`` process for every message. Importing
torch, reading the data and torch's first-use set-up in that process cost seconds per
round on a small device, so ``fedge client`` keeps one trainer process warm instead:
the ClientApp Flower starts (:data:`app`, which imports Flower and nothing heavier)
forwards the message's records to it over a Unix socket in the client's private working
folder, authenticated with a key only that folder holds, and returns the reply (an error
reply, with the trainer's reason, when training failed). The server's last message, that
its run has finished (:data:`RUN_FINISHED`), is handed over the same way; every reply
of such a node carries a :data:`FEDGE_NODE` record, so that the server does not send that
message to nodes that answer without it (another ClientApp). Both ends of that hand-off
live here; the trainer itself is passed in.

A device that joins with Flower's plain ``flower-supernode`` instead of ``fedge client``
runs this ClientApp with no trainer behind it: it logs :data:`NOT_FEDGE_CLIENT` and
answers each train message with an error reply saying so, which the server logs under
the node's id and counts as the node's failure in that round.
"""

import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log as flower_log

from fedge.client.compression import compression_mod
from fedge.client.privacy import dp_clipping_mod
from fedge.client.secagg import secagg_mod
from fedge.client.wire import WireRecorder
from fedge.protocol import FEDGE_NODE, RUN_FINISHED, SUMMARY_KEY

log = logging.getLogger("fedge.client")

Trainer = Callable[[RecordDict, Context], RecordDict]
SOCKET_KEY = "trainer-socket"
AUTHKEY_KEY = "trainer-authkey"
CLIENT_APP_ERROR = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION
# Why a node that runs Flower's plain SuperNode, with no `fedge client` behind this
# ClientApp, cannot train (its node config lacks the trainer's entries).
NOT_FEDGE_CLIENT = (
    "this federation trains with `fedge client`, which keeps fedge's trainer and this "
    "device's data behind the ClientApp; this node runs a plain Flower SuperNode without "
    "them. Start this device with `fedge client --server HOST:PORT --data FILE` (add --ca "
    "and --key for a TLS server, --insecure for a plaintext one) instead of "
    "`flower-supernode`")


class TrainerFailed(RuntimeError):
    """The warm trainer could not answer; the server gets an error reply saying why."""


@contextmanager
def serve_trainer(trainer: Trainer, workdir: Path,
                  on_run_finished: Callable[[str], None] = lambda summary: None,
                  ) -> Iterator[dict[str, str]]:
    """Answer relayed messages with ``trainer`` on a background thread until the block
    ends, and pass the server's end-of-run summary to ``on_run_finished``; yields the
    node-config entries the relay needs to find it."""
    socket, authkey = workdir / "trainer.sock", workdir / "trainer.key"
    authkey.touch(mode=0o600)
    authkey.write_bytes(secrets.token_bytes(32))
    listener = Listener(str(socket), family="AF_UNIX", authkey=authkey.read_bytes())
    stopping = threading.Event()
    threading.Thread(target=_answer_until_stopped,
                     args=(listener, trainer, on_run_finished, stopping),
                     daemon=True, name="fedge-trainer").start()
    try:
        yield {SOCKET_KEY: str(socket), AUTHKEY_KEY: str(authkey)}
    finally:
        stopping.set()
        listener.close()  # removes the socket while its folder still exists


def _answer_until_stopped(listener: Listener, trainer: Trainer,
                          on_run_finished: Callable[[str], None],
                          stopping: threading.Event) -> None:
    while not stopping.is_set():
        try:
            connection = listener.accept()
        except (AuthenticationError, OSError) as error:
            if not stopping.is_set():
                log.warning("refused a connection to the trainer: %s", error)
            continue
        with connection:
            kind, content, context = connection.recv()
            if kind == RUN_FINISHED:
                on_run_finished(str(content))
                connection.send((True, RecordDict()))
                continue
            try:
                connection.send((True, trainer(content, context)))
            except Exception as error:  # the server hears why, in an error reply
                connection.send((False, str(error) or type(error).__name__))


def _ask_trainer(kind: str, content: object, context: Context) -> RecordDict:
    authkey = Path(str(context.node_config[AUTHKEY_KEY])).read_bytes()
    with Client(str(context.node_config[SOCKET_KEY]), family="AF_UNIX",
                authkey=authkey) as connection:
        connection.send((kind, content, context))
        ok, answer = connection.recv()
    if not ok:
        raise TrainerFailed(answer)
    return answer


def has_trainer(context: Context) -> bool:
    """Whether ``fedge client`` started this node, and so named its warm trainer."""
    return SOCKET_KEY in context.node_config and AUTHKEY_KEY in context.node_config


def relay(content: RecordDict, context: Context) -> RecordDict:
    """The warm trainer's reply to ``content``, found through the node config."""
    return _ask_trainer("train", content, context)


def fedge_node_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Marks the replies of a node with fedge's trainer behind it (see FEDGE_NODE)."""
    reply = call_next(msg, context)
    if has_trainer(context) and reply.has_content():
        reply.content[FEDGE_NODE] = ConfigRecord({"answers": RUN_FINISHED})
    return reply


# The wire recorder is the first mod, the outermost: it records what leaves the device
# after every other mod (`fedge client --record-wire` names its folder in the node config).
# The fedge-node mark is on every reply, secure aggregation's included.
# DP clipping is the last, the innermost: it clips the trainer's reply when the server asks.
# SecAgg+ answers a secure server's rounds (masking what the trainer sent), nothing else.
# Compression sends the clipped update quantized when the server's config asks for it.
app = ClientApp(mods=[WireRecorder(), fedge_node_mod, secagg_mod, compression_mod,
                      dp_clipping_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    if not has_trainer(context):  # Flower shows this process's log in the SuperNode's
        flower_log(logging.ERROR, "fedge: %s", NOT_FEDGE_CLIENT)
        return Message(Error(CLIENT_APP_ERROR, NOT_FEDGE_CLIENT), reply_to=msg)
    try:
        return Message(relay(msg.content, context), reply_to=msg)
    except TrainerFailed as failure:  # an error reply, without a traceback in the log
        return Message(Error(CLIENT_APP_ERROR, str(failure)),
                       reply_to=msg)


@app.query(RUN_FINISHED.split(".")[1])
def run_finished(msg: Message, context: Context) -> Message:
    summary = next((str(c[SUMMARY_KEY]) for c in msg.content.config_records.values()
                    if SUMMARY_KEY in c), "")
    if not has_trainer(context):
        flower_log(logging.INFO, "fedge: the federation's run finished (%s)", summary)
        return Message(RecordDict(), reply_to=msg)
    return Message(_ask_trainer(RUN_FINISHED, summary, context), reply_to=msg)
