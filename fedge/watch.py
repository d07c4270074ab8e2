"""``fedge watch RUN_DIR``: a live view of a run folder, read from its metrics.json.

The server rewrites metrics.json (atomically) after every round, in ``fedge simulate``
and ``fedge server`` alike; :func:`watch` reads it again whenever it changes and draws
the rounds so far, until the run has finished or failed. The drawing is made of small
pure functions of the metrics dict (:func:`sparkline`, :func:`rounds_table`,
:func:`header`, :func:`render`, :func:`round_line`, :func:`summary_line`), which do not
touch the run folder.

On a terminal the view redraws in place (``rich.live.Live``); on anything else (a pipe,
a CI log) it prints one plain line per new round and then the run's summary.
"""

import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from fedge.config import step_name
from fedge.errors import FedgeError
from fedge.files import finite_number
from fedge.models.measures import HEADLINE, higher_is_better, test_headline

SPARKS = "▁▂▃▄▅▆▇█"
DONE = ("finished", "failed")
WAITING = "waiting for the run's first round…"
STATUS_STYLE = {"running": "yellow", "finished": "green", "failed": "red"}


def sparkline(values: Sequence[float | None], width: int | None = None) -> str:
    """``values`` as bars ▁ (the smallest) to █ (the largest), one character each; a
    missing or non-finite value is a blank; all-equal values are mid-height bars.
    With ``width``, only the last ``width`` values."""
    if width is not None:
        values = list(values)[-width:] if width > 0 else []
    finite = [v for v in values if finite_number(v)]
    if not finite:
        return " " * len(values)
    low, high = min(finite), max(finite)
    top = len(SPARKS) - 1
    bars = []
    for value in values:
        if not finite_number(value):
            bars.append(" ")
        elif high == low:
            bars.append(SPARKS[top // 2])
        else:
            bars.append(SPARKS[int((value - low) / (high - low) * top + 0.5)])
    return "".join(bars)


def unit(metrics: dict) -> str:
    """What one server step is called: a round, or a model version (fedbuff)."""
    return step_name(str((metrics.get("config") or {}).get("strategy")))


def task_of(metrics: dict) -> str:
    task = (metrics.get("config") or {}).get("task")
    return task if task in HEADLINE else "classification"


def measured(record: dict | None, name: str) -> float | None:
    """A round's validation measure ``name`` (``val_loss``, ``val_macro_f1``, or without
    the ``val_`` prefix): a finite scalar, else None (missing, null, a per-class table)."""
    if not record:
        return None
    name = name.removeprefix("val_")
    if name == "loss":
        value = record.get("val_loss")
    else:
        value = (record.get("val_measures") or {}).get(name)
        if value is None:
            value = record.get(f"val_{name}")
    return float(value) if finite_number(value) else None


def _shown(value: object, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if finite_number(value) else "n/a"


def _best_record(metrics: dict) -> dict | None:
    best = metrics.get("best_round")
    return next((r for r in metrics.get("rounds") or [] if r.get("round") == best), None)


def _monitor(metrics: dict) -> str:
    return metrics.get("monitor") or "val_loss"


def _progress(metrics: dict) -> str:
    """``round 2/20``: the last step recorded, of the most the run may take."""
    rounds = metrics.get("rounds") or []
    done = rounds[-1].get("round", len(rounds)) if rounds else 0
    most = (metrics.get("config") or {}).get("rounds")
    return f"{unit(metrics)} {done}/{most}" if most else f"{unit(metrics)} {done}"


def _best_text(metrics: dict) -> str | None:
    """``best round 3: val_loss 0.312``, or None before there is one."""
    best = metrics.get("best_round")
    if best is None:
        return None
    monitor = _monitor(metrics)
    return (f"best {unit(metrics)} {best}: {monitor} "
            f"{_shown(measured(_best_record(metrics), monitor))}")


def _setting(metrics: dict) -> str:
    """``fedavg, classification, 3 clients``: what the run is, from its config."""
    config = metrics.get("config") or {}
    parts = [str(config[k]) for k in ("strategy", "task") if config.get(k)]
    if config.get("clients"):
        parts.append(f"{config['clients']} clients")
    return ", ".join(parts)


def header(metrics: dict, where: str | None = None, age: float | None = None) -> Text:
    """The view's first line: status, progress, the best round and its monitored value,
    the strategy and task; ``where``, the run folder; ``age``, seconds since
    metrics.json last changed (shown while the run is running)."""
    status = str(metrics.get("status", "running"))
    parts = [_progress(metrics)]
    if best := _best_text(metrics):
        parts.append(best)
    if metrics.get("stopped_early"):
        parts.append("stopped early")
    if setting := _setting(metrics):
        parts.append(setting)
    if age is not None and status == "running":
        parts.append(f"updated {age:.0f}s ago")
    text = Text()
    if where:
        text.append(f"{where}  ", style="bold")
    text.append(status, style=f"bold {STATUS_STYLE.get(status, '')}".strip())
    text.append("  ·  " + "  ·  ".join(parts))
    return text


def rounds_table(metrics: dict, last: int = 10) -> Table:
    """The last ``last`` rounds (versions): training and validation loss, the task's
    headline measure (and the monitored one, when it is neither), clients aggregated,
    failures and timeouts, seconds; ★ on the best round."""
    task, monitor, step = task_of(metrics), _monitor(metrics), unit(metrics)
    headline = f"val_{HEADLINE[task]}"
    measures = ["val_loss", headline]
    if monitor not in measures:
        measures.append(monitor)
    rounds = metrics.get("rounds") or []
    shown = rounds[-last:] if last > 0 else []
    evaluated = "" if step == "round" else "evaluated "
    caption = (f"the last {len(shown)} of {len(rounds)} {evaluated}{step}s"
               if len(shown) < len(rounds) else None)
    table = Table(step, "train_loss", *measures, "clients", "failed", "timed out", "seconds",
                  "", caption=caption, caption_justify="left")
    for column in table.columns[:-1]:
        column.justify = "right"
    best = metrics.get("best_round")
    for record in shown:
        table.add_row(
            str(record.get("round", "")), _shown(record.get("train_loss")),
            *(_shown(measured(record, name)) for name in measures),
            _count(record.get("num_clients")), _count(record.get("failures")),
            _count(record.get("timeouts")), _shown(record.get("seconds"), 2),
            "[green]★ best[/]" if record.get("round") == best else "")
    return table


def _count(value: object) -> str:
    return str(value) if isinstance(value, int) else "n/a"


def trend(metrics: dict, width: int = 60) -> Text | None:
    """The monitored validation measure over every round as a sparkline, or None before
    the first round."""
    rounds = metrics.get("rounds") or []
    if not rounds:
        return None
    monitor = _monitor(metrics)
    values = [measured(r, monitor) for r in rounds]
    better = "higher" if higher_is_better(monitor) else "lower"
    last = f", the last {width}" if len(values) > width else ""
    text = Text(f"{monitor} ")
    text.append(sparkline(values, width), style="cyan")
    text.append(f"  (per {unit(metrics)}{last}; {better} is better)", style="dim")
    return text


def _ran(metrics: dict) -> str:
    """``3 rounds``, ``1 round``; fedbuff: ``5 evaluations`` (of versions)."""
    ran = len(metrics.get("rounds") or [])
    name = "round" if unit(metrics) == "round" else "evaluation"
    return f"{ran} {name}{'' if ran == 1 else 's'}"


def outcome(metrics: dict) -> str | None:
    """How the run ended, in a line: the best round and the test result of a finished
    run, the error of a failed one; None while it runs."""
    status = metrics.get("status")
    if status == "failed":
        return f"failed after {_ran(metrics)}: {metrics.get('error') or 'no reason recorded'}"
    if status != "finished":
        return None
    ran = _ran(metrics) + (", stopped early" if metrics.get("stopped_early") else "")
    seconds = metrics.get("seconds")
    took = f" in {seconds:.1f}s" if finite_number(seconds) else ""
    best = _best_text(metrics) or f"best {unit(metrics)} none"
    test = metrics.get("test") or {}
    return (f"finished: {ran}{took}; {best}; {test_headline(task_of(metrics), test)} "
            f"(loss {_shown(test.get('loss'))})")


def render(metrics: dict | None, where: str | None = None, last: int = 10,
           age: float | None = None) -> RenderableType:
    """The whole view of ``metrics`` (None: no metrics.json yet)."""
    if metrics is None:
        return Text(f"{where}  {WAITING}" if where else WAITING)
    parts: list[RenderableType] = [header(metrics, where, age)]
    if metrics.get("rounds"):
        parts.append(rounds_table(metrics, last))
        parts.append(trend(metrics))
    elif metrics.get("status") == "running":
        parts.append(Text(WAITING))
    if end := outcome(metrics):
        style = "bold red" if metrics.get("status") == "failed" else "bold green"
        parts.append(Text(end, style=style))
    return Group(*parts)


def round_line(metrics: dict, record: dict) -> str:
    """One round as plain text (the view off a terminal): ``round 2/3  train_loss 0.411
    val_loss 0.352  val_accuracy 0.902  clients 3  1.20s  ★ best`` (★ when it is the
    best so far); failures and timeouts only when there were some."""
    monitor, task = _monitor(metrics), task_of(metrics)
    measures = ["val_loss", f"val_{HEADLINE[task]}"]
    if monitor not in measures:
        measures.append(monitor)
    most = (metrics.get("config") or {}).get("rounds")
    number = f"{record.get('round')}/{most}" if most else str(record.get("round"))
    faults = "".join(f"  {label} {record[key]}" for key, label in
                     (("failures", "failed"), ("timeouts", "timed out"))
                     if isinstance(record.get(key), int) and record[key])
    star = "  ★ best" if record.get("round") == metrics.get("best_round") else ""
    return (f"{unit(metrics)} {number}  train_loss {_shown(record.get('train_loss'))}  "
            + "  ".join(f"{name} {_shown(measured(record, name))}" for name in measures)
            + f"  clients {_count(record.get('num_clients'))}{faults}  "
            f"{_shown(record.get('seconds'), 2)}s{star}")


def summary_line(metrics: dict) -> str:
    """The last line of the plain view: how the run ended."""
    return outcome(metrics) or f"{metrics.get('status')}: {_best_text(metrics)}"


class _MetricsFile:
    """metrics.json of a run folder, read again only when its size, time or inode (a
    rename puts a new file in its place) changed."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "metrics.json"
        self.run_dir = run_dir
        self.seen: tuple | None = None
        self.metrics: dict | None = None
        self.changed_at = time.monotonic()

    def poll(self) -> bool:
        """Whether metrics.json changed since the last poll (and then read it)."""
        from fedge.server.run_folder import read_metrics

        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if seen == self.seen:
            return False
        self.metrics = read_metrics(self.run_dir)
        self.seen = seen
        self.changed_at = time.monotonic()
        return True


def watch(run_dir: Path | str, *, refresh: float = 1.0, console: Console | None = None,
          timeout: float | None = None, last: int = 10) -> dict:
    """Show the run in folder ``run_dir`` until it has finished or failed, and return its
    final metrics.json (its ``status`` says how it ended).

    metrics.json is looked at every ``refresh`` seconds and read again when it changed. A
    folder without one yet (a server waiting for its clients) is waited on. On a terminal
    ``console`` shows a live view (the last ``last`` rounds, redrawn in place); off one, a
    plain line per new round and a summary. With ``timeout`` (seconds), the metrics read
    so far (``{}`` for none) are returned when it passes with the run still going.
    A path that is no folder is a :class:`FedgeError`.
    """
    run_dir = Path(run_dir)
    if not finite_number(refresh) or refresh <= 0:
        raise FedgeError(f"refresh must be a number of seconds above 0, not {refresh}")
    if not run_dir.exists():
        raise FedgeError(f"no run folder at {run_dir}")
    if not run_dir.is_dir():
        raise FedgeError(f"{run_dir} is not a folder (give a run folder: --out of fedge "
                         "simulate or fedge server)")
    console = console or Console()
    deadline = None if timeout is None else time.monotonic() + timeout
    source = _MetricsFile(run_dir)
    if console.is_terminal:
        return _live(source, console, refresh, deadline, last)
    return _plain(source, console, refresh, deadline)


def _finished(metrics: dict | None) -> bool:
    return metrics is not None and metrics.get("status") in DONE


def _wait(refresh: float, deadline: float | None) -> bool:
    """Sleep a refresh; False once the deadline has passed."""
    if deadline is not None and time.monotonic() >= deadline:
        return False
    if deadline is not None:
        refresh = max(0.0, min(refresh, deadline - time.monotonic()))
    time.sleep(refresh)
    return True


def _live(source: _MetricsFile, console: Console, refresh: float, deadline: float | None,
          last: int) -> dict:
    from rich.live import Live

    where = str(source.run_dir)

    def view() -> RenderableType:
        return render(source.metrics, where, last, time.monotonic() - source.changed_at)

    source.poll()
    with Live(view(), console=console, auto_refresh=False) as live:
        while not _finished(source.metrics) and _wait(refresh, deadline):
            source.poll()
            live.update(view(), refresh=True)  # also the "updated …s ago"
        live.update(view(), refresh=True)
    return source.metrics or {}


def _plain(source: _MetricsFile, console: Console, refresh: float,
           deadline: float | None) -> dict:
    printed: int | None = None  # the last round printed
    said_waiting = False

    def say(line: str) -> None:
        console.print(line, highlight=False, markup=False, soft_wrap=True)

    while True:
        if source.poll():
            metrics = source.metrics or {}
            rounds = metrics.get("rounds") or []
            if printed is not None and rounds and rounds[-1].get("round", 0) < printed:
                printed = None  # the folder holds a new run
            if printed is None:
                say(f"watching {source.run_dir}: {_setting(metrics) or 'a fedge run'}")
                printed = 0
            for record in rounds:
                if record.get("round", 0) > printed:
                    say(round_line(metrics, record))
                    printed = record.get("round", 0)
        elif source.metrics is None and not said_waiting:
            say(f"{source.run_dir}: {WAITING}")
            said_waiting = True
        if _finished(source.metrics):
            say(summary_line(source.metrics))
            return source.metrics
        if not _wait(refresh, deadline):
            return source.metrics or {}
