"""Supervised children: nothing fedge starts outlives it, and no traceback reaches a user."""

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedge.guard import GRACE
from fedge.processes import TracebackFilter, relay_output

pytestmark = pytest.mark.timeout(120)

# A command that starts two helpers, as Flower's do: one in its own session (out of its
# process group) that ignores SIGTERM, and one that it then orphans.
STUBBORN_HELPERS = textwrap.dedent("""
    import signal, subprocess, sys, time
    subprocess.Popen([sys.executable, "-c", "import signal, time; "
                      "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"],
                     start_new_session=True)
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    print("started", flush=True)
    time.sleep(float(sys.argv[1]))
""")


def descendants_of(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if stat[0] != "Z":
                children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def wait_until_gone(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if _running(pid)}
        time.sleep(0.1)
    return alive


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_guard_ends_every_helper_of_a_command_that_exits(tmp_path):
    script = tmp_path / "helpers.py"
    script.write_text(STUBBORN_HELPERS)
    guard = subprocess.Popen([sys.executable, "-m", "fedge.guard", sys.executable,
                              str(script), "1"], stdout=subprocess.PIPE, text=True)
    assert guard.stdout.readline() == "started\n"
    helpers = descendants_of(guard.pid)
    assert len(helpers) == 3  # the command and its two helpers
    assert guard.wait(timeout=GRACE + 10) == 0  # the command's own status
    assert wait_until_gone(helpers, 1.0) == set()


def test_children_are_gone_soon_after_their_parent_is_killed(tmp_path):
    """SIGKILL of the fedge process leaves no time to clean up: its guards do it."""
    script = tmp_path / "helpers.py"
    script.write_text(STUBBORN_HELPERS)
    parent_code = textwrap.dedent(f"""
        import sys, time
        from fedge.processes import Children
        Children({{}}).start([sys.executable, {str(script)!r}, "300"])
        print("ready", flush=True)
        time.sleep(300)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE,
                              text=True)
    assert parent.stdout.readline() == "ready\n"
    deadline = time.monotonic() + 30
    while len(descendants_of(parent.pid)) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)  # the guard, the command and its two helpers
    everything = descendants_of(parent.pid)
    assert len(everything) == 4
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    assert wait_until_gone(everything, GRACE + 5) == set()


def test_a_stopped_child_is_ended_with_its_helpers_within_the_bound(tmp_path):
    from fedge.processes import STOP_BOUND, Children

    script = tmp_path / "helpers.py"
    script.write_text(STUBBORN_HELPERS)
    children = Children({})
    process = children.start([sys.executable, str(script), "300"], capture=True)
    assert process.stdout.readline() == b"started\n"
    helpers = descendants_of(process.pid)
    started = time.monotonic()
    children.end(process)
    assert time.monotonic() - started <= STOP_BOUND
    assert wait_until_gone(helpers, 1.0) == set()


def test_a_traceback_is_shown_as_its_last_line_and_a_stop_as_nothing():
    crash = subprocess.run([sys.executable, "-c", "import json; json.loads('{')"],
                           capture_output=True, text=True, timeout=30).stderr
    stop = subprocess.run([sys.executable, "-c", "raise KeyboardInterrupt"],
                          capture_output=True, text=True, timeout=30).stderr
    lines = ["\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode\n",
             *crash.splitlines(keepends=True), *stop.splitlines(keepends=True),
             "INFO :      Sent successfully\n"]
    show = TracebackFilter("Flower's SuperNode")
    shown = [line for line in map(show, lines) if line is not None]
    assert shown == [lines[0], "Flower's SuperNode raised json.decoder.JSONDecodeError: "
                               "Expecting property name enclosed in double quotes: line 1 "
                               "column 2 (char 1)\n", "INFO :      Sent successfully\n"]


def test_relayed_output_is_observed_whole_and_shown_filtered():
    stream = io.BytesIO(b"one\nTraceback (most recent call last):\n  File x\n"
                        b"KeyboardInterrupt\ntwo\n")
    seen, sink = [], io.StringIO()
    relay_output(stream, seen.append, "child", sink=sink).join(timeout=5)
    assert seen == ["one", "Traceback (most recent call last):", "  File x",
                    "KeyboardInterrupt", "two"]
    assert sink.getvalue() == "one\ntwo\n"
