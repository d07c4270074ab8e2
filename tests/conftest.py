"""Shared fixtures: an isolated Flower environment and one real default run."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from typer.testing import CliRunner

from fedge.cli import app
from fedge.client import relay
from fedge.client.app import build_client_app, build_trainer
from fedge.client.data import LocalData, split_train_val
from fedge.simulations.datasets import load_dataset

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


UNIT_TESTS = Path(__file__).parent / "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests outside tests/unit run real federations, processes or training: they are the
    slow tier, which `pytest -m "not slow"` leaves out."""
    for item in items:
        if UNIT_TESTS not in item.path.parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def private_flower_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Flower writes its config under FLWR_HOME; tests never touch the user's ~/.flwr."""
    os.environ.update(FLOWER_ENV, FLWR_HOME=str(tmp_path_factory.mktemp("flwr-home")))


def run_fedge(*args: str, timeout: float = 300, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The ``fedge`` command as a user runs it, in its own bounded process."""
    return subprocess.run(
        [sys.executable, "-m", "fedge", *args], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd,
    )


def stop_process_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the group ``process`` leads (started with ``start_new_session``), SIGKILL
    after ``grace`` seconds; returns once it has exited."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def takes_ctrl_c() -> None:
    """A ``preexec_fn``: the child takes Ctrl-C as a terminal's foreground job does, even
    when the tests run with SIGINT ignored (inherited by a background job of a
    non-interactive shell, ``pytest &``), which Python would otherwise pass on to it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def path_without_this_python() -> str:
    """PATH without the folder of this Python's commands (a virtual environment's
    ``bin``), as for a user who has not activated the environment."""
    commands = Path(sys.executable).parent.resolve()
    return os.pathsep.join(folder for folder in os.environ.get("PATH", "").split(os.pathsep)
                           if folder and Path(folder).resolve() != commands)


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -c code args...`` in its own bounded process."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fedge simulate`` with its defaults: digits, 10 clients, Dirichlet(0.5), ≤ 20 rounds."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    result = run_fedge("simulate", "--out", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


def assert_simulation_refused(tmp_path: Path, options: list[str], message: str) -> None:
    """``fedge simulate OPTIONS`` ends with ``message`` on stderr, exit status 2, no
    traceback, and no run folder."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["simulate", "--out", str(out), *options])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert not out.exists()


def device_data(context: Context) -> LocalData:
    """A device's private samples: 200 real digits, a fifth held out for validation."""
    digits = load_dataset("digits")
    return split_train_val(digits.x[:200], digits.y[:200], val_fraction=0.2, seed=0)


@contextlib.contextmanager
def device_client_app(where: str, mod: Mod, tmp_path: Path) -> Iterator[tuple[ClientApp, dict]]:
    """The ClientApp that runs ``mod`` on ``device_data``, and the node-config entries it
    needs: in a ``simulation``, built with ``mod``; in a ``deployment``, the per-message
    ClientApp of `fedge client` (it runs every mod), relaying to a warm trainer."""
    if where == "simulation":
        yield build_client_app(device_data, device="cpu", mods=[mod]), {}
        return
    with relay.serve_trainer(build_trainer(device_data, "cpu"), tmp_path) as node_config:
        yield relay.app, node_config


# The user's file: BatchNorm and dropout, a factory argument fedge passes (num_classes)
# and one it does not (width, defaulted). Every process that imports it says so in
# imports.log, with the test-process marker its environment carries.
USER_MODEL = '''
import os
from pathlib import Path

import torch
from torch import nn

Path(__file__).with_name("imports.log").open("a").write(
    os.environ.get("FEDGE_TEST_PROCESS", "-") + "\\n")


class Net(nn.Module):
    def __init__(self, num_classes: int, dropout: float, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(width * 16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x / 16.0))
'''


def write_user_model(folder: Path, source: str = USER_MODEL) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "my_model.py"
    path.write_text(textwrap.dedent(source))
    return path


def write_flat_csv(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Samples as a CSV of flat rows: a header, one column per value, then ``label``."""
    header = ",".join([*(f"p{i}" for i in range(x[0].size)), "label"])
    rows = (",".join([*(f"{v:g}" for v in sample.ravel()), str(label)])
            for sample, label in zip(x, y, strict=True))
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture(scope="session")
def device_binary(tmp_path_factory):
    """`fedge-device`, built once per test session as `fedge build-device` builds it."""
    pytest.importorskip("executorch", reason="fedge-device needs pip install 'fedge[edge]'")
    from fedge.client.device_build import build_device

    return build_device(tmp_path_factory.mktemp("fedge-device-build"))
