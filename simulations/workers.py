"""A Flower ``Grid`` that trains a round's clients in parallel, in worker processes.

:class:`WorkerGrid` is :class:`~fedge.simulations.inprocess.InProcessGrid` spread over a
few long-lived processes. Each worker starts once (see :func:`start_method`), sets torch
to one thread, and builds the very ClientApp the in-process backend builds from a
picklable :class:`ClientRecipe`: the clients' data is this process's, shared with forked
workers (a spawned worker receives one copy), and memory grows with the workers, not with
the clients. Node ``n`` always
goes to worker ``n % workers``, which keeps its Flower Context (SecAgg+'s keys between
stages). Messages travel as Flower's own protobuf serialization, as over a network.

One thread per worker makes training bit-identical to a single thread, whichever worker
trains a client; the server sorts the replies into the order of its messages, so the
same seed gives the same run with 2 or 4 workers, and with InProcessGrid, whose clients
train on one thread too.

As with InProcessGrid, every reply is in when ``push_messages`` returns. A worker that
dies (or answers nothing for ``timeout`` seconds) becomes an error reply for each of its
nodes' messages, which the server counts as failures; it is started again at once, for
the next round. Workers ignore Ctrl-C: :meth:`WorkerGrid.close` ends every worker, and
workers end themselves when this process dies.
"""

import atexit
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from flwr.app import Error, Message
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedge.config import RunConfig
from fedge.errors import FedgeError
from fedge.server.privacy import clients_per_round
from fedge.simulations.clients import SimulatedClients
from fedge.simulations.inprocess import CLIENT_APP_ERROR, FIRST_CLIENT_NODE_ID, SimulatedNodes

log = logging.getLogger("fedge.server")

START_TIMEOUT = 300.0  # seconds for the workers' first start (import torch, read the data)
STOP_GRACE = 5.0  # seconds a worker has to stop before it is killed
IN_FLIGHT = 2  # messages sent to a worker ahead of its replies


@dataclass(frozen=True)
class ClientRecipe:
    """Everything a process needs to build the simulation's ClientApp (picklable)."""

    config: RunConfig
    clients: SimulatedClients
    num_classes: int
    record_wire: Path | None = None

    def client_app(self) -> ClientApp:
        from fedge.client.app import build_client_app
        from fedge.client.compression import compression_mod
        from fedge.client.privacy import dp_clipping_mod
        from fedge.client.secagg import secagg_mod
        from fedge.client.wire import WireRecorder
        from fedge.models.hf import pretrained_folder
        from fedge.simulations.attacks import staged_attack

        # The wire recorder stays the first mod, the outermost: it records what leaves a
        # client. DP clipping is the last mod, the innermost: it clips what honest training
        # produced (an attacker's mod acts after it, as a malicious device would not clip).
        # SecAgg+ masks what the mods inside it produce; it passes plaintext rounds through.
        # Compression quantizes what the device sends, an attacker's update included.
        wire = [] if self.record_wire is None else [WireRecorder(self.record_wire)]
        load_data, attack_mods = staged_attack(self.config, self.clients.local_data,
                                               self.num_classes)
        return build_client_app(load_data, device=self.config.simulation.device,
                                mods=[*wire, secagg_mod, compression_mod, *attack_mods,
                                      dp_clipping_mod],
                                base_folder=pretrained_folder(self.config.model.name))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(config: RunConfig) -> int:
    """The worker processes an in-process simulation uses (1: none, train in this one)."""
    if config.simulation.workers is not None and config.simulation.workers < 1:
        raise FedgeError(f"workers must be at least 1 (1: train in this process), not "
                         f"{config.simulation.workers}")
    per_round = min(config.strategy.clients, clients_per_round(config.strategy))
    if config.simulation.workers is not None:
        return max(1, min(config.simulation.workers, config.strategy.clients))
    return max(1, min(available_cores(), per_round))


def start_method(device: str) -> str:
    """``fork`` on Linux for CPU training: a worker starts in milliseconds with torch, the
    ClientApp's modules and the clients' data already in memory, shared copy-on-write,
    and one torch thread makes the parent's thread pool irrelevant (as in torch's own
    DataLoader workers). ``spawn`` elsewhere: CUDA cannot be used in a forked child of a
    process that touched it, and macOS's system libraries are not fork-safe."""
    if not sys.platform.startswith("linux"):
        return "spawn"
    from fedge.client.training import pick_device

    return "fork" if pick_device(device).type == "cpu" else "spawn"


def _import_what_training_imports() -> None:
    """Build a throwaway optimizer: torch imports ``torch._dynamo`` (about a second) on
    the first one. Done here, before forking, every worker inherits it instead of
    importing it again, and this process has it for the final ONNX export."""
    import torch

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def _encode(message: Message) -> bytes:
    return message_to_proto(message).SerializeToString()


def _decode(payload: bytes) -> Message:
    proto = ProtoMessage()
    proto.ParseFromString(payload)
    return message_from_proto(proto)


def _serve(recipe: ClientRecipe, num_nodes: int, run_id: int, index: int, inbox: Any,
           outbox: Connection, parent: int, log_level: int) -> None:
    """A worker: build the ClientApp once, then answer messages until told to stop."""
    from fedge import guard

    guard.die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops us
    import torch

    torch.set_num_threads(1)
    _share_the_gpus(recipe.config.simulation.device, index)
    logging.getLogger("flwr").setLevel(log_level)
    from fedge.simulations.inprocess import InProcessGrid

    nodes = InProcessGrid(recipe.client_app(), num_nodes, run_id)
    outbox.send_bytes(b"")  # ready
    while True:
        try:
            task = inbox.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if task is None:
            return
        outbox.send_bytes(_encode(nodes.reply_to(_decode(task))))


def _share_the_gpus(device: str, index: int) -> None:
    """Worker ``k`` trains on GPU ``k % GPUs`` when the run asks for CUDA without naming a
    GPU: the workers spread evenly over every GPU of the machine."""
    import torch

    if device in ("auto", "cuda") and torch.cuda.device_count() > 1:
        torch.cuda.set_device(index % torch.cuda.device_count())


class _Worker:
    """One worker process, its inbox and the messages it has not answered yet."""

    def __init__(self, index: int, context: Any, args: tuple) -> None:
        self.index = index
        self.inbox = context.Queue()
        reader, writer = context.Pipe(duplex=False)
        self.replies: Connection = reader
        self.process = context.Process(
            target=_serve, args=(*args, index, self.inbox, writer, os.getpid(),
                                 logging.getLogger("flwr").level),
            name=f"fedge-worker-{index}", daemon=True)
        with _main_module_hidden() if context.get_start_method() == "spawn" else (
                contextlib.nullcontext()):
            self.process.start()
        writer.close()  # the worker holds the only writing end: its death is EOF here
        self.ready, self.started = False, time.monotonic()
        self.outstanding: dict[str, Message] = {}  # unanswered, sent or still queued here
        self.queued: deque[str] = deque()  # ids of those not yet sent
        self.progress = self.started  # when it last answered, or got work while idle

    def feed(self) -> None:
        """Send queued messages until ``IN_FLIGHT`` are with the worker: memory holds a
        few encoded messages per worker, not one per client."""
        while self.queued and len(self.outstanding) - len(self.queued) < IN_FLIGHT:
            if len(self.outstanding) == len(self.queued):  # idle until now
                self.progress = time.monotonic()
            self.inbox.put(_encode(self.outstanding[self.queued.popleft()]))

    def hung(self, timeout: float) -> bool:
        busy = len(self.outstanding) > len(self.queued)
        return self.ready and busy and time.monotonic() - self.progress > timeout

    def alive(self) -> bool:
        return self.process.is_alive()

    def ask_to_stop(self) -> None:
        """An idle worker stops after its last message; a busy one is ended now (it
        would finish every message queued for it first)."""
        if self.outstanding or not self.ready:
            self.process.terminate()
            return
        with contextlib.suppress(OSError, ValueError):
            self.inbox.put(None)

    def stop(self, deadline: float) -> None:
        """Wait until ``deadline`` (monotonic seconds) for the process to end; then end it."""
        self.process.join(max(0.0, deadline - time.monotonic()))
        for end in (self.process.terminate, self.process.kill):
            if not self.process.is_alive():
                break
            end()
            self.process.join(2.0)
        self.inbox.cancel_join_thread()  # a dead worker's inbox must not block our exit
        self.inbox.close()
        self.replies.close()


class WorkerGrid(SimulatedNodes):
    """Nodes ``1001, 1002, ...`` as in :class:`InProcessGrid`, their ClientApp run by
    ``workers`` processes built from ``recipe``. ``push_messages`` returns once every
    reply is in; a worker that answers nothing for ``timeout`` seconds (real time: the
    round's timeout, unless a simulated clock keeps that) is ended and replaced, and its
    messages get error replies; see the module docstring."""

    def __init__(self, recipe: ClientRecipe, num_nodes: int, workers: int,
                 timeout: float = 600.0, run_id: int = 1,
                 start_timeout: float = START_TIMEOUT) -> None:
        if workers < 1:
            raise FedgeError(f"workers must be at least 1, not {workers}")
        super().__init__(num_nodes, run_id)
        self.timeout = timeout
        self._args = (recipe, num_nodes, run_id)
        self._context = multiprocessing.get_context(start_method(recipe.config.simulation.device))
        if self._context.get_start_method() == "fork":
            _import_what_training_imports()
        self._replies: dict[str, Message] = {}
        self._closed = False
        atexit.register(self.close)
        self._workers: list[_Worker] = []
        try:
            self._workers = [_Worker(k, self._context, self._args) for k in range(workers)]
            self._await_start(start_timeout)
        except BaseException:
            self.close()
            raise

    # --- Grid ---------------------------------------------------------------------------

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Hand each message to its node's worker; replies wait for ``pull_messages``."""
        self._check_open()
        ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            node = message.metadata.dst_node_id
            if not 0 <= node - FIRST_CLIENT_NODE_ID < self.num_nodes:
                self._replies[message_id] = Message(Error(CLIENT_APP_ERROR, f"no node {node}"),
                                                    reply_to=message)
            else:
                worker = self._workers[node % len(self._workers)]
                worker.outstanding[message_id] = message
                worker.queued.append(message_id)
            ids.append(message_id)
        for worker in self._workers:
            worker.feed()
        # As in InProcessGrid, every reply is in when the push returns (an error reply for
        # each message of a worker that died or stayed silent for `timeout` seconds): a
        # simulated clock then decides which results were late, not this machine's speed.
        while any(w.outstanding for w in self._workers):
            self._collect(1.0)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids``, in that order."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    # --- workers ------------------------------------------------------------------------

    @property
    def worker_pids(self) -> list[int]:
        """The workers' process ids, in worker order (for tests and monitoring)."""
        return [w.process.pid for w in self._workers]

    def close(self) -> None:
        """End every worker (politely, then by force); the grid cannot be used after."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        with _ignored_interrupts():
            for worker in self._workers:
                worker.ask_to_stop()
            deadline = time.monotonic() + STOP_GRACE
            for worker in self._workers:
                worker.stop(deadline)

    def __enter__(self) -> "WorkerGrid":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise FedgeError("this WorkerGrid is closed")

    def _await_start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self._workers):
            self._collect(min(1.0, max(0.0, deadline - time.monotonic())), starting=True)
            if time.monotonic() >= deadline and not all(w.ready for w in self._workers):
                raise FedgeError(f"the simulation's worker processes did not start within "
                                 f"{timeout:.0f} s")

    def _collect(self, wait_for: float, starting: bool = False) -> None:
        """Read every reply that is in (waiting up to ``wait_for`` seconds for one), and
        turn dead or hung workers into error replies."""
        readable = {w.replies: w for w in self._workers}
        sentinels = {w.process.sentinel: w for w in self._workers}
        ready = wait([*readable, *sentinels], timeout=wait_for) if wait_for > 0 else [
            c for c in readable if c.poll()]
        for connection in ready:
            worker = readable.get(connection)
            if worker is None:
                continue
            while worker in self._workers and connection.poll():
                try:
                    payload = connection.recv_bytes()
                except (EOFError, OSError):
                    break
                worker.progress = time.monotonic()
                if not payload:  # started: its deadline runs from now
                    worker.ready = True
                    continue
                reply = _decode(payload)
                if worker.outstanding.pop(reply.metadata.reply_to_message_id, None):
                    self._replies[reply.metadata.reply_to_message_id] = reply
                worker.feed()
        now = time.monotonic()
        for worker in list(self._workers):
            if not worker.alive():
                code = worker.process.exitcode
                if starting:
                    raise FedgeError(f"a simulation worker process ended while starting "
                                     f"(exit code {code}); run with --workers 1 to see why")
                self._fail(worker, f"ended (exit code {code})")
            elif not worker.ready:
                if now - worker.started > START_TIMEOUT:
                    self._fail(worker, f"did not start within {START_TIMEOUT:g} s")
            elif worker.hung(self.timeout):
                self._fail(worker, f"answered nothing for {self.timeout:g} s")

    def _fail(self, worker: _Worker, what: str) -> None:
        """Error replies for ``worker``'s unanswered messages; a fresh worker in its place."""
        pid = worker.process.pid
        for message_id, message in worker.outstanding.items():
            self._replies[message_id] = Message(
                Error(CLIENT_APP_ERROR, f"simulation worker {worker.index} (pid {pid}) {what} "
                                        f"before node {message.metadata.dst_node_id} replied"),
                reply_to=message)
        if worker.outstanding:
            log.warning("simulation worker %d (pid %d) %s: %d client(s) failed; restarting it",
                        worker.index, pid, what, len(worker.outstanding))
        worker.outstanding.clear()
        worker.process.kill()
        worker.stop(0.0)
        self._workers[worker.index] = _Worker(worker.index, self._context, self._args)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a spawned worker without re-running the ``__main__`` script in it, as
    ``multiprocessing`` otherwise does: a worker needs nothing from it, and a script that
    calls ``fedge.simulate`` without an ``if __name__ == "__main__":`` guard would run again
    in every worker."""
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__spec__", "__file__")
             if name in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.update(saved)


class _ignored_interrupts:
    """Finish stopping the workers even if a second Ctrl-C arrives meanwhile."""

    def __enter__(self) -> None:
        self._previous = None
        with contextlib.suppress(ValueError):  # not the main thread
            self._previous = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
