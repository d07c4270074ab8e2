"""A client on a device: Flower's SuperNode running fedge's ClientApp on local files.

``fedge client`` checks the device's data file, then starts ``flower-supernode`` against
the server (TLS with the operator's CA, and the device's key for node authentication);
Flower then runs :data:`app` for each message, which reads the samples named in the
node config.
"""

import logging
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from flwr.app import Context

from fedge.client.app import build_client_app
from fedge.client.data import LocalData, split_train_val
from fedge.datafiles import load_labelled_data
from fedge.errors import FedgeError
from fedge.processes import Children, flower_command, free_port

log = logging.getLogger("fedge.client")


@dataclass(frozen=True)
class DeviceData:
    path: Path
    label_column: str = "label"
    val_fraction: float = 0.2
    seed: int = 0

    def load(self) -> LocalData:
        x, y = load_labelled_data(self.path, label_column=self.label_column)
        return split_train_val(x, y, self.val_fraction, self.seed)

    def node_config(self) -> str:
        path = str(self.path.resolve()).replace("\\", "\\\\").replace('"', '\\"')
        return (f'data-path = "{path}"\nlabel-column = "{self.label_column}"\n'
                f"val-fraction = {self.val_fraction}\nseed = {self.seed}\n")


@lru_cache(maxsize=4)
def _load(data: DeviceData) -> LocalData:
    return data.load()


def node_data(context: Context) -> LocalData:
    config = context.node_config
    return _load(DeviceData(Path(str(config["data-path"])), str(config["label-column"]),
                            float(config["val-fraction"]), int(config["seed"])))


app = build_client_app(node_data)


def supernode_args(server: str, ca: Path | None, key: Path | None, node_config: Path,
                   port: int) -> list[str]:
    args = [flower_command("flower-supernode"), "--superlink", server,
            "--node-config", str(node_config), "--port", str(port)]
    args += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    if key is not None:
        args += ["--auth-supernode-private-key", str(key)]
    return args


def run_client(server: str, data: DeviceData, ca: Path | None, key: Path | None,
               device: str = "auto") -> int:
    """Check the data, then serve as a SuperNode until stopped; returns its exit status."""
    for path, what in ((ca, "CA certificate"), (key, "private key")):
        if path is not None and not path.is_file():
            raise FedgeError(f"{what} {path} does not exist")
    samples = data.load()
    log.info("%d training and %d validation samples from %s", len(samples.train_y),
             len(samples.val_y), data.path)
    with tempfile.TemporaryDirectory(prefix="fedge-client-") as workdir:
        node_config = Path(workdir) / "node.toml"
        node_config.write_text(data.node_config() + f'device = "{device}"\n')
        children = Children(env={"FLWR_HOME": workdir})
        with children.running():
            supernode = children.start(supernode_args(server, ca, key, node_config,
                                                      free_port()))
            return supernode.wait()
