"""What a running federation tells those who watch it: trackers (MLflow, TensorBoard) and
the operator's metrics. An observer never changes the run, and a failing one never stops
it: its error is logged once and it is heard no more."""

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Message
from flwr.serverapp import Grid

from fedge.config import RunConfig
from fedge.server.grid import GridWrapper

log = logging.getLogger("fedge.server")

# What the server is doing, as observers hear it.
PHASES = ("starting", "waiting", "training", "evaluating", "exporting", "finished", "failed")


@dataclass(frozen=True)
class RunStart:
    """The run an observer watches: its folder and settings, the model's fingerprint,
    its step's name (``round``, or FedBuff's ``version``), the task's headline measure,
    and the round it resumes after (0 for a new run) with the rounds before it."""

    run_dir: Path
    config: RunConfig
    fingerprint: str | None
    origin: str | None
    unit: str
    headline: str
    resumed_after: int = 0
    command: str = "simulate"  # or "server"
    versions: dict[str, str] = field(default_factory=dict)  # fedge, flwr, torch
    history: tuple[dict, ...] = ()  # a resumed run's rounds so far, as metrics.json keeps them


class RunObserver:
    """Hears a federation as it runs; each method does nothing unless overridden.

    ``round_done`` gets the round's record as metrics.json keeps it (``as_dict``), and
    for FedBuff the staleness τ of each update aggregated since the last record.
    ``ended`` comes once, after the run folder is complete (``finished``) or the run
    stopped (``failed``: no model; ``interrupted``: it can resume)."""

    def started(self, run: RunStart) -> None: ...
    def initial(self, measured: dict) -> None: ...
    def phase(self, phase: str) -> None: ...
    def connected(self, nodes: int) -> None: ...
    def round_done(self, record: dict, improved: bool, staleness: Sequence[int] = ()) -> None: ...
    def ended(self, status: str, error: str | None = None) -> None: ...
    def close(self) -> None: ...


class Observers(RunObserver):
    """Many observers as one; one that raises is logged once and dropped."""

    def __init__(self, observers: Iterable[RunObserver] = ()) -> None:
        self.observers = list(observers)

    def _each(self, event: str, *args: object) -> None:
        for observer in list(self.observers):
            try:
                getattr(observer, event)(*args)
            except Exception as error:  # watching must never stop training
                log.warning("%s stopped observing the run (%s: %s); the run goes on",
                            type(observer).__name__, type(error).__name__, error)
                self.observers.remove(observer)

    def started(self, run: RunStart) -> None:
        self._each("started", run)

    def initial(self, measured: dict) -> None:
        self._each("initial", measured)

    def phase(self, phase: str) -> None:
        self._each("phase", phase)

    def connected(self, nodes: int) -> None:
        self._each("connected", nodes)

    def round_done(self, record: dict, improved: bool, staleness: Sequence[int] = ()) -> None:
        self._each("round_done", record, improved, staleness)

    def ended(self, status: str, error: str | None = None) -> None:
        self._each("ended", status, error)

    def close(self) -> None:
        self._each("close")


class ObservedGrid(GridWrapper):
    """Tells ``observers`` how many clients are connected (``waiting`` while fewer than
    ``min_nodes``) and when training messages go out, delegating everything to ``grid``:
    Flower's own, beneath the round logic that samples and waits."""

    def __init__(self, grid: Grid, observers: RunObserver, min_nodes: int) -> None:
        super().__init__(grid)
        self.observers, self.min_nodes = observers, min_nodes

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self.grid.get_node_ids())
        self.observers.connected(len(nodes))
        if len(nodes) < self.min_nodes:
            self.observers.phase("waiting")
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if any(m.metadata.message_type.startswith("train") for m in messages):
            self.observers.phase("training")
        return self.grid.push_messages(messages)
