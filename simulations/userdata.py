"""Your own data in a simulation: one file split among the clients, or one per client.

``--data FILE`` (CSV, NPZ or image folder, read as ``fedge client --data`` reads it) is
split by ``--partition``: ``iid``, ``dirichlet:A``, ``shards:K``, or ``column:NAME``, one
client per value of a CSV column (a device id, a site), that column being no feature.
``--client-data DIR`` holds one data file or image folder per client: its entries, sorted
by name (hidden ones ignored), are clients 0, 1, 2, ...

**Hold-outs.** The server's validation and test samples come from ``--val-data`` and
``--test-data`` when given; otherwise ``test_share`` and then ``val_share`` of all the
samples, stratified by label (scikit-learn's ``train_test_split``, seeded), are taken out
*before* any client gets its samples, as for the built-in data sets. A natural partition
loses the held-out rows from its clients; no client ever holds a held-out sample.
Strata by task: the class; a multilabel sample's rarest label; a regression sample's
quantile bin of its first target. Classes of one sample pool into one stratum (a lone
one is refused: it cannot be both held out and trained on); a multilabel or regression
task's rare strata merge until the split can be stratified.

**Tasks.** ``[task] task`` decides how labels are read (:mod:`fedge.datafiles`); a
binary task's 2 classes become 0/1 after the hold-outs, the positive class 1 (``[task]
positive``, by default the rarest class in the server's validation samples), and its
class names are (negative, positive).

**Class names.** Files that label samples by name give the federation the sorted union
of all their names (``sorted()``; the first name is class 0), and every file's ids are
mapped onto it. Files that label by id keep their ids, unnamed. In-memory samples that
carry ``class_names`` keep that order (the files' names must be among them).

Only :class:`UserData` (paths and settings, never arrays) travels to Ray workers; every
process reads and splits the files once (cached) and, from the seed, gets the same split.
"""

import math
import uuid
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from fedge.client.data import label_strata, merged_strata, pooled_singletons
from fedge.config import DEFAULT_DATASET, RunConfig, SimulationSettings, default
from fedge.datafiles import (
    LabelledSamples,
    as_samples,
    binary_labels,
    count_classes,
    label_columns,
    load_labelled_data,
    task_labels,
    united_class_names,
)
from fedge.errors import FedgeError
from fedge.models.hf import is_pretrained, model_folder
from fedge.simulations.partition import PartitionSpec, natural_partitions

MEMORY = "the in-memory samples"


@dataclass(frozen=True)
class UserData:
    """Where a simulation's own samples come from, and how they are held out."""

    data: str | None = None  # one file, split by the partition
    client_data: str | None = None  # a folder of one file or image folder per client
    val_data: str | None = None
    test_data: str | None = None
    label_column: str = default("label_column")
    group_column: str | None = None  # partition column:NAME
    sample_shape: tuple[int, ...] | None = None
    val_share: float = default("val_share")
    test_share: float = default("test_share")
    seed: int = 0
    task: str = default("task")
    positive: str | None = default("positive")  # binary: the positive class, name or id
    # A text model's samples: texts from text_column, tokenized with the tokenizer of
    # this Hugging Face model folder to max_length tokens (None: the longest text's).
    text_model: str | None = None
    text_column: str = default("text_column")
    max_length: int | None = None
    # In-memory samples (the Python API; in-process simulations only): compared and
    # hashed by their id, so that the description stays a cheap cache key.
    memory_id: str | None = None
    memory: LabelledSamples | None = field(default=None, compare=False, repr=False)

    @property
    def non_feature_columns(self) -> tuple[str, ...]:
        """The columns of a CSV that are no features: the label's (several, for a
        multilabel or regression task) and the group's."""
        labels = label_columns(self.label_column, self.task)
        return labels if self.group_column is None else (*labels, self.group_column)

    @property
    def natural(self) -> bool:
        """One client per group (a column's value, or an entry of --client-data)."""
        return self.client_data is not None or self.group_column is not None


@dataclass(frozen=True)
class UserSplit:
    """The clients' samples, their partitions when natural, and the server's hold-outs.

    Labels (``y``, ``val_y``, ``test_y``) as ``task`` has them: class ids (n,), binary 0/1
    (n,) with ``class_names`` (negative, positive), a multilabel 0/1 matrix (n, L), or
    regression targets, float32 (n, T); ``class_names`` names the classes, labels or
    targets (None: unnamed)."""

    x: np.ndarray
    y: np.ndarray
    partitions: list[np.ndarray] | None  # natural: indices into x, y for each client
    client_names: list[str] | None  # natural: each client's column value or entry name
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: tuple[str, ...] | None
    # Classes (named: the number of names; else the largest id seen + 1; binary: 2),
    # labels (multilabel) or targets (regression).
    num_classes: int
    vocab_size: int | None  # token-id samples: the largest id seen + 1
    task: str = default("task")


@lru_cache(maxsize=4)
def split_user_data(source: UserData) -> UserSplit:
    """Read ``source``'s files, hold out the server's samples, and partition the rest
    when the partition is natural; every problem is a :class:`FedgeError` naming it."""
    pool, codes, names_of_groups = _pool(source)
    held = [(_read(source, path), path) for path in (source.val_data, source.test_data)
            if path is not None]
    if source.text_model is not None:
        every = _tokenized([*pool, *held], source)
        pool, held = every[:len(pool)], every[len(pool):]
    order = source.memory.class_names if source.memory is not None else None
    class_names, ids = united_class_names([*pool, *held], order)
    x = _concatenate([samples.x for samples, _ in pool], [where for _, where in pool])
    y = np.concatenate(ids[:len(pool)])
    client_rows, val_rows, test_rows = _hold_outs(y, source)
    val = test = None
    if source.val_data is not None:
        val = held[0][0].x, ids[len(pool)]
    if source.test_data is not None:
        test = held[-1][0].x, ids[-1]
    val = val or (x[val_rows], y[val_rows])
    test = test or (x[test_rows], y[test_rows])
    for (part_x, _), where in ((val, source.val_data), (test, source.test_data)):
        if where is not None:
            _same_kind(part_x, x, where, _first(pool))
    partitions = None
    if codes is not None:
        partitions = _natural(codes[client_rows], names_of_groups, source)
    y, val_y, test_y = y[client_rows], val[1], test[1]
    if source.task == "binary":
        (y, val_y, test_y), class_names = binary_labels(
            [y, val_y, test_y], class_names, source.positive, val_y, _described(source))
    vocab = None
    if np.issubdtype(x.dtype, np.integer):
        vocab = int(max(x.max(), val[0].max(), test[0].max())) + 1
    return UserSplit(x[client_rows], y, partitions, names_of_groups, val[0], val_y, test[0],
                     test_y, class_names, count_classes(class_names, [y, val_y, test_y]),
                     vocab, source.task)


def _described(source: UserData) -> str:
    """The samples of ``source`` in a message."""
    return (source.data or source.client_data or MEMORY) + (
        " with its server files" if source.val_data or source.test_data else "")


def _first(pool: list[tuple[LabelledSamples, object]]) -> object:
    return pool[0][1]


def _read(source: UserData, path: str | Path, group_column: str | None = None
          ) -> LabelledSamples:
    return load_labelled_data(Path(path), label_column=source.label_column,
                              sample_shape=source.sample_shape, group_column=group_column,
                              task=source.task,
                              text_column=source.text_column if source.text_model else None)


def _tokenized(parts: list[tuple[LabelledSamples, object]], source: UserData
               ) -> list[tuple[LabelledSamples, object]]:
    """Texts as token ids: one length for all the parts (the longest text's by default)."""
    from fedge.models.hf import token_ids

    ids = token_ids([samples.x for samples, _ in parts], Path(source.text_model),
                    source.max_length)
    return [(replace(samples, x=x), where) for (samples, where), x in zip(parts, ids,
                                                                          strict=True)]


def _pool(source: UserData) -> tuple[list[tuple[LabelledSamples, object]], np.ndarray | None,
                                     list[str] | None]:
    """The samples the clients and the hold-outs come from, with where they came from;
    for a natural partition, each sample's group number and the groups' names."""
    if source.memory is not None:
        samples = _checked_memory(source.memory, source)
        pool = [(samples, MEMORY)]
        groups = samples.groups
    elif source.data is not None:
        if source.group_column is not None and (Path(source.data).is_dir()
                                                or Path(source.data).suffix.lower() != ".csv"):
            raise FedgeError(f"partition column:{source.group_column} splits a CSV file by "
                             f"one of its columns, but {source.data} is not a .csv file")
        samples = _read(source, source.data, source.group_column)
        pool = [(samples, source.data)]
        groups = samples.groups
    else:
        return _client_entries(source)
    if source.group_column is None:
        return pool, None, None
    if groups is None:
        raise FedgeError(f"partition column:{source.group_column} needs each sample's group: "
                         "give the in-memory samples groups")
    values, members = natural_partitions(np.asarray(groups).astype(str))
    codes = np.empty(len(groups), dtype=np.int64)
    for code, rows in enumerate(members):
        codes[rows] = code
    return pool, codes, values


def _client_entries(source: UserData) -> tuple[list[tuple[LabelledSamples, object]],
                                               np.ndarray, list[str]]:
    folder = Path(source.client_data)
    if not folder.is_dir():
        raise FedgeError(f"--client-data {folder} is not a folder; give a folder holding one "
                         "data file or image folder per client")
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")),
                     key=lambda p: p.name)
    if not entries:
        raise FedgeError(f"--client-data {folder} is empty; put one data file or image "
                         "folder per client in it")
    pool = [(_read(source, entry), entry) for entry in entries]
    codes = np.concatenate([np.full(len(samples.y), k) for k, (samples, _) in enumerate(pool)])
    return pool, codes, [entry.name for entry in entries]


def _checked_memory(samples: LabelledSamples, source: UserData) -> LabelledSamples:
    """In-memory samples held to the same standard as a data file's."""
    x = np.asarray(samples.x)
    if x.ndim < 2 or x.dtype.kind not in "biuf":
        raise FedgeError(f"{MEMORY} must be a numeric array of shape (samples, ...), not "
                         f"{x.dtype} of shape {x.shape}")
    x = as_samples(x, MEMORY)
    if source.sample_shape is not None:
        if math.prod(x.shape[1:]) != math.prod(source.sample_shape):
            raise FedgeError(f"{MEMORY} have shape {x.shape[1:]}, but input_shape is "
                             f"{tuple(source.sample_shape)}")
        x = x.reshape(len(x), *source.sample_shape)
    if len(x) == 0:
        raise FedgeError(f"{MEMORY} hold no samples")
    y, names = task_labels(np.asarray(samples.y), MEMORY, source.task, samples.class_names)
    groups = None if samples.groups is None else np.asarray(samples.groups).astype(str)
    return LabelledSamples(x, y, names, groups)


def _concatenate(parts: list[np.ndarray], sources: list[object]) -> np.ndarray:
    for part, where in zip(parts[1:], sources[1:], strict=True):
        _same_kind(part, parts[0], where, sources[0])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _same_kind(x: np.ndarray, reference: np.ndarray, where: object, reference_source: object
               ) -> None:
    if x.shape[1:] != reference.shape[1:]:
        raise FedgeError(f"samples in {where} have shape {x.shape[1:]}, but those in "
                         f"{reference_source} {reference.shape[1:]}; every file must hold "
                         "samples of one shape (input_shape reshapes flat CSV rows)")
    if (x.dtype.kind in "iu") != (reference.dtype.kind in "iu"):
        raise FedgeError(f"samples in {where} are {x.dtype} but those in {reference_source} "
                         f"{reference.dtype}: token ids and float samples do not mix")


def _hold_outs(y: np.ndarray, source: UserData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the clients, of the server's validation and of the test set: a stated
    share of the samples, stratified by label (:func:`hold_out_strata`), for each
    hold-out not given as a file."""
    rows, none = np.arange(len(y)), np.zeros(0, dtype=np.int64)
    take_test, take_val = source.test_data is None, source.val_data is None
    if take_test and take_val and source.val_share + source.test_share >= 1:
        raise FedgeError(f"val_share {source.val_share:g} and test_share "
                         f"{source.test_share:g} leave no samples for the clients")
    test_rows = val_rows = none
    if take_test:
        rows, test_rows = _stratified(y, rows, source.test_share, source.seed, "test",
                                      source.test_share, "--test-data")
    if take_val:
        share = source.val_share / (1 - source.test_share) if take_test else source.val_share
        rows, val_rows = _stratified(y, rows, share, source.seed, "validation",
                                     source.val_share, "--val-data")
    return rows, val_rows, test_rows


def hold_out_strata(y: np.ndarray, share: float) -> np.ndarray:
    """The strata a hold-out of ``share`` of the samples labelled ``y`` keeps in
    proportion: classes (those of a single sample pooled); a multilabel sample's rarest
    label, a regression sample's quantile bin of its first target, rare ones merged until
    each side of the split can hold a sample of every stratum."""
    if y.ndim == 1:
        return pooled_singletons(y)
    held = math.ceil(share * len(y))  # as train_test_split counts a share
    return merged_strata(label_strata(y), min(held, len(y) - held))


def _stratified(y: np.ndarray, rows: np.ndarray, share: float, seed: int, what: str,
                stated: float, option: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        kept, held = train_test_split(rows, test_size=share,
                                      stratify=hold_out_strata(y[rows], share),
                                      random_state=seed)
    except ValueError as error:
        raise FedgeError(f"cannot hold out {stated:.0%} of the {len(y)} samples for the "
                         f"server's {what} set, stratified by label: {error} Give the {what} "
                         f"samples with {option}, or more samples of every class") from None
    return np.sort(kept), np.sort(held)


def _natural(codes: np.ndarray, names: list[str], source: UserData) -> list[np.ndarray]:
    """Each group's rows among the clients' samples; a group left with fewer than 2 (the
    hold-outs took the others) is a client that cannot train and validate."""
    partitions = [np.flatnonzero(codes == k) for k in range(len(names))]
    for k, rows in enumerate(partitions):
        if len(rows) < 2:
            what = (f"entry {names[k]!r} of {source.client_data}" if source.client_data
                    else f"value {names[k]!r} of column {source.group_column!r}")
            taken = ("" if source.val_data and source.test_data else
                     " after the server's hold-outs (give them with --val-data and "
                     "--test-data instead)")
            raise FedgeError(f"client {k} ({what}) has {len(rows)} "
                             f"sample{'' if len(rows) == 1 else 's'}{taken}; a client needs "
                             "at least 2 (training and validation)")
    return partitions


def user_data_source(config: RunConfig, data: LabelledSamples | None = None
                     ) -> UserData | None:
    """The description of the run's own samples (None: a built-in data set), after the
    checks of settings that do not go together."""
    simulation = config.simulation
    given = simulation.model_fields_set
    own = [name for name, value in (("in-memory samples", data), ("--data", simulation.data),
                                    ("--client-data", simulation.client_data))
           if value is not None]
    spec = PartitionSpec.parse(simulation.partition)
    if not own:
        for option, value in (("--val-data", simulation.val_data),
                              ("--test-data", simulation.test_data)):
            if value is not None:
                raise FedgeError(f"{option} is for your own data (--data or --client-data); "
                                 f"data set {simulation.dataset or DEFAULT_DATASET!r} holds out "
                                 "its own samples")
        if spec.kind == "column":
            raise FedgeError(f"partition {simulation.partition!r} splits your own CSV file by "
                             "one of its columns: give the file with --data")
        return None
    if len(own) > 1:
        raise FedgeError(f"give one source of samples, not {' and '.join(own)}")
    if "dataset" in given:
        raise FedgeError(f"give --dataset or {own[0]}, not both")
    if simulation.client_data is not None and "partition" in given:
        raise FedgeError(f"--client-data is one client per entry of {simulation.client_data}: "
                         f"it takes no --partition ({simulation.partition!r})")
    if data is not None and simulation.backend == "ray":
        raise FedgeError("in-memory samples cannot be sent to Ray's workers: use backend "
                         "'inprocess', or save the samples to a file and give its path as "
                         "data")
    if data is not None and not isinstance(data, LabelledSamples):
        raise FedgeError(f"in-memory samples must be LabelledSamples, not "
                         f"{type(data).__name__}")

    def absolute(path: str | None) -> str | None:
        return None if path is None else str(Path(path).expanduser().resolve())

    text_model = None
    if is_pretrained(config.model.name):
        if data is not None:
            raise FedgeError("a Hugging Face model reads its texts from files: give data "
                             "as the path of a CSV (or NPZ of strings), not in memory")
        text_model = str(model_folder(config.model.name))
    return UserData(
        data=absolute(simulation.data), client_data=absolute(simulation.client_data),
        val_data=absolute(simulation.val_data), test_data=absolute(simulation.test_data),
        label_column=config.data.label_column,
        group_column=spec.column if spec.kind == "column" else None,
        sample_shape=None if config.data.input_shape is None else tuple(config.data.input_shape),
        val_share=simulation.val_share, test_share=simulation.test_share, seed=config.seed,
        task=config.task.name, positive=config.task.positive,
        memory_id=None if data is None else uuid.uuid4().hex, memory=data,
        text_model=text_model, text_column=config.data.text_column,
        max_length=config.data.max_length)


def fit_config(config: RunConfig, source: UserData, split: UserSplit) -> RunConfig:
    """The settings the samples decide: the clients of a natural partition, the default
    model for the samples' shape; and a clear error for settings that contradict them."""
    simulation = config.simulation
    updates: dict[str, object] = {}
    if split.partitions is not None:
        count = len(split.partitions)
        what = (f"entries in {simulation.client_data}" if simulation.client_data
                else f"values of column {source.group_column!r}")
        asked = config.strategy.clients
        if "clients" in config.strategy.model_fields_set and asked != count:
            raise FedgeError(f"--clients {asked} does not match the {count} {what} "
                             "(one client each); leave --clients out")
        updates["clients"] = count
    if config.model.name is None:
        updates["model"] = default_model(split.x)
    _check_outputs(config.data.num_classes, split)
    return config.updated(**updates)


def _check_outputs(asked: int | None, split: UserSplit) -> None:
    """``num_classes`` (``asked``; None: the data's) against the data: classes enough for
    a classifier, and for a binary, multilabel or regression task exactly the data's
    classes, labels or targets."""
    count, names = split.num_classes, split.class_names
    if split.task in ("multilabel", "regression"):
        what = "label" if split.task == "multilabel" else "target"
        if asked not in (None, count):
            named = f": {', '.join(names)}" if names else ""
            raise FedgeError(f"num_classes {asked} does not match the {count} {what}s of the "
                             f"data{named}")
        if count < 1:
            raise FedgeError(f"no sample has a {what}; a {split.task} task needs at least 1")
        return
    if split.task == "binary" and asked not in (None, 2):
        raise FedgeError(f"num_classes {asked} does not match a binary task's 2 classes: "
                         f"{', '.join(names)}")
    if names is not None and asked not in (None, count):
        raise FedgeError(f"num_classes {asked} does not match the {count} "
                         f"class names of the data: {', '.join(names)}")
    if asked is not None and asked < count:
        raise FedgeError(f"num_classes {asked} is too small for the data, "
                         f"whose labels go up to {count - 1}")
    if max(count, asked or 0) < 2:
        only = names[0] if names else "0"
        raise FedgeError(f"the samples hold only one class ({only}); a classifier needs at "
                         "least 2")


def default_model(x: np.ndarray) -> str:
    """The built-in model for samples like ``x``."""
    if x.dtype.kind in "iu" and x.ndim == 2:
        return "tinytext"
    by_dims = {2: "mlp", 3: "sensor1d", 4: "cnn"}
    if x.dtype.kind in "iu" or x.ndim not in by_dims:
        raise FedgeError(f"no built-in model takes samples of shape {x.shape[1:]} "
                         f"({x.dtype}); choose one with --model")
    return by_dims[x.ndim]


def describe_source(simulation: SimulationSettings, source: UserData, split: UserSplit) -> str:
    """What the run trains on, for the first line of ``fedge simulate``."""
    where = (f"data {simulation.data}" if simulation.data else
             f"client data {simulation.client_data}" if simulation.client_data else
             "in-memory data")
    return f"{where} (real data, {_labelled(split)})"


def _labelled(split: UserSplit) -> str:
    """What the samples' labels are, e.g. "10 named classes", "binary, positive fraud"."""
    if split.task == "binary":
        return f"binary, positive class {split.class_names[1]}"
    one, many = {"classification": ("class", "classes"), "multilabel": ("label", "labels"),
                 "regression": ("target", "targets")}[split.task]
    named = "named " if split.class_names else ""
    what = one if split.num_classes == 1 else many
    return f"{split.num_classes} {named}{what}" + (
        "" if split.task == "classification" else f" ({split.task})")


def describe_partition(simulation: SimulationSettings, source: UserData) -> str:
    return (f"one per entry of {simulation.client_data}" if source.client_data
            else simulation.partition)


STRATA = {"classification": "label", "binary": "label",
          "multilabel": "each sample's rarest label",
          "regression": "quantiles of the first target"}


def describe_holdouts(simulation: SimulationSettings, split: UserSplit) -> str:
    """Where the server's validation and test samples come from."""
    def held(name: str, path: str | None, share: float, count: int) -> str:
        if path:
            return f"{name} {path} ({count} samples)"
        return (f"{name} {count} samples ({share:.0%} of the data, stratified by "
                f"{STRATA[split.task]})")

    validation = held("validation", simulation.val_data, simulation.val_share, len(split.val_y))
    test = held("test", simulation.test_data, simulation.test_share, len(split.test_y))
    return f"{validation}, {test}; no client holds any of them"
