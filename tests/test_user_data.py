"""Your own data: `fedge simulate --data/--client-data`, class names end to end, and
`fedge predict` on the files a user has (CSV with a header, images, folders)."""

import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from fedge.cli import app
from fedge.client.deployment import DeviceData
from fedge.config import RunConfig
from fedge.datafiles import LabelledSamples
from fedge.errors import FedgeError
from fedge.simulations.runner import plan_simulation

from conftest import run_fedge, run_python

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGITS = load_digits()
# Cheap settings for plans and short runs.
FAST = {"rounds": 1, "local_epochs": 1, "min_clients": 2}


def write_csv(path: Path, header: list[str], rows) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def digits_csv(path: Path, rows: np.ndarray, devices=None, named: bool = True,
               uid: bool = True) -> Path:
    """Digits ``rows`` as a CSV: 64 pixels (the first replaced by the row number, so that
    every sample can be recognised), a label (a word, or the digit), a device column."""
    header = [f"p{i}" for i in range(64)] + ["label"] + (["device"] if devices is not None
                                                        else [])
    table = []
    for k, row in enumerate(rows):
        pixels = [int(v) for v in DIGITS.data[row]]
        if uid:
            pixels[0] = int(row)
        label = WORDS[DIGITS.target[row]] if named else int(DIGITS.target[row])
        table.append(pixels + [label] + ([devices[k]] if devices is not None else []))
    return write_csv(path, header, table)


def context(partition_id: int) -> Context:
    return Context(run_id=1, node_id=partition_id, state=RecordDict(),
                   node_config={"partition-id": partition_id}, run_config={})


def client_rows(plan, k: int) -> set[int]:
    """The digits rows client ``k`` holds (train and validation), by their row number."""
    data = plan.clients.local_data(context(k))
    rows = np.concatenate([data.train_x[:, 0], data.val_x[:, 0]]).astype(int)
    assert len(set(rows)) == len(rows)
    return set(rows.tolist())


def server_rows(plan) -> set[int]:
    server = plan.server_data
    return set(np.concatenate([server.val_x[:, 0], server.test_x[:, 0]]).astype(int).tolist())


# --- natural partitions: each client gets exactly its own samples ---------------------


def test_column_partition_gives_each_client_exactly_its_own_samples(tmp_path):
    rows = np.arange(600)
    devices = [f"dev{r % 3}" if r < 500 else "dev10" for r in rows]  # dev10 after dev2
    path = digits_csv(tmp_path / "parts.csv", rows, devices)

    plan = plan_simulation(RunConfig(data=str(path), partition="column:device", **FAST))

    assert plan.config.strategy.clients == 4  # one client per device, none asked for
    held = server_rows(plan)
    assert len(held) == len(plan.server_data.val_y) + len(plan.server_data.test_y) == 180
    names = ["dev0", "dev1", "dev10", "dev2"]  # sorted as text
    for k, device in enumerate(names):
        own = {int(r) for r, d in zip(rows, devices, strict=True) if d == device}
        assert client_rows(plan, k) == own - held
    assert sorted(plan.clients.partition_sizes()) == sorted(
        len({int(r) for r, d in zip(rows, devices, strict=True) if d == n} - held) for n in names)
    # the device column is no feature: 64 pixels per sample
    assert plan.server_data.val_x.shape[1:] == (64,)
    assert plan.server_data.class_names == tuple(sorted(WORDS))


def test_client_data_gives_each_entry_exactly_its_own_samples_and_maps_its_names(tmp_path):
    folder = tmp_path / "sites"
    folder.mkdir()
    sites = {"a.csv": np.arange(0, 150), "b.npz": np.arange(150, 400),
             "c.csv": np.arange(400, 520)}
    for name, rows in sites.items():
        if name.endswith(".csv"):
            digits_csv(folder / name, rows)
        else:  # an NPZ of the same 64 values, labelled by name too
            x = DIGITS.data[rows].astype(np.float32)
            x[:, 0] = rows
            np.savez(folder / name, x=x, y=np.array([WORDS[t] for t in DIGITS.target[rows]]))
    (folder / ".DS_Store").write_bytes(b"hidden: ignored")
    # site a lacks the digit 9: its own ids differ from the federation's
    keep = sites["a.csv"][DIGITS.target[sites["a.csv"]] != 9]
    digits_csv(folder / "a.csv", keep)
    sites["a.csv"] = keep

    plan = plan_simulation(RunConfig(client_data=str(folder), **FAST))

    assert plan.config.strategy.clients == 3
    held = server_rows(plan)
    names = plan.server_data.class_names
    assert names == tuple(sorted(WORDS))
    for k, rows in enumerate(sites.values()):
        assert client_rows(plan, k) == set(rows.tolist()) - held
        data = plan.clients.local_data(context(k))
        assert data.class_names == names
        for x, y in ((data.train_x, data.train_y), (data.val_x, data.val_y)):
            expected = [names.index(WORDS[DIGITS.target[int(r)]]) for r in x[:, 0]]
            np.testing.assert_array_equal(y, expected)
    assert held.isdisjoint(set().union(*(client_rows(plan, k) for k in range(3))))


def test_hold_out_files_leave_every_sample_to_the_clients(tmp_path):
    rows = np.arange(300)
    path = digits_csv(tmp_path / "parts.csv", rows, [f"d{r % 2}" for r in rows])
    val = digits_csv(tmp_path / "val.csv", np.arange(1000, 1100))
    test = digits_csv(tmp_path / "test.csv", np.arange(1100, 1250))

    plan = plan_simulation(RunConfig(data=str(path), partition="column:device",
                                     val_data=str(val), test_data=str(test), **FAST))

    assert client_rows(plan, 0) | client_rows(plan, 1) == set(range(300))
    assert set(plan.server_data.val_x[:, 0].astype(int)) == set(range(1000, 1100))
    assert set(plan.server_data.test_x[:, 0].astype(int)) == set(range(1100, 1250))
    assert "validation" in plan.holdouts and str(val) in plan.holdouts


def test_a_pooled_file_is_held_out_before_it_is_partitioned(tmp_path):
    path = digits_csv(tmp_path / "all.csv", np.arange(len(DIGITS.target)))

    plan = plan_simulation(RunConfig(data=str(path), clients=5, partition="dirichlet:0.5",
                                     val_share=0.1, test_share=0.2, **FAST))

    held = server_rows(plan)
    assert len(plan.server_data.test_y) == pytest.approx(0.2 * 1797, abs=1)
    assert len(plan.server_data.val_y) == pytest.approx(0.1 * 1797, abs=1)
    clients = [client_rows(plan, k) for k in range(5)]
    assert sum(map(len, clients)) == 1797 - len(held)
    assert held.isdisjoint(set().union(*clients))
    # stratified: every digit is in the test set in its share
    counts = np.bincount(plan.server_data.test_y, minlength=10)
    assert counts.min() >= 30


def test_numeric_labels_stay_unnamed_and_in_memory_samples_plan_too(tmp_path):
    path = digits_csv(tmp_path / "ids.csv", np.arange(400), named=False)
    plan = plan_simulation(RunConfig(data=str(path), clients=3, **FAST))
    assert plan.server_data.class_names is None and plan.server_data.num_classes == 10

    x = DIGITS.images[:400, None].astype(np.float32)
    groups = np.array([f"cam{i % 2}" for i in range(400)])
    labels = np.array([WORDS[t] for t in DIGITS.target[:400]])
    memory = LabelledSamples(x, np.array([sorted(WORDS).index(w) for w in labels]),
                             tuple(sorted(WORDS)), groups)
    plan = plan_simulation(RunConfig(partition="column:camera", **FAST), data=memory)
    assert plan.config.model.name == "cnn" and plan.config.strategy.clients == 2
    assert plan.server_data.class_names == tuple(sorted(WORDS))
    assert "in-memory data" in plan.source
    with pytest.raises(FedgeError, match="in-memory samples cannot be sent to Ray's workers"):
        plan_simulation(RunConfig(backend="ray", **FAST), data=memory)


def test_the_clients_description_is_small_and_a_fresh_process_rebuilds_the_same_samples(
        tmp_path):
    """What Ray sends to its workers: paths, not arrays; a worker reads the file itself."""
    rows = np.arange(500)
    path = digits_csv(tmp_path / "parts.csv", rows, [f"d{r % 4}" for r in rows])
    plan = plan_simulation(RunConfig(data=str(path), partition="column:device", **FAST))
    description = pickle.dumps(plan.clients)
    assert len(description) < 2000
    (tmp_path / "clients.pkl").write_bytes(description)

    code = ("import pickle, sys, numpy as np\n"
            "from flwr.app import Context, RecordDict\n"
            "clients = pickle.load(open(sys.argv[1], 'rb'))\n"
            "data = clients.local_data(Context(run_id=1, node_id=2, state=RecordDict(),"
            " node_config={'partition-id': 2}, run_config={}))\n"
            "np.savez(sys.argv[2], x=data.train_x, y=data.train_y)\n")
    result = run_python(code, str(tmp_path / "clients.pkl"), str(tmp_path / "worker.npz"))
    assert result.returncode == 0, result.stderr
    here = plan.clients.local_data(context(2))
    with np.load(tmp_path / "worker.npz") as worker:
        np.testing.assert_array_equal(worker["x"], here.train_x)
        np.testing.assert_array_equal(worker["y"], here.train_y)


# --- bad input: one error line, exit status 2, nothing written -------------------------


def _refused(tmp_path: Path, options: list[str], message: str) -> None:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["simulate", "--out", str(out), "--rounds", "1",
                                      *options])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output + result.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    files = {"parts": digits_csv(tmp_path / "parts.csv", np.arange(300),
                                 [f"d{r % 3}" for r in range(300)])}
    files["plain"] = digits_csv(tmp_path / "plain.csv", np.arange(300))
    np.savez(tmp_path / "parts.npz", x=DIGITS.data[:50], y=DIGITS.target[:50])
    files["npz"] = tmp_path / "parts.npz"
    sites = tmp_path / "sites"
    sites.mkdir()
    digits_csv(sites / "a.csv", np.arange(100))
    digits_csv(sites / "b.csv", np.arange(100, 200))
    files["sites"] = sites
    files["val"] = digits_csv(tmp_path / "val.csv", np.arange(1000, 1100))
    files["test"] = digits_csv(tmp_path / "test.csv", np.arange(1100, 1200))
    return files


@pytest.mark.parametrize("options, message", [
    (["--data", "{plain}", "--client-data", "{sites}"],
     "give one source of samples, not --data and --client-data"),
    (["--partition", "column:device"], "splits your own CSV file by one of its columns"),
    (["--data", "{npz}", "--partition", "column:device"], "parts.npz is not a .csv file"),
    (["--data", "{parts}", "--partition", "column:site"],
     "has no 'site' column; its columns are: p0, p1,"),
    (["--data", "{parts}", "--partition", "column:device", "--clients", "5"],
     "--clients 5 does not match the 3 values of column 'device'"),
    (["--client-data", "{sites}", "--clients", "3"],
     "--clients 3 does not match the 2 entries in"),
    (["--client-data", "{sites}", "--partition", "iid"], "it takes no --partition ('iid')"),
    (["--dataset", "digits", "--data", "{plain}"], "give --dataset or --data, not both"),
    (["--val-data", "{val}"], "--val-data is for your own data (--data or --client-data)"),
    (["--data", "{plain}", "--val-share", "0.6", "--test-share", "0.5"],
     "val_share 0.6 and test_share 0.5 leave no samples for the clients"),
    (["--data", "{parts}"], "holds 'd0' in column 'device', which is not a number"),
    (["--data", "{plain}", "--model", "cnn"], "model 'cnn' expects samples shaped (channels"),
    (["--data", "{plain}", "--label-column", "digit"], "has no 'digit' column"),
])
def test_bad_own_data_settings_are_refused_before_anything_is_written(tmp_path, options,
                                                                     message):
    files = _bad_inputs(tmp_path)
    _refused(tmp_path, [o.format(**files) for o in options], message)


def test_a_client_data_entry_that_cannot_be_read_is_named(tmp_path):
    files = _bad_inputs(tmp_path)
    (files["sites"] / "notes.txt").write_text("not data")
    _refused(tmp_path, ["--client-data", str(files["sites"])], "notes.txt: use a .csv file")
    (files["sites"] / "notes.txt").unlink()
    (files["sites"] / "empty").mkdir()
    _refused(tmp_path, ["--client-data", str(files["sites"])], "empty has no class sub-folders")


def test_a_client_left_with_fewer_than_two_samples_is_refused(tmp_path):
    files = _bad_inputs(tmp_path)
    digits_csv(files["sites"] / "c.csv", np.arange(200, 201))
    _refused(tmp_path, ["--client-data", str(files["sites"]), "--val-data", str(files["val"]),
                        "--test-data", str(files["test"])],
             "client 2 (entry 'c.csv' of")
    digits_csv(files["sites"] / "c.csv", np.arange(200, 203))  # hold-outs take them
    _refused(tmp_path, ["--client-data", str(files["sites"]), "--val-share", "0.3",
                        "--test-share", "0.3"], "after the server's hold-outs")


def test_files_that_label_differently_or_hold_other_shapes_are_refused(tmp_path):
    files = _bad_inputs(tmp_path)
    digits_csv(files["sites"] / "c.csv", np.arange(200, 300), named=False)
    _refused(tmp_path, ["--client-data", str(files["sites"])],
             "labels its classes by name but")
    (files["sites"] / "c.csv").unlink()
    write_csv(tmp_path / "narrow.csv", ["a", "label"], [[i, WORDS[i % 10]] for i in range(50)])
    _refused(tmp_path, ["--client-data", str(files["sites"]), "--val-data",
                        str(tmp_path / "narrow.csv")], "have shape (1,), but those in")


def test_hold_outs_that_cannot_be_stratified_or_a_single_class_are_refused(tmp_path):
    rows = [r for r in range(400) if DIGITS.target[r] != 7] + [int(np.flatnonzero(
        DIGITS.target == 7)[0])]  # one seven only
    _refused(tmp_path, ["--data", str(digits_csv(tmp_path / "one7.csv", np.array(rows))),
                        "--clients", "2"], "cannot hold out 15% of the")
    threes = np.flatnonzero(DIGITS.target == 3)[:60]
    _refused(tmp_path, ["--data", str(digits_csv(tmp_path / "threes.csv", threes)),
                        "--clients", "2"], "the samples hold only one class (three)")


# --- class names end to end: simulate, then predict through the real CLI --------------


def test_csv_string_labels_come_back_from_predict_and_its_int8_model(tmp_path):
    rows = np.arange(900)
    data = digits_csv(tmp_path / "digits.csv", rows, uid=False)
    run = tmp_path / "run"

    result = run_fedge("simulate", "--data", str(data), "--clients", "3", "--rounds", "2",
                       "--local-epochs", "2", "--partition", "iid", "--out", str(run),
                       "--record-wire", str(tmp_path / "wire"))

    assert result.returncode == 0, result.stdout + result.stderr
    audit = CliRunner().invoke(app, ["audit-wire", str(tmp_path / "wire"), "--data", str(data)])
    assert audit.exit_code == 0 and "passed" in audit.stdout, audit.output
    first = result.stdout.splitlines()[0]
    assert f"data {data} (real data, 10 named classes), model mlp, 3 clients (iid" in first
    assert "server hold-outs: validation 135 samples (15% of the data" in result.stdout
    spec = json.loads((run / "metrics.json").read_text())["model_spec"]
    assert spec["class_names"] == sorted(WORDS)

    # a device's file: a header row, and a label column that predict ignores
    probe = digits_csv(tmp_path / "probe.csv", np.arange(1500, 1520), uid=False)
    predicted = run_fedge("predict", str(run / "model.onnx"), str(probe))
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    assert len(lines) == 20 and set(lines) <= set(WORDS)
    truth = [WORDS[t] for t in DIGITS.target[1500:1520]]
    assert np.mean([a == b for a, b in zip(lines, truth, strict=True)]) >= 0.5

    ids = run_fedge("predict", str(run / "model.onnx"), str(probe), "--ids").stdout.split()
    assert [sorted(WORDS)[int(i)] for i in ids] == lines
    shares = run_fedge("predict", str(run / "model.onnx"), str(probe), "--probabilities")
    table = list(csv.reader(shares.stdout.splitlines()))
    assert table[0] == sorted(WORDS) and len(table) == 21
    values = np.array(table[1:], dtype=float)
    np.testing.assert_allclose(values.sum(axis=1), 1, atol=1e-3)
    assert [table[0][k] for k in values.argmax(axis=1)] == lines

    # the int8 model keeps the names; evaluation data labelled by name maps onto them
    quantized = run_fedge("export", str(run / "best.pt"), "-o", str(tmp_path / "q.onnx"),
                          "--quantize", "int8-dynamic", "--eval-data", str(probe))
    assert quantized.returncode == 0, quantized.stderr
    assert "int8 vs fp32 on 20 held-out samples" in quantized.stdout
    int8 = run_fedge("predict", str(tmp_path / "q.onnx"), str(probe))
    assert int8.returncode == 0 and set(int8.stdout.split()) <= set(WORDS)


def test_class_named_image_folders_come_back_from_predict_with_file_names(tmp_path):
    classes = {"good": 0, "scratch": 1, "dent": 7}  # digits stand in for photos
    data = tmp_path / "images"
    for name, digit in classes.items():
        for k, row in enumerate(np.flatnonzero(DIGITS.target == digit)[:60]):
            (data / name).mkdir(parents=True, exist_ok=True)
            pixels = np.minimum(DIGITS.images[row] * 16, 255).astype(np.uint8)
            Image.fromarray(pixels).save(data / name / f"{k:02d}.png")
    run = tmp_path / "run"

    result = run_fedge("simulate", "--data", str(data), "--clients", "2", "--rounds", "2",
                       "--local-epochs", "2", "--partition", "iid", "--lr", "0.01",
                       "--out", str(run))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "(real data, 3 named classes), model cnn, 2 clients" in result.stdout
    probe = tmp_path / "probe"
    for name, digit in classes.items():
        row = np.flatnonzero(DIGITS.target == digit)[100]
        (probe / name).mkdir(parents=True)
        Image.fromarray(np.minimum(DIGITS.images[row] * 16, 255).astype(np.uint8)).save(
            probe / name / "photo.png")
    predicted = run_fedge("predict", str(run / "model.onnx"), str(probe))
    assert predicted.returncode == 0, predicted.stderr
    rows = [line.split("\t") for line in predicted.stdout.splitlines()]
    assert [file for file, _ in rows] == ["dent/photo.png", "good/photo.png",
                                          "scratch/photo.png"]
    assert {label for _, label in rows} <= set(classes)
    single = run_fedge("predict", str(run / "model.onnx"), str(probe / "good" / "photo.png"),
                       "--probabilities")
    table = list(csv.reader(single.stdout.splitlines()))
    assert table[0] == ["file", "dent", "good", "scratch"]
    assert table[1][0] == "photo.png" and len(table) == 2


# --- predict inputs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory) -> Path:
    """An untrained digits CNN exported as fedge exports it, with class names."""
    from fedge.models.export import export_onnx
    from fedge.models.registry import build_model, spec_from_data

    x = DIGITS.images[:64, None].astype(np.float32)
    spec = spec_from_data("cnn", x, 10, 0.2, class_names=tuple(sorted(WORDS)))
    path = tmp_path_factory.mktemp("model") / "named.onnx"
    export_onnx(build_model(spec), spec, x, path)
    return path


def predict(*args: str):
    return CliRunner().invoke(app, ["predict", *args])


def test_a_csv_header_is_detected_and_headerless_numbers_still_read(tmp_path, digits_model):
    from fedge.models.export import CLASS_NAMES_KEY as EXPORTED_KEY
    from fedge.models.inference import CLASS_NAMES_KEY, read_inputs

    assert CLASS_NAMES_KEY == EXPORTED_KEY
    digits_csv(tmp_path / "header.csv", np.arange(5), uid=False)
    np.savetxt(tmp_path / "plain.csv", DIGITS.data[:5], delimiter=",")
    write_csv(tmp_path / "y.csv", ["digit", *[f"p{i}" for i in range(64)]],
              [["x", *DIGITS.data[k]] for k in range(5)])

    with_header = read_inputs(tmp_path / "header.csv").samples
    np.testing.assert_array_equal(with_header, DIGITS.data[:5])
    np.testing.assert_array_equal(read_inputs(tmp_path / "plain.csv").samples, DIGITS.data[:5])
    np.testing.assert_array_equal(read_inputs(tmp_path / "y.csv", "digit").samples,
                                  DIGITS.data[:5])
    by_header = predict(str(digits_model), str(tmp_path / "header.csv")).stdout.split()
    assert by_header == predict(str(digits_model), str(tmp_path / "plain.csv")).stdout.split()
    assert set(by_header) <= set(WORDS)


def test_predict_marks_nan_rows_of_a_headed_csv_and_refuses_text(tmp_path, digits_model):
    rows = [[*DIGITS.data[0], "zero"], [*(["nan"] * 64), "one"]]
    write_csv(tmp_path / "nan.csv", [*(f"p{i}" for i in range(64)), "label"], rows)
    result = predict(str(digits_model), str(tmp_path / "nan.csv"))
    assert result.exit_code == 1
    assert result.stdout.splitlines()[1] == "-" and result.stdout.splitlines()[0] in WORDS
    assert "1 of 2 samples" in result.stderr

    write_csv(tmp_path / "bad.csv", ["a", "b"], [[1, "x"]])
    for path, message in ((tmp_path / "bad.csv", "line 2 holds 'x' in column 'b', which is "
                                                 "not a number"),
                          (tmp_path / "header-only.csv", "is a header, but no samples follow")):
        if path.name == "header-only.csv":
            path.write_text("a,b\n")
        result = predict(str(digits_model), str(path))
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: cannot read inputs from")
        assert message in lines[0]
    (tmp_path / "empty").mkdir()
    result = predict(str(digits_model), str(tmp_path / "empty"))
    assert result.exit_code == 2 and "is a folder without images" in result.stderr


def test_a_first_row_of_numbers_with_a_typo_is_an_error_not_a_header(tmp_path, digits_model):
    rows = [[f"{v:g}" for v in DIGITS.data[k]] for k in range(3)]
    rows[0][2] = "1O"  # a typo: the letter O
    (tmp_path / "typo.csv").write_text("".join(",".join(row) + "\n" for row in rows))

    result = run_fedge("predict", str(digits_model), str(tmp_path / "typo.csv"))

    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: cannot read inputs from {tmp_path / 'typo.csv'}: line 1 holds '1O' in column "
        "3, which is not a number; a first row of numbers with text among them is neither a "
        "sample nor a header (which holds no number, or names the label column or an "
        "ignored column)"]


def test_a_header_of_numbered_columns_is_a_header_when_it_names_the_label(tmp_path,
                                                                         digits_model):
    from fedge.models.inference import read_inputs

    write_csv(tmp_path / "numbered.csv", [*map(str, range(64)), "label"],
              [[*DIGITS.data[k], WORDS[DIGITS.target[k]]] for k in range(3)])

    np.testing.assert_array_equal(read_inputs(tmp_path / "numbered.csv").samples,
                                  DIGITS.data[:3])


# --- predict on the very file a run was trained on ---------------------------------------


@pytest.fixture(scope="module")
def column_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """A short run on a CSV split among clients by its device column: the run folder, the
    file, and what `fedge simulate` printed."""
    folder = tmp_path_factory.mktemp("column")
    rows = np.arange(300)
    data = digits_csv(folder / "parts.csv", rows, [f"dev{r % 3}" for r in rows], uid=False)
    result = run_fedge("simulate", "--data", str(data), "--partition", "column:device",
                       "--rounds", "1", "--local-epochs", "1", "--out", str(folder / "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    return folder / "run", data, result.stdout


def test_predict_skips_the_partition_column_the_model_records(column_run):
    import fedge

    run, data, _ = column_run

    result = run_fedge("predict", str(run / "model.onnx"), str(data))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 300 and set(lines) <= set(WORDS)
    assert fedge.predict(run / "model.onnx", data) == lines
    spec = json.loads((run / "metrics.json").read_text())["model_spec"]
    assert spec["non_feature_columns"] == ["label", "device"]


def test_columns_named_with_ignore_column_are_skipped_and_must_exist(column_run, tmp_path):
    import fedge

    run, data, _ = column_run
    with data.open(newline="") as file:
        table = list(csv.reader(file))
    sited = write_csv(tmp_path / "sited.csv", ["site", *table[0]],
                      [["north" if k % 2 else "south", *row] for k, row in enumerate(table[1:])])
    model = str(run / "model.onnx")
    expected = run_fedge("predict", model, str(data)).stdout

    kept = run_fedge("predict", model, str(sited))
    ignored = run_fedge("predict", model, str(sited), "--ignore-column", "site")
    missing = run_fedge("predict", model, str(sited), "--ignore-column", "room")

    assert kept.returncode == 2
    assert "line 2 holds 'south' in column 'site', which is not a number" in kept.stderr
    assert ignored.returncode == 0, ignored.stderr
    assert ignored.stdout == expected
    assert fedge.predict(model, sited, ignore_columns=["site"]) == expected.splitlines()
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: {sited} has no column 'room' to ignore; its columns are: site, "
        f"{', '.join(table[0])}"]


def test_metrics_name_the_data_a_run_trained_on_as_the_console_does(column_run, default_run):
    run, data, printed = column_run

    metrics = json.loads((run / "metrics.json").read_text())
    builtin = json.loads((default_run / "metrics.json").read_text())

    assert metrics["config"]["dataset"] is None
    assert metrics["data"] == f"data {data} (real data, 10 named classes)"
    assert printed.startswith(f"fedge simulate: {metrics['data']}, model mlp")
    assert builtin["config"]["dataset"] == "digits"
    assert builtin["data"] == "digits (real data)"


def test_server_data_names_are_the_union_of_its_files(tmp_path):
    from fedge.server.deployment import ServerSettings, load_server_data

    val = digits_csv(tmp_path / "val.csv", np.flatnonzero(DIGITS.target < 5)[:50])
    test = digits_csv(tmp_path / "test.csv", np.flatnonzero(DIGITS.target >= 3)[:50])
    settings = ServerSettings(config=RunConfig(model="mlp"), val_data=val, test_data=test,
                              run_dir=tmp_path / "run")

    data = load_server_data(settings)

    assert data.class_names == tuple(sorted(WORDS)) and data.num_classes == 10
    names = np.array(data.class_names)
    assert set(names[data.val_y]) == {"zero", "one", "two", "three", "four"}
    expected = [WORDS[t] for t in DIGITS.target[np.flatnonzero(DIGITS.target >= 3)[:50]]]
    assert names[data.test_y].tolist() == expected


def test_a_device_keeps_its_own_names(tmp_path):
    path = digits_csv(tmp_path / "dev.csv", np.flatnonzero(DIGITS.target < 3)[:40])
    data = DeviceData(path).load()
    assert data.class_names == ("one", "two", "zero")
    assert set(np.concatenate([data.train_y, data.val_y])) == {0, 1, 2}


def _train_message(class_names: tuple[str, ...] | None, always: int = 0) -> RecordDict:
    """A round of an mlp that predicts class id ``always`` for every sample, and that
    one epoch at lr 1e-9 leaves as it is."""
    from flwr.app import ArrayRecord, ConfigRecord

    from fedge.models.registry import build_model, spec_from_data

    x = DIGITS.data.astype(np.float32)
    spec = spec_from_data("mlp", x, 10 if class_names is None else len(class_names), 0.1,
                          class_names=class_names)
    state = build_model(spec).state_dict()
    state["layers.6.bias"][:] = -100.0
    state["layers.6.bias"][always] = 100.0
    return RecordDict({
        "arrays": ArrayRecord(state),
        "config": ConfigRecord({"model-spec": spec.to_json(), "local-epochs": 1,
                                "batch-size": 16, "lr": 1e-9, "optimizer": "sgd",
                                "local-patience": 1, "seed": 0, "server-round": 1}),
    })


def test_a_device_trains_its_names_as_the_federations_class_ids(tmp_path):
    from fedge.client.app import CannotTakePart, build_trainer

    rows = np.flatnonzero(DIGITS.target < 3)[:60]
    device = DeviceData(digits_csv(tmp_path / "dev.csv", rows))
    local = device.load()
    assert local.class_names == ("one", "two", "zero")
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    federation = tuple(sorted(WORDS))  # ... "one" 4, ... "two" 8, "zero" 9

    # A model that always answers "zero" is right exactly on the device's zeros: its own
    # id 2 for "zero" became the federation's 9.
    reply = build_trainer(lambda c: device.load(), "cpu")(
        _train_message(federation, always=federation.index("zero")), context)
    zeros = float(np.mean(local.val_y == local.class_names.index("zero")))
    assert 0 < zeros < 1
    assert reply["metrics"]["val_accuracy"] == pytest.approx(zeros)

    with pytest.raises(CannotTakePart, match="the federation does not know: zero"):
        build_trainer(lambda c: device.load(), "cpu")(
            _train_message(("one", "three", "two")), context)
    with pytest.raises(CannotTakePart, match="the federation's classes have no names"):
        build_trainer(lambda c: device.load(), "cpu")(_train_message(None), context)
