"""The Ray backend through Flower's simulation SuperLink: a Ray cluster joined with
--ray-address, fractional CPUs on a local Ray, Ctrl-C and resume, and bad input refused
before anything starts (pytest -m ray)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_diabetes

from fedge.config import RunConfig
from fedge.processes import free_port
from fedge.simulations.ray import FlowerLog, federation_config
from fedge.simulations.workers import available_cores

from conftest import assert_simulation_refused, run_fedge, stop_process_group, takes_ctrl_c
from test_deployment import MARKER, marked_processes

pytestmark = pytest.mark.ray

RUN_FILES = ["best.pt", "checkpoint.pt", "curves.png", "metrics.json", "model.onnx",
             "onnx_report.json"]  # what the in-process backend writes, and nothing else
SMALL = ["--clients", "3", "--local-epochs", "1", "--partition", "iid", "--patience", "10"]
GONE_WITHIN = 20.0  # seconds: fedge's guards end their children within ~8 s


def wait_until_gone(marker: str, seconds: float = GONE_WITHIN) -> list[int]:
    """The processes carrying ``marker`` that are still there after ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


class RayNode:
    """A node of a Ray cluster, as `ray start` makes it, that this test module owns:
    the head of a new cluster of ``cpus`` CPUs at ``ip``, or a node that ``joins`` the
    head at that address; ``launcher`` runs it on another host (tests/netlab.py). Every
    process of it carries a marker, and only those are stopped (a plain `ray stop`
    would stop every Ray on the machine)."""

    def __init__(self, ip: str = "127.0.0.1", cpus: int = 2, joins: str | None = None,
                 launcher: Sequence[str] = ()) -> None:
        # Ray's socket paths must stay short (AF_UNIX): not under pytest's tmp_path.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))
        self.port, self.marker = free_port(), f"fedge-ray-node-{uuid.uuid4().hex}"
        self.address = joins or f"{ip}:{self.port}"
        role = ["--address", joins] if joins else ["--head", "--port", str(self.port),
                                                    "--include-dashboard", "false"]
        ray = Path(sys.executable).with_name("ray")
        self.log = self.temp_dir / "node.log"
        with self.log.open("wb") as log:
            # --block keeps `ray start` in the foreground; fedge's guard ends it and
            # everything it started (Ray's daemons, their workers) when told to stop.
            self.process = subprocess.Popen(
                [*launcher, sys.executable, "-m", "fedge.guard", str(ray), "start", *role,
                 "--node-ip-address", ip, "--num-cpus", str(cpus), "--disable-usage-stats",
                 "--temp-dir", str(self.temp_dir / "ray"), "--block"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, MARKER: self.marker})
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"ray start failed:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def actor_logs(self) -> list[str]:
        """The cluster's logs of the ClientApp actors it ran."""
        logs = self.temp_dir / "ray" / "session_latest" / "logs"
        return [p.name for p in logs.glob("worker-*.out")
                if ":actor_name:ClientAppActor" in p.read_text(errors="replace")]

    def actors_alive(self) -> list[int]:
        return [pid for pid in marked_processes(self.marker)
                if b"ClientAppActor" in _cmdline(pid)]

    def actors_gone_within(self, seconds: float) -> bool:
        """Whether no ClientApp actor runs on this node any more within ``seconds``."""
        deadline = time.monotonic() + seconds
        while self.actors_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        return not self.actors_alive()

    def stop(self) -> None:
        stop_process_group(self.process)
        left = wait_until_gone(self.marker)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not left, f"processes of the Ray node outlived it: {left}"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture(scope="module")
def ray_head():
    head = RayNode()
    try:
        yield head
    finally:
        head.stop()


def fedge_marked(marker: str, *args: str, timeout: float = 300,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_fedge(*args, timeout=timeout, env={MARKER: marker}, cwd=cwd)


@pytest.mark.timeout(400)
def test_a_run_joins_a_ray_cluster_and_leaves_nothing_behind(ray_head, tmp_path):
    marker = f"fedge-run-{uuid.uuid4().hex}"
    out = tmp_path / "run"
    started = time.monotonic()
    result = fedge_marked(marker, "simulate", "--backend", "ray", "--ray-address",
                          ray_head.address, "--client-cpus", "1", "--rounds", "2", *SMALL,
                          "--out", str(out))
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "round   1/2" in result.stdout and "round   2/2" in result.stdout
    assert "done: 2 rounds" in result.stdout
    assert "deprecat" not in output.lower()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["config"]["ray_address"] == ray_head.address
    assert [r["num_clients"] for r in metrics["rounds"]] == [3, 3]
    assert metrics["rounds"][-1]["val_accuracy"] > 0.5
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    # The clients trained on that cluster: its logs hold the run's ClientApp actors
    # (2 CPUs, 1 per client: 2 of them), and they ended with the run.
    assert len(ray_head.actor_logs()) == 2, ray_head.actor_logs()
    assert not wait_until_gone(marker)
    assert ray_head.actors_gone_within(GONE_WITHIN)
    print(f"cluster run: {seconds:.1f} s")


@pytest.mark.timeout(300)
def test_a_cluster_without_room_for_a_client_is_one_clear_error(ray_head, tmp_path):
    """The head has no GPU: no client fits, which Flower finds only once Ray runs."""
    marker = f"fedge-run-{uuid.uuid4().hex}"
    result = fedge_marked(marker, "simulate", "--backend", "ray",
                          "--ray-address", ray_head.address, "--client-gpus", "0.5",
                          "--rounds", "1", *SMALL, "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: Ray has no room for one "
                                                     "client"), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not wait_until_gone(marker)


def test_flowers_chatter_and_tracebacks_stay_out_of_the_output_without_verbose():
    log = FlowerLog(verbose=False)
    lines = ["INFO :      Starting Flower Simulation", "fedge-progress {}",
             "ERROR :     An exception occured!! ActorPool is empty. Stopping Simulation.",
             "ERROR :     Traceback (most recent call last):",
             '  File "vce_api.py", line 217, in run_api', "    backend.build(app_fn)",
             "ValueError: ActorPool is empty.", "",
             "The above exception was the direct cause of the following exception:",
             "Traceback (most recent call last):", '  File "app.py", line 3, in main',
             "RuntimeError: Simulation Runtime crashed.",
             "(ClientAppActor pid=12) a client's print", "WARNING :   slow",
             "a warning of fedge's own"]
    assert [line for line in lines if not log.hide(line)] == ["a warning of fedge's own"]
    assert log.failure() == "An exception occured!! ActorPool is empty. Stopping Simulation."
    assert not FlowerLog(verbose=True).hide("ERROR :     Traceback (most recent call last):")


def _fedge_process(marker: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=takes_ctrl_c,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", MARKER: marker})


@pytest.mark.timeout(500)
def test_half_cpus_on_a_local_ray_survive_ctrl_c_and_the_run_resumes(tmp_path):
    """--client-cpus 0.5: a local Ray of 2 logical CPUs per core. Ctrl-C (SIGINT to
    the terminal's process group) after round 1 ends every process (SuperLink, flwr run,
    flwr-simulation, Ray); --resume on the Ray backend finishes the run."""
    marker = f"fedge-run-{uuid.uuid4().hex}"
    out = tmp_path / "run"
    # Later rounds take ~0.3 s: 20 of them leave Ctrl-C seconds to land mid-run.
    args = ["simulate", "--backend", "ray", "--client-cpus", "0.5", "--rounds", "20",
            *SMALL, "--patience", "30", "--out", str(out)]
    process = _fedge_process(marker, *args)
    try:
        for line in process.stdout:
            if line.startswith("round   1/20"):
                os.killpg(process.pid, signal.SIGINT)
                break
        assert process.wait(timeout=60) == 130, process.stderr.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert "interrupted" in process.stderr.read()
    assert not wait_until_gone(marker)
    before = json.loads((out / "metrics.json").read_text())
    done = len(before["rounds"])
    assert before["status"] == "running" and 1 <= done < 20, done
    assert before["config"]["client_cpus"] == 0.5
    assert not (out / ".flower").exists()

    result = fedge_marked(marker, *args, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "round   1/20" not in result.stdout, result.stdout
    assert f"round {done + 1:>3}/20" in result.stdout, result.stdout
    after = json.loads((out / "metrics.json").read_text())
    assert after["status"] == "finished"
    assert [r["round"] for r in after["rounds"]] == list(range(1, len(after["rounds"]) + 1))
    assert len(after["rounds"]) > done and after["rounds"][:done] == before["rounds"]
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    assert not wait_until_gone(marker)


def test_fractions_of_a_cpu_scale_a_local_rays_logical_cpus():
    cores = available_cores()
    half = federation_config(RunConfig(backend="ray", clients=5, client_cpus=0.5,
                                       client_gpus=0.25))
    assert half["num-supernodes"] == 5
    assert (half["client-resources-num-cpus"], half["init-args-num-cpus"]) == (1, 2 * cores)
    assert half["client-resources-num-gpus"] == 0.25
    whole = federation_config(RunConfig(backend="ray", client_cpus=2))
    assert (whole["client-resources-num-cpus"], whole["init-args-num-cpus"]) == (2, cores)
    # A cluster's resources are its own: no init arguments (ray.init refuses them).
    joined = federation_config(RunConfig(backend="ray", ray_address="10.0.0.1:6379"))
    assert joined["client-resources-num-cpus"] == 1 and "init-args-num-cpus" not in joined


@pytest.mark.parametrize(("options", "message"), [
    (["--backend", "ray", "--client-cpus", "0"],
     "client_cpus: Input should be greater than 0"),
    (["--backend", "ray", "--client-gpus", "-1"],
     "client_gpus: Input should be greater than or equal to 0"),
    (["--backend", "ray", "--client-cpus", "0.333"], "not a whole number of hundredths"),
    (["--backend", "ray", "--client-cpus", "4096"], "more than this machine's"),
    (["--client-cpus", "0.5"], "client_cpus=0.5: settings of the Ray backend"),
    (["--ray-address", "127.0.0.1:6379"], "settings of the Ray backend; give backend ray"),
    (["--backend", "ray", "--ray-address", "head-node"], "is not HOST:PORT"),
    (["--backend", "ray", "--ray-address", "ray://head:10001"], "not a Ray Client"),
    (["--backend", "ray", "--ray-address", "127.0.0.1:6379", "--client-cpus", "0.5"],
     "give whole CPUs"),
])
def test_bad_ray_settings_are_refused_before_anything_starts(tmp_path, options, message):
    assert_simulation_refused(tmp_path, options, message)


def test_an_unreachable_cluster_is_refused_before_anything_starts(tmp_path):
    port = free_port()  # nothing listens there
    assert_simulation_refused(tmp_path, ["--backend", "ray", "--ray-address",
                                         f"127.0.0.1:{port}"],
                              f"cannot reach the Ray cluster at 127.0.0.1:{port}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpus_without_cuda_are_refused(tmp_path):
    assert_simulation_refused(tmp_path, ["--backend", "ray", "--client-gpus", "0.5"],
                              "needs a CUDA GPU")


@pytest.mark.timeout(400)
def test_a_regression_task_trains_on_a_ray_cluster(ray_head, tmp_path):
    data = load_diabetes()
    rows = [",".join([*map(str, x), str(t)]) for x, t in zip(data.data, data.target,
                                                           strict=True)]
    csv = tmp_path / "diabetes.csv"
    csv.write_text(",".join([*(f"f{k}" for k in range(10)), "progression"]) + "\n"
                   + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    result = fedge_marked(f"fedge-run-{uuid.uuid4().hex}", "simulate", "--backend", "ray",
                          "--ray-address", ray_head.address, "--client-cpus", "1",
                          "--rounds", "2", "--clients", "3", "--data", str(csv),
                          "--label-column", "progression", "--task", "regression",
                          "--model", "mlp", "--out", str(out),
                          "--track", "tensorboard:tb", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "val_mae" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["rmse"] < data.target.std() * 1.5
    assert sorted(metrics["rounds"][-1]["clients"], key=int) == ["0", "1", "2"]
    # Flower's ServerApp runs elsewhere; the tracker's folder is where the user said.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_mae")] == [0, 1, 2]
