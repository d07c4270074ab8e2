"""FedBuff: asynchronous buffered aggregation, on the simulated clock.

The hand-computed steps run FedBuff itself on Flower messages to a real ClientApp whose
"training" adds a known update, so that every server step can be written down by hand."""

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedge.config import RunConfig
from fedge.server.checkpoint import load_checkpoint
from fedge.server.fedbuff import BufferSettings, FedBuff
from fedge.simulations.attacks import attacker_partitions
from fedge.simulations.heterogeneity import AsynchronousDevices, SimulatedFleet
from fedge.simulations.inprocess import InProcessGrid
from fedge.simulations.runner import plan_simulation, simulate

from conftest import assert_simulation_refused

SAMPLES_PER_SECOND = 100.0
# Client k adds UPDATES[k] to whatever it is sent; its task takes SIZES[k] / 100 simulated
# seconds (one epoch): client 0 returns every 0.03 s, client 1 once, at 0.1 s.
UPDATES = [np.array([1.0, 0.0], np.float32), np.array([0.0, 4.0], np.float32),
           np.array([np.nan, 0.0], np.float32)]
SIZES = [3, 10, 5]


def known_update_app(configs: list[dict] | None = None) -> ClientApp:
    """Client k adds UPDATES[k]; ``configs`` collects the train config of every task."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        k = int(context.node_config["partition-id"])
        if configs is not None:
            configs.append({"client": k, **message.content["config"]})
        sent = message.content["arrays"]["w"].numpy()
        return Message(RecordDict({
            "arrays": ArrayRecord(array_dict={"w": Array(sent + UPDATES[k])}),
            "metrics": MetricRecord({"num-examples": SIZES[k], "epochs": 1}),
        }), reply_to=message)

    return app


def run_fedbuff(settings: BufferSettings, versions: int, clients: int = 2,
                configs: list[dict] | None = None) -> tuple[dict[int, np.ndarray], FedBuff]:
    """The global ``w`` after each version, evaluated every version."""
    grid = AsynchronousDevices(
        InProcessGrid(known_update_app(configs), clients),
        SimulatedFleet(clients=clients, seed=0, samples_per_second=SAMPLES_PER_SECOND),
        round_timeout=100.0)
    seen: dict[int, np.ndarray] = {}

    def evaluate(version: int, arrays: ArrayRecord) -> MetricRecord:
        seen[version] = arrays["w"].numpy().copy()
        return MetricRecord()

    fedbuff = FedBuff(settings, train_metrics_aggr_fn=lambda replies, key: MetricRecord(),
                      clock=grid.clock)
    fedbuff.start(grid, ArrayRecord(array_dict={"w": Array(np.zeros(2, np.float32))}),
                  num_rounds=versions, evaluate_fn=evaluate)
    return seen, fedbuff


def test_a_slow_clients_stale_update_counts_less_than_a_fresh_one():
    seen, fedbuff = run_fedbuff(BufferSettings(concurrency=2, buffer=1), versions=4)
    a, b = UPDATES[0], UPDATES[1]
    # Client 0 steps the model at 0.03, 0.06 and 0.09 s; client 1's result, trained on
    # version 0, arrives at 0.1 s, three versions late: weight 1/√(1 + 3) = 1/2.
    np.testing.assert_allclose(seen[1], a)
    np.testing.assert_allclose(seen[2], 2 * a)
    np.testing.assert_allclose(seen[3], 3 * a)
    np.testing.assert_allclose(seen[4], 3 * a + b / 2)
    assert [r.staleness for r in fedbuff.versions] == [[0], [0], [0], [3]]
    assert [r.nodes for r in fedbuff.versions] == [[1001], [1001], [1001], [1002]]
    assert [r.elapsed_seconds for r in fedbuff.versions] == pytest.approx([.03, .06, .09, .1])


def test_a_buffer_of_two_divides_the_weighted_sum_by_two():
    configs: list[dict] = []
    seen, fedbuff = run_fedbuff(BufferSettings(concurrency=2, buffer=2), versions=2,
                                configs=configs)
    a, b = UPDATES[0], UPDATES[1]
    # 0.03 and 0.06 s: client 0 twice on version 0; then client 0 (version 1, 0.09 s)
    # and client 1 (version 0, 0.1 s, one version late).
    np.testing.assert_allclose(seen[1], (a + a) / 2)
    np.testing.assert_allclose(seen[2], seen[1] + (a + b / math.sqrt(2)) / 2, rtol=1e-6)
    assert [r.staleness for r in fedbuff.versions] == [[0, 0], [0, 1]]
    # Client 0 got version 0 twice, each time with a seed of its own: a real client
    # draws other batches and dropout, instead of sending the same update again.
    twice = [c for c in configs if c["client"] == 0 and c["server-round"] == 0]
    assert len(twice) == 2 and twice[0]["seed"] != twice[1]["seed"]


def test_an_update_staler_than_max_staleness_is_dropped_and_counted():
    seen, fedbuff = run_fedbuff(BufferSettings(concurrency=2, buffer=1, max_staleness=2),
                                versions=4)
    # Client 1's result, three versions late, never reaches the model: version 4 is
    # client 0's fourth (0.12 s).
    np.testing.assert_allclose(seen[4], 4 * UPDATES[0])
    assert [r.dropped_stale for r in fedbuff.versions] == [0, 0, 0, 1]
    assert fedbuff.report()["dropped_stale"] == 1


def test_an_update_the_screen_refuses_is_counted_and_takes_no_place_in_the_buffer():
    # Client 2 sends NaN weights; with a buffer of 2 the only steps are of clients 0 and 1.
    seen, fedbuff = run_fedbuff(BufferSettings(concurrency=3, buffer=2), versions=2,
                                clients=3)
    assert all(np.isfinite(w).all() for w in seen.values())
    assert sum(r.rejected for r in fedbuff.versions) >= 1
    assert all(node != 1003 for r in fedbuff.versions for node in r.nodes)


def fedbuff_config(**settings: object) -> RunConfig:
    return RunConfig(**{"strategy": "fedbuff", "clients": 10, "rounds": 12,
                        "local_epochs": 1, "patience": 50, "concurrency": 6, "buffer": 3,
                        "eval_every": 2, "workers": 1, **settings})


def without_wall_time(metrics: dict) -> dict:
    for record in metrics["rounds"]:
        record.pop("seconds"), record.pop("slowest_client_seconds")
        for client in (record.get("clients") or {}).values():
            client.pop("train_seconds")
    return {key: metrics[key] for key in ("rounds", "versions", "asynchronous")}


def test_slow_clients_updates_arrive_stale_and_count_and_the_seed_fixes_the_run(tmp_path):
    config = fedbuff_config(slow_fraction=0.3, offline_fraction=0.2, track=["tensorboard"])
    slow = {1001 + k for k in SimulatedFleet.from_config(config).slow_clients()}
    runs = []
    for name in ("first", "again"):
        simulate(plan_simulation(config), tmp_path / name)
        runs.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    metrics = runs[0]

    steps = [(tau, node) for v in metrics["versions"]
             for tau, node in zip(v["staleness"], v["nodes"], strict=True)]
    slow_staleness = [tau for tau, node in steps if node in slow]
    fast_staleness = [tau for tau, node in steps if node not in slow]
    assert slow_staleness and min(slow_staleness) >= 1  # they arrive late, and count
    assert np.mean(slow_staleness) > np.mean(fast_staleness) + 1
    assert [v["version"] for v in metrics["versions"]] == list(range(1, 13))
    assert [r["round"] for r in metrics["rounds"]] == [2, 4, 6, 8, 10, 12]
    times = [r["elapsed_seconds"] for r in metrics["rounds"]]
    assert times == sorted(times) and metrics["asynchronous"]["clock"] == "simulated"
    assert metrics["rounds"][-1]["val_accuracy"] > metrics["initial"]["val_accuracy"] + 0.2
    assert without_wall_time(runs[1]) == without_wall_time(metrics)
    # A tracker hears each evaluation with the staleness of the updates since the last.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "first" / "tensorboard"))
    events.Reload()
    tracked = {e.step: e.value for e in events.Scalars("staleness_max")}
    assert tracked == {r: max(tau for v in metrics["versions"] if r - 2 < v["version"] <= r
                              for tau in v["staleness"]) for r in range(2, 13, 2)}

    simulate(plan_simulation(config.updated(**{"workers": 2})), tmp_path / "two")
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert ([(v["nodes"], v["staleness"]) for v in two["versions"]]
            == [(v["nodes"], v["staleness"]) for v in metrics["versions"]])


def test_every_update_is_decoded_and_screened_against_the_version_it_trained_on(tmp_path):
    # Two of ten clients send w + 100·Δ; every client sends its update as int8.
    config = fedbuff_config(byzantine=0.2, attack="scale", compress="int8",
                            slow_fraction=0.3)
    attackers = {1001 + k for k in attacker_partitions(config)}
    simulate(plan_simulation(config), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())

    assert sum(v["rejected"] for v in metrics["versions"]) >= 2
    assert not attackers & {node for v in metrics["versions"] for node in v["nodes"]}
    # Stale updates were decoded against their own versions: the model still learns
    # (with the attackers' updates in, validation accuracy stayed at 0.15).
    assert max(tau for v in metrics["versions"] for tau in v["staleness"]) >= 1
    assert metrics["rounds"][-1]["val_accuracy"] > metrics["initial"]["val_accuracy"] + 0.2
    float_bytes = 4 * sum(t.numel() for t in load_checkpoint(
        tmp_path / "run" / "best.pt").state_dict.values() if t.is_floating_point())
    assert all(r["bytes_per_client"] < 0.3 * float_bytes for r in metrics["rounds"])


def test_an_interrupted_fedbuff_run_resumes_after_its_last_checkpointed_version(tmp_path):
    config = fedbuff_config(slow_fraction=0.3)
    run = tmp_path / "run"

    def interrupt(record, improved):
        if record.round == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(plan_simulation(config), run, on_round=interrupt)
    before = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in before["rounds"]] == [2, 4, 6]
    in_flight = before["asynchronous"]["in_flight"]
    assert in_flight >= 1

    simulate(plan_simulation(config), run, resume=True)
    after = json.loads((run / "metrics.json").read_text())
    assert after["status"] == "finished"
    assert [v["version"] for v in after["versions"]] == list(range(1, 13))
    assert after["versions"][:6] == before["versions"][:6]
    assert after["rounds"][:3] == before["rounds"]
    assert after["asynchronous"]["discarded_at_resume"] == in_flight
    # Time goes on from the checkpoint: the resumed run's clock starts where it stopped.
    assert after["rounds"][3]["elapsed_seconds"] > before["rounds"][-1]["elapsed_seconds"]


@pytest.mark.parametrize("args, message", [
    (["--buffer", "5", "--concurrency", "3"],
     "--buffer 5 is larger than --concurrency 3"),
    (["--server-lr", "0"], "server_lr: Input should be greater than 0"),
    (["--server-lr", "-1"], "server_lr: Input should be greater than 0"),
    (["--secagg"], "--strategy fedbuff cannot be combined with --secagg"),
    (["--dp-clip-norm", "1"], "--strategy fedbuff cannot be combined with differential "
                              "privacy"),
    (["--concurrency", "20"], "--concurrency 20 is more than the 10 clients"),
    (["--backend", "ray"], "--strategy fedbuff needs backend inprocess"),
])
def test_bad_fedbuff_settings_are_refused_before_any_file_is_written(tmp_path, args, message):
    assert_simulation_refused(tmp_path, ["--strategy", "fedbuff", *args], message)


def test_fedbuffs_settings_are_refused_without_fedbuff(tmp_path):
    assert_simulation_refused(tmp_path, ["--buffer", "3"],
                              "--buffer is a setting of --strategy fedbuff, not of fedavg")
