"""Your own model, from a file outside fedge: simulation, export, resume, bad input.

A real deployment of it is in test_deployment.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.server.checkpoint import load_checkpoint
from fedge.simulations.datasets import load_dataset, split_federated

from conftest import USER_MODEL, assert_simulation_refused, run_fedge, write_user_model

pytestmark = pytest.mark.timeout(600)

FAST = ["--clients", "4", "--local-epochs", "1", "--partition", "iid"]


def simulate_here(*args: str):
    """`fedge simulate ARGS` in this process (own_run is the run in a process of its own)."""
    from typer.testing import CliRunner

    from fedge.cli import app

    return CliRunner().invoke(app, ["simulate", *args])


@pytest.fixture(scope="module")
def own_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own")
    model = write_user_model(root / "elsewhere")
    result = run_fedge("simulate", "--model", f"{model}:Net", "--rounds", "3", *FAST,
                       "--out", str(root / "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "run"


def test_your_model_trains_and_its_run_records_where_it_came_from(own_run):
    metrics = json.loads((own_run / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["model"]["origin"] == f"{own_run.parent / 'elsewhere' / 'my_model.py'}:Net"
    assert len(metrics["model"]["fingerprint"]) == 16
    assert metrics["rounds"][-1]["val_accuracy"] > metrics["initial"]["val_accuracy"] + 0.3
    checkpoint = load_checkpoint(own_run / "checkpoint.pt")
    assert checkpoint.model_origin == metrics["model"]["origin"]
    assert checkpoint.model_spec.fingerprint == metrics["model"]["fingerprint"]


def test_batchnorm_statistics_are_averaged_and_its_counter_kept_by_the_server(own_run):
    state = load_checkpoint(own_run / "checkpoint.pt").state_dict
    # Running statistics are weights of the model: clients update them, the server
    # averages them. The batch counter is an integer: it stays the server's.
    assert not torch.equal(state["features.1.running_mean"], torch.zeros(8))
    assert state["features.1.running_var"].min() > 0
    assert state["features.1.num_batches_tracked"].item() == 0
    assert state["features.1.num_batches_tracked"].dtype == torch.int64


def test_your_model_exports_to_onnx_with_parity_and_predicts(own_run, tmp_path):
    report = json.loads((own_run / "onnx_report.json").read_text())
    assert report["max_abs_diff"] <= report["tolerance"]
    test_x, test_y = split_federated(load_dataset("digits"), seed=0).test
    np.save(tmp_path / "samples.npy", test_x[:50])
    result = run_fedge("predict", str(own_run / "model.onnx"), str(tmp_path / "samples.npy"))
    assert result.returncode == 0, result.stderr
    predicted = np.array([int(line.split()[-1]) for line in result.stdout.split()])
    assert (predicted == test_y[:50]).mean() > 0.6

    # A later export needs no source code: the checkpoint holds the model's program.
    source = own_run.parent / "elsewhere" / "my_model.py"
    source.rename(tmp_path / "moved.py")
    try:
        for options in ([], ["--quantize", "int8"]):
            out = tmp_path / f"again{len(options)}.onnx"
            result = run_fedge("export", str(own_run / "best.pt"), "-o", str(out), *options)
            assert result.returncode == 0, result.stderr
            assert "int8 predicts the fp32 class" in result.stdout or not options
            predicted = run_fedge("predict", str(out), str(tmp_path / "samples.npy"))
            assert len(predicted.stdout.split()) == 50
    finally:
        (tmp_path / "moved.py").rename(source)


def test_resuming_with_another_model_is_refused(tmp_path):
    model = write_user_model(tmp_path / "m")
    run = tmp_path / "run"
    options = ["--model", f"{model}:Net", "--rounds", "2", *FAST, "--out", str(run)]
    first = simulate_here(*options, "--rounds", "1")
    assert first.exit_code == 0, first.output
    (run / "metrics.json").write_text('{"status": "running"}')  # as if interrupted
    write_user_model(tmp_path / "m", USER_MODEL.replace("width: int = 8", "width: int = 12"))
    # A process that has not imported the first version of the file.
    result = run_fedge("simulate", *options, "--resume")
    assert result.returncode == 2
    assert "cannot resume: the model my_model.py:Net is not the one the run started with" \
        in result.stderr
    assert "Traceback" not in result.stderr


FACTORY_WITH_OTHER_ARGUMENT = USER_MODEL.replace("width: int = 8", "width: int")
WRONG_OUTPUT = USER_MODEL.replace("return self.head(self.features(x / 16.0))",
                                  "return self.head(self.features(x / 16.0))[:, :3]")
DATA_DEPENDENT = USER_MODEL.replace(
    "return self.head(", "if x.sum() > 0:\n            x = -x\n        return self.head(")


@pytest.mark.parametrize("source, name, message", [
    (None, "Net", "model file {dir}/absent.py does not exist"),
    ("class Net(:\n", "Net", "cannot import model file {dir}/my_model.py: SyntaxError"),
    (USER_MODEL, "Network", "has no 'Network'; its nn.Module classes are: Net"),
    (FACTORY_WITH_OTHER_ARGUMENT, "Net", "needs argument width, which fedge cannot give"),
    (WRONG_OUTPUT, "Net", "but fedge needs logits of shape (2, 10)"),
    (DATA_DEPENDENT, "Net", "cannot be shipped to devices as a torch.export program"),
])
def test_a_model_that_cannot_federate_is_refused_before_anything_starts(
        tmp_path, source, name, message):
    folder = tmp_path / "src"
    path = write_user_model(folder, source) if source else folder / "absent.py"
    assert_simulation_refused(tmp_path, ["--model", f"{path}:{name}"],
                              message.format(dir=folder))


def _pretrained(tmp_path: Path, **changes: torch.Tensor) -> Path:
    from fedge.models.source import instantiate, resolve_factory

    origin, factory = resolve_factory(f"{write_user_model(tmp_path / 'src')}:Net")
    state = instantiate(origin, factory, (1, 8, 8), 10, 0.1).state_dict()
    state.update(changes)
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("options, message", [
    (["--reset", "tail.*"], "--reset 'tail.*' matches none of the model's parameters"),
    (["--freeze", "*"], "--freeze * freezes every parameter: nothing is left to train"),
    (["--freeze", "features.*", "--freeze", "head.*"], "freezes every parameter"),
])
def test_globs_that_match_nothing_or_everything_are_refused(tmp_path, options, message):
    weights = _pretrained(tmp_path)
    model = f"{tmp_path / 'src' / 'my_model.py'}:Net"
    assert_simulation_refused(tmp_path, ["--model", model, "--init", str(weights), *options],
                              message)


def test_freezing_one_of_a_layers_running_statistics_is_refused(tmp_path):
    # Frozen statistics keep their layer in eval mode in training: both, or neither.
    model = f"{write_user_model(tmp_path / 'src')}:Net"
    assert_simulation_refused(tmp_path, ["--model", model, "--freeze", "*.running_mean"],
                              "--freeze matches features.1.running_mean but not "
                              "features.1.running_var: a layer's running statistics are "
                              "frozen together (freeze both, or neither)")


def test_reset_without_initial_weights_is_refused(tmp_path):
    model = f"{write_user_model(tmp_path / 'src')}:Net"
    assert_simulation_refused(tmp_path, ["--model", model, "--reset", "head.*"],
                              "--reset leaves parameters fresh instead of --init's weights; "
                              "give --init too")


def test_weights_that_do_not_fit_are_listed_in_one_error(tmp_path):
    weights = _pretrained(tmp_path, **{"head.2.weight": torch.zeros(10, 64),
                                       "extra.weight": torch.zeros(3)})
    state = torch.load(weights)
    del state["features.0.bias"]
    torch.save(state, weights)
    model = f"{tmp_path / 'src' / 'my_model.py'}:Net"
    assert_simulation_refused(
        tmp_path, ["--model", model, "--init", str(weights)],
        f"--init {weights} does not fit the model: missing features.0.bias; unexpected "
        "extra.weight; mis-shaped head.2.weight (file (10, 64), model (10, 128))")


def test_initial_weights_come_from_a_state_dict_safetensors_or_an_earlier_run(own_run, tmp_path):
    from safetensors.torch import save_file

    earlier = load_checkpoint(own_run / "best.pt")
    weights = {name: value.contiguous() for name, value in earlier.state_dict.items()}
    torch.save(weights, tmp_path / "weights.pt")
    save_file(weights, tmp_path / "weights.safetensors")
    model = f"{own_run.parent / 'elsewhere' / 'my_model.py'}:Net"
    best = next(r for r in earlier.history if r["round"] == earlier.round)
    for source in ("weights.pt", "weights.safetensors", str(own_run / "best.pt")):
        run = tmp_path / f"from-{Path(source).name}"
        result = simulate_here("--model", model, "--init", str(tmp_path / source),
                               "--rounds", "1", *FAST, "--out", str(run))
        assert result.exit_code == 0, result.output
        assert "round   0/1  starting model" in result.stdout
        initial = json.loads((run / "metrics.json").read_text())["initial"]
        # The same weights on the same server samples: the earlier run's best round.
        assert initial["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)


def test_your_model_takes_raw_inputs_unless_it_asks_for_fedge_scaling(tmp_path):
    model = write_user_model(tmp_path / "m")
    runs = {}
    for flag in ("--no-scale-inputs", "--scale-inputs"):
        run = tmp_path / flag
        result = simulate_here("--model", f"{model}:Net", flag, "--rounds", "1", *FAST,
                               "--out", str(run))
        assert result.exit_code == 0, result.output
        runs[flag] = json.loads((run / "metrics.json").read_text())["model_spec"]
    assert runs["--no-scale-inputs"]["input_mean"] is None
    assert len(runs["--scale-inputs"]["input_mean"]) == 1  # one channel


@pytest.mark.parametrize("case, message", [
    ("flat samples", "my_model.py:Net cannot take samples of shape (30,)"),
    ("weights of another model", "does not fit the model: missing features.0.weight"),
])
def test_a_server_refuses_your_model_before_its_superlink_starts(tmp_path, case, message):
    from fedge.processes import free_port

    model = write_user_model(tmp_path / "src")
    x = np.zeros((6, 30) if case == "flat samples" else (6, 1, 8, 8), np.float32)
    np.savez(tmp_path / "val.npz", x=x, y=np.arange(6) % 3)
    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "other.pt")
    init = ["--init", str(tmp_path / "other.pt")] if case != "flat samples" else []
    result = run_fedge("server", "--insecure", "--host", "127.0.0.1", "--port",
                       str(free_port()), "--model", f"{model}:Net", *init, "--val-data",
                       str(tmp_path / "val.npz"), "--out", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("privacy", [["--secagg"], ["--dp-clip-norm", "5"]])
def test_frozen_and_integer_entries_stay_out_of_secure_and_private_rounds(tmp_path, privacy):
    model = write_user_model(tmp_path / "m")
    run = tmp_path / "run"
    result = simulate_here("--model", f"{model}:Net", "--rounds", "1", *FAST,
                           "--freeze", "features.0.*", *privacy, "--out", str(run))
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rounds"][0]["num_clients"] == 4 and metrics["rounds"][0]["failures"] == 0
    assert metrics["rounds"][0]["val_loss"] < metrics["initial"]["val_loss"]
    state = load_checkpoint(run / "checkpoint.pt").state_dict
    assert state["features.1.num_batches_tracked"].item() == 0
    from fedge.models.source import instantiate, resolve_factory

    torch.manual_seed(0)  # the run's seed: its starting weights
    start = instantiate(*resolve_factory(f"{model}:Net"), (1, 8, 8), 10, 0.2).state_dict()
    assert torch.equal(state["features.0.weight"], start["features.0.weight"])  # frozen
    assert not torch.equal(state["head.2.weight"], start["head.2.weight"])  # trained
