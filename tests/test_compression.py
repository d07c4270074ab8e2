"""Update compression: clients send w_local − w quantized (fp16, int8), the server decodes
it before screening and aggregation, and every round records the bytes sent."""

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedge.client.app import build_client_app
from fedge.client.compression import compression_mod, encode_update
from fedge.client.wire import audit_recording, read_recording
from fedge.config import RunConfig
from fedge.models.registry import build_model, spec_from_data
from fedge.server.compression import decode_update
from fedge.server.federation import Federation
from fedge.simulations.attacks import UpdateAttack
from fedge.simulations.datasets import load_dataset
from fedge.simulations.inprocess import InProcessGrid
from fedge.simulations.runner import plan_simulation, simulate

from conftest import assert_simulation_refused, device_client_app

SMALL = {"dataset": "digits", "clients": 4, "rounds": 3, "local_epochs": 1, "partition": "iid",
         "patience": 10}
SCHEMES = ["none", "fp16", "int8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """The same small run uncompressed and with each scheme; int8's wire is recorded."""
    results = {}
    for scheme in SCHEMES:
        run_dir = tmp_path_factory.mktemp(scheme) / "run"
        wire = run_dir.parent / "wire" if scheme == "int8" else None
        outcome = simulate(plan_simulation(RunConfig(**SMALL, compress=scheme)), run_dir,
                           record_wire=wire)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        results[scheme] = {"outcome": outcome, "metrics": metrics, "wire": wire}
    return results


def mean_bytes(run: dict) -> float:
    return float(np.mean([r["bytes_per_client"] for r in run["metrics"]["rounds"]]))


def test_compressed_runs_complete_and_record_the_bytes_each_client_sent(runs):
    for scheme in SCHEMES:
        rounds = runs[scheme]["metrics"]["rounds"]
        assert runs[scheme]["metrics"]["status"] == "finished"
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert all(r["num_clients"] == 4 and r["rejected"] == 0 for r in rounds)
        assert all(r["bytes_per_client"] > 0 for r in rounds)
        assert runs[scheme]["metrics"]["config"]["compress"] == scheme


def test_fp16_sends_half_and_int8_a_quarter_of_the_bytes(runs):
    plain = mean_bytes(runs["none"])
    # float32 weights, 4 bytes a value, plus a small header per array
    parameters = sum(v.numel() for v in build_model(_spec()).state_dict().values())
    assert 4 * parameters <= plain < 4 * parameters * 1.02
    assert mean_bytes(runs["fp16"]) / plain == pytest.approx(0.5, abs=0.02)
    assert mean_bytes(runs["int8"]) / plain == pytest.approx(0.25, abs=0.02)


def _spec():
    digits = load_dataset("digits")
    return spec_from_data("cnn", digits.x, 10, dropout=0.2)


def test_compressed_runs_reach_the_accuracy_of_the_uncompressed_one(runs):
    plain = runs["none"]["outcome"].test_accuracy
    assert plain > 0.7
    for scheme in ["fp16", "int8"]:
        assert abs(runs[scheme]["outcome"].test_accuracy - plain) <= 0.02


def test_the_wire_carries_int8_updates_and_the_scheme_the_server_asked_for(runs):
    messages = read_recording(runs["int8"]["wire"])
    assert len(messages) == 4 * 3
    for message in messages:
        assert message.received["compress"] == "int8"
        assert {a.dtype for a in message.arrays["arrays"].values()} == {np.dtype(np.int8)}
        assert message.configs["compression"]["scheme"] == "int8"
    digits = load_dataset("digits")
    assert audit_recording(runs["int8"]["wire"], digits.x).passed


@pytest.mark.parametrize("magnitude", [1e-6, 1e-3, 1.0, 300.0])
def test_a_decoded_update_is_within_one_quantization_step_of_the_original(magnitude):
    update = np.random.default_rng(0).normal(0, magnitude, size=(64, 33))
    levels, scale = encode_update(update, "int8", np.random.default_rng(1))
    assert levels.dtype == np.int8 and np.abs(levels).max() == 127
    assert scale == pytest.approx(np.abs(update).max() / 127)
    # stochastic rounding to one of the two neighbouring levels: less than a step s
    assert np.abs(decode_update(levels, scale) - update).max() < scale * (1 + 1e-12)

    halves, unit = encode_update(update, "fp16", np.random.default_rng(1))
    assert halves.dtype == np.float16 and unit == 1.0
    # fp16 keeps 11 significant bits: half a step is 2⁻¹¹ of the value (2⁻²⁵ if subnormal)
    error = np.abs(decode_update(halves, unit) - update)
    assert (error <= np.abs(update) * 2.0**-11 + 2.0**-25).all()


def test_int8_rounding_is_unbiased_so_updates_below_half_a_step_still_arrive_on_average():
    # One large value sets the step s = 1; the others are far below s/2, which rounding to
    # the nearest level would send as 0 every time.
    update = np.array([127.0, 0.1, -0.05, 0.3, 0.0])
    rng = np.random.default_rng(2)
    decoded = np.array([decode_update(*encode_update(update, "int8", rng))
                        for _ in range(4000)])

    assert set(np.unique(decoded[:, 1])) == {0.0, 1.0}
    # the mean of 4,000 draws is within 4 standard errors (σ ≤ s/2) of the true update
    np.testing.assert_allclose(decoded.mean(axis=0), update, atol=4 * 0.5 / np.sqrt(4000))


def test_int8_rounding_draws_are_reproducible_from_their_seed():
    update = np.random.default_rng(0).normal(size=100)
    first, _ = encode_update(update, "int8", np.random.default_rng(7))
    again, _ = encode_update(update, "int8", np.random.default_rng(7))
    other, _ = encode_update(update, "int8", np.random.default_rng(8))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_a_zero_update_stays_zero_and_a_non_finite_one_decodes_to_nan():
    rng = np.random.default_rng(0)
    levels, scale = encode_update(np.zeros(5), "int8", rng)
    assert not decode_update(levels, scale).any()
    levels, scale = encode_update(np.array([1.0, np.nan, 2.0]), "int8", rng)
    assert np.isnan(decode_update(levels, scale)).all()  # the server's screen refuses it


def scales_dropped(partition: int):
    """A broken client: its int8 update comes without its scales."""

    def mod(message, context, call_next):
        reply = call_next(message, context)
        if context.node_config["partition-id"] == partition:
            reply.content["compression"] = ConfigRecord({"scheme": "int8"})
        return reply

    return mod


def test_undecodable_and_non_finite_compressed_updates_are_rejected(tmp_path):
    config = RunConfig(**{**SMALL, "rounds": 1}, compress="int8")
    plan = plan_simulation(config)
    nan = UpdateAttack("nan", 1.0, attackers=frozenset({0}))
    # scales_dropped breaks what leaves the device; the NaN update is compressed as usual
    client_app = build_client_app(plan.clients.local_data,
                                  mods=[scales_dropped(1), compression_mod, nan])
    outcome = Federation(plan.config, plan.server_data, tmp_path).run(
        InProcessGrid(client_app, config.strategy.clients))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    (record,) = metrics["rounds"]
    assert outcome.rounds_run == 1
    assert (record["rejected"], record["num_clients"]) == (2, 2)
    # the two honest int8 updates were decoded and aggregated into a better model
    assert record["val_loss"] < metrics["initial"]["val_loss"]



def _train_reply(app, scheme: str | None, context: Context) -> RecordDict:
    InProcessGrid(app, 1)  # sets the task identity Flower's messages need, as a runtime does
    start = ArrayRecord(build_model(_spec()).state_dict())
    config = {"model-spec": _spec().to_json(), "local-epochs": 1, "batch-size": 16,
              "lr": 0.01, "optimizer": "adam", "local-patience": 1, "seed": 0,
              "server-round": 1}
    if scheme is not None:
        config["compress"] = scheme
    message = Message(RecordDict({"arrays": start, "config": ConfigRecord(config)}), 1001,
                      "train")
    return app(message, context).content


@pytest.mark.parametrize("where", ["simulation", "deployment"])
def test_both_client_apps_compress_only_when_the_server_asks(where, tmp_path):
    with device_client_app(where, compression_mod, tmp_path) as (app, node_config):
        context = Context(run_id=1, node_id=1001, node_config={"partition-id": 0, **node_config},
                          state=RecordDict(), run_config={})
        plain = _train_reply(app, None, context)
        halves = _train_reply(app, "fp16", context)
        levels = _train_reply(app, "int8", context)
    assert "compression" not in plain
    assert {a.dtype for a in plain["arrays"].values()} == {"float32"}
    assert {a.dtype for a in halves["arrays"].values()} == {"float16"}
    assert {a.dtype for a in levels["arrays"].values()} == {"int8"}
    assert len(levels["compression"]["scales"]) == len(levels["arrays"])


@pytest.mark.parametrize(("options", "message"), [
    (["--compress", "int4"], "compress: Input should be 'none', 'fp16' or 'int8'"),
    (["--compress", "int8", "--secagg"], "--compress int8 cannot be combined with --secagg"),
    (["--compress", "fp16", "--dp-clip-norm", "1"],
     "--compress fp16 cannot be combined with differential privacy"),
])
def test_bad_compression_settings_are_refused_before_any_file_is_written(options, message,
                                                                        tmp_path):
    assert_simulation_refused(tmp_path, ["--clients", "3", *options], message)
