"""fedge on real networks: a server on the address of a host that is not loopback, clients
behind slow and lossy links, a link that goes down and comes back, and a Ray cluster
whose head and worker are two hosts. Each host is a network namespace of a lab the test
makes (tests/netlab.py); the tests are skipped, with the reason, where none can be made."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from netlab import Impairment, Lab, network_lab
from test_deployment import (
    CHILDREN_GONE,
    FINISHED,
    MARKER,
    Deployment,
    assert_gone_within,
)
from test_ray import GONE_WITHIN, RUN_FILES, SMALL, RayNode, wait_until_gone

# A poor link, each way: 150 ms of delay, 5 % of packets lost, 1 Mbit/s.
LOSSY = Impairment(delay=0.150, loss=0.05, rate=1_000_000)
OUTAGE = 10.0  # seconds a client's link stays down


class LabDeployment(Deployment):
    """A :class:`Deployment` whose server and clients each run on a host of ``lab`` (a
    process is named after its host); the server listens on its host's own address."""

    def __init__(self, lab: Lab, root: Path, rounds: int, **settings: object) -> None:
        self.lab, self.host = lab, lab.address("server")
        super().__init__(root, rounds, **settings)

    def launcher(self, name: str) -> list[str]:
        return self.lab.command(name, [])


@pytest.mark.timeout(420)
def test_a_tls_federation_over_lossy_links_loses_nothing_when_a_link_goes_down(tmp_path):
    """The server listens on its host's own address (not loopback, not 0.0.0.0); three
    clients reach it over lossy links, and one of them loses its link for a while."""
    hosts = {"server": Impairment(), **{f"device{i}": LOSSY for i in range(3)}}
    with network_lab(hosts) as lab:
        d = LabDeployment(lab, tmp_path, rounds=2, **{"local-epochs": 1})
        try:
            server = d.server()
            clients = [d.client(f"device{i}", f"device{i}.npz") for i in range(3)]
            # device2's link goes down as it starts on its first task: its reply, and
            # its next task, must wait for the link to come back.
            d.wait_for(lambda: server.poll() is not None
                       or "Receiving: train message" in d.log("device2"), 300,
                       "device2's first task")
            assert server.poll() is None, d.logs()
            lab.link_down("device2")
            time.sleep(OUTAGE)
            while_down = d.log("device2")
            lab.link_up("device2")
            assert "Sent successfully" not in while_down  # its reply waited

            assert server.wait(timeout=300) == 0, d.logs()
            metrics = d.metrics()
            assert metrics["status"] == "finished"
            assert [(r["round"], r["num_clients"], r["failures"], r["timeouts"])
                    for r in metrics["rounds"]] == [(1, 3, 0, 0), (2, 3, 0, 0)]
            # device2 came back by itself, in the same session: its reply, its second
            # task and the farewell all went through once its link was up again.
            after = d.log("device2")[len(while_down):]
            assert after.count("Sent successfully") == 3, d.log("device2")
            for i, client in enumerate(clients):
                assert client.wait(timeout=120) == 0, d.logs()
                assert FINISHED in d.log(f"device{i}")
                assert "Traceback" not in d.log(f"device{i}")
                assert_gone_within(d, f"device{i}", CHILDREN_GONE)
            assert f"SuperLink listening on {lab.address('server')}:" in d.log("server")
            assert_gone_within(d, "server", CHILDREN_GONE)
        finally:
            d.stop_all()


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_ray_cluster_of_two_hosts_trains_clients_on_both(tmp_path):
    """The head (1 CPU) on one host, a worker (1 CPU) on another that joins it over the
    network, and `fedge simulate --ray-address` on the head's host: one client actor
    fits on each node."""
    with network_lab({"head": Impairment(), "worker": Impairment()}) as lab:
        nodes = [RayNode(lab.address("head"), cpus=1, launcher=lab.command("head", []))]
        try:
            head = nodes[0]
            nodes.append(RayNode(lab.address("worker"), cpus=1, joins=head.address,
                                 launcher=lab.command("worker", [])))
            marker = f"fedge-run-{uuid.uuid4().hex}"
            out = tmp_path / "run"
            result = subprocess.run(
                lab.command("head", [sys.executable, "-m", "fedge", "simulate", "--backend",
                                     "ray", "--ray-address", head.address, "--client-cpus",
                                     "1", "--rounds", "1", *SMALL, "--out", str(out)]),
                capture_output=True, text=True, timeout=300,
                env={**os.environ, MARKER: marker})
            assert result.returncode == 0, result.stdout + result.stderr
            metrics = json.loads((out / "metrics.json").read_text())
            assert metrics["status"] == "finished"
            assert metrics["config"]["ray_address"] == head.address
            assert [r["num_clients"] for r in metrics["rounds"]] == [3]
            assert sorted(p.name for p in out.iterdir()) == RUN_FILES
            # Each node ran one of the run's ClientApp actors, and they ended with it.
            assert [len(node.actor_logs()) for node in nodes] == [1, 1]
            assert not wait_until_gone(marker)
            assert all(node.actors_gone_within(GONE_WITHIN) for node in nodes)
        finally:
            for node in reversed(nodes):
                node.stop()
