"""Differential privacy: clients clip, the server adds calibrated noise, a real accountant
reports ε after every round."""

import json
import math
import shutil

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from typer.testing import CliRunner

from fedge import cli
from fedge.client.app import build_client_app
from fedge.client.privacy import dp_clipping_mod
from fedge.config import RunConfig
from fedge.models.registry import build_model, spec_from_data
from fedge.server.checkpoint import load_checkpoint
from fedge.server.federation import Federation
from fedge.simulations.datasets import load_dataset
from fedge.simulations.inprocess import InProcessGrid
from fedge.simulations.runner import plan_simulation

from conftest import assert_simulation_refused, device_client_app

CLIP = 0.1  # small: heavy noise on large weights would fail the ONNX parity check
SMALL = {"dataset": "digits", "clients": 3, "rounds": 2, "local_epochs": 1, "partition": "iid",
         "patience": 10}
RUNS = {
    "plain": {},
    "clipped": {"dp_clip_norm": CLIP},
    "noisy": {"dp_clip_norm": CLIP, "dp_noise_multiplier": 1.0},
    "noisier": {"dp_clip_norm": CLIP, "dp_noise_multiplier": 4.0},
}


def rdp_epsilon(sigma: float, releases: int, delta: float = 1e-5) -> float:
    """ε of ``releases`` Gaussian mechanisms with noise multiplier σ, straight from
    Google's dp-accounting."""
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(sigma), releases)
    return accountant.get_epsilon(delta)


def norm(arrays: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays))


def minus(a: list[np.ndarray], b: list[np.ndarray]) -> list[np.ndarray]:
    return [x.astype(np.float64) - y for x, y in zip(a, b, strict=True)]


class BroadcastGrid(InProcessGrid):
    """The in-process grid, keeping the global weights the server sends in each round."""

    def __init__(self, client_app, num_nodes: int) -> None:
        super().__init__(client_app, num_nodes)
        self.broadcasts: list[list[np.ndarray]] = []

    def push_messages(self, messages):
        messages = list(messages)
        if messages:
            self.broadcasts.append(messages[0].content["arrays"].to_numpy_ndarrays())
        return super().push_messages(messages)


def run_federation(run_dir, config: RunConfig, resume=None) -> tuple[dict, BroadcastGrid]:
    plan = plan_simulation(config)
    run_dir.mkdir(exist_ok=True)
    grid = BroadcastGrid(build_client_app(plan.clients.local_data, mods=[dp_clipping_mod]),
                         config.strategy.clients)
    Federation(plan.config, plan.server_data, run_dir, resume=resume).run(grid)
    return json.loads((run_dir / "metrics.json").read_text()), grid


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same seeded run without DP, clipping only, and with two noise levels."""
    root = tmp_path_factory.mktemp("privacy")
    return {name: (root / name, *run_federation(root / name, RunConfig(**SMALL, **dp)))
            for name, dp in RUNS.items()}


def test_a_dp_run_reports_epsilon_after_every_round_and_its_test_accuracy(tmp_path):
    result = CliRunner().invoke(cli.app, [
        "simulate", "--out", str(tmp_path), "--clients", "3", "--rounds", "3",
        "--local-epochs", "1", "--partition", "iid", "--patience", "10",
        "--dp-clip-norm", str(CLIP), "--dp-noise-multiplier", "1.0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())

    epsilons = [r["epsilon"] for r in metrics["rounds"]]
    assert all(math.isfinite(e) and e > 0 for e in epsilons)
    assert epsilons == sorted(set(epsilons))  # strictly growing: every round spends more
    assert epsilons == pytest.approx([rdp_epsilon(1.0, k) for k in (1, 2, 3)], rel=1e-9)
    privacy = metrics["privacy"]
    assert privacy["epsilon"] == epsilons[-1] and privacy["delta"] == 1e-5
    assert (privacy["noise_multiplier"], privacy["clip_norm"]) == (1.0, CLIP)
    assert (privacy["clients_per_round"], privacy["releases"]) == (3, 3)
    assert privacy["noise_std"] == pytest.approx(1.0 * CLIP / 3)
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert f"ε = {epsilons[-1]:.2f}, δ = 1e-05" in result.output
    assert f"test accuracy {metrics['test']['accuracy']:.3f}" in result.output


def test_clients_clip_their_updates_and_the_server_adds_noise_of_std_sigma_c_over_m(runs):
    start = {name: grid.broadcasts[0] for name, (_, _, grid) in runs.items()}
    after_round_1 = {name: grid.broadcasts[1] for name, (_, _, grid) in runs.items()}
    for name in RUNS:  # the same seed: the same starting model everywhere
        for a, b in zip(start[name], start["plain"], strict=True):
            np.testing.assert_array_equal(a, b)

    # the mean of updates clipped to C moves the model by at most C; unclipped ones did not
    assert norm(minus(after_round_1["plain"], start["plain"])) > 2 * CLIP
    assert norm(minus(after_round_1["clipped"], start["clipped"])) <= CLIP * (1 + 1e-5)

    # the same clipped mean plus Gaussian noise N(0, (σ·C/m)²) in every weight
    noise = np.concatenate([d.ravel() for d in minus(after_round_1["noisy"],
                                                     after_round_1["clipped"])])
    assert noise.std() == pytest.approx(1.0 * CLIP / 3, rel=0.05)
    assert abs(noise.mean()) < 0.05 * noise.std()


def test_more_noise_spends_less_epsilon_and_clipping_alone_claims_none(runs):
    noisy, noisier = (runs[name][1] for name in ("noisy", "noisier"))
    assert 0 < noisier["privacy"]["epsilon"] < noisy["privacy"]["epsilon"] < math.inf
    assert noisier["privacy"]["epsilon"] == pytest.approx(rdp_epsilon(4.0, 2), rel=1e-9)

    clipped, plain = runs["clipped"][1], runs["plain"][1]
    assert clipped["privacy"]["epsilon"] is None and clipped["privacy"]["clip_norm"] == CLIP
    assert [r["epsilon"] for r in clipped["rounds"]] == [None, None]
    assert plain["privacy"] is None
    assert [r["epsilon"] for r in plain["rounds"]] == [None, None]


def test_a_resumed_dp_run_continues_its_privacy_account(runs, tmp_path):
    run_dir = tmp_path / "resumed"
    shutil.copytree(runs["noisy"][0], run_dir)
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    config = RunConfig(**{**SMALL, **RUNS["noisy"], "rounds": 3})

    metrics, grid = run_federation(run_dir, config, resume=checkpoint)

    assert len(grid.broadcasts) == 1  # only round 3 ran
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert metrics["rounds"][:2] == runs["noisy"][1]["rounds"]
    assert metrics["rounds"][2]["epsilon"] == pytest.approx(rdp_epsilon(1.0, 3), rel=1e-9)
    assert metrics["privacy"]["releases"] == 3



def _train_reply(app, clip_norm: float | None, context: Context) -> tuple[float, RecordDict]:
    """The update norm of ``app``'s reply to a train message, and the reply."""
    InProcessGrid(app, 1)  # sets the task identity Flower's messages need, as a runtime does
    spec = spec_from_data("cnn", load_dataset("digits").x, 10, dropout=0.1)
    start = ArrayRecord(build_model(spec).state_dict())
    config = {"model-spec": spec.to_json(), "local-epochs": 1, "batch-size": 16, "lr": 0.01,
              "optimizer": "adam", "local-patience": 1, "seed": 0, "server-round": 1}
    if clip_norm is not None:
        config[KEY_CLIPPING_NORM] = clip_norm
    message = Message(RecordDict({"arrays": start, "config": ConfigRecord(config)}), 1001,
                      "train")
    reply = app(message, context).content
    return norm(minus(reply["arrays"].to_numpy_ndarrays(), start.to_numpy_ndarrays())), reply


@pytest.mark.parametrize("where", ["simulation", "deployment"])
def test_both_client_apps_clip_only_when_the_server_asks(where, tmp_path):
    with device_client_app(where, dp_clipping_mod, tmp_path) as (app, node_config):
        context = Context(run_id=1, node_id=1001, node_config={"partition-id": 0, **node_config},
                          state=RecordDict(), run_config={})
        unclipped, reply = _train_reply(app, None, context)
        assert unclipped > 0.2 and "dp-weight" not in reply["metrics"]
        clipped, reply = _train_reply(app, 0.1, context)
    assert clipped == pytest.approx(0.1, rel=1e-4)
    assert reply["metrics"]["dp-weight"] == 1
    assert reply["metrics"]["num-examples"] == 160


@pytest.mark.parametrize(("options", "message"), [
    (["--dp-noise-multiplier", "1"], "dp_noise_multiplier needs dp_clip_norm"),
    (["--dp-clip-norm", "0"], "dp_clip_norm: Input should be greater than 0"),
    (["--dp-clip-norm", "1", "--dp-delta", "1"], "dp_delta: Input should be less than 1"),
    (["--dp-clip-norm", "1", "--dp-noise-multiplier", "-1"],
     "dp_noise_multiplier: Input should be greater than or equal to 0"),
    (["--dp-clip-norm", "1", "--strategy", "fedadam"],
     "differential privacy needs strategy fedavg or fedprox"),
    (["--dp-clip-norm", "1", "--strategy", "krum"],
     "differential privacy needs strategy fedavg or fedprox"),
])
def test_bad_privacy_settings_are_refused_before_any_file_is_written(options, message,
                                                                    tmp_path):
    assert_simulation_refused(tmp_path, ["--clients", "3", *options], message)
