"""Bad input: one clear message, a non-zero exit, and nothing half-written."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

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


@pytest.mark.parametrize("args, message", [
    (["simulate", "--clients", "ten"], "invalid value for '--clients': 'ten' is not a valid "
                                       "integer"),
    (["simulate", "--lr", "fast"], "invalid value for '--lr': 'fast' is not a valid float"),
    (["simulate", "--round", "3"], "no such option '--round'"),
    (["server", "--insecure"], "missing option '--val-data'"),
    (["server", "--val-data", "v.npz", "--insecure", "--health-port", "0"],
     "invalid value for '--health-port': 0 is not in the range 1<=x<=65535"),
    (["server", "--val-data", "v.npz", "--insecure", "--metrics-port", "70000"],
     "invalid value for '--metrics-port': 70000 is not in the range 1<=x<=65535"),
    (["client", "--server", "127.0.0.1:9", "--data", "d.npz", "--insecure",
      "--join-timeout", "soon"], "invalid value for '--join-timeout': 'soon' is not a valid "
                                 "float"),
    (["gateway", "--server", "127.0.0.1:9", "--min-devices", "two"],
     "invalid value for '--min-devices': 'two' is not a valid integer"),
    (["export", "best.pt", "-o", "m.onnx", "--quantize", "int4"],
     "invalid value for '--quantize': 'int4' is not one of 'int8', 'int8-dynamic'"),
    (["predict", "model.onnx"], "missing argument 'INPUTS'"),
    (["certs", "--host", "h", "--days", "a year"], "invalid value for '--days'"),
    (["simulat"], "no such command 'simulat'. Did you mean 'simulate'?"),
])
def test_a_command_line_that_cannot_be_parsed_is_one_error_line_naming_the_option(
        tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = fedge(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_server_port_beyond_65535_is_refused_in_one_line_before_anything_starts(tmp_path):
    np.savez(tmp_path / "val.npz", x=np.zeros((4, 30), np.float32), y=np.arange(4) % 2)
    result = run_fedge("server", "--val-data", str(tmp_path / "val.npz"), "--model", "mlp",
                       "--insecure", "--port", "70000", "-o", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: invalid value for '--port': 70000 is not in the range 1<=x<=65535"]
    assert not (tmp_path / "run").exists()


def test_the_installed_command_exits_non_zero_with_one_line_on_stderr(tmp_path):
    result = run_fedge("simulate", "--model", "resnet", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown model 'resnet'; choose one of: cnn, mlp, sensor1d, tinytext, or your "
        "own as FILE.py:NAME or package.module:NAME"]


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


# --- deployment: everything is checked before the SuperLink or a SuperNode starts ---


@pytest.fixture
def server_folder(tmp_path):
    """What an operator has: validation samples, a run config, certificates, keys."""
    from fedge.client.keys import make_node_keys
    from fedge.server.certs import make_certificates
    from fedge.simulations.datasets import load_dataset

    digits = load_dataset("digits")
    np.savez(tmp_path / "val.npz", x=digits.x[:100], y=digits.y[:100])
    (tmp_path / "run.toml").write_text('model = "cnn"\nmin-clients = 2\n')
    make_certificates(tmp_path / "certs", ["localhost", "127.0.0.1"])
    make_node_keys(tmp_path / "keys", "device0")
    return tmp_path


def serve(folder, *options: str, port: int | None = None):
    from fedge.processes import free_port

    return fedge("server", "--val-data", str(folder / "val.npz"), "--config",
                 str(folder / "run.toml"), "--host", "127.0.0.1",
                 "--port", str(port or free_port()), "-o", str(folder / "run"), *options)


def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _finished_run(folder, default_run):
    shutil.copytree(default_run, folder / "run")


def _interrupted_run(folder, default_run):
    shutil.copytree(default_run, folder / "run")
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    (folder / "run" / "metrics.json").write_text(json.dumps({**metrics, "status": "running"}))


@pytest.mark.parametrize("make, options, message", [
    (lambda f, r: (f / "val.npz").unlink(), [], "no such file or folder"),
    (lambda f, r: np.savez(f / "val.npz", x=np.zeros((5, 30), np.float32), y=np.arange(5)),
     [], "model 'cnn' expects samples shaped (channels, height, width)"),
    (lambda f, r: (f / "run.toml").write_text('model = "cnn"\ninput-shape = [1, 8, 8]\n'),
     ["--val-data", "{f}/val.csv"], "holds 'dark' in column 'p1', which is not a number"),
    (lambda f, r: (f / "run.toml").write_text('model = "mlp"\n'),
     ["--val-data", "{f}/nan.csv"], "holds 'nan' in column 'p0'; values must be finite"),
    (lambda f, r: None, ["--test-data", "{f}/missing.npz"], "no such file or folder"),
    (_finished_run, [], "has already finished; give a new run folder with --out"),
    (lambda f, r: (_interrupted_run(f, r), (f / "run" / "checkpoint.pt").write_bytes(b"junk")),
     [], "checkpoint.pt is not a readable checkpoint"),
    (lambda f, r: (_interrupted_run(f, r), (f / "run.toml").write_text(
        'model = "cnn"\nlr = 0.5\n')), [], "made with other settings (lr=0.003)"),
    (lambda f, r: ((f / "run").mkdir(), (f / "run" / "notes.txt").write_text("mine")), [],
     "is not empty and holds no fedge run (it holds notes.txt)"),
    (lambda f, r: (f / "keys" / "device0.pub").write_text("not a key\n"),
     ["--certs", "{f}/certs", "--authorized-key", "{f}/keys/device0.pub"],
     "is not an OpenSSH public key"),
    (lambda f, r: (f / "certs" / "server.key").write_bytes((f / "certs" / "ca.key").read_bytes()),
     ["--certs", "{f}/certs"], "server.key is not the key of"),
    (lambda f, r: None, ["--insecure", "--authorized-key", "{f}/keys/device0.pub"],
     "--authorized-key needs TLS (--certs)"),
    # a server that waited for clients it can only refuse would say so after join-timeout
    (lambda f, r: (f / "run.toml").write_text('model = "cnn"\njoin-timeout = 5\n'),
     ["--certs", "{f}/certs"], "a TLS server admits only the clients whose public keys it "
                               "is given, and it was given none: give each client's .pub "
                               "file (made by `fedge keys`) with --authorized-key"),
    (lambda f, r: (f / "run.toml").write_text('model = "cnn"\nrounds = 0\n'), [],
     "rounds: Input should be greater than or equal to 1"),
    (lambda f, r: None, ["--strategy", "fedbuff", "--concurrency", "2", "--buffer", "4"],
     "--buffer 4 is larger than --concurrency 2"),
    (lambda f, r: None, ["--strategy", "fedbuff", "--server-lr", "0"],
     "server_lr: Input should be greater than 0"),
    (lambda f, r: (f / "run.toml").write_text('model = "cnn"\nstrategy = "fedbuff"\n'
                                               'secagg = true\n'), [],
     "--strategy fedbuff cannot be combined with --secagg"),
])
def test_a_server_with_bad_input_refuses_before_anything_starts_or_is_written(
        server_folder, default_run, make, options, message):
    f = server_folder
    (f / "val.csv").write_text("label,p0,p1\n0,1,dark\n")
    (f / "nan.csv").write_text("label,p0,p1\n0,nan,1\n1,2,3\n")
    make(f, default_run)
    before = snapshot(f)
    options = [o.format(f=f) for o in options]
    if "--certs" not in options:
        options.append("--insecure")
    result = serve(f, *options)
    assert_refused(result, message)
    assert snapshot(f) == before  # no .flower, no superlink.log, nothing resumed


def test_a_server_refuses_a_port_that_is_in_use_before_starting(server_folder):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(server_folder, "--insecure", port=port)
    assert_refused(result, f"port {port} on 127.0.0.1 is already in use; choose another "
                           "with --port")
    assert not (server_folder / "run").exists()


def test_a_server_refuses_a_bad_metrics_port_in_one_line_before_starting(server_folder):
    import socket

    from fedge.processes import free_port

    port, health = free_port(), free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        used = taken.getsockname()[1]
        for options, message in (
            (["--metrics-port", str(port)],
             f"--metrics-port {port} is the server's --port; choose another"),
            (["--health-port", str(health), "--metrics-port", str(health)],
             f"--metrics-port {health} is the server's --health-port; choose another"),
            (["--metrics-port", str(used)],
             f"port {used} on 127.0.0.1 is already in use; choose another with "
             "--metrics-port"),
        ):
            result = serve(server_folder, "--insecure", *options, port=port)
            assert_refused(result, message)
            errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
            assert errors == [f"error: {message}"], result.stderr
    assert not (server_folder / "run").exists()


@pytest.mark.parametrize("host, message", [
    ("203.0.113.7", "--host 203.0.113.7 is not an address of this machine; give one of this "
                    "machine's addresses, or 0.0.0.0 to listen on all of them"),
    ("10.200.0.256", "--host '10.200.0.256' is neither an IP address nor a host name that "
                     "resolves"),
])
def test_a_server_refuses_a_host_it_cannot_listen_on_before_starting(server_folder, host,
                                                                     message):
    result = serve(server_folder, "--insecure", "--host", host)  # the last --host counts
    assert_refused(result, message)
    assert "--port" not in result.stderr  # the port is not the problem
    assert not (server_folder / "run").exists()


def test_a_tls_server_refuses_certificates_that_do_not_name_its_host(server_folder):
    """Flower's own processes dial the SuperLink at the address it listens on: here
    ::1, which the fixture's certificates (localhost, 127.0.0.1) do not name."""
    import socket

    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback on this machine")
    result = serve(server_folder, "--certs", str(server_folder / "certs"), "--host", "::1")
    assert_refused(result, "server.pem is not valid for ::1 (--host ::1): Flower's own "
                           "processes on this machine dial the server there")
    assert "`fedge certs --host ::1 --host ...`" in result.stderr
    assert not (server_folder / "run").exists()


@pytest.fixture
def python_without_flower_commands(tmp_path) -> Path:
    """This Python with fedge and its libraries, in an environment whose ``bin`` holds no
    commands (Flower's included): a user's environment that lacks them."""
    env = tmp_path / "bare-env"
    (env / "bin").mkdir(parents=True)
    (env / "pyvenv.cfg").write_text(
        f"home = {Path(os.path.realpath(sys.executable)).parent}\n"
        "include-system-site-packages = false\n")
    (env / "bin" / "python").symlink_to(os.path.realpath(sys.executable))
    lib = env / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    lib.mkdir(parents=True)
    (lib / "site-packages").symlink_to(sysconfig.get_path("purelib"))
    return env / "bin" / "python"


def test_without_flowers_commands_server_and_client_say_so_before_starting(
        server_folder, python_without_flower_commands):
    f = server_folder
    before = snapshot(f)
    for args, missing in (
        (["server", "--val-data", "val.npz", "--config", "run.toml", "--insecure",
          "--host", "127.0.0.1", "--port", "9", "-o", "run"], "flower-superlink"),
        (["client", "--server", "127.0.0.1:9", "--insecure", "--data", "val.npz",
          "--join-timeout", "5"],
         "flower-superexec"),
    ):
        result = subprocess.run([str(python_without_flower_commands), "-m", "fedge", *args],
                                cwd=f, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: Flower's `{missing}` command is not installed with "
                               f"this Python ({python_without_flower_commands}"), last
        assert "Traceback" not in result.stderr
    assert snapshot(f) == before  # nothing written, nothing started


@pytest.mark.parametrize("options, message", [
    (["--server", "not-a-host-port", "--insecure"], "--server 'not-a-host-port' is not "
                                                    "HOST:PORT"),
    (["--server", "localhost:99999", "--insecure"], "with a port in 1..65535"),
    (["--server", "127.0.0.1:9", "--insecure", "--key", "{f}/keys/device0.key"],
     "--key needs TLS (--ca)"),
    (["--server", "127.0.0.1:9", "--ca", "{f}/val.npz"], "is not a PEM certificate"),
    (["--server", "127.0.0.1:9", "--ca", "{f}/certs/ca.pem", "--key", "{f}/certs/ca.pem"],
     "is not an unencrypted OpenSSH private key"),
    (["--server", "127.0.0.1:9", "--insecure", "--device", "tpu"], "unknown device 'tpu'"),
    (["--server", "127.0.0.1:9", "--insecure", "--val-fraction", "1.5"],
     "--val-fraction must lie between 0 and 1"),
    (["--server", "127.0.0.1:9", "--insecure", "--data", "{f}/nan.csv"],
     "line 2 of"),
])
def test_a_client_with_bad_input_refuses_before_connecting(server_folder, options, message):
    f = server_folder
    (f / "nan.csv").write_text("label,a,b\n0,nan,1\n")
    options = [o.format(f=f) for o in options]
    data = [] if "--data" in options else ["--data", str(f / "val.npz")]
    # A client that wrongly went on would give up joining after 3 s, with another message.
    result = fedge("client", *options, *data, "--join-timeout", "3")
    assert_refused(result, message)


# --- export and predict ---------------------------------------------------------------


def _damaged(default_run, tmp_path, **changes):
    payload = torch.load(default_run / "best.pt", weights_only=True)
    torch.save({**payload, **changes}, tmp_path / "damaged.pt")
    return tmp_path / "damaged.pt"


@pytest.mark.parametrize("changes, message", [
    ({"reference_inputs": torch.zeros(5, 3, 4)}, "its reference inputs ((5, 3, 4)) are not a "
                                                 "batch of samples of its model's shape"),
    ({"reference_inputs": None}, "its reference inputs (NoneType)"),
    ({"state_dict": {}}, "holds no model weights"),
    ({"round": "two"}, "its round or history is malformed"),
    ({"model_spec": '{"name": "cnn", "input_shape": [], "num_classes": 10, "dropout": 0}'},
     "invalid model spec: input_shape: Tuple should have at least 1 item"),
])
def test_a_damaged_checkpoint_is_refused_with_what_is_wrong(tmp_path, default_run, changes,
                                                            message):
    damaged = _damaged(default_run, tmp_path, **changes)
    assert_refused(fedge("export", str(damaged), "-o", str(tmp_path / "m.onnx")), message)
    assert not (tmp_path / "m.onnx").exists()


def test_an_empty_or_garbage_checkpoint_says_why_it_cannot_be_read(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert_refused(fedge("export", str(tmp_path / "empty.pt"), "-o", str(tmp_path / "m.onnx")),
                   "empty.pt is empty, not a checkpoint")
    (tmp_path / "text.pt").write_text("hello world garbage")
    result = fedge("export", str(tmp_path / "text.pt"), "-o", str(tmp_path / "m.onnx"))
    assert_refused(result, "text.pt is not a readable checkpoint (corrupt or not a torch "
                           "file): ")
    assert not result.stderr.strip().endswith(":")


def test_export_never_replaces_its_own_checkpoint_or_writes_onto_a_folder(tmp_path,
                                                                          default_run):
    copy = tmp_path / "best.pt"
    shutil.copy(default_run / "best.pt", copy)
    assert_refused(fedge("export", str(copy), "-o", str(copy), "--overwrite"),
                   "is the checkpoint itself")
    assert copy.read_bytes() == (default_run / "best.pt").read_bytes()
    assert_refused(fedge("export", str(copy), "-o", str(tmp_path), "--overwrite"),
                   "is a folder; give the file to write")


def test_a_failed_export_or_device_data_leaves_no_folder_behind(tmp_path, default_run):
    not_exported = _damaged(default_run, tmp_path, state_dict={
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in torch.load(default_run / "best.pt", weights_only=True)["state_dict"].items()})
    before = sorted(tmp_path.iterdir())

    assert_refused(fedge("export", str(tmp_path / "missing.pt"), "-o",
                         str(tmp_path / "models" / "m.onnx")), "does not exist")
    assert_refused(fedge("export", str(not_exported), "-o",
                         str(tmp_path / "models" / "edge" / "m.onnx")),
                   "outputs on the reference inputs are not finite")
    assert_refused(fedge("device-data", str(tmp_path / "missing.npz"), "-o",
                         str(tmp_path / "device" / "local.bin")), "missing.npz")

    assert sorted(tmp_path.iterdir()) == before


def test_int8_evaluation_data_must_fit_the_model_and_needs_quantize(tmp_path, default_run):
    np.savez(tmp_path / "eval.npz", x=np.zeros((4, 64), np.float32), y=np.array([0, 1, 42, 2]))
    args = ["export", str(default_run / "best.pt"), "-o", str(tmp_path / "q.onnx"),
            "--eval-data", str(tmp_path / "eval.npz")]
    assert_refused(fedge(*args), "--eval-data is for comparing an int8 model with its fp32 "
                                 "model; give --quantize too")
    assert_refused(fedge(*args, "--quantize", "int8"),
                   "eval.npz has label 42, but the model has 10 classes (0..9)")
    assert not (tmp_path / "q.onnx").exists()


def test_predict_reports_each_sample_holding_nan_or_inf_and_predicts_the_others(
        tmp_path, default_run):
    from fedge.simulations.datasets import load_dataset

    x = load_dataset("digits").x[:4].reshape(4, 64).astype(np.float64)
    x[1, 5], x[3, 0] = np.nan, np.inf
    np.save(tmp_path / "x.npy", x)
    result = run_fedge("predict", str(default_run / "model.onnx"), str(tmp_path / "x.npy"))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and lines[1] == lines[3] == "-"
    assert lines[0].isdigit() and lines[2].isdigit()
    assert result.stderr.strip().splitlines() == [
        f"error: 2 of 4 samples in {tmp_path / 'x.npy'} hold NaN, Inf or values beyond "
        "float32's range and have no prediction (\"-\"): samples 2, 4, counting from 1"]


@pytest.mark.parametrize("content, message", [
    ("", "holds no samples"),
    ("\n\n", "holds no samples"),
])
def test_predict_on_an_empty_file_says_so_in_one_line(tmp_path, default_run, content, message):
    (tmp_path / "x.csv").write_text(content)
    result = run_fedge("predict", str(default_run / "model.onnx"), str(tmp_path / "x.csv"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'x.csv'} {message}"]


def test_predict_on_a_zero_byte_npy_file_is_an_error_not_an_abort(tmp_path, default_run):
    (tmp_path / "x.npy").write_bytes(b"")
    assert_refused(fedge("predict", str(default_run / "model.onnx"), str(tmp_path / "x.npy")),
                   "cannot read inputs from")


# --- simulate settings found only when they were used --------------------------------


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"),
    (["--lr", "inf"], "lr: Input should be a finite number"),
    (["--seed", "-1"], "seed: Input should be greater than or equal to 0"),
    (["--partition", "shards:100000", "--clients", "3"],
     "shards:100000 for 3 clients needs 300000 shards"),
])
def test_settings_that_could_only_fail_later_are_refused_up_front(tmp_path, args, message):
    assert_simulation_refused(tmp_path, args, message)


def test_an_unwritable_wire_recording_folder_is_refused(tmp_path):
    (tmp_path / "afile").write_text("")
    result = fedge("simulate", "--out", str(tmp_path / "run"), "--rounds", "1",
                   "--record-wire", str(tmp_path / "afile" / "sub"))
    assert_refused(result, "cannot be written: Not a directory")
    assert not (tmp_path / "run").exists()


def test_a_setting_spelt_twice_in_a_config_file_is_refused(tmp_path):
    (tmp_path / "run.toml").write_text("local-epochs = 1\nlocal_epochs = 2\n")
    assert_refused(fedge("simulate", "--config", str(tmp_path / "run.toml")),
                   "sets local-epochs twice (spelt with - and _)")


@pytest.mark.parametrize("args, message", [
    (["--server", "127.0.0.1:9092", "--insecure"], "give --tokens"),
    (["--server", "127.0.0.1:9092", "--ca", "ca.pem"], "give --certs (HTTPS for devices"),
    (["--server", "127.0.0.1:9092", "--insecure", "--tokens", "nowhere"], "nowhere"),
    (["--server", "nohost", "--insecure", "--tokens", "t"], "is not HOST:PORT"),
    (["--server", "127.0.0.1:9092", "--insecure", "--tokens", "t", "--listen", "x"],
     "--listen 'x' is not HOST:PORT"),
    (["--server", "127.0.0.1:9092", "--insecure", "--tokens", "t", "--round-deadline", "0"],
     "round_deadline must be a positive number of seconds"),
    (["--server", "127.0.0.1:9092", "--insecure", "--tokens", "t", "--listen",
      "127.0.0.1:8443", "--metrics-port", "8443"],
     "--metrics-port 8443 is the gateway's --listen port; choose another"),
])
def test_a_gateway_with_bad_settings_says_so_before_it_starts(tmp_path, monkeypatch, args,
                                                              message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "dev1.sha256").write_text("ab" * 32 + "\n")
    assert_refused(fedge("gateway", *args), message)


def test_device_tokens_and_device_data_refuse_to_overwrite(tmp_path):
    out = tmp_path / "tokens"
    assert fedge("tokens", "dev1", "-o", str(out)).exit_code == 0
    secret = (out / "dev1.token").read_text()
    assert_refused(fedge("tokens", "dev1", "-o", str(out)), "refusing to overwrite")
    assert (out / "dev1.token").read_text() == secret
    assert_refused(fedge("tokens", "../dev", "-o", str(out)), "../dev")

    np.savez(tmp_path / "samples.npz", x=np.zeros((4, 3), np.float32), y=np.arange(4))
    target = tmp_path / "local.bin"
    assert fedge("device-data", str(tmp_path / "samples.npz"), "-o", str(target)).exit_code == 0
    written = target.read_bytes()
    assert_refused(fedge("device-data", str(tmp_path / "samples.npz"), "-o", str(target)),
                   "already exists")
    assert_refused(fedge("device-data", str(tmp_path / "missing.npz"), "-o",
                         str(tmp_path / "other.bin")), "missing.npz")
    assert target.read_bytes() == written and not (tmp_path / "other.bin").exists()
