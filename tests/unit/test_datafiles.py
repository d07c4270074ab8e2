"""A device's own data file: CSV, NPZ or an image folder, read into (x, y) or refused clearly."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_digits

from fedge.datafiles import load_labelled_data
from fedge.errors import FedgeError

from conftest import run_python


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_image(path: Path, pixels: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels.astype(np.uint8))
    (image.convert(mode) if mode else image).save(path)


def digit_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` sklearn digits as 0..255 grayscale 8x8 pixels."""
    digits = load_digits()
    return np.minimum(digits.images[:n] * 16, 255), digits.target[:n]


# CSV

def test_csv_label_column_becomes_int_labels_and_every_other_column_a_float_feature(tmp_path):
    cancer = load_breast_cancer()
    x, y = cancer.data[:20], cancer.target[:20]
    header = ["diagnosis", *cancer.feature_names]
    rows = [[label, *features] for label, features in zip(y, x, strict=True)]
    path = write_csv(tmp_path / "cancer.csv", header, rows)

    samples = load_labelled_data(path, label_column="diagnosis")

    got_x, got_y = samples.x, samples.y

    assert got_x.dtype == np.float32 and got_x.shape == (20, 30)
    np.testing.assert_allclose(got_x, x, rtol=1e-6)
    assert got_y.dtype == np.int64
    np.testing.assert_array_equal(got_y, y)


def test_csv_rows_of_pixels_are_reshaped_to_the_models_sample_shape(tmp_path):
    digits = load_digits()
    table = np.column_stack([digits.data[:12], digits.target[:12]])
    header = ",".join([*(f"pixel{i}" for i in range(64)), "label"])
    path = tmp_path / "digits.csv"
    np.savetxt(path, table, delimiter=",", header=header, comments="")  # labels as 3.0e+00

    samples = load_labelled_data(path, sample_shape=(1, 8, 8))

    x, y = samples.x, samples.y

    assert x.shape == (12, 1, 8, 8)
    np.testing.assert_array_equal(x[:, 0], digits.images[:12])
    np.testing.assert_array_equal(y, digits.target[:12])


def test_csv_without_the_label_column_lists_the_columns_it_has(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["a", "class"], [[1, 0]])
    with pytest.raises(FedgeError, match=r"has no 'label' column; its columns are: a, class"):
        load_labelled_data(path)


def test_csv_non_numeric_feature_names_the_line_and_column(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], [[1, 2, 0], [3, "n/a", 1]])
    with pytest.raises(FedgeError, match=r"line 3 of .*d\.csv holds 'n/a' in column 'b'"):
        load_labelled_data(path)


@pytest.mark.parametrize("label", ["1.5", "-1"])
def test_csv_labels_must_be_whole_class_ids_not_fractions_or_negatives(tmp_path, label):
    path = write_csv(tmp_path / "d.csv", ["a", "label"], [[0.5, 0], [0.7, label]])
    with pytest.raises(FedgeError, match=rf"has label {label}, but labels must be integer class"):
        load_labelled_data(path)


@pytest.mark.parametrize("column, value", [("a", "nan"), ("a", "-inf"), ("label", "NaN"),
                                           ("a", "1e999")])
def test_csv_values_must_be_finite_and_the_line_and_column_are_named(tmp_path, column, value):
    row = {"a": "0.7", "label": "1", column: value}
    path = write_csv(tmp_path / "d.csv", ["a", "label"], [[0.5, 0], [row["a"], row["label"]]])
    with pytest.raises(FedgeError, match=rf"line 3 of .*d\.csv holds '{value}' in column "
                                         rf"'{column}'; values must be finite numbers"):
        load_labelled_data(path)


def test_npz_samples_with_nan_or_inf_are_refused_and_counted(tmp_path):
    x = np.zeros((5, 3), np.float64)
    x[1, 2], x[4, 0] = np.nan, 1e300  # 1e300 is Inf once it is float32
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(5))
    with pytest.raises(FedgeError, match=r"holds NaN, Inf or values beyond float32's range "
                                         r"in 2 samples \(the first is sample 1\)"):
        load_labelled_data(tmp_path / "d.npz")


def test_csv_text_labels_are_class_names_with_ids_in_sorted_order(tmp_path):
    rows = [[0.1, "scratch"], [0.2, " good"], [0.3, "dent"], [0.4, "good"], [0.5, "Zinc"]]
    path = write_csv(tmp_path / "d.csv", ["a", "label"], rows)

    samples = load_labelled_data(path)

    # sorted() order: upper case before lower case; cells are stripped like the header
    assert samples.class_names == ("Zinc", "dent", "good", "scratch")
    np.testing.assert_array_equal(samples.y, [3, 2, 1, 2, 0])
    assert samples.y.dtype == np.int64 and samples.groups is None
    np.testing.assert_array_equal(samples.x[:, 0], np.float32([0.1, 0.2, 0.3, 0.4, 0.5]))


def test_csv_integer_labels_stay_unnamed_ids(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["a", "label"], [[0.5, 2], [0.7, 0]])
    samples = load_labelled_data(path)
    assert samples.class_names is None
    np.testing.assert_array_equal(samples.y, [2, 0])


def test_csv_labels_mixing_ids_and_names_are_refused_naming_both_lines(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["a", "label"], [[0.5, "cat"], [0.6, 1], [0.7, "dog"]])
    with pytest.raises(FedgeError, match=r"column 'label' of .*d\.csv mixes class ids and "
                                         r"class names \(line 3 holds '1', line 2 'cat'\)"):
        load_labelled_data(path)


def test_csv_empty_label_is_refused_with_its_line(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["a", "label"], [[0.5, "cat"], [0.6, " "]])
    with pytest.raises(FedgeError, match=r"line 3 of .*d\.csv has no label in column 'label'"):
        load_labelled_data(path)


def test_csv_names_map_to_the_federations_ids_and_unknown_names_are_listed(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["a", "label"], [[0.5, "good"], [0.6, "dent"]])

    samples = load_labelled_data(path, class_names=["scratch", "good", "dent"])

    assert samples.class_names == ("scratch", "good", "dent")
    np.testing.assert_array_equal(samples.y, [1, 2])
    with pytest.raises(FedgeError, match=r"has a class the federation does not know: dent; "
                                         r"the federation's classes are: scratch, good"):
        load_labelled_data(path, class_names=["scratch", "good"])


def test_a_group_column_becomes_the_groups_and_is_no_feature(tmp_path):
    rows = [["dev2", 0.5, "a", 7], ["dev10", 0.6, "b", 8], [" 3 ", 0.7, "a", 9]]
    path = write_csv(tmp_path / "d.csv", ["device", "f1", "label", "f2"], rows)

    samples = load_labelled_data(path, group_column="device")

    assert samples.x.shape == (3, 2)
    np.testing.assert_array_equal(samples.x, np.float32([[0.5, 7], [0.6, 8], [0.7, 9]]))
    assert samples.groups.tolist() == ["dev2", "dev10", "3"]
    assert samples.class_names == ("a", "b")


@pytest.mark.parametrize("group, message", [
    ("site", r"has no 'site' column; its columns are: device, f1, label"),
    ("label", r"column 'label' of .* cannot be both the label and the group"),
])
def test_a_bad_group_column_is_refused(tmp_path, group, message):
    path = write_csv(tmp_path / "d.csv", ["device", "f1", "label"], [["d", 0.5, 0]])
    with pytest.raises(FedgeError, match=message):
        load_labelled_data(path, group_column=group)


def test_a_group_value_must_not_be_empty_and_groups_need_a_csv(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["device", "f1", "label"], [["d", 0.5, 0], ["", 1, 1]])
    with pytest.raises(FedgeError, match=r"line 3 of .* has no value in column 'device'"):
        load_labelled_data(path, group_column="device")
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3)), y=np.array([0, 1]))
    with pytest.raises(FedgeError, match=r"d\.npz is not a \.csv file, so it has no column "
                                         r"'device'"):
        load_labelled_data(tmp_path / "d.npz", group_column="device")


def test_an_empty_csv_file_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("")
    with pytest.raises(FedgeError, match=r"d\.csv is empty; it needs a header row"):
        load_labelled_data(path)


def test_a_csv_with_a_header_but_no_rows_is_refused(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["a", "label"], [])
    with pytest.raises(FedgeError, match=r"d\.csv holds no samples"):
        load_labelled_data(path)


def test_a_csv_with_only_a_label_column_is_refused(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["label"], [[0], [1]])
    with pytest.raises(FedgeError, match=r"no feature columns besides 'label'"):
        load_labelled_data(path)


def test_a_ragged_csv_row_is_refused(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], [[1, 2, 0], [3, 1]])
    with pytest.raises(FedgeError, match=r"line 3 of .* has 2 values, but the header names 3"):
        load_labelled_data(path)


def test_a_spreadsheet_csv_with_byte_order_mark_and_blank_lines_loads(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("\ufefflabel, a\r\n1,0.5\r\n\r\n0,2\r\n", encoding="utf-8")

    samples = load_labelled_data(path)

    x, y = samples.x, samples.y

    np.testing.assert_array_equal(x, [[0.5], [2.0]])
    np.testing.assert_array_equal(y, [1, 0])



def test_a_large_csv_is_read_in_about_the_memory_of_its_samples(tmp_path):
    """Rows go straight into the sample array: no Python float and list slot per value,
    which took 12 times the array's memory (and 1.2 GB for a 210 MiB file)."""
    rng = np.random.default_rng(0)
    block = "".join(",".join(f"{v:.6f}" for v in row) + f",{label}\n" for row, label in zip(
        rng.normal(size=(1000, 40)), rng.choice(["good", "dent", "scratch"], 1000),
        strict=True))
    path = tmp_path / "large.csv"
    path.write_text(",".join(f"f{i}" for i in range(40)) + ",label\n" + block * 50)
    # The peak resident memory of this process alone: VmHWM (getrusage's maximum would
    # start at pytest's, inherited through fork).
    code = ("import json, re, sys\n"
            "from pathlib import Path\n"
            "from fedge.datafiles import load_labelled_data\n"
            "def peak():\n"
            "    status = Path('/proc/self/status').read_text()\n"
            "    return int(re.search(r'VmHWM:\\s+(\\d+) kB', status)[1]) * 1024\n"
            "before = peak()\n"
            "samples = load_labelled_data(Path(sys.argv[1]))\n"
            "print(json.dumps([samples.x.shape, samples.x.nbytes, peak() - before,"
            " samples.class_names]))\n")

    result = run_python(code, str(path))

    assert result.returncode == 0, result.stderr
    shape, size, grown, names = json.loads(result.stdout)
    assert shape == [50_000, 40] and names == ["dent", "good", "scratch"]
    assert grown < 4 * size, f"reading took {grown / size:.1f} times the samples' memory"


# NPZ

def test_npz_float_samples_become_float32_and_labels_int64(tmp_path):
    cancer = load_breast_cancer()
    path = tmp_path / "d.npz"
    np.savez(path, x=cancer.data[:15], y=cancer.target[:15].astype(np.int32))

    samples = load_labelled_data(path)

    x, y = samples.x, samples.y

    assert x.dtype == np.float32 and x.shape == (15, 30)
    np.testing.assert_allclose(x, cancer.data[:15], rtol=1e-6)
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, cancer.target[:15])


def test_npz_integer_samples_stay_integers_as_token_ids(tmp_path):
    tokens = np.array([[5, 9, 0], [70000, 2, 1]], dtype=np.int32)
    np.savez(tmp_path / "d.npz", x=tokens, y=np.array([1, 0], dtype=np.uint8))

    samples = load_labelled_data(tmp_path / "d.npz")

    x, y = samples.x, samples.y

    assert x.dtype == np.int64
    np.testing.assert_array_equal(x, tokens)
    np.testing.assert_array_equal(y, [1, 0])


def test_npz_without_y_names_the_missing_array_and_lists_those_present(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3)), labels=np.zeros(2))
    with pytest.raises(FedgeError, match=r"has no array 'y'; its arrays are: x, labels"):
        load_labelled_data(tmp_path / "d.npz")


def test_npz_with_more_samples_than_labels_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 4)), y=np.zeros(2, dtype=int))
    with pytest.raises(FedgeError, match=r"x of shape \(3, 4\) and y of shape \(2,\)"):
        load_labelled_data(tmp_path / "d.npz")


@pytest.mark.parametrize("labels", [[0, -2], [0.0, 0.5]])
def test_npz_labels_must_be_whole_class_ids(tmp_path, labels):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4)), y=np.array(labels))
    with pytest.raises(FedgeError, match=r"labels must be integer class ids 0, 1, 2"):
        load_labelled_data(tmp_path / "d.npz")


def test_npz_text_labels_are_class_names_and_bytes_or_objects_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 4)), y=np.array(["dog", "cat", "dog"]))
    samples = load_labelled_data(tmp_path / "d.npz")
    assert samples.class_names == ("cat", "dog")
    np.testing.assert_array_equal(samples.y, [1, 0, 1])

    np.savez(tmp_path / "b.npz", x=np.zeros((2, 4)), y=np.array([b"cat", b"dog"]))
    with pytest.raises(FedgeError, match=r"labels in .*b\.npz are bytes \(\|S3\); give class "
                                         r"names as text"):
        load_labelled_data(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 4)), y=np.array([True, False]))
    with pytest.raises(FedgeError, match=r"must be integer class ids or class names, not bool"):
        load_labelled_data(tmp_path / "c.npz")


def test_npz_object_arrays_are_refused_because_pickle_is_never_used(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([[1], [1, 2]], dtype=object), y=np.array([0, 1]))
    with pytest.raises(FedgeError, match=r"cannot read .*d\.npz: Object arrays cannot be loaded"):
        load_labelled_data(tmp_path / "d.npz")


def test_a_file_named_npz_that_is_not_an_archive_is_refused(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"x,y\n1,0\n")
    with pytest.raises(FedgeError, match=r"d\.npz is not an \.npz archive"):
        load_labelled_data(tmp_path / "d.npz")


# Image folders

def test_grayscale_images_load_as_one_channel_raw_pixels_labelled_by_folder(tmp_path):
    pixels, targets = digit_images(30)
    for i, (image, target) in enumerate(zip(pixels, targets, strict=True)):
        write_image(tmp_path / str(target) / f"{i:02d}.png", image)
    order = sorted(range(30), key=lambda i: (targets[i], i))  # folder by folder, file by file

    samples = load_labelled_data(tmp_path)

    x, y = samples.x, samples.y

    assert x.dtype == np.float32 and x.shape == (30, 1, 8, 8)
    assert x.max() == 255
    np.testing.assert_array_equal(x[:, 0], pixels[order])
    np.testing.assert_array_equal(y, targets[order])


def test_rgb_images_load_channels_first(tmp_path):
    rgb = np.arange(4 * 5 * 3).reshape(4, 5, 3) * 4
    write_image(tmp_path / "0" / "a.bmp", rgb)
    write_image(tmp_path / "1" / "b.png", 255 - rgb)

    samples = load_labelled_data(tmp_path)

    x, y = samples.x, samples.y

    assert x.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(x[0], rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(x[1], 255 - rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(y, [0, 1])


def test_other_image_modes_are_converted_to_rgb(tmp_path):
    gray = np.full((6, 6), 200)
    write_image(tmp_path / "0" / "a.png", gray, mode="LA")
    write_image(tmp_path / "0" / "b.png", np.zeros((6, 6, 3)), mode="RGBA")

    x = load_labelled_data(tmp_path).x

    assert x.shape == (2, 3, 6, 6)
    np.testing.assert_array_equal(x[0], np.full((3, 6, 6), 200))


def test_class_names_map_folders_to_the_federations_class_ids(tmp_path):
    write_image(tmp_path / "dog" / "a.png", np.zeros((4, 4)))
    write_image(tmp_path / "cat" / "b.png", np.zeros((4, 4)))

    y = load_labelled_data(tmp_path, class_names=["bird", "cat", "dog"]).y

    np.testing.assert_array_equal(y, [1, 2])  # cat then dog; this client has no birds


def test_a_folder_that_is_not_a_class_name_is_refused_listing_the_classes(tmp_path):
    write_image(tmp_path / "horse" / "a.png", np.zeros((4, 4)))
    with pytest.raises(FedgeError, match=r"has a class the federation does not know: horse; "
                                         r"the federation's classes are: bird, cat, dog"):
        load_labelled_data(tmp_path, class_names=["bird", "cat", "dog"])


def test_class_named_folders_get_ids_in_sorted_order(tmp_path):
    write_image(tmp_path / "scratch" / "a.png", np.full((4, 4), 1))
    write_image(tmp_path / "good" / "b.png", np.full((4, 4), 2))
    write_image(tmp_path / "good" / "c.png", np.full((4, 4), 3))

    samples = load_labelled_data(tmp_path)

    assert samples.class_names == ("good", "scratch")
    np.testing.assert_array_equal(samples.y, [0, 0, 1])
    np.testing.assert_array_equal(samples.x[:, 0, 0, 0], [2, 3, 1])  # folder by folder


def test_digit_folders_stay_unnamed_ids(tmp_path):
    write_image(tmp_path / "3" / "a.png", np.zeros((4, 4)))
    samples = load_labelled_data(tmp_path)
    assert samples.class_names is None
    np.testing.assert_array_equal(samples.y, [3])


def test_folders_mixing_ids_and_names_are_refused(tmp_path):
    write_image(tmp_path / "cat" / "a.png", np.zeros((4, 4)))
    write_image(tmp_path / "1" / "a.png", np.zeros((4, 4)))
    with pytest.raises(FedgeError, match=r"sub-folders of .* mix class ids and class names "
                                         r"\(1, cat\)"):
        load_labelled_data(tmp_path)


def test_an_empty_folder_is_refused(tmp_path):
    with pytest.raises(FedgeError, match=r"has no class sub-folders"):
        load_labelled_data(tmp_path)


def test_class_folders_without_images_are_refused(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "notes.txt").write_text("not an image")
    with pytest.raises(FedgeError, match=r"no images \(\.png, \.jpg, \.jpeg, \.bmp\) in the sub"):
        load_labelled_data(tmp_path)


def test_images_of_mixed_sizes_are_refused_naming_one(tmp_path):
    write_image(tmp_path / "0" / "a.png", np.zeros((8, 8)))
    write_image(tmp_path / "1" / "big.png", np.zeros((9, 8)))
    with pytest.raises(FedgeError, match=r"share one size and mode, but .*big\.png has shape"):
        load_labelled_data(tmp_path)


def test_grayscale_and_colour_images_mixed_are_refused(tmp_path):
    write_image(tmp_path / "0" / "a.png", np.zeros((8, 8)))
    write_image(tmp_path / "0" / "b.png", np.zeros((8, 8, 3)))
    with pytest.raises(FedgeError, match=r"b\.png has shape \(3, 8, 8\) and .*a\.png \(1, 8, 8\)"):
        load_labelled_data(tmp_path)


def test_an_unreadable_image_is_named(tmp_path):
    write_image(tmp_path / "0" / "a.png", np.zeros((8, 8)))
    (tmp_path / "0" / "broken.jpg").write_bytes(b"not really a jpeg")
    with pytest.raises(FedgeError, match=r"broken\.jpg is not a readable image"):
        load_labelled_data(tmp_path)


def test_hidden_files_and_folders_beside_the_images_are_ignored(tmp_path):
    write_image(tmp_path / "0" / "a.png", np.zeros((4, 4)))
    (tmp_path / "0" / "._a.png").write_bytes(b"macOS resource fork")
    write_image(tmp_path / ".ipynb_checkpoints" / "a.png", np.zeros((4, 4)))

    samples = load_labelled_data(tmp_path)

    x, y = samples.x, samples.y

    assert x.shape == (1, 1, 4, 4)
    np.testing.assert_array_equal(y, [0])



# Any form

def test_samples_already_in_the_models_shape_are_kept_and_others_flattened(tmp_path):
    pixels, targets = digit_images(3)
    for i, (image, target) in enumerate(zip(pixels, targets, strict=True)):
        write_image(tmp_path / str(target) / f"{i}.png", image)

    kept = load_labelled_data(tmp_path, sample_shape=(1, 8, 8)).x
    flat = load_labelled_data(tmp_path, sample_shape=(64,)).x

    assert kept.shape == (3, 1, 8, 8)
    np.testing.assert_array_equal(flat, kept.reshape(3, 64))


def test_a_sample_shape_with_a_different_number_of_values_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 30)), y=np.array([0, 1]))
    with pytest.raises(FedgeError, match=r"have shape \(30,\), but the model expects samples "
                                         r"of shape \(1, 8, 8\)"):
        load_labelled_data(tmp_path / "d.npz", sample_shape=(1, 8, 8))


def test_a_missing_path_is_refused(tmp_path):
    with pytest.raises(FedgeError, match=r"no such file or folder: .*absent\.csv"):
        load_labelled_data(tmp_path / "absent.csv")


def test_an_unsupported_file_type_lists_the_supported_forms(tmp_path):
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(FedgeError, match=r"cannot read .*d\.json: use a \.csv file .*, an \.npz "
                                         r"file with arrays x and y, or a folder"):
        load_labelled_data(tmp_path / "d.json")



def test_json_fedge_writes_is_strict_even_for_nan_and_infinity(tmp_path):
    import json
    import math

    from fedge.files import write_json

    write_json(tmp_path / "m.json", {"loss": math.nan, "rounds": [{"x": math.inf}, 1.5],
                                     "pair": (-math.inf, 2)})

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == {
        "loss": None, "rounds": [{"x": None}, 1.5], "pair": [None, 2]}


# Class names across files and devices

def test_remap_labels_maps_a_devices_own_sorted_names_onto_the_federations_ids():
    from fedge.datafiles import remap_labels

    # this device has no "dent" samples: its own ids 0, 1 stand for good, scratch
    y = remap_labels(np.array([1, 0, 1]), ("good", "scratch"), ("dent", "good", "scratch"),
                     "dev1.csv")
    np.testing.assert_array_equal(y, [2, 1, 2])
    assert y.dtype == np.int64
    ids = np.array([4, 0])
    np.testing.assert_array_equal(remap_labels(ids, None, ("a", "b"), "x"), ids)


def test_remap_labels_names_the_unknown_classes_and_unnamed_federations():
    from fedge.datafiles import remap_labels

    with pytest.raises(FedgeError, match=r"dev1\.csv has 2 classes the federation does not "
                                         r"know: rust, scratch; the federation's classes are: "
                                         r"dent, good"):
        remap_labels(np.array([0, 1, 2]), ("good", "rust", "scratch"), ("dent", "good"),
                     "dev1.csv")
    with pytest.raises(FedgeError, match=r"names its classes \(good\), but the federation's "
                                         r"classes have no names"):
        remap_labels(np.array([0]), ("good",), None, "dev1.csv")


def test_united_class_names_are_the_sorted_union_and_refuse_named_with_unnamed(tmp_path):
    from fedge.datafiles import united_class_names

    write_csv(tmp_path / "val.csv", ["a", "label"], [[0, "good"], [1, "scratch"]])
    write_csv(tmp_path / "test.csv", ["a", "label"], [[0, "dent"], [1, "good"]])
    write_csv(tmp_path / "ids.csv", ["a", "label"], [[0, 1]])
    val, test, ids = (load_labelled_data(tmp_path / f"{n}.csv") for n in ("val", "test", "ids"))

    names, (val_y, test_y) = united_class_names([(val, "val.csv"), (test, "test.csv")])

    assert names == ("dent", "good", "scratch")
    np.testing.assert_array_equal(val_y, [1, 2])
    np.testing.assert_array_equal(test_y, [0, 1])
    with pytest.raises(FedgeError, match=r"val\.csv labels its classes by name but ids\.csv "
                                         r"by id"):
        united_class_names([(val, "val.csv"), (ids, "ids.csv")])
