"""Coordination overhead of a round over Flower's Deployment Engine on loopback.

overhead = round time − the slowest client's local training time. Three polling
configurations run side by side in one invocation, all with fedge's warm trainer
(machines are noisy, so only the ratio is meaningful): Flower's defaults (the ServerApp
grid checks for replies every 3 s, SuperExec for work every 1 s, an idle SuperNode for
messages every 3 s), fedge's server-side polls alone, and fedge's full settings. Round 1
is left out: it includes the clients joining.

    python benchmarks/deployment_overhead.py [--clients 3] [--rounds 5]
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from fedge.processes import free_port
from fedge.simulations.datasets import load_dataset, split_federated
from fedge.simulations.partition import PartitionSpec, partition_indices

CONFIGURATIONS = {  # server grid poll, SuperExec poll, SuperNode idle poll (seconds)
    "Flower defaults (3 s, 1 s, 3 s)": {"poll": 3.0, "superexec": "1.0", "supernode": "3"},
    "server side only (0.1 s, 0.1 s, 3 s)": {"poll": 0.1, "superexec": "0.1",
                                             "supernode": "3"},
    "fedge (0.1 s, 0.1 s, 0.5 s)": {"poll": 0.1, "superexec": "0.1", "supernode": "0.5"},
}


def write_data(root: Path, clients: int) -> None:
    split = split_federated(load_dataset("digits"), seed=0)
    np.savez(root / "val.npz", x=split.server_val[0], y=split.server_val[1])
    x, y = split.clients
    for i, rows in enumerate(partition_indices(y, clients, PartitionSpec.parse("iid"), 0)):
        np.savez(root / f"client{i}.npz", x=x[rows], y=y[rows])


def run_federation(root: Path, clients: int, rounds: int, poll: float, superexec: str,
                   supernode: str) -> list:
    port = free_port()
    (root / "run.toml").write_text(
        f'model = "cnn"\nrounds = {rounds}\nlocal-epochs = 1\nmin-clients = {clients}\n'
        f"patience = {rounds}\npoll-interval = {poll}\n")
    env = {**os.environ, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": superexec,
           "FEDGE_SUPERNODE_POLL": supernode}
    fedge = [sys.executable, "-m", "fedge"]
    logs = open(root / "processes.log", "ab")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [*fedge, "server", "--val-data", "val.npz", "--config", "run.toml", "--insecure",
         "--host", "127.0.0.1", "--port", str(port), "-o", "run"],
        cwd=root, env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
    devices = [subprocess.Popen(
        [*fedge, "client", "--server", f"127.0.0.1:{port}", "--data", f"client{i}.npz",
         "--insecure"], cwd=root, env=env, stdout=logs, stderr=subprocess.STDOUT,
        start_new_session=True) for i in range(clients)]
    try:
        if server.wait(timeout=900) != 0:
            sys.exit(f"the federation failed; see {root / 'processes.log'}")
    finally:
        for process in [server, *devices]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
        logs.close()
    return json.loads((root / "run" / "metrics.json").read_text())["rounds"][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name, settings in CONFIGURATIONS.items():
        with tempfile.TemporaryDirectory() as folder:
            write_data(Path(folder), args.clients)
            rounds = run_federation(Path(folder), args.clients, args.rounds, **settings)
        round_s = statistics.mean(r["seconds"] for r in rounds)
        train_s = statistics.mean(r["slowest_client_seconds"] for r in rounds)
        rows.append((name, round_s, train_s, round_s - train_s))
    baseline = rows[0][3]
    print(f"\n{args.clients} clients on loopback, rounds 2–{args.rounds} "
          "(seconds, mean per round)")
    print("| configuration | round | slowest client training | overhead | overhead ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, round_s, train_s, overhead in rows:
        print(f"| {name} | {round_s:.2f} | {train_s:.2f} | {overhead:.2f} | "
              f"{overhead / baseline:.2f}× |")


if __name__ == "__main__":
    main()
