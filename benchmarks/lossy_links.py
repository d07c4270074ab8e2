"""What a slow, lossy link costs a deployment: the same TLS federation over clean links
and over impaired ones, side by side in one invocation.

A real `fedge server` on a host of its own (a network namespace, listening on its own
address) and `fedge client` processes on hosts of their own, joined by the user-space
router of tests/netlab.py (root, iproute2 and /dev/net/tun needed). Clean: every link
unimpaired (the router still forwards every packet). Lossy: each client's link delays
every packet by 150 ms, drops 5 % of them and carries at most 1 Mbit/s, each way.
Digits, `cnn` (0.15 MB of weights each way per round and client), 1 local epoch; round 1
is left out of the per-round mean (it includes the clients joining). The configurations
alternate, ``--repeats`` times each.

    sudo python benchmarks/lossy_links.py [--clients 3] [--rounds 5] [--repeats 1]
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedge.client.keys import make_node_keys
from fedge.server.certs import make_certificates
from fedge.simulations.datasets import load_dataset, split_federated
from fedge.simulations.partition import PartitionSpec, partition_indices

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from netlab import Impairment, Lab, network_lab, unavailable

LINKS = {"clean": Impairment(), "lossy": Impairment(delay=0.150, loss=0.05, rate=1_000_000)}
PORT = 9092  # every host has a network of its own


def write_files(root: Path, clients: int, rounds: int, server_address: str) -> None:
    split = split_federated(load_dataset("digits"), seed=0)
    np.savez(root / "val.npz", x=split.server_val[0], y=split.server_val[1])
    x, y = split.clients
    for i, rows in enumerate(partition_indices(y, clients, PartitionSpec.parse("iid"), 0)):
        np.savez(root / f"client{i}.npz", x=x[rows], y=y[rows])
        make_node_keys(root / "keys", f"client{i}")
    make_certificates(root / "certs", [server_address])
    (root / "run.toml").write_text(
        f'model = "cnn"\nrounds = {rounds}\nlocal-epochs = 1\nmin-clients = {clients}\n'
        f"patience = {rounds}\nround-timeout = 300\n")


def run_federation(lab: Lab, root: Path, clients: int) -> tuple[float, list[dict]]:
    """Wall seconds from the server's start to its exit, and the rounds it recorded."""
    fedge = [sys.executable, "-m", "fedge"]
    server_address = lab.address("server")
    keys = [a for i in range(clients) for a in ("--authorized-key", f"keys/client{i}.pub")]
    logs = open(root / "processes.log", "ab")  # noqa: SIM115 - closed below
    started = time.monotonic()
    server = subprocess.Popen(
        lab.command("server", [*fedge, "server", "--val-data", "val.npz", "--config",
                               "run.toml", "--certs", "certs", *keys, "--host",
                               server_address, "--port", str(PORT), "-o", "run"]),
        cwd=root, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
    devices = [subprocess.Popen(
        lab.command(f"client{i}", [*fedge, "client", "--server", f"{server_address}:{PORT}",
                                   "--ca", "certs/ca.pem", "--key", f"keys/client{i}.key",
                                   "--data", f"client{i}.npz"]),
        cwd=root, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
        for i in range(clients)]
    try:
        if server.wait(timeout=1800) != 0:
            sys.exit(f"the federation failed; see {root / 'processes.log'}")
        seconds = time.monotonic() - started
        for device in devices:
            device.wait(timeout=120)
    finally:
        for process in [server, *devices]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
        logs.close()
    return seconds, json.loads((root / "run" / "metrics.json").read_text())["rounds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if reason := unavailable():
        sys.exit(f"no network lab on this machine: {reason}")
    results: dict[str, list[tuple[float, list[dict]]]] = {name: [] for name in LINKS}
    for _ in range(args.repeats):
        for name, link in LINKS.items():
            hosts = {"server": Impairment(), **{f"client{i}": link
                                                for i in range(args.clients)}}
            with network_lab(hosts) as lab, tempfile.TemporaryDirectory() as folder:
                write_files(Path(folder), args.clients, args.rounds, lab.address("server"))
                results[name].append(run_federation(lab, Path(folder), args.clients))
    print(f"\n{args.clients} clients, {args.rounds} rounds, {args.repeats} run(s) each; "
          f"seconds (mean per run), rounds 2–{args.rounds} (mean per round)")
    print("| links | wall time | round | slowest client training | failures + timeouts "
          "| wall ratio | round ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_wall = base_round = 0.0
    for name, runs in results.items():
        later = [r for _, rounds in runs for r in rounds[1:]]
        wall = statistics.mean(seconds for seconds, _ in runs)
        per_round = statistics.mean(r["seconds"] for r in later)
        training = statistics.mean(r["slowest_client_seconds"] for r in later)
        lost = sum(r["failures"] + r["timeouts"] for _, rounds in runs for r in rounds)
        base_wall, base_round = base_wall or wall, base_round or per_round
        print(f"| {name} | {wall:.1f} | {per_round:.2f} | {training:.2f} | {lost} | "
              f"{wall / base_wall:.2f}× | {per_round / base_round:.2f}× |")


if __name__ == "__main__":
    main()
