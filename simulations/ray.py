"""The ``ray`` backend: Flower's simulation engine on Ray, through Flower's supported entry
point (``flwr.simulation.run_simulation`` is deprecated).

:func:`run_on_ray` starts a simulation SuperLink (``flower-superlink --simulation``,
loopback, insecure, a free port) and submits an app folder with ``flwr run APP
CONNECTION --stream`` and the federation's simulation options (``--federation-config``:
the number of SuperNodes, each client's CPUs and GPUs, Ray's init arguments). Flower
then runs ``flwr-simulation``, which starts Ray, or joins the cluster ``RAY_ADDRESS``
names (the variable reaches it through the SuperLink and its SuperExec, which pass on
their environment), and runs this module's components:

- :data:`server_app` runs the :class:`~fedge.server.federation.Federation` that
  :func:`run_on_ray` describes in the run folder's hidden ``.flower/`` (a pickle fedge
  writes and reads itself): it writes the run folder exactly as the in-process backend
  does and prints one ``fedge-progress`` line per round, which the streamed log brings
  back for the command line's progress lines;
- :data:`client_app` builds the simulation's ClientApp from its
  :class:`~fedge.simulations.workers.ClientRecipe` once per Ray worker.

Every process (SuperLink, ``flwr run``, ``flwr-simulation``, a local Ray) runs under
:class:`~fedge.processes.Children` and ends with the run, its failure or Ctrl-C. A
cluster's own processes stay; the run's actors end with its driver.
"""

import contextlib
import functools
import json
import logging
import pickle
import queue
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedge.config import RunConfig, SimulationSettings
from fedge.errors import FedgeError
from fedge.files import write_atomic, write_json
from fedge.processes import Children, free_port
from fedge.server.checkpoint import load_checkpoint
from fedge.server.federation import Federation, RunOutcome, ServerData
from fedge.server.rounds import RoundRecord
from fedge.server.run_folder import resumable_checkpoint, run_finished
from fedge.server.starting_model import StartingModel
from fedge.server.superlink import last_error, start_superlink, stream_run, write_app
from fedge.simulations.workers import ClientRecipe, available_cores
from fedge.tracking import with_absolute_place

SERVERAPP, CLIENTAPP = "fedge.simulations.ray:server_app", "fedge.simulations.ray:client_app"
FLOWER_FOLDER = ".flower"  # in the run folder while the run lasts
SERVER_FILE, CLIENT_FILE, STOPPED_FILE = "ray-server.pkl", "ray-clients.pkl", "stopped.json"
PROGRESS = "fedge-progress "  # the ServerApp's progress lines: this, then JSON
STARTUP_TIMEOUT = 60.0  # seconds for the SuperLink to listen
PROBE_TIMEOUT = 3.0  # seconds to reach a Ray cluster's head before anything starts
CPU_DENOMINATOR = 100  # finest CPU share: 1/100 of a CPU
RAY_SETTINGS = {"ray_address": None, "client_cpus": 1.0, "client_gpus": 0.0}  # off-Ray values
# Flower's and Ray's own lines in the streamed log, shown only with --verbose: their
# log records, `flwr run`'s notes, Ray's start-up line, the ClientApp actors' output.
CHATTER = ("INFO ", "DEBUG ", "WARNING ", "ERROR ", "Successfully started run",
           "Loading project", "Started a local Ray instance", "Using SuperLink",
           "Successfully installed", "Flower App configuration warnings",
           "- Recommended property", "An unhandled exception occurred",
           "For more information, visit", "(ClientAppActor", "The above exception",
           "During handling of")
NO_ROOM = "ActorPool is empty"  # Flower: Ray cannot place one client's resources


class FlowerLog:
    """What the streamed log shows without --verbose: neither Flower's and Ray's
    chatter nor tracebacks (also those Flower logs as errors), but fedge's own lines;
    it keeps Flower's error messages for fedge's one-line error."""

    def __init__(self, verbose: bool) -> None:
        self.verbose, self.errors = verbose, []
        self._in_traceback = False

    def hide(self, line: str) -> bool:
        if line.startswith(PROGRESS):
            return True
        if line.startswith("ERROR ") and "Traceback" not in line:
            self.errors.append(line.split(":", 1)[-1].strip())
        if self.verbose:
            return False
        if "Traceback (most recent call last)" in line:
            self._in_traceback = True
        elif self._in_traceback and not line[:1].isspace():
            self._in_traceback = False  # its last line, the exception, is hidden too
            return True
        return self._in_traceback or not line.strip() or line.startswith(CHATTER)

    def failure(self) -> str | None:
        """The first error Flower logged (the cause; later ones follow from it)."""
        return self.errors[0] if self.errors else None


@dataclass(frozen=True)
class ServerSide:
    """What the ServerApp process needs to run the federation (pickled by fedge)."""

    config: RunConfig
    server_data: ServerData
    start: StartingModel
    run_dir: Path
    resume: bool
    verbose: bool


def check_ray_settings(simulation: SimulationSettings) -> None:
    """The Ray settings, checked before any file is written or process started: off the
    Ray backend they are refused, CPU shares must be representable, GPUs need CUDA, and
    a cluster's head must answer."""
    if simulation.backend != "ray":
        given = [f"{k}={getattr(simulation, k)!r}" for k, off in RAY_SETTINGS.items()
                 if getattr(simulation, k) != off]
        if given:
            raise FedgeError(f"{', '.join(given)}: settings of the Ray backend; give backend "
                             "ray (--backend ray) or leave them out (the in-process backend "
                             "runs on this machine's cores, see --workers)")
        return
    if simulation.ray_address is not None:
        if simulation.client_cpus != int(simulation.client_cpus):
            raise FedgeError(
                f"client_cpus {simulation.client_cpus:g} with a Ray cluster (--ray-address): "
                "Flower hands Ray whole CPUs per client, and a running cluster's CPU count "
                "is fixed; give whole CPUs, or start the cluster with more logical CPUs "
                "(e.g. `ray start --num-cpus` twice its cores, then --client-cpus 1 for "
                "half a core)")
        _probe(simulation.ray_address)
        return
    cpu_scale(simulation.client_cpus)
    cores = available_cores()
    if simulation.client_cpus > cores:
        raise FedgeError(f"client_cpus {simulation.client_cpus:g} is more than this machine's "
                         f"{cores} cores: no client could ever run")
    if simulation.client_gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise FedgeError(f"client_gpus {simulation.client_gpus:g} needs a CUDA GPU, and "
                             "torch finds none on this machine; leave --client-gpus at 0")
        if simulation.client_gpus > torch.cuda.device_count():
            raise FedgeError(f"client_gpus {simulation.client_gpus:g} is more than this "
                             f"machine's {torch.cuda.device_count()} GPUs")


def cpu_scale(cpus: float) -> int:
    """How many logical CPUs a local Ray counts per core, so that ``cpus`` is whole."""
    share = Fraction(cpus).limit_denominator(CPU_DENOMINATOR)
    if abs(float(share) - cpus) > 1e-9:
        raise FedgeError(f"client_cpus {cpus:g} is not a whole number of hundredths of a "
                         "CPU; give e.g. 0.5, 0.25 or 1.5")
    return share.denominator


def _probe(address: str) -> None:
    """A short TCP connect to the head's GCS port: a clear error before anything starts."""
    if "://" in address:
        raise FedgeError(f"ray_address {address!r}: give the head's own address HOST:PORT "
                         "(`ray start --head` prints it), not a Ray Client (ray://) one")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedgeError(f"ray_address {address!r} is not HOST:PORT (the head's address "
                         "`ray start --head` prints, e.g. 127.0.0.1:6379)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT):
            pass
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise FedgeError(f"cannot reach the Ray cluster at {address} ({reason}); start its "
                         "head with `ray start --head --port PORT` or correct "
                         "--ray-address") from None


def federation_config(config: RunConfig) -> dict[str, object]:
    """The simulation options of ``flwr run --federation-config``.

    Flower 1.42's ``SimulationConfig`` holds whole CPUs per client (uint32) but a float
    of GPUs. A local Ray gets fractions of a CPU nonetheless: it is started with ``k``
    logical CPUs per core and each client reserves ``cpus·k`` of them (0.5 on 2 cores:
    Ray counts 4 CPUs, a client takes 1), so as many clients train at once as the
    fraction promises. A cluster's CPU count is fixed, and ``ray.init`` refuses CPU
    counts when it connects: there, no init arguments, and only whole CPUs
    (:func:`check_ray_settings`)."""
    simulation = config.simulation
    options: dict[str, object] = {"num-supernodes": config.strategy.clients,
                                  "client-resources-num-gpus": float(simulation.client_gpus),
                                  "init-args-log-to-driver": True}
    if simulation.ray_address is None:
        scale = cpu_scale(simulation.client_cpus)
        options["client-resources-num-cpus"] = round(simulation.client_cpus * scale)
        options["init-args-num-cpus"] = available_cores() * scale
    else:
        options["client-resources-num-cpus"] = int(simulation.client_cpus)
    return options


def run_on_ray(federation: Federation, recipe: ClientRecipe, resume: bool,
               on_round: Callable[[RoundRecord, bool], None] | None = None,
               on_start: Callable[[dict], None] | None = None,
               verbose: bool = False) -> RunOutcome:
    """Run ``federation`` on Flower's simulation engine, on a local Ray or the cluster at
    ``config.simulation.ray_address``; ``on_start`` and ``on_round`` hear the ServerApp's
    progress."""
    config, run_dir = federation.config, federation.run_dir.resolve()
    if recipe.record_wire is not None:  # Ray's workers run in folders of their own
        recipe = replace(recipe, record_wire=recipe.record_wire.resolve())
    flower_home = run_dir / FLOWER_FOLDER
    port = free_port()
    env = {"FLWR_HOME": str(flower_home),
           # Ray warns at start-up unless told how to treat CUDA_VISIBLE_DEVICES with 0 GPUs.
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    # ray.init() joins the cluster RAY_ADDRESS names (no init args then); "local" starts
    # a Ray of our own even when `ray start` left a cluster's address in /tmp/ray.
    env["RAY_ADDRESS"] = config.simulation.ray_address or "local"
    events: queue.Queue[dict] = queue.Queue()
    shown = FlowerLog(verbose)

    def observe(line: str) -> None:
        if line.startswith(PROGRESS):
            with contextlib.suppress(ValueError):  # a line cut short: no progress line
                events.put(json.loads(line[len(PROGRESS):]))

    def dispatch() -> None:
        while True:
            try:
                event = events.get_nowait()
            except queue.Empty:
                return
            if event["kind"] == "start" and on_start:
                on_start(event["initial"])
            elif event["kind"] == "round" and on_round:
                on_round(RoundRecord(**event["record"]), event["best"])

    try:
        app_dir = write_app(flower_home, SERVERAPP, CLIENTAPP, port)
        server_file = flower_home / SERVER_FILE
        # Flower runs the ServerApp in a folder of its own: a tracker's folder is made absolute.
        served = config.updated(track=[with_absolute_place(v) for v in config.tracking.track])
        write_atomic(server_file, pickle.dumps(ServerSide(
            served, federation.data, federation.start, run_dir, resume, verbose)))
        write_atomic(flower_home / CLIENT_FILE, pickle.dumps(recipe))
        superlink_log = flower_home / "superlink.log"
        children = Children(env=env)
        with children.running():
            superlink = start_superlink(
                children, ["--simulation", "--insecure", "--host", "127.0.0.1", "--port",
                           str(port), "--disable-runtime-dependency-installation"],
                port, superlink_log, STARTUP_TIMEOUT)
            status = stream_run(children, app_dir, superlink, superlink_log, server_file,
                                federation_config=federation_config(config),
                                observe=observe, hide=shown.hide, verbose=True,
                                tick=dispatch)
            dispatch()
        return _outcome(run_dir, status, shown.failure(), last_error(superlink_log))
    finally:
        shutil.rmtree(flower_home, ignore_errors=True)


def _outcome(run_dir: Path, status: int, failure: str | None,
             superlink_error: str) -> RunOutcome:
    """The finished run, read back from its run folder; or a clear error."""
    stopped = run_dir / FLOWER_FOLDER / STOPPED_FILE
    if stopped.exists():
        raise FedgeError(json.loads(stopped.read_text())["error"])
    if failure and NO_ROOM in failure:
        raise FedgeError("Ray has no room for one client with these resources (client_cpus, "
                         "client_gpus); lower them or give the cluster more (Flower: "
                         f"{failure.split('!!')[-1].strip()})")
    if not run_finished(run_dir):
        cause = failure or f"`flwr run` exited with status {status}; SuperLink: {superlink_error}"
        raise FedgeError(f"the Ray simulation ended before the run finished: {cause} "
                         "(--verbose shows Flower's log)")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = json.loads((run_dir / "onnx_report.json").read_text())
    return RunOutcome(run_dir, len(metrics["rounds"]), metrics["best_round"],
                      metrics["stopped_early"], metrics["test"]["loss"],
                      metrics["test"].get("accuracy"), report, metrics["privacy"],
                      metrics["test"])


def _progress(kind: str, **payload: object) -> None:
    print(PROGRESS + json.dumps({"kind": kind, **payload}), flush=True)


server_app = ServerApp()


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    settings_file = Path(str(context.run_config["settings"]))
    side: ServerSide = pickle.loads(settings_file.read_bytes())
    # Flower logs every round at INFO; the command line prints its own lines instead.
    logging.getLogger("flwr").setLevel(logging.INFO if side.verbose else logging.ERROR)
    if side.verbose:  # fedge's own log too, as `fedge simulate -v` shows it in-process
        logging.basicConfig(level=logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        checkpoint = (load_checkpoint(resumable_checkpoint(side.run_dir)) if side.resume
                      else None)
        federation = Federation(
            side.config, side.server_data, side.run_dir, resume=checkpoint, start=side.start,
            on_round=lambda record, best: _progress("round", record=record.as_dict(),
                                                    best=best),
            on_start=lambda initial: _progress("start", initial=initial))
        federation.run(grid)
    except FedgeError as error:  # the command line reports it, as its own error
        write_json(settings_file.with_name(STOPPED_FILE), {"error": str(error)})


class _RecipeClientApp(ClientApp):
    """The simulation's ClientApp, built from the run's recipe once per process (a Ray
    worker) on its first message; Flower pickles this empty shell to the workers."""

    def __call__(self, message: Message, context: Context) -> Message:
        return _client_app(str(context.run_config["settings"]))(message, context)


@functools.cache
def _client_app(settings: str) -> ClientApp:
    recipe: ClientRecipe = pickle.loads(Path(settings).with_name(CLIENT_FILE).read_bytes())
    return recipe.client_app()


client_app = _RecipeClientApp()
