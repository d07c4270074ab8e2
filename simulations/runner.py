"""Many clients on one machine: the same ServerApp and ClientApp as a deployment.

Backends: ``inprocess`` (default) hands each message to the ClientApp in this process
through :class:`~fedge.simulations.inprocess.InProcessGrid`; ``ray`` is Flower's own
simulation engine, for large runs and Ray clusters.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from flwr.serverapp import Grid
from torch import nn

from fedge.client.training import check_device
from fedge.client.wire import check_wire_folder
from fedge.config import DEFAULT_DATASET, RunConfig, StrategySettings
from fedge.datafiles import LabelledSamples
from fedge.errors import FedgeError
from fedge.models.hf import check_pretrained_settings
from fedge.models.registry import check_sample_shape
from fedge.server.checkpoint import load_checkpoint
from fedge.server.fedbuff import BufferSettings
from fedge.server.federation import (
    Federation,
    RunOutcome,
    ServerData,
    check_server_settings,
    prepare,
)
from fedge.server.rounds import RoundRecord
from fedge.server.run_folder import prepare_run_dir, resumable_checkpoint
from fedge.server.starting_model import StartingModel
from fedge.server.strategies import check_strategy_name
from fedge.simulations.attacks import check_attack
from fedge.simulations.clients import SimulatedClients
from fedge.simulations.datasets import for_task, load_dataset, split_federated
from fedge.simulations.heterogeneity import SimulatedFleet, check_heterogeneity, with_devices
from fedge.simulations.partition import PartitionSpec
from fedge.simulations.ray import check_ray_settings
from fedge.simulations.userdata import (
    describe_holdouts,
    describe_partition,
    describe_source,
    fit_config,
    split_user_data,
    user_data_source,
)
from fedge.simulations.vectorized import VectorizedGrid, check_vectorize
from fedge.simulations.workers import ClientRecipe, WorkerGrid, resolve_workers


@dataclass(frozen=True)
class SimulationPlan:
    """A checked configuration: everything that can be wrong is found before any file
    is written."""

    config: RunConfig
    clients: SimulatedClients
    server_data: ServerData
    synthetic: bool
    source: str = ""  # what the run trains on, e.g. "digits (real data)"
    partition: str = ""  # how the clients' samples were split
    holdouts: str | None = None  # your own data: where the server's samples come from
    start: StartingModel | None = None  # the model, checked and with its initial weights


def plan_simulation(config: RunConfig, data: LabelledSamples | None = None,
                    factory: Callable[..., nn.Module] | None = None) -> SimulationPlan:
    """Check everything about a simulation, reading its data and building its starting
    model. ``data``: in-memory samples instead of a built-in data set or
    ``config.simulation.data`` (backend ``inprocess`` only: Ray's workers read samples from
    files). ``factory``: your own model's class or function, instead of importing
    ``config.model.name``."""
    plan = _plan_data(config, data)
    return replace(plan, start=prepare(plan.config, plan.server_data, factory))


def _plan_data(config: RunConfig, data: LabelledSamples | None) -> SimulationPlan:
    check_pretrained_settings(config.model)  # before its data is read as texts or not
    own = user_data_source(config, data)
    if own is None:
        name = config.simulation.dataset or DEFAULT_DATASET
        dataset = for_task(load_dataset(name, config.seed), config.task.name,
                           config.task.positive)
        config = config.updated(dataset=name,
                                model=config.model.name or dataset.default_model)
        check_sample_shape(config.model.name, dataset.x.shape[1:])
        _check_dataset_settings(config, dataset.x.shape[1:], dataset.num_classes)
    else:
        own_split = split_user_data(own)
        config = fit_config(config, own, own_split)
        check_sample_shape(config.model.name, own_split.x.shape[1:])
    simulation = config.simulation
    check_strategy_name(config.strategy.name)
    check_attack(config)
    check_heterogeneity(config)
    check_server_settings(config)
    check_device(simulation.device)
    resolve_workers(config)
    check_vectorize(config)
    check_ray_settings(simulation)
    PartitionSpec.parse(simulation.partition)
    if config.strategy.name == "fedbuff":
        concurrency = BufferSettings.from_strategy(config.strategy).concurrency
        if concurrency > config.strategy.clients:
            raise FedgeError(f"--concurrency {concurrency} is more than the "
                             f"{config.strategy.clients} clients: FedBuff gives a client one task "
                             "at a time")
    if config.strategy.min_clients > config.strategy.clients:
        raise FedgeError(f"min_clients ({config.strategy.min_clients}) is larger than the "
                         f"number of clients ({config.strategy.clients}): no round could "
                         "ever start")
    clients = SimulatedClients(simulation.dataset, simulation.partition, config.strategy.clients,
                               config.seed, simulation.val_fraction, simulation.val_share,
                               simulation.test_share, own, config.task.name,
                               config.task.positive)
    if min(clients.partition_sizes()) < 2:
        raise FedgeError(f"partition {simulation.partition!r} leaves a client with fewer than "
                         "2 samples; use fewer clients or a larger alpha")
    if own is not None:
        source = describe_source(simulation, own, own_split)
        server_data = ServerData(own_split.val_x, own_split.val_y, own_split.test_x,
                                 own_split.test_y, num_classes=config.data.num_classes
                                 or own_split.num_classes, vocab_size=own_split.vocab_size,
                                 class_names=own_split.class_names, source=source,
                                 non_feature_columns=own.non_feature_columns)
        return SimulationPlan(config, clients, server_data, False, source,
                              describe_partition(simulation, own),
                              describe_holdouts(simulation, own_split))
    split = split_federated(dataset, config.seed, simulation.val_share, simulation.test_share)
    source = f"{simulation.dataset} ({'SYNTHETIC data' if dataset.synthetic else 'real data'})"
    server_data = ServerData(*split.server_val, *split.test, num_classes=dataset.num_classes,
                             vocab_size=dataset.vocab_size, class_names=dataset.class_names,
                             source=source)
    return SimulationPlan(config, clients, server_data, dataset.synthetic, source,
                          simulation.partition)


def _check_dataset_settings(config: RunConfig, sample_shape: tuple[int, ...],
                            num_classes: int) -> None:
    """``input_shape`` and ``num_classes`` describe a deployment's data files; in a
    simulation the data set decides them, and a different value is a mistake."""
    data, dataset = config.data, config.simulation.dataset
    if data.num_classes is not None and data.num_classes != num_classes:
        raise FedgeError(f"num_classes {data.num_classes} does not match data set "
                         f"{dataset!r}, which has {num_classes} classes")
    if data.input_shape is not None and tuple(data.input_shape) != tuple(sample_shape):
        raise FedgeError(f"input_shape {list(data.input_shape)} does not match data set "
                         f"{dataset!r}, whose samples have shape {list(sample_shape)}")


def simulate(plan: SimulationPlan, run_dir: Path, overwrite: bool = False,
             on_round: Callable[[RoundRecord, bool], None] | None = None,
             resume: bool = False, record_wire: Path | None = None,
             on_start: Callable[[dict], None] | None = None,
             verbose: bool = False) -> RunOutcome:
    """Run the planned federation and write its run folder ``run_dir``; with ``resume``,
    continue the interrupted run in ``run_dir`` after its last checkpointed round; with
    ``record_wire``, record every client reply in that folder (:mod:`fedge.client.wire`).
    ``on_start`` hears the starting model's validation metrics, ``on_round`` each round's
    record; ``verbose``: the Ray backend shows Flower's and Ray's logs."""
    config = plan.config
    simulation = config.simulation
    check_vectorize(config, record_wire)
    wire = None if record_wire is None else check_wire_folder(record_wire)
    if simulation.backend == "ray":  # the ServerApp runs in Flower's process: it reports
        on_round_here = on_start_here = None
    else:
        on_round_here, on_start_here = on_round, on_start
    if resume:
        checkpoint = load_checkpoint(resumable_checkpoint(run_dir))
        federation = Federation(config, plan.server_data, run_dir, on_round_here, checkpoint,
                                start=plan.start, on_start=on_start_here)
    else:
        federation = Federation(config, plan.server_data, prepare_run_dir(run_dir, overwrite),
                                on_round_here, start=plan.start, on_start=on_start_here)
    recipe = ClientRecipe(config, plan.clients, plan.server_data.num_classes, wire)
    if simulation.backend == "inprocess":
        first_round = (federation.resume.round if federation.resume else 0) + 1
        workers = resolve_workers(config)
        # A simulated clock keeps the round's deadline in simulated seconds; workers then
        # get the default deadline in real ones before they count as hung.
        hung_after = (StrategySettings.model_fields["round_timeout"].default
                      if SimulatedFleet.from_config(config).heterogeneous
                      else config.strategy.round_timeout)

        def clients_grid() -> Grid:
            if workers == 1:
                from fedge.simulations.inprocess import InProcessGrid

                return InProcessGrid(recipe.client_app(), config.strategy.clients)
            return WorkerGrid(recipe, config.strategy.clients, workers, timeout=hung_after)

        with contextlib.ExitStack() as stack:
            if simulation.vectorize:  # the clients' grid only for what cannot be batched
                fallback = "in workers" if workers > 1 else "one by one in this process"
                base = VectorizedGrid(clients_grid, config.strategy.clients,
                                      plan.clients.local_data, simulation.device, fallback)
            else:
                base = clients_grid()
            if hasattr(base, "close"):
                stack.callback(base.close)
            grid, clock = with_devices(base, config, first_round)
            return federation.run(grid, clock=clock)

    from fedge.simulations.ray import run_on_ray

    return run_on_ray(federation, recipe, resume, on_round=on_round, on_start=on_start,
                      verbose=verbose)
