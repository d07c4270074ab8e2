"""The wire privacy check: every message a client sends is recorded, and nothing it sends
holds its raw training samples, only arrays shaped like the model's parameters and scalar
metrics. The audit is shown failing on clients that leak, so its passing means something."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from typer.testing import CliRunner

from fedge.cli import app
from fedge.client.app import build_client_app
from fedge.client.relay import app as relay_app
from fedge.client.relay import serve_trainer
from fedge.client.wire import FOLDER_KEY, WireRecorder, audit_recording, read_recording
from fedge.config import RunConfig
from fedge.errors import FedgeError
from fedge.models.registry import build_model, spec_from_data
from fedge.server.checkpoint import load_checkpoint
from fedge.simulations.datasets import load_dataset
from fedge.simulations.inprocess import InProcessGrid
from fedge.simulations.runner import plan_simulation

RUN = {"clients": 4, "fraction": 0.5, "rounds": 3, "local_epochs": 1, "partition": "iid",
       "patience": 5}


def fedge(*args: str):
    return CliRunner().invoke(app, list(args))


def training_samples(clients: int) -> np.ndarray:
    """Every simulated client's raw training samples, one per row."""
    plan = plan_simulation(RunConfig(**{**RUN, "clients": clients}))
    contexts = [Context(run_id=1, node_id=i, node_config={"partition-id": i}, state=RecordDict(),
                        run_config={}) for i in range(clients)]
    return np.concatenate([plan.clients.local_data(c).train_x for c in contexts])


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """`fedge simulate --record-wire`: 4 digits clients, 2 sampled per round, 3 rounds."""
    root = tmp_path_factory.mktemp("wire")
    options = [f"--{key.replace('_', '-')}={value}" for key, value in RUN.items()]
    result = fedge("simulate", *options, "--record-wire", str(root / "wire"),
                   "--out", str(root / "run"))
    assert result.exit_code == 0, result.output
    return root / "run", root / "wire"


def test_every_message_of_every_sampled_client_is_recorded_once(recorded_run):
    run_dir, wire = recorded_run
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    messages = read_recording(wire)

    assert len(messages) == sum(r["num_clients"] for r in rounds) == 2 * 3
    for r in rounds:
        assert len({m.node_id for m in messages if m.round == r["round"]}) == r["num_clients"]
    for m in messages:
        assert m.name.startswith(f"node-{m.node_id}_round-{m.round:04d}_train_")
        assert m.error is None and set(m.arrays) == {"arrays"} and set(m.metrics) == {"metrics"}
        assert (wire / f"{m.name}.npz").is_file()
    assert sorted(p.suffix for p in wire.iterdir()) == [".json"] * 6 + [".npz"] * 6


def test_the_recording_is_exactly_what_the_server_aggregated(recorded_run):
    # FedAvg of the last round's recorded replies must be the run's final global model.
    run_dir, wire = recorded_run
    last = [m for m in read_recording(wire) if m.round == RUN["rounds"]]
    weights = np.array([m.metrics["metrics"]["num-examples"] for m in last], dtype=np.float64)
    final = load_checkpoint(run_dir / "checkpoint.pt").state_dict
    for key, tensor in final.items():
        sent = np.stack([m.arrays["arrays"][key] for m in last]).astype(np.float64)
        average = np.tensordot(weights / weights.sum(), sent, axes=1)
        np.testing.assert_allclose(average, tensor.numpy(), rtol=1e-5, atol=1e-6)


def test_a_whole_run_sends_no_training_sample_and_only_model_arrays(recorded_run):
    _, wire = recorded_run
    samples = training_samples(RUN["clients"])
    audit = audit_recording(wire, samples)
    assert audit.passed, audit.violations
    assert (audit.messages, audit.rounds) == (6, 3)
    assert audit.samples_searched == len(samples) and audit.samples_skipped == 0
    assert audit.arrays == 6 * len(build_model(spec_from_data(
        "cnn", samples, num_classes=10, dropout=0.2)).state_dict())

    result = fedge("audit-wire", str(wire), "--dataset", "digits")
    assert result.exit_code == 0, result.output
    assert "passed" in result.stdout and "samples searched" in result.stdout


# --- the audit can fail: clients that leak -------------------------------------------


def _steal_rows(reply: Message, rows: np.ndarray, how: str) -> None:
    arrays, metrics = reply.content["arrays"], reply.content["metrics"]
    if how == "an extra array":
        arrays["stolen"] = Array(rows)
    elif how == "inside a parameter of the right shape":
        key = max(arrays, key=lambda k: arrays[k].numpy().size)
        weights = arrays[key].numpy().copy()
        weights.reshape(-1)[: rows[0].size] = rows[0].reshape(-1)
        arrays[key] = Array(weights)
    elif how == "as scalar metrics":
        metrics.update({f"pixel-{i}": float(v) for i, v in enumerate(rows[0].reshape(-1))})
    elif how == "as a list metric":
        metrics["sample"] = rows[0].reshape(-1).astype(np.float64).tolist()


def leaky_mod(how: str, load_data):
    def leak(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        _steal_rows(reply, load_data(context).train_x[:3], how)
        return reply

    return leak


def record_leaky_round(folder, how: str) -> np.ndarray:
    """One train message to each of two digits clients that leak ``how``, recorded into
    ``folder``; returns the clients' training samples (of 8 small clients, so that they
    train quickly)."""
    clients = plan_simulation(RunConfig(**{**RUN, "clients": 8})).clients
    # The recorder comes first, outermost: it sees what the leaky mod adds to the reply.
    mods = [WireRecorder(folder), leaky_mod(how, clients.local_data)]
    grid = InProcessGrid(build_client_app(clients.local_data, device="cpu", mods=mods),
                         num_nodes=2)
    spec = spec_from_data("cnn", load_dataset("digits").x, num_classes=10, dropout=0.2)
    content = RecordDict({
        "arrays": ArrayRecord(build_model(spec).state_dict()),
        "config": ConfigRecord({"model-spec": spec.to_json(), "local-epochs": 1,
                                "batch-size": 32, "lr": 0.003, "optimizer": "adam",
                                "local-patience": 1, "seed": 0, "server-round": 1}),
    })
    replies = grid.send_and_receive([Message(content, node, "train")
                                     for node in grid.get_node_ids()])
    assert all(r.has_content() for r in replies), [r.error for r in replies if r.has_error()]
    return training_samples(8)


@pytest.mark.parametrize("how, found", [
    ("an extra array", ["'stolen' is not one of the model's parameters",
                        "array arrays/'stolen' holds 3 raw sample(s) verbatim as float32"]),
    ("inside a parameter of the right shape", ["holds 1 raw sample(s) verbatim as float32"]),
    ("as scalar metrics", ["metrics 'metrics' holds 1 raw sample(s) verbatim as float32"]),
    ("as a list metric", ["metric metrics/'sample' is a list of 64 values, not a scalar",
                          "metrics 'metrics' holds 1 raw sample(s) verbatim as float32"]),
])
def test_the_audit_catches_a_client_that_sends_training_samples(tmp_path, how, found):
    audit = audit_recording(tmp_path, record_leaky_round(tmp_path, how))
    assert not audit.passed and audit.messages == 2
    for message in {m.name for m in read_recording(tmp_path)}:
        problems = [v.problem for v in audit.violations if v.message == message]
        assert len(problems) == len(found), problems
        for expected, problem in zip(found, problems, strict=True):
            assert expected in problem


def test_the_audit_command_fails_with_exit_status_1_and_names_the_leak(tmp_path):
    record_leaky_round(tmp_path, "an extra array")
    result = fedge("audit-wire", str(tmp_path), "--dataset", "digits")
    assert result.exit_code == 1, result.output
    assert "failed" in result.stdout and "4 violations" in result.stdout
    assert "verbatim as float32" in result.stdout


def test_a_client_that_fails_is_recorded_with_its_error(tmp_path):
    def no_data(context):
        raise RuntimeError("disk unplugged")

    grid = InProcessGrid(build_client_app(no_data, mods=[WireRecorder(tmp_path)]), num_nodes=1)
    spec = spec_from_data("mlp", np.zeros((4, 3), np.float32), num_classes=2, dropout=0.0)
    config = ConfigRecord({"model-spec": spec.to_json(), "server-round": 4})
    [reply] = grid.send_and_receive([Message(RecordDict({"config": config}), 1001, "train")])

    [message] = read_recording(tmp_path)
    assert reply.error.reason == "RuntimeError: disk unplugged"
    assert message.error["reason"] == "RuntimeError: disk unplugged"
    assert (message.node_id, message.round, message.arrays) == (1001, 4, {})
    audit = audit_recording(tmp_path, np.arange(16, dtype=np.float32).reshape(4, 4) + 0.5)
    assert audit.passed and audit.error_replies == 1


# --- deployment: the relay ClientApp records when its node config names a folder -----


def test_the_relay_clientapp_records_only_when_the_node_config_names_a_folder(tmp_path):
    def trainer(content: RecordDict, context: Context) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({"num-examples": 5})})

    InProcessGrid(build_client_app(lambda context: None), num_nodes=1)  # Flower's task identity
    wire = tmp_path / "wire"
    with serve_trainer(trainer, tmp_path) as entries:
        for node_config in (entries, {**entries, FOLDER_KEY: str(wire)}):
            context = Context(run_id=1, node_id=7, node_config=node_config,
                              state=RecordDict(), run_config={})
            reply = relay_app(Message(RecordDict({"config": ConfigRecord({"server-round": 2})}),
                                      7, "train"), context)
            assert reply.content["metrics"]["num-examples"] == 5

    [message] = read_recording(wire)
    assert (message.node_id, message.round, message.metrics) == (
        7, 2, {"metrics": {"num-examples": 5}})


# --- bad input: one clear error ------------------------------------------------------


def test_bad_recordings_and_samples_are_refused_with_a_clear_error(recorded_run, tmp_path):
    _, wire = recorded_run
    samples = training_samples(RUN["clients"])
    with pytest.raises(FedgeError, match=r"no wire recording at .*: not a folder"):
        audit_recording(tmp_path / "missing", samples)
    with pytest.raises(FedgeError, match="holds no recorded messages"):
        audit_recording(tmp_path, samples)
    (tmp_path / "node-1_round-0001_train_x.json").write_text("{not json")
    with pytest.raises(FedgeError, match=r"cannot read recorded message .*node-1_round-0001"):
        audit_recording(tmp_path, samples)
    with pytest.raises(FedgeError, match=r"samples have shape \(30,\), but the recorded model "
                                         r"'cnn' takes \(1, 8, 8\)"):
        audit_recording(wire, load_dataset("breast_cancer").x)
    with pytest.raises(FedgeError, match="none of the 3 samples can be searched for"):
        audit_recording(wire, np.zeros((3, 1, 8, 8), np.float32))


def test_a_recording_missing_its_arrays_is_refused(recorded_run, tmp_path):
    _, wire = recorded_run
    first = sorted(wire.glob("*.json"))[0]
    (tmp_path / first.name).write_bytes(first.read_bytes())
    with pytest.raises(FedgeError, match=f"cannot read recorded message .*{first.stem}"):
        audit_recording(tmp_path, training_samples(RUN["clients"]))


def test_the_audit_command_refuses_bad_input_with_exit_status_2(tmp_path):
    for args, message in (
        ([str(tmp_path)], "give the samples to search for: --data FILE or --dataset NAME"),
        ([str(tmp_path / "missing"), "--dataset", "digits"], "no wire recording at"),
        ([str(tmp_path), "--data", str(tmp_path / "none.csv")], "no such file or folder"),
    ):
        result = fedge("audit-wire", *args)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and "Traceback" not in result.output


def test_a_recording_folder_that_is_a_file_is_refused_before_the_run_starts(tmp_path):
    (tmp_path / "wire").write_text("")
    result = fedge("simulate", "--record-wire", str(tmp_path / "wire"),
                   "--out", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    assert "is a file, not a folder" in result.stderr
    assert not (tmp_path / "run").exists()
