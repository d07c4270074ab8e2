"""A Flower SuperLink and a ``flwr run`` of an app fedge writes: what the deployment
server (:mod:`fedge.server.deployment`) and the Ray simulation
(:mod:`fedge.simulations.ray`) both need.

The app folder holds only a ``pyproject.toml`` naming installed components (fedge's own
ServerApp and ClientApp); the connection lives in ``$FLWR_HOME/config.toml``; the run is
submitted with ``flwr run APP CONNECTION --stream``, whose output (the ServerApp's log)
is relayed while the SuperLink is watched. Every process runs under :class:`Children`.
"""

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedge.errors import FedgeError
from fedge.files import write_atomic
from fedge.processes import Children, flower_command, plain, relay_output, wait_for_port

CONNECTION = "fedge"
APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedge-app"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedge"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
settings = ""
"""


def write_app(flower_home: Path, serverapp: str, clientapp: str, port: int,
              ca: Path | None = None, host: str = "127.0.0.1") -> Path:
    """The app folder (under ``flower_home``, Flower's ``FLWR_HOME``) whose components
    are ``serverapp`` and ``clientapp`` (``module:attribute``), and the connection to
    a SuperLink at ``host``:``port`` (``ca``: its TLS CA; None: insecure)."""
    app_dir = flower_home / "app"
    app_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(app_dir / "pyproject.toml",
                 APP_PYPROJECT.format(serverapp=serverapp, clientapp=clientapp).encode())
    security = ('insecure = true' if ca is None
                else f'root-certificates = "{ca.resolve()}"')
    write_atomic(flower_home / "config.toml", (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{host_port(host, port)}"\n{security}\n').encode())
    return app_dir


def start_superlink(children: Children, args: Sequence[str], port: int, log: Path,
                    timeout: float, host: str = "127.0.0.1") -> subprocess.Popen:
    """``flower-superlink ARGS`` (its output appended to ``log``), once it listens on
    ``host``:``port``; a clear error with its last error line if it does not."""
    superlink = children.start([flower_command("flower-superlink"), *args], log=log)
    try:
        wait_for_port(host, port, superlink, timeout, "the SuperLink")
    except FedgeError as error:
        raise FedgeError(f"{error}: {last_error(log)}") from None
    return superlink


def local_address(host: str) -> str:
    """Where this machine reaches a server that listens on ``host``: loopback for a
    wildcard (0.0.0.0, ::), else that very address: a server bound to one address of a
    multi-homed host does not answer on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def host_port(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def stream_run(children: Children, app_dir: Path, superlink: subprocess.Popen,
               superlink_log: Path, settings_file: Path, *,
               federation_config: dict[str, object] | None = None,
               observe: Callable[[str], None] = lambda line: None,
               hide: Callable[[str], bool] | None = None, verbose: bool = False,
               advice: Callable[[], str] = lambda: "",
               tick: Callable[[], None] = lambda: None) -> int:
    """Submit the app with ``flwr run --stream`` (run config ``settings`` =
    ``settings_file``; ``federation_config``: a simulation's options), relay its output
    until the run ends, and return ``flwr run``'s exit status. Every line goes to
    ``observe``; stderr shows them but those ``hide`` picks (see :func:`relay_output`). A
    SuperLink that stops during the run is an error, followed by ``advice()``.
    ``tick()`` runs on this thread a few times a second while the run lasts."""
    args = [flower_command("flwr"), "run", str(app_dir), CONNECTION, "--stream",
            "--run-config", f'settings="{settings_file}"']
    if federation_config:
        args += ["--federation-config",
                 " ".join(f"{key}={_toml(value)}" for key, value in federation_config.items())]
    run = children.start(args, capture=True)
    output = relay_output(run.stdout, observe, "Flower", verbose, hide=hide)
    while run.poll() is None:
        tick()
        if superlink.poll() is not None:
            then = advice()
            raise FedgeError(f"the SuperLink stopped during the run: "
                             f"{last_error(superlink_log)}{'; ' + then if then else ''}")
        time.sleep(0.2)
    output.join(timeout=5)
    return run.returncode


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def last_error(log_file: Path) -> str:
    """The SuperLink's last error line in its log, or where to look."""
    try:
        lines = [plain(line) for line in log_file.read_text(errors="replace").splitlines()]
    except OSError:
        return f"see {log_file}"
    errors = [line for line in lines if "ERROR" in line or "Errno" in line]
    if not errors:
        return f"see {log_file}"
    return errors[-1].split(":", 1)[-1].strip() if "ERROR" in errors[-1] else errors[-1]
