"""Secure aggregation: Flower's SecAgg+ gives FedAvg's global model without showing the
server any client's weights; fedge's rounds, metrics, early stopping and export still work."""

import json
import logging

import pytest
import torch
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

from fedge.cli import app
from fedge.config import RunConfig
from fedge.errors import FedgeError
from fedge.server.checkpoint import load_checkpoint
from fedge.simulations.runner import plan_simulation, simulate

SMALL = {"dataset": "digits", "clients": 4, "rounds": 1, "local_epochs": 1,
         "partition": "iid", "patience": 5}


def run(tmp_path, name: str, **overrides) -> tuple[dict, dict[str, torch.Tensor]]:
    plan = plan_simulation(RunConfig(**{**SMALL, **overrides}))
    simulate(plan, tmp_path / name)
    metrics = json.loads((tmp_path / name / "metrics.json").read_text())
    return metrics, load_checkpoint(tmp_path / name / "checkpoint.pt").state_dict


def training_samples(config: RunConfig) -> int:
    clients = plan_simulation(config).clients
    return sum(len(clients.local_data(Context(run_id=1, node_id=0, state=RecordDict(),
                                              node_config={"partition-id": k}, run_config={}))
                   .train_y) for k in range(config.strategy.clients))


def test_the_secure_aggregate_equals_plaintext_fedavg_up_to_quantization(tmp_path):
    plain_metrics, plain = run(tmp_path, "plain")
    secure_metrics, secure = run(tmp_path, "secure", secagg=True)

    # Each client's term w_k·n_k/W is rounded to one of Q levels over ±c: at most 2c/Q off,
    # so the average of K clients is off by at most K · 2c/Q · W / Σn_k.
    config = RunConfig(**SMALL, secagg=True)
    bound = (config.strategy.clients * 2 * config.privacy.secagg_clipping_range
             / config.privacy.secagg_quantization_range * config.privacy.secagg_max_weight
             / training_samples(config))
    difference = max((plain[k] - secure[k]).abs().max().item() for k in plain)
    assert difference <= bound + 1e-6, f"max |secagg − plaintext| = {difference:.2e}"
    assert all(secure[k].dtype == plain[k].dtype for k in plain)
    # The clients' own metrics still reach the server, next to the masked weights.
    (plain_round,), (secure_round,) = plain_metrics["rounds"], secure_metrics["rounds"]
    assert secure_round["num_clients"] == plain_round["num_clients"] == 4
    for key in ("train_loss", "client_val_loss", "client_val_accuracy", "client_epochs"):
        assert secure_round[key] == pytest.approx(plain_round[key], rel=1e-9)
    assert secure_round["val_loss"] == pytest.approx(plain_round["val_loss"], abs=1e-4)


def test_a_secure_simulation_stops_early_and_exports_its_best_round(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "simulate", "--secagg", "--clients", "3", "--rounds", "5", "--local-epochs", "1",
        "--patience", "1", "--min-delta", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "secure aggregation: SecAgg+" in result.output

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["config"]["secagg"]
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]  # plateau after `patience` 1
    assert metrics["stopped_early"] and metrics["best_round"] == 1
    assert all(r["num_clients"] == 3 and r["failures"] == 0 for r in metrics["rounds"])
    assert load_checkpoint(out / "best.pt").round == 1
    assert load_checkpoint(out / "checkpoint.pt").round == 2
    assert (out / "model.onnx").stat().st_size > 0
    assert json.loads((out / "onnx_report.json").read_text())["best_round"] == 1


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_client_with_more_samples_than_secagg_max_weight_refuses_and_says_why(tmp_path):
    lines = Lines()
    logging.getLogger("fedge.server").addHandler(lines)
    try:
        with pytest.raises(FedgeError, match=r"no client could train: none of the 1 rounds "
                           r"aggregated an update \(3 failed.*more than the server's "
                           r"secagg_max_weight \(10\)"):
            run(tmp_path, "too_many", clients=3, secagg=True, secagg_max_weight=10)
    finally:
        logging.getLogger("fedge.server").removeHandler(lines)

    metrics = json.loads((tmp_path / "too_many" / "metrics.json").read_text())
    (record,) = metrics["rounds"]
    assert metrics["status"] == "failed"
    assert record["failures"] == 3 and record["num_clients"] == 0
    assert record["val_loss"] == pytest.approx(metrics["initial"]["val_loss"])  # model kept
    assert sum("more than the server's secagg_max_weight (10)" in line
               for line in lines.lines) == 3


@pytest.mark.parametrize("args, message", [
    (["--strategy", "krum"], "secagg works with strategy fedavg or fedprox, not 'krum'"),
    (["--strategy", "fedmedian"], "secagg works with strategy fedavg or fedprox, not "
                                  "'fedmedian'"),
    (["--strategy", "fedadam"], "secagg works with strategy fedavg or fedprox, not 'fedadam'"),
    (["--secagg-threshold", "3"], "secagg_threshold (3) must be smaller than "
                                  "secagg_num_shares (3)"),
    (["--secagg-num-shares", "5", "--secagg-threshold", "3"],
     "secagg needs at least secagg_threshold (3) clients per round, but min_clients is 2"),
    (["--clients", "1100"], "1100 clients × secagg_quantization_range (4194304) must stay "
                            "below 2**32"),
    (["--secagg-num-shares", "2"], "secagg_num_shares: Input should be greater than or "
                                   "equal to 3"),
    # Checked where differential privacy and simulated devices are (not by fedge.secagg):
    (["--dp-clip-norm", "1.0"], "secagg cannot be combined"),
    (["--drop-fraction", "0.2"], "do not work with secagg"),
])
def test_settings_secure_aggregation_cannot_work_with_are_refused(tmp_path, args, message):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["simulate", "--secagg", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert not out.exists()


def test_the_server_refuses_a_secure_run_it_cannot_serve_before_writing_anything(tmp_path):
    (tmp_path / "run.toml").write_text('model = "cnn"\nsecagg = true\nstrategy = "krum"\n')
    out = tmp_path / "fleet"
    result = CliRunner().invoke(app, [
        "server", "--insecure", "--val-data", str(tmp_path / "val.npz"),
        "--config", str(tmp_path / "run.toml"), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "secagg works with strategy fedavg or fedprox, not 'krum'" in result.stderr
    assert not out.exists()
