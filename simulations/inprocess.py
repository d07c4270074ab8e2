"""A Flower ``Grid`` that runs the ClientApp inside this process.

Flower's strategies drive it through ``Strategy.start(grid=...)`` exactly as they drive
the Ray simulation engine or the Deployment Engine, without Ray's ~10 s start-up.
"""

import contextlib
import copy
import uuid
from collections.abc import Iterable, Iterator

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

# Flower builds every Message from a process-wide task identity that its runtimes set;
# fedge's grids set it through act_as_server, here only (flwr 1.42; pinned by
# tests/test_backends.py).
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1  # Flower's SuperLink node id
FIRST_CLIENT_NODE_ID = 1001
CLIENT_APP_ERROR = 2  # reply error code for an exception inside the ClientApp


def act_as_server(run_id: int) -> None:
    """Let this process build Flower messages as the server of run ``run_id`` (what
    Flower's runtimes do before they run a ServerApp)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE_ID, 1


class SimulatedNodes(Grid):
    """What every simulation grid shares: nodes ``1001 … 1000 + num_nodes`` of run
    ``run_id``, whose replies are all in when ``push_messages`` returns (so
    ``send_and_receive`` needs no timeout); subclasses push and pull."""

    def __init__(self, num_nodes: int, run_id: int = 1) -> None:
        self.num_nodes, self._run_id = num_nodes, run_id
        self._run = Run.create_empty(run_id)
        act_as_server(run_id)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(range(FIRST_CLIENT_NODE_ID, FIRST_CLIENT_NODE_ID + self.num_nodes))

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


class InProcessGrid(SimulatedNodes):
    """Nodes ``1001, 1002, ...``, each with a persistent Context whose node config
    carries ``partition-id`` and ``num-partitions`` as in Flower's simulation engine.

    A node's Context is made when a message arrives and kept only while its ``state``
    holds something (SecAgg+'s keys between stages): registering 10,000 nodes costs
    nothing, and memory follows the nodes sampled, not the nodes registered."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        super().__init__(num_nodes, run_id)
        self.client_app = client_app
        self._contexts: dict[int, Context] = {}
        self._replies: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Run each message through the ClientApp now; replies wait for ``pull_messages``."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self._replies[message.metadata.message_id] = self._handle(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def reply_to(self, message: Message) -> Message:
        """The ClientApp's reply to ``message``, now (an error reply if it raised)."""
        return self._handle(message)

    def _handle(self, message: Message) -> Message:
        context = self._context(message.metadata.dst_node_id)
        if context is None:
            return Message(Error(CLIENT_APP_ERROR, f"no node {message.metadata.dst_node_id}"),
                           reply_to=message)
        try:
            # Each node gets its own copy, as over a network: SecAgg+ sends one RecordDict
            # to every node, and Flower's client mod edits it.
            with one_torch_thread():
                return self.client_app(copy.deepcopy(message), context)
        except Exception as error:  # a failing client must not end the round
            return Message(Error(CLIENT_APP_ERROR, f"{type(error).__name__}: {error}"),
                           reply_to=message)
        finally:
            if not context.state:
                self._contexts.pop(context.node_id, None)

    def live_contexts(self) -> int:
        """How many node Contexts are held now (nodes whose ``state`` holds something)."""
        return len(self._contexts)

    def _context(self, node_id: int) -> Context | None:
        partition_id = node_id - FIRST_CLIENT_NODE_ID
        if not 0 <= partition_id < self.num_nodes:
            return None
        if node_id not in self._contexts:
            self._contexts[node_id] = node_context(node_id, self.num_nodes, self._run_id)
        return self._contexts[node_id]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Train on one torch thread, as every worker does: a sum split over threads rounds
    differently, and the same seed must give the same numbers whatever ``--workers``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def node_context(node_id: int, num_nodes: int, run_id: int = 1) -> Context:
    """A fresh Context for simulated node ``node_id`` of ``num_nodes``, whose node config
    carries ``partition-id`` and ``num-partitions`` as in Flower's simulation engine."""
    return Context(run_id=run_id, node_id=node_id,
                   node_config={"partition-id": node_id - FIRST_CLIENT_NODE_ID,
                                "num-partitions": num_nodes},
                   state=RecordDict(), run_config={})
