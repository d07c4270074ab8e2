"""Unequal, unreliable devices in simulation: drops, offline clients, deadlines."""

import json
from collections import Counter

import pytest
from flwr.app import Context, RecordDict

from fedge.client.app import build_client_app
from fedge.config import RunConfig
from fedge.server.federation import Federation
from fedge.simulations.heterogeneity import SimulatedFleet, with_devices
from fedge.simulations.inprocess import InProcessGrid
from fedge.simulations.runner import plan_simulation, simulate

from conftest import assert_simulation_refused

SMALL = RunConfig(clients=10, rounds=4, local_epochs=1, partition="iid", patience=10)


def node_context(partition: int) -> Context:
    return Context(run_id=1, node_id=1001 + partition, node_config={"partition-id": partition},
                   state=RecordDict(), run_config={})


def rounds_of(run_dir) -> list[dict]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    return metrics["rounds"]


def test_with_30_percent_of_clients_dropping_per_round_the_run_completes_and_reports_it(
        tmp_path):
    # quarantine 0: every round draws its drops afresh, so all 10 clients are sampled
    config = SMALL.updated(**{"rounds": 3, "drop_fraction": 0.3, "quarantine": 0.0})
    outcome = simulate(plan_simulation(config), tmp_path)
    rounds = rounds_of(tmp_path)

    fleet = SimulatedFleet.from_config(config)
    dropped = [sum(fleet.drops(r, k) for k in range(10)) for r in (1, 2, 3)]
    assert sum(dropped) > 0
    assert [r["failures"] for r in rounds] == dropped
    assert [r["num_clients"] for r in rounds] == [10 - d for d in dropped]
    assert [r["timeouts"] for r in rounds] == [0, 0, 0]
    assert outcome.rounds_run == 3 and (tmp_path / "model.onnx").exists()


def test_offline_clients_are_not_sampled(tmp_path):
    config = SMALL.updated(**{"clients": 6, "rounds": 3, "offline_fraction": 0.4,
                                      "min_clients": 3})
    plan = plan_simulation(config)
    trained = Counter()

    def counting(context):
        trained[context.node_config["partition-id"]] += 1
        return plan.clients.local_data(context)

    grid, clock = with_devices(InProcessGrid(build_client_app(counting), 6), config)
    Federation(plan.config, plan.server_data, tmp_path).run(grid, clock=clock)

    fleet = SimulatedFleet.from_config(config)
    online = [fleet.online(r) for r in (1, 2, 3)]
    assert any(len(o) < 6 for o in online), "the seed should take some clients offline"
    # fraction 1.0: every online client trains, no offline one does
    assert [r["num_clients"] for r in rounds_of(tmp_path)] == [len(o) for o in online]
    assert trained == Counter(k for o in online for k in o)


@pytest.mark.timeout(120)  # a grid that waited for the real deadline would take 11 days
def test_slow_clients_miss_the_deadline_without_the_simulation_waiting_for_it(tmp_path):
    # 1 sample/s: the 2 normal clients need ~250 simulated seconds for their ~250 samples,
    # the 2 slow ones 10⁷ times longer, against a deadline of 10⁶ s (11.6 days).
    config = SMALL.updated(**{"clients": 4, "rounds": 3, "slow_fraction": 0.5,
                                      "slowdown": 1e7, "samples_per_second": 1.0,
                                      "round_timeout": 1e6})
    simulate(plan_simulation(config), tmp_path)
    rounds = rounds_of(tmp_path)
    # Late clients count as timeouts and sit out the next 60 s (the quarantine) on the
    # simulated clock: round 2 (~250 s) runs without them, round 3 samples them again.
    assert [(r["num_clients"], r["timeouts"], r["failures"]) for r in rounds] == [
        (2, 2, 0), (2, 0, 0), (2, 2, 0)]
    # the server waited for the deadline, but only on the simulated clock
    simulated = [r["simulated_seconds"] for r in rounds]
    assert simulated[0] == simulated[2] == 1e6 and 60 < simulated[1] < 1000


def test_a_round_without_late_clients_lasts_as_long_as_its_slowest_result(tmp_path):
    config = SMALL.updated(**{"clients": 3, "rounds": 1, "slow_fraction": 1 / 3,
                                      "slowdown": 4.0, "samples_per_second": 50.0})
    plan = plan_simulation(config)
    simulate(plan, tmp_path)
    (record,) = rounds_of(tmp_path)
    fleet = SimulatedFleet.from_config(config)
    (slow,) = fleet.slow_clients()
    train_samples = [len(plan.clients.local_data(node_context(k)).train_x) for k in range(3)]
    # one local epoch (local_epochs=1): t_k = slowdown_k · n_k / samples_per_second
    expected = max((4.0 if k == slow else 1.0) * n / 50.0 for k, n in enumerate(train_samples))
    assert record["simulated_seconds"] == pytest.approx(expected)
    assert (record["num_clients"], record["timeouts"]) == (3, 0)


def test_the_seed_fixes_the_devices_drops_match_their_rate_and_min_clients_stay_online():
    fleet = SimulatedFleet(clients=20, seed=7, offline_fraction=0.5, drop_fraction=0.3,
                        slow_fraction=0.25, min_online=4)
    again = SimulatedFleet(clients=20, seed=7, offline_fraction=0.5, drop_fraction=0.3,
                        slow_fraction=0.25, min_online=4)
    other = SimulatedFleet(clients=20, seed=8, offline_fraction=0.5, drop_fraction=0.3,
                        slow_fraction=0.25, min_online=4)

    def pattern(f: SimulatedFleet) -> tuple:
        return (f.slow_clients(), [f.online(r) for r in range(1, 30)],
                [[f.drops(r, k) for k in range(20)] for r in range(1, 30)])

    assert pattern(fleet) == pattern(again) != pattern(other)
    assert len(fleet.slow_clients()) == 5
    dropped = sum(fleet.drops(r, k) for r in range(1, 201) for k in range(20))
    assert 0.27 <= dropped / 4000 <= 0.33
    assert all(len(SimulatedFleet(clients=6, seed=s, offline_fraction=0.99, min_online=4)
                   .online(r)) == 4 for s in range(5) for r in range(1, 20))


@pytest.mark.parametrize(("args", "message"), [
    (["--drop-fraction", "1.5"], "drop_fraction: Input should be less than 1"),
    (["--offline-fraction", "-0.1"], "offline_fraction: Input should be greater than or equal"),
    (["--slowdown", "0.5"], "slowdown: Input should be greater than or equal to 1"),
    (["--backend", "ray", "--drop-fraction", "0.3"], "need backend inprocess"),
    (["--secagg", "--slow-fraction", "0.3"], "do not work with secagg"),
])
def test_bad_device_settings_are_refused_before_any_file_is_written(tmp_path, args, message):
    assert_simulation_refused(tmp_path, args, message)
