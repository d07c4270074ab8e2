"""A client on a device: Flower's SuperNode running fedge's ClientApp on local files.

``fedge client`` checks the device's data file, then starts ``flower-supernode`` against
the server (TLS with the operator's CA, and the device's key for node authentication);
Flower then starts :data:`fedge.client.relay.app` for each message, which hands it to
the trainer this process keeps warm, with the data already loaded.
"""

import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedge.client.app import build_trainer
from fedge.client.data import LocalData, split_train_val
from fedge.client.relay import serve_trainer
from fedge.client.wire import FOLDER_KEY, check_wire_folder
from fedge.datafiles import load_labelled_data
from fedge.errors import FedgeError
from fedge.processes import Children, free_port

log = logging.getLogger("fedge.client")

STAYED_CONNECTED = 60.0  # seconds a SuperNode must have run to count as having joined
JOIN_PROBLEMS = ("the server may not be up yet, this device's key may not be registered "
                 "with it, or TLS settings differ (--ca for a TLS server, --insecure for a "
                 "plaintext one)")


@dataclass(frozen=True)
class DeviceData:
    path: Path
    label_column: str = "label"
    val_fraction: float = 0.2
    seed: int = 0

    def load(self) -> LocalData:
        x, y = load_labelled_data(self.path, label_column=self.label_column)
        return split_train_val(x, y, self.val_fraction, self.seed)


def node_config_toml(entries: dict[str, str]) -> str:
    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "".join(f"{key} = {quoted(value)}\n" for key, value in entries.items())


def supernode_args(server: str, ca: Path | None, key: Path | None, node_config: Path,
                   port: int, join_timeout: float) -> list[str]:
    # Flower's SuperNode retries an unreachable server forever unless told otherwise.
    args = [sys.executable, "-m", "fedge.client.supernode", "--superlink", server,
            "--max-wait-time", str(join_timeout),
            "--node-config", str(node_config), "--port", str(port)]
    args += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    if key is not None:
        args += ["--auth-supernode-private-key", str(key)]
    return args


def run_client(server: str, data: DeviceData, ca: Path | None, key: Path | None,
               device: str = "auto", join_timeout: float = 600.0,
               record_wire: Path | None = None) -> None:
    """Check the data, then serve as a SuperNode until stopped; with ``record_wire``, every
    reply this device sends is also recorded in that folder (see :mod:`fedge.client.wire`).

    A SuperNode exits when it cannot join (the server is not up yet, has not registered
    this device's key yet, or speaks TLS to a plaintext client) and when its server goes
    away (a restart, or the end of the run). It is started again with growing pauses
    until it has failed to stay connected for ``join_timeout`` seconds.
    """
    for path, what in ((ca, "CA certificate"), (key, "private key")):
        if path is not None and not path.is_file():
            raise FedgeError(f"{what} {path} does not exist")
    wire = {} if record_wire is None else {FOLDER_KEY: str(check_wire_folder(record_wire))}
    samples = data.load()
    log.info("%d training and %d validation samples from %s", len(samples.train_y),
             len(samples.val_y), data.path)
    trainer = build_trainer(lambda context: samples, device)
    with (tempfile.TemporaryDirectory(prefix="fedge-client-") as workdir,
          serve_trainer(trainer, Path(workdir)) as relay_entries):
        node_config = Path(workdir) / "node.toml"
        node_config.write_text(node_config_toml({**relay_entries, **wire}))
        children = Children(env={"FLWR_HOME": workdir})
        with children.running():
            args = supernode_args(server, ca, key, node_config, free_port(), join_timeout)
            _serve_until_stopped(children, args, server, join_timeout)


def _serve_until_stopped(children: Children, args: list[str], server: str,
                         join_timeout: float) -> None:
    """Until SIGTERM/Ctrl-C, or until joining has failed for ``join_timeout`` seconds."""
    give_up_at, pause = time.monotonic() + join_timeout, 1.0
    while True:
        started = time.monotonic()
        # A SuperNode also exits, with status 0, when its server goes away: rejoin then too.
        status = children.start(args).wait()
        if time.monotonic() - started > STAYED_CONNECTED:  # it had joined: rejoin afresh
            give_up_at, pause = time.monotonic() + join_timeout, 1.0
        if time.monotonic() >= give_up_at:
            raise FedgeError(f"gave up joining the federation at {server} after "
                             f"{join_timeout:.0f} s: {JOIN_PROBLEMS}")
        log.warning("could not join the federation at %s (SuperNode exit %d): %s; "
                    "retrying in %.0f s", server, status, JOIN_PROBLEMS, pause)
        time.sleep(pause)
        pause = min(2 * pause, 30.0)
