"""The server on a host: Flower's SuperLink plus a ``flwr run`` of fedge's ServerApp.

``fedge server`` starts ``flower-superlink`` (TLS and node authentication on unless
``--insecure``), registers the public keys of the devices allowed to join, submits the
run with ``flwr run`` and streams its log; Flower runs :data:`app` in a ServerApp process
that writes the run folder exactly as a simulation does, resuming from its checkpoint
when the folder already holds one.
"""

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from pydantic import BaseModel

from fedge.config import RunConfig
from fedge.datafiles import load_labelled_data
from fedge.errors import FedgeError
from fedge.files import write_atomic
from fedge.logs import LogFormat, show_fedge_logs
from fedge.processes import Children, wait_for_port
from fedge.server.checkpoint import load_checkpoint
from fedge.server.federation import Federation, ServerData, check_server_settings
from fedge.server.run_folder import resumable_checkpoint, run_finished

log = logging.getLogger("fedge.server")

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
serverapp = "fedge.server.deployment:app"
clientapp = "fedge.client.relay:app"

[tool.flwr.app.config]
settings = ""
"""


class ServerSettings(BaseModel):
    """What the ServerApp process needs, handed over as one JSON file."""

    config: RunConfig
    val_data: Path
    test_data: Path | None = None
    run_dir: Path
    log_format: LogFormat = "text"


@dataclass(frozen=True)
class Listener:
    host: str
    port: int
    certs: Path | None  # folder with ca.pem, server.pem, server.key; None: --insecure
    authorized_keys: tuple[Path, ...] = ()
    health_port: int | None = None


def load_server_data(settings: ServerSettings) -> ServerData:
    """Held-out samples from files: validation for early stopping, test for the report
    (the validation file doubles as test set when no test file is given)."""
    shape = settings.config.input_shape
    val_x, val_y = load_labelled_data(settings.val_data, sample_shape=shape)
    test_x, test_y = (load_labelled_data(settings.test_data, sample_shape=shape)
                      if settings.test_data else (val_x, val_y))
    num_classes = settings.config.num_classes or int(max(val_y.max(), test_y.max())) + 1
    vocab = None  # token-id inputs: the largest id seen sets the embedding size
    if np.issubdtype(val_x.dtype, np.integer):
        vocab = int(max(val_x.max(), test_x.max())) + 1
    return ServerData(val_x, val_y, test_x, test_y, num_classes, vocab_size=vocab)


def federation_for(settings: ServerSettings) -> Federation:
    """A new run, or the continuation of the interrupted run in ``settings.run_dir``."""
    run_dir = settings.run_dir
    resume = None
    if (run_dir / "checkpoint.pt").exists():
        resume = load_checkpoint(resumable_checkpoint(run_dir))
    elif (run_dir / "metrics.json").exists():
        raise FedgeError(f"{run_dir} holds a run without a checkpoint; choose another folder")
    config = settings.config
    if config.model is None:
        raise FedgeError("the server's config needs a model (cnn, mlp, sensor1d, tinytext)")
    return Federation(config, load_server_data(settings), run_dir, resume=resume)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings_file = Path(str(context.run_config["settings"]))
    settings = ServerSettings.model_validate_json(settings_file.read_text())
    show_fedge_logs(settings.log_format)
    federation_for(settings).run(grid)


def superlink_args(listener: Listener) -> list[str]:
    args = ["flower-superlink", "--host", listener.host,
            "--port", str(listener.port), "--disable-runtime-dependency-installation"]
    if listener.certs is None:
        args.append("--insecure")
    else:
        args += ["--ssl-ca-certfile", str(listener.certs / "ca.pem"),
                 "--ssl-certfile", str(listener.certs / "server.pem"),
                 "--ssl-keyfile", str(listener.certs / "server.key"),
                 "--enable-supernode-auth"]
    if listener.health_port:
        args += ["--health-server-address", f"{listener.host}:{listener.health_port}"]
    return args


def _connection_toml(listener: Listener) -> str:
    security = ('insecure = true' if listener.certs is None
                else f'root-certificates = "{(listener.certs / "ca.pem").resolve()}"')
    return (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{listener.port}"\n{security}\n')


def check_listener(listener: Listener) -> None:
    if listener.certs is not None:
        missing = [n for n in ("ca.pem", "server.pem", "server.key")
                   if not (listener.certs / n).is_file()]
        if missing:
            raise FedgeError(f"{listener.certs} lacks {', '.join(missing)}; make them with "
                             "`fedge certs`")
    for key in listener.authorized_keys:
        if not key.is_file():
            raise FedgeError(f"authorized key {key} does not exist")


def serve(settings: ServerSettings, listener: Listener, startup_timeout: float = 60.0) -> None:
    """Run the SuperLink and the federation until the run ends; SIGTERM stops both, and
    the run folder keeps the last completed round for a restart to resume from."""
    check_listener(listener)
    check_server_settings(settings.config)
    run_dir = settings.run_dir.resolve()
    flower_home = run_dir / ".flower"
    app_dir = flower_home / "app"
    app_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(app_dir / "pyproject.toml", APP_PYPROJECT.encode())
    write_atomic(flower_home / "config.toml", _connection_toml(listener).encode())
    settings_file = flower_home / "server-settings.json"
    write_atomic(settings_file, settings.model_copy(update={"run_dir": run_dir})
                 .model_dump_json(indent=2).encode())

    children = Children(env={"FLWR_HOME": str(flower_home)})
    with children.running():
        superlink = children.start(superlink_args(listener), log=run_dir / "superlink.log")
        wait_for_port("127.0.0.1", listener.port, superlink, startup_timeout, "the SuperLink")
        log.info("SuperLink listening on %s:%d (%s)", listener.host, listener.port,
                 "INSECURE" if listener.certs is None else "TLS, node authentication")
        for key in listener.authorized_keys:
            _register(key, children.env)
        run = children.start(["flwr", "run", str(app_dir), CONNECTION,
                              "--stream", "--run-config", f'settings="{settings_file}"'])
        run.wait()
    if not run_finished(run_dir):
        raise FedgeError(f"the run ended before it finished; see {run_dir / 'superlink.log'}"
                         " — starting the server again on the same folder resumes it")


def _register(key: Path, env: dict[str, str]) -> None:
    result = subprocess.run(["flwr", "supernode", "register", str(key),
                             CONNECTION], env=env, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise FedgeError(f"could not register client key {key}: "
                         f"{(result.stdout + result.stderr).strip()}")
    log.info("registered client key %s", key.name)
