"""Bad input: one clear message, a non-zero exit, and nothing half-written."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedge.cli import app

from conftest import assert_simulation_refused, run_fedge


def fedge(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_refused(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output + result.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet"], "unknown model 'resnet'; choose one of: cnn, mlp"),
    (["--dataset", "mnist"], "unknown data set 'mnist'; choose one of: digits"),
    (["--strategy", "fedsgd"], "unknown strategy 'fedsgd'; choose one of: fedavg, fedprox"),
    (["--partition", "dirichlet:x"], "malformed partition 'dirichlet:x'"),
    (["--partition", "shards:0"], "malformed partition 'shards:0'"),
    (["--dataset", "breast_cancer", "--model", "cnn"],
     "model 'cnn' expects samples shaped (channels, height, width)"),
    (["--clients", "1"], "min_clients (2) is larger than the number of clients (1)"),
    (["--clients", "0"], "clients: Input should be greater than or equal to 1"),
    (["--fraction", "1.5"], "fraction: Input should be less than or equal to 1"),
    (["--backend", "spark"], "backend: Input should be 'inprocess' or 'ray'"),
])
def test_bad_simulation_settings_are_refused_before_any_file_is_written(tmp_path, args, message):
    assert_simulation_refused(tmp_path, args, message)


def test_an_existing_non_empty_output_folder_is_kept(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert_refused(fedge("simulate", "--out", str(tmp_path), "--rounds", "1"),
                   "is not empty; choose another or pass --overwrite")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_overwrite_never_empties_a_folder_that_is_not_a_run_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert_refused(fedge("simulate", "--out", str(tmp_path), "--overwrite"),
                   "does not look like a fedge run folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_a_previous_run(tmp_path):
    args = ["simulate", "--out", str(tmp_path / "run"), "--rounds", "1", "--clients", "3",
            "--local-epochs", "1"]
    assert fedge(*args).exit_code == 0
    (tmp_path / "run" / "stale.txt").write_text("old")
    result = fedge(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "run" / "stale.txt").exists()
    assert (tmp_path / "run" / "model.onnx").exists()


@pytest.mark.parametrize("content, message", [
    ("rounds = ", "is not valid TOML"),
    ("learning_rate = 0.1", "learning_rate: Extra inputs are not permitted"),
    ('rounds = "many"', "rounds: Input should be a valid integer"),
])
def test_a_bad_config_file_is_named_with_its_problem(tmp_path, content, message):
    (tmp_path / "run.toml").write_text(content)
    result = fedge("simulate", "--config", str(tmp_path / "run.toml"), "--out",
                   str(tmp_path / "run"))
    assert_refused(result, message)
    assert not (tmp_path / "run").exists()


def test_a_missing_config_file_is_named(tmp_path):
    assert_refused(fedge("simulate", "--config", str(tmp_path / "nope.toml")),
                   "cannot read config file")


def test_a_config_file_sets_the_run_and_flags_override_it(tmp_path):
    (tmp_path / "run.toml").write_text(
        'dataset = "breast_cancer"\nclients = 3\nrounds = 5\nlocal-epochs = 1\n')
    result = fedge("simulate", "--config", str(tmp_path / "run.toml"), "--rounds", "1",
                   "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "breast_cancer" in result.stdout and "3 clients" in result.stdout
    assert "round   1/1" in result.stdout


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"\x00garbage" * 100), "is not a readable checkpoint"),
    (lambda p: torch.save({"weights": torch.zeros(3)}, p), "is not a fedge checkpoint"),
    (lambda p: None, "does not exist"),
])
def test_a_corrupt_foreign_or_missing_checkpoint_is_refused(tmp_path, make, message):
    checkpoint = tmp_path / "checkpoint.pt"
    make(checkpoint)
    assert_refused(fedge("export", str(checkpoint), "-o", str(tmp_path / "m.onnx")), message)
    assert not (tmp_path / "m.onnx").exists()


def test_export_does_not_overwrite_an_existing_model(tmp_path, default_run):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"keep me")
    assert_refused(fedge("export", str(default_run / "best.pt"), "-o", str(target)),
                   "already exists; pass --overwrite")
    assert target.read_bytes() == b"keep me"


@pytest.mark.parametrize("inputs, message", [
    (np.zeros((3, 30), np.float32), "inputs of shape (3, 30) do not fit the model"),
    (np.zeros((2, 1, 7, 7), np.float32), "samples of shape (1, 8, 8) (or rows of 64 values)"),
])
def test_inputs_that_do_not_fit_the_model_are_refused(tmp_path, default_run, inputs, message):
    np.save(tmp_path / "x.npy", inputs)
    assert_refused(fedge("predict", str(default_run / "model.onnx"), str(tmp_path / "x.npy")),
                   message)


def test_unreadable_prediction_inputs_are_refused(tmp_path, default_run):
    (tmp_path / "x.csv").write_text("1,2,three\n")
    assert_refused(fedge("predict", str(default_run / "model.onnx"), str(tmp_path / "x.csv")),
                   "cannot read inputs")
    (tmp_path / "x.txt").write_text("1")
    assert_refused(fedge("predict", str(default_run / "model.onnx"), str(tmp_path / "x.txt")),
                   "unsupported input file x.txt")
    (tmp_path / "fake.onnx").write_text("not a model")
    np.save(tmp_path / "x.npy", np.zeros((1, 64)))
    assert_refused(fedge("predict", str(tmp_path / "fake.onnx"), str(tmp_path / "x.npy")),
                   "is not a valid ONNX model")


def test_the_installed_command_exits_non_zero_with_one_line_on_stderr(tmp_path):
    result = run_fedge("simulate", "--model", "resnet", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown model 'resnet'; choose one of: cnn, mlp, sensor1d, tinytext"]


def test_deployment_commands_need_tls_or_an_explicit_insecure(tmp_path):
    np.savez(tmp_path / "val.npz", x=np.zeros((4, 30), np.float32), y=np.arange(4) % 2)
    assert_refused(fedge("server", "--val-data", str(tmp_path / "val.npz")),
                   "give --certs (TLS, the default) or --insecure")
    assert_refused(fedge("client", "--server", "127.0.0.1:9", "--data",
                         str(tmp_path / "val.npz")), "give --ca (TLS, the default) or --insecure")


def test_a_server_without_its_certificates_is_refused_before_it_starts(tmp_path):
    np.savez(tmp_path / "val.npz", x=np.zeros((4, 30), np.float32), y=np.arange(4) % 2)
    (tmp_path / "certs").mkdir()
    (tmp_path / "run.toml").write_text('model = "mlp"\n')
    result = fedge("server", "--val-data", str(tmp_path / "val.npz"), "--config",
                   str(tmp_path / "run.toml"), "--certs", str(tmp_path / "certs"),
                   "-o", str(tmp_path / "run"))
    assert_refused(result, "lacks ca.pem, server.pem, server.key; make them with `fedge certs`")
    assert not (tmp_path / "run").exists()


def test_a_client_with_a_malformed_data_file_stops_before_connecting(tmp_path):
    (tmp_path / "data.csv").write_text("label,a\n0,1\n1,oops\n")
    result = fedge("client", "--server", "127.0.0.1:9", "--data", str(tmp_path / "data.csv"),
                   "--insecure")
    assert_refused(result, "data.csv")
