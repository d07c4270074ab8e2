"""fedge-device, the C++ device client (``client/device/``), built once per session with
``build_device``: local mode trains real digits with the programs fedge exports, maps no
libtorch or libpython, writes a blob Python reads, takes the same steps as eager PyTorch,
refuses bad input with one line, and trains one gateway round."""

import json
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from fedge.models.blob import pack, unpack
from fedge.models.edge import export_edge_programs, write_edge_folder
from fedge.models.registry import ModelSpec, build_model, spec_from_data

from conftest import run_fedge, write_flat_csv

pytest.importorskip("executorch", reason="fedge-device needs pip install 'fedge[edge]'")
pytestmark = pytest.mark.edge

TIMEOUT = 120  # seconds, for every fedge-device process
MAX_BATCH = 32
TEST_SAMPLES = 360
DATA_FORMAT = {"format": "fedge-device-data/1", "class_names": None}


def run_device(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT)


def strict_json(text: str) -> dict:
    """One JSON line, refusing NaN and Infinity as a strict parser does."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def digits(name: str) -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    x = d.images.reshape(-1, 1, 8, 8) if name == "cnn" else d.data
    return x.astype(np.float32), d.target.astype(np.int64)


def write_folder(folder: Path, name: str, dropout: float, x: np.ndarray, y: np.ndarray
                 ) -> tuple[dict, dict[str, np.ndarray]]:
    """The programs fedge exports for a fresh ``name`` model, their manifest and the
    model's initial weights (weights.bin), as `fedge-device --local` reads them."""
    torch.manual_seed(0)
    spec = spec_from_data(name, x, 10, dropout)
    return write_model_folder(folder, build_model(spec), spec, x, y)


def write_model_folder(folder: Path, model: nn.Module, spec: ModelSpec, x: np.ndarray,
                       y: np.ndarray, frozen: Sequence[str] = ()
                       ) -> tuple[dict, dict[str, np.ndarray]]:
    """``model``'s programs (``frozen``: the entries --freeze matched), their manifest and
    the model's weights (weights.bin) in ``folder``."""
    programs = export_edge_programs(model, spec, x[:200], y[:200], MAX_BATCH, frozen)
    write_edge_folder(programs, folder)
    state = {entry["name"]: model.state_dict()[entry["name"]].numpy().copy()
             for entry in programs.manifest["state"]}
    (folder / "weights.bin").write_bytes(pack({}, state))
    return programs.manifest, state


def write_data(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    path.write_bytes(pack(DATA_FORMAT, {"x": x, "y": y}))
    return path


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The digits CNN as the server exports it (dropout on), its samples split into a
    device's local samples and a test set."""
    folder = tmp_path_factory.mktemp("cnn")
    x, y = digits("cnn")
    manifest, state = write_folder(folder, "cnn", 0.2, x, y)
    order = np.random.default_rng(0).permutation(len(y))
    test, local = order[:TEST_SAMPLES], order[TEST_SAMPLES:]
    return {"folder": folder, "manifest": manifest, "state": state,
            "local": write_data(folder / "local.bin", x[local], y[local]),
            "test": write_data(folder / "test.bin", x[test], y[test]), "samples": len(local)}


@pytest.fixture(scope="module")
def cnn_run(device_binary: Path, cnn: dict) -> dict:
    out = cnn["folder"] / "result.bin"
    done = run_device(device_binary, "--local", cnn["folder"], "--data", cnn["local"],
                      "--test", cnn["test"], "--epochs", 5, "--out", out)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1, done.stdout
    return {"metrics": strict_json(done.stdout), "out": out}


def test_local_mode_trains_the_digits_cnn(cnn_run: dict, cnn: dict) -> None:
    metrics = cnn_run["metrics"]
    assert metrics["test_accuracy"] >= 0.9, metrics  # 0.95 to 0.97 seen
    assert metrics["val_accuracy"] >= 0.85
    assert metrics["num_examples"] == cnn["samples"] - round(0.2 * cnn["samples"])
    assert 1 <= metrics["epochs"] <= 5 and metrics["stopped_early"] in (0, 1)
    assert metrics["seconds_per_epoch"] > 0 and metrics["peak_rss_kib"] > 0
    assert all(math.isfinite(metrics[key]) for key in
               ("train_loss", "val_loss", "test_loss", "train_seconds"))


def test_the_device_process_maps_no_libtorch_or_libpython(cnn_run: dict) -> None:
    libraries = cnn_run["metrics"]["libraries"]
    names = [Path(path).name for path in libraries]
    assert "libexecutorch.so" in names, libraries
    assert not [path for path in libraries
                if any(part in path for part in ("libtorch", "libc10", "libpython",
                                                 "/torch/"))], libraries


def test_the_trained_weights_blob_reads_in_python(cnn_run: dict, cnn: dict) -> None:
    header, arrays = unpack(cnn_run["out"].read_bytes())
    manifest = cnn["manifest"]
    assert header["program"] == manifest["programs"]["train"]["sha256"]
    assert header["num_examples"] == cnn_run["metrics"]["num_examples"]
    assert header["metrics"]["val_loss"] == pytest.approx(cnn_run["metrics"]["val_loss"])
    trained = {entry["name"]: tuple(entry["shape"]) for entry in manifest["state"]
               if not entry["frozen"]}
    assert {name: array.shape for name, array in arrays.items()} == trained
    for name, array in arrays.items():
        assert array.dtype == np.float32 and np.isfinite(array).all(), name
    assert any(not np.array_equal(arrays[name], cnn["state"][name]) for name in arrays)


# -- the same steps as eager PyTorch ----------------------------------------------------

class SplitMix64:
    """fedge-device's randomness (src/train.cpp, Random): splitmix64 and Fisher–Yates."""

    MASK = 2**64 - 1

    def __init__(self, seed: int) -> None:
        self.state = seed & self.MASK

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self.MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.MASK
        return z ^ (z >> 31)

    def shuffle(self, items: list[int]) -> None:
        for i in range(len(items), 1, -1):
            j = self.next() % i
            items[i - 1], items[j] = items[j], items[i - 1]


@pytest.fixture(scope="module")
def no_dropout(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """MLP and CNN folders of models without dropout (so eager and device agree), on 600
    samples."""
    made = {}
    for name in ("mlp", "cnn"):
        folder = tmp_path_factory.mktemp(f"{name}-no-dropout")
        x, y = digits(name)
        x, y = x[:600], y[:600]
        manifest, state = write_folder(folder, name, 0.0, x, y)
        made[name] = {"folder": folder, "manifest": manifest, "state": state, "x": x, "y": y,
                      "data": write_data(folder / "local.bin", x, y)}
    return made


@pytest.mark.parametrize(("name", "optimizer", "lr", "batch_size", "kernels"), [
    ("mlp", "sgd", 0.05, 48, "fast"),  # batches larger than max_batch run in pieces
    ("mlp", "adam", 0.003, 20, "fast"),
    ("cnn", "sgd", 0.05, 20, "fast"),  # fedge-device's own convolution kernels
    ("cnn", "sgd", 0.05, 20, "portable"),  # ExecuTorch's
])
def test_one_epoch_takes_eager_pytorchs_steps(device_binary: Path, no_dropout: dict,
                                              tmp_path: Path, name: str, optimizer: str,
                                              lr: float, batch_size: int, kernels: str) -> None:
    case, seed = no_dropout[name], 5
    out = tmp_path / "result.bin"
    done = run_device(device_binary, "--local", case["folder"], "--data", case["data"],
                      "--epochs", 1, "--optimizer", optimizer, "--lr", lr, "--batch-size",
                      batch_size, "--seed", seed, "--kernels", kernels, "--out", out)
    assert done.returncode == 0, done.stderr
    metrics = strict_json(done.stdout)
    assert metrics["best_epoch"] == 1, metrics  # else the device returns the initial weights

    x, y = case["x"], case["y"]
    model = build_model(spec_from_data(name, x, 10, 0.0))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in case["state"].items()},
                          strict=False)
    train_loss = eager_epoch(model.train(), x, y, seed, optimizer, lr, batch_size)
    assert metrics["train_loss"] == pytest.approx(train_loss, rel=1e-5)
    assert_same_weights(out, model)


def eager_epoch(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int, optimizer: str,
                lr: float, batch_size: int) -> float:
    """Epoch 1 of a task in eager PyTorch, on the samples and in the order fedge-device
    takes them, over ``model``'s parameters that require grad; its mean training loss."""
    order = list(range(len(y)))
    SplitMix64(0).shuffle(order)  # the device's split: seed 0, kept for every task
    n_val = min(max(1, round(0.2 * len(y))), len(y) - 1)
    train = order[n_val:]
    SplitMix64(seed).shuffle(train)  # epoch 1's order, from the task's seed
    trained = [p for p in model.parameters() if p.requires_grad]
    step = (torch.optim.SGD(trained, lr=lr, momentum=0.9) if optimizer == "sgd"
            else torch.optim.Adam(trained, lr=lr))
    loss_sum = 0.0
    for start in range(0, len(train), batch_size):
        rows = train[start:start + batch_size]
        loss = F.cross_entropy(model(torch.as_tensor(x[rows])), torch.as_tensor(y[rows]))
        step.zero_grad()
        loss.backward()
        step.step()
        loss_sum += loss.item() * len(rows)
    return loss_sum / len(train)


def assert_same_weights(result: Path, model: nn.Module) -> None:
    _, arrays = unpack(result.read_bytes())
    expected = model.state_dict()
    for key, array in arrays.items():
        np.testing.assert_allclose(array, expected[key].numpy(), rtol=0, atol=2e-6,
                                   err_msg=key)


def test_flat_csv_rows_train_the_cnn_as_its_images_do(device_binary: Path, no_dropout: dict,
                                                      tmp_path: Path) -> None:
    """`fedge device-data` keeps a CSV's rows flat ([64]); the device gives them the model's
    input shape ([1, 8, 8]), as `fedge client` does."""
    case = no_dropout["cnn"]
    x, y = case["x"], case["y"]
    write_flat_csv(tmp_path / "rows.csv", x, y)
    made = run_fedge("device-data", str(tmp_path / "rows.csv"), "-o", str(tmp_path / "flat.bin"))
    assert made.returncode == 0, made.stderr
    assert unpack((tmp_path / "flat.bin").read_bytes())[1]["x"].shape == (len(y), 64)

    results = {}
    for kind, data in (("images", case["data"]), ("flat", tmp_path / "flat.bin")):
        out = tmp_path / f"{kind}.out"
        done = run_device(device_binary, "--local", case["folder"], "--data", data,
                          "--epochs", 1, "--seed", 5, "--out", out)
        assert done.returncode == 0, done.stderr
        results[kind] = unpack(out.read_bytes())
    (images_header, images), (flat_header, flat) = results["images"], results["flat"]
    assert images.keys() == flat.keys()
    for name in images:
        np.testing.assert_array_equal(flat[name], images[name], err_msg=name)
    for metric in ("train_loss", "val_loss", "val_accuracy"):
        assert flat_header["metrics"][metric] == images_header["metrics"][metric]


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),
                                      nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x / 16.0))


def test_a_frozen_batchnorm_layer_trains_on_its_statistics_as_in_pytorch(
        device_binary: Path, tmp_path: Path) -> None:
    x, y = digits("cnn")
    x, y = x[:600], y[:600]
    torch.manual_seed(0)
    model = BatchNormNet().train()
    with torch.no_grad():  # statistics of real digits, as pretraining leaves them
        model(torch.as_tensor(x))
    frozen = [name for name in model.state_dict() if name.startswith("features.1.")]
    spec = ModelSpec(name="net.py:BatchNormNet", input_shape=(1, 8, 8), num_classes=10,
                     dropout=0.0)
    write_model_folder(tmp_path, model, spec, x, y, frozen)
    out = tmp_path / "result.bin"
    done = run_device(device_binary, "--local", tmp_path, "--data",
                      write_data(tmp_path / "local.bin", x, y), "--epochs", 1, "--optimizer",
                      "sgd", "--lr", 0.05, "--batch-size", 20, "--seed", 5, "--out", out)
    assert done.returncode == 0, done.stderr
    metrics = strict_json(done.stdout)
    assert metrics["best_epoch"] == 1, metrics

    # PyTorch with the frozen layer in eval mode: its statistics, its weight and bias fixed.
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in frozen)
    model.train()
    model.features[1].eval()
    train_loss = eager_epoch(model, x, y, 5, "sgd", 0.05, 20)
    assert metrics["train_loss"] == pytest.approx(train_loss, rel=1e-5)
    assert_same_weights(out, model)


# -- bad input ----------------------------------------------------------------------------

def test_bad_input_is_one_error_line_and_exit_2(device_binary: Path, cnn: dict,
                                                tmp_path: Path) -> None:
    folder, local = cnn["folder"], cnn["local"]
    flat = write_data(tmp_path / "flat.bin", np.zeros((10, 63), np.float32),
                      np.zeros(10, np.int64))
    labels = write_data(tmp_path / "labels.bin", np.zeros((10, 1, 8, 8), np.float32),
                        np.full(10, 10, np.int64))
    token = tmp_path / "dev.token"
    token.write_text("a-token")
    cut = tmp_path / "cut.bin"
    cut.write_bytes(local.read_bytes()[:1000])
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for file in ("manifest.json", "train.pte", "predict.pte", "weights.bin"):
        data = (folder / file).read_bytes()
        if file == "train.pte":
            data = data[:-1] + bytes([data[-1] ^ 1])
        (tampered / file).write_bytes(data)
    cases = [
        (["--local", folder, "--data", tmp_path / "missing.bin"],
         "cannot read the data file"),
        (["--local", folder, "--data", flat],
         "samples have shape [63] (63 values), the model 'cnn' takes [1, 8, 8] (64 values)"),
        (["--local", folder, "--data", labels], "class id 10"),
        (["--local", folder, "--data", cut], "cut short"),
        (["--local", tampered, "--data", local], "train.pte does not match its manifest"),
        (["--local", folder, "--data", local, "--epochs", "many"], "--epochs"),
        (["--local", folder, "--data", local, "--frobnicate", "1"], "unknown option"),
        (["--local", folder], "needs --data"),
        (["--gateway", "https://127.0.0.1:1", "--token", token, "--data", local],
         "give the gateway's CA certificate with --ca"),
    ]
    for args, message in cases:
        done = run_device(device_binary, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stdout == "", args
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, done.stderr)
        assert message in lines[0], (args, lines[0])


# -- gateway mode ---------------------------------------------------------------------------

def test_a_gateway_round_over_http_with_one_device(device_binary: Path, no_dropout: dict,
                                                   tmp_path: Path) -> None:
    from fedge.server.device_tokens import make_tokens, read_token_digests
    from fedge.server.gateway import DeviceFleet, GatewaySettings

    case = no_dropout["mlp"]
    folder, manifest = case["folder"], case["manifest"]
    programs = {manifest["programs"][kind]["sha256"]: (folder / f"{kind}.pte").read_bytes()
                for kind in ("train", "predict")}
    make_tokens(["dev1"], tmp_path / "tokens")
    fleet = DeviceFleet(read_token_digests(tmp_path / "tokens"),
                        GatewaySettings(round_deadline=60, poll_seconds=2))
    training = {"epochs": 2, "batch_size": 32, "lr": 0.003, "optimizer": "adam",
                "patience": 2, "proximal_mu": 0.01, "seed": 11}
    with fleet.serving("127.0.0.1", 0, None, None) as port:
        device = subprocess.Popen(
            [str(device_binary), "--gateway", f"http://127.0.0.1:{port}", "--token",
             str(tmp_path / "tokens/dev1.token"), "--data", str(case["data"]), "--cache",
             str(tmp_path / "cache")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        try:
            result = fleet.run_round(1, manifest, programs, case["state"], training)
            fleet.finish("1 round: done")
            out, err = device.communicate(timeout=TIMEOUT)
        finally:
            if device.poll() is None:
                device.kill()
                device.communicate()
    assert result.report == {"dev1": "accepted"}, (result.report, err)
    assert device.returncode == 0, err
    assert out.strip() == "1 round: done"
    assert result.num_examples == 600 - 120
    assert set(result.arrays) == {entry["name"] for entry in manifest["state"]}
    assert all(not np.array_equal(array, case["state"][name])
               for name, array in result.arrays.items())
    assert 0 < result.metrics["val_accuracy"] <= 1
    assert "round 1: 2 epochs" in err and "result accepted" in err
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(
        f"{sha}.pte" for sha in programs)
