"""One run's configuration, by concern: each setting defined once (name, type, default,
bounds, help), from which the command line's options, the TOML file's keys and the Python
API's keywords come."""

import logging
import tomllib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedge.datafiles import LABEL_COLUMN, TEXT_COLUMN
from fedge.errors import FedgeError, validation_problems
from fedge.protocol import training_key

log = logging.getLogger(__name__)


class Section(BaseModel):
    """One concern's settings; a component receives the sections it reads, nothing more."""

    # Infinity is no setting: an infinite learning rate or timeout is a typo, and JSON
    # (metrics.json keeps the config) cannot even write it down.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, values: object) -> object:
        if isinstance(values, dict):
            _refuse_booleans_for_numbers(cls, values)
        return values


def _refuse_booleans_for_numbers(model: type[BaseModel], values: dict) -> None:
    """TOML's ``rounds = true`` would otherwise be one round."""
    for key, value in values.items():
        field = model.model_fields.get(key)
        if (isinstance(value, bool) and field
                and bool not in (field.annotation, *get_args(field.annotation))):
            raise ValueError(f"{key}: expected a number, not {str(value).lower()}")


class DataSettings(Section):
    """What one sample is: read by the server and by every client."""

    label_column: str = Field(LABEL_COLUMN, description="CSV column holding the label "
                              "(multilabel, regression: one or several, comma-separated)")
    input_shape: tuple[int, ...] | None = Field(None, description="shape of one sample, e.g. "
                                                "[1, 8, 8] (1,8,8 on the command line) for "
                                                "flat CSV rows of 8×8 images")
    num_classes: int | None = Field(None, ge=2, description="default: largest label + 1")
    text_column: str = Field(TEXT_COLUMN, description="hf: models: the CSV column holding "
                             "each sample's text")
    max_length: int | None = Field(None, ge=2, description="hf: models: tokens per text; "
                                   "longer texts lose their end, shorter ones are padded "
                                   "(default: the longest text of the server's data, rounded "
                                   "up to a multiple of 8, at most 128)")

    @field_validator("input_shape", mode="before")
    @classmethod
    def _shape_as_text(cls, value: object) -> object:
        """``--input-shape 1,8,8`` on the command line, ``[1, 8, 8]`` in TOML."""
        if isinstance(value, str):
            try:
                return tuple(int(size) for size in value.replace("x", ",").split(","))
            except ValueError:
                raise ValueError(f"expected sizes such as 1,8,8, not {value!r}") from None
        return value


class ModelSettings(Section):
    """The network the federation trains, and its starting weights."""

    name: str | None = Field(None, description="cnn | mlp | sensor1d | tinytext, your "
                              "own: FILE.py:NAME or package.module:NAME, or a pretrained "
                              "Hugging Face model: hf:FOLDER (default: the data set's own)")
    scale_inputs: bool | None = Field(None, description="put fedge's input scaling (mean "
                                      "and std of the server's validation data, per "
                                      "channel) inside the model (default: on for built-in "
                                      "models, off for your own, which bring their own "
                                      "preprocessing)")
    init: str | None = Field(None, description="initial weights: a torch state_dict (.pt), "
                             ".safetensors, or a fedge checkpoint of an earlier run")
    reset: list[str] = Field([], description="parameters (glob, e.g. 'head.*') left at fresh "
                             "initialization instead of --init's weights")
    freeze: list[str] = Field([], description="parameters and buffers (glob) that are not "
                              "trained, sent or aggregated")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout rate")
    lora: int | None = Field(None, ge=1, description="hf: models: train low-rank adapters "
                             "of this rank and the head, not the whole model; only they "
                             "are sent and aggregated")
    lora_alpha: float | None = Field(None, gt=0.0, description="LoRA's scale α (the update "
                                     "is α/rank · BA; default: 2 × rank)")
    lora_targets: list[str] = Field([], description="LoRA: the layers adapted, by module "
                                    "name, e.g. query,value (default: peft's choice for the "
                                    "architecture)")

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _targets_as_text(cls, value: object) -> object:
        """``--lora-targets query,value`` (or the option repeated) on the command line, a
        list in TOML."""
        items = [value] if isinstance(value, str) else value
        if isinstance(items, list) and all(isinstance(item, str) for item in items):
            return [name.strip() for item in items for name in item.split(",") if name.strip()]
        return value


class TrainingSettings(Section):
    """A client's local training: sent to every client in every train message,
    each setting under its name spelt with ``-`` (``local-epochs``)."""

    local_epochs: int = Field(5, ge=1, description="local epoch budget per round")
    batch_size: int = Field(32, ge=1, description="local mini-batch size")
    lr: float = Field(0.003, gt=0.0, description="client learning rate")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="client optimizer: adam | sgd")
    local_patience: int = Field(2, ge=1, description="local epochs without improvement "
                                                     "before a client stops")
    compress: Literal["none", "fp16", "int8"] = Field("none", description="none | fp16 | "
                                                      "int8: clients send their update "
                                                      "w_local − w quantized (int8: one "
                                                      "scale per array)")


    # Sent only when not the default: earlier fedge clients take any ``compress`` entry
    # for a request to compress, and a federation's devices are not all updated at once.
    _only_when_set: ClassVar[tuple[str, ...]] = ("compress",)

    def as_config(self) -> dict[str, str | int | float]:
        """The settings as a train message's config entries (``local-epochs``: 5, ...)."""
        defaults = TrainingSettings()
        return {training_key(name): value for name, value in self.model_dump().items()
                if name not in self._only_when_set or value != getattr(defaults, name)}

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> "TrainingSettings":
        """The settings a train message carries; one it lacks (a server of an earlier
        fedge) keeps its default."""
        sent = {name: config[training_key(name)] for name in cls.model_fields
                if training_key(name) in config}
        try:
            return cls(**sent)
        except ValidationError as error:
            raise FedgeError("the server sent local-training settings this client cannot "
                             f"use: {validation_problems(error)}") from None


TaskName = Literal["classification", "binary", "multilabel", "regression"]


class TaskSettings(Section):
    """What the federation learns and how it is judged: the loss clients train with, the
    measures the server reports, the one that picks the best round, and the decision
    threshold stored with the model."""

    name: TaskName = Field("classification", description="classification | binary | "
                           "multilabel | regression")
    positive: str | None = Field(None, description="binary: the positive class, by name or "
                                 "id (default: the rarest class in the server's validation "
                                 "data)")
    class_weights: str = Field("none", description="none | balanced | W1,W2,...: weights of "
                               "the classes in the loss (binary, multilabel: of the "
                               "positives); balanced from the server's validation data")
    loss: Literal["auto", "mse", "huber"] = Field("auto", description="auto (the task's: "
                                                   "cross-entropy, or MSE for regression) | "
                                                   "mse | huber (regression)")
    monitor: str = Field("val_loss", description="the measure that picks the best round and "
                         "stops the run: val_loss, or val_ and a measure of the task (e.g. "
                         "val_pr_auc, val_macro_f1, val_mae)")
    threshold: str | None = Field(None, description="binary, multilabel: the decision "
                                  "threshold: f1 | recall:R | precision:P | a value in (0, 1), "
                                  "chosen on the server's validation data at the best round "
                                  "(default 0.5)")

    @field_validator("class_weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        if value in ("none", "balanced"):
            return value
        try:
            weights = [float(w) for w in value.split(",")]
        except ValueError:
            raise ValueError(f"expected none, balanced or numbers such as 1,10, not "
                             f"{value!r}") from None
        if not all(0 < w < float("inf") for w in weights):
            raise ValueError(f"class weights must be positive and finite, not {value!r}")
        return value

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, value: str | None) -> str | None:
        if value is None or value == "f1":
            return value
        rule, _, target = value.rpartition(":")
        try:
            number = float(target)
        except ValueError:
            number = float("nan")
        if rule not in ("", "recall", "precision") or not 0 < number < 1:
            raise ValueError(f"expected f1, recall:R, precision:P or a value between 0 and 1 "
                             f"(R, P too), not {value!r}")
        return value


class StrategySettings(Section):
    """How the server runs rounds, aggregates, and stops."""

    name: str = Field("fedavg", description="fedavg | fedprox | fedadam | fedmedian | "
                                                "fedtrimmedavg | krum | multikrum | fedbuff "
                                                "(asynchronous, no round barrier)")
    clients: int = Field(10, ge=1, description="clients in the federation: how many a "
                         "simulation runs; in a deployment, the devices that may take part "
                         "(differential privacy and SecAgg+ size their rounds by it)")
    rounds: int = Field(20, ge=1, description="maximum rounds (fedbuff: model versions)")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="fraction of clients per round")
    min_clients: int = Field(2, ge=1, description="minimum clients per round")
    patience: int = Field(5, ge=1, description="rounds without improvement of the monitored "
                          "measure (--monitor; validation loss by default) before the run "
                          "stops")
    min_delta: float = Field(0.0, ge=0.0, description="smallest change of the monitored "
                             "measure that counts as an improvement")
    proximal_mu: float = Field(0.01, ge=0.0, description="FedProx proximal weight μ")
    server_lr: float | None = Field(None, gt=0.0, description="server learning rate: "
                                    "fedadam's η (default 0.1), fedbuff's η_g (default 1.0)")
    concurrency: int | None = Field(None, ge=1, description="fedbuff: clients kept training "
                                    "at once (default: the clients a fedavg round samples)")
    buffer: int | None = Field(None, ge=1, description="fedbuff: client updates per server "
                               "step K (default: half the concurrency, rounded up)")
    max_staleness: int | None = Field(None, ge=0, description="fedbuff: drop (and count) an "
                                      "update trained on a model more than this many "
                                      "versions old (default: keep every update)")
    eval_every: int | None = Field(None, ge=1, description="fedbuff: evaluate, checkpoint and "
                                   "check early stopping every this many versions (default: "
                                   "concurrency / buffer, rounded up: about a round's "
                                   "updates); patience counts evaluations")
    trimmed_fraction: float = Field(0.2, ge=0.0, lt=0.5, description="fedtrimmedavg: share β "
                                    "of the largest and of the smallest values cut per weight")
    krum_byzantine: int = Field(2, ge=0, description="krum | multikrum: Byzantine clients f "
                                                     "tolerated per round")
    multikrum_select: int | None = Field(None, ge=1, description="multikrum: updates averaged "
                                         "per round (default: clients per round − f)")
    max_norm_ratio: float = Field(10.0, ge=0.0, description="reject an update ‖w_k − w‖ larger "
                                  "than this many times the round's median (0: off)")
    round_timeout: float = Field(600.0, gt=0.0, description="seconds a round waits for replies")
    min_results: int = Field(1, ge=1, description="fewest client results a round aggregates; "
                                                  "with fewer it keeps the global model")
    poll_interval: float = Field(0.1, gt=0.0, description="seconds between the server's "
                                                          "checks for client replies")
    join_timeout: float = Field(300.0, gt=0.0, description="seconds to wait for min_clients to "
                                                           "connect before the run gives up")
    quarantine: float = Field(60.0, ge=0.0, description="seconds a client that failed or "
                              "missed the deadline is not sampled (simulated seconds when "
                              "the simulation has slow, offline or dropping clients)")


class PrivacySettings(Section):
    """Differential privacy and secure aggregation."""

    dp_clip_norm: float | None = Field(None, gt=0.0, description="differential privacy: "
                                       "clients clip their update to this L2 norm C; a round "
                                       "then takes exactly max(fraction·clients, min_clients) "
                                       "clients, averaged with equal weights")
    dp_noise_multiplier: float = Field(0.0, ge=0.0, description="differential privacy: the "
                                       "server adds Gaussian noise σ·C/m to the mean of the m "
                                       "clipped updates (0: clipping only, no privacy)")
    dp_delta: float = Field(1e-5, gt=0.0, lt=1.0, description="differential privacy: the δ "
                                                             "at which ε is reported")
    secagg: bool = Field(False, description="secure aggregation (Flower's SecAgg+): the "
                         "server sees only the weighted sum of the clients' weights, never "
                         "one client's (fedavg, fedprox)")
    secagg_num_shares: int = Field(3, ge=3, description="SecAgg+: clients (itself included) "
                                   "among which each client's secrets are shared")
    secagg_threshold: int = Field(2, ge=2, description="SecAgg+: shares needed to rebuild a "
                                  "secret; higher is more private, lower survives more "
                                  "dropouts (< secagg_num_shares, ≤ min_clients)")
    secagg_clipping_range: float = Field(8.0, gt=0.0, description="SecAgg+: every weight × "
                                         "samples / secagg_max_weight must lie within ± this")
    secagg_quantization_range: int = Field(2**22, ge=2, lt=2**32, description="SecAgg+: "
                                           "integer levels a weight is rounded to (error ≤ 2 "
                                           "× clipping range / levels); clients per round × "
                                           "levels must stay below 2**32")
    secagg_max_weight: float = Field(1000.0, gt=0.0, description="SecAgg+: the most training "
                                     "samples a client may have (its FedAvg weight)")


class SimulationSettings(Section):
    """Only `fedge simulate`: its data, its simulated clients and devices, and
    where they run."""

    dataset: str | None = Field(None, description="digits | breast_cancer | synthetic-sensor "
                                "| synthetic-text (default: digits, unless you give your "
                                "own data)")
    data: str | None = Field(None, description="simulation: your labelled samples (CSV, NPZ "
                             "or image folder), split among clients by --partition")
    client_data: str | None = Field(None, description="simulation: a folder of one data "
                                    "file or image folder per client (a natural federation)")
    val_data: str | None = Field(None, description="simulation: the server's validation "
                                 "samples (default: val_share of the data)")
    test_data: str | None = Field(None, description="simulation: the test samples "
                                  "(default: test_share of the data)")
    val_share: float = Field(0.15, gt=0.0, lt=1.0, description="simulation: share of the "
                             "data (stratified) held out for the server's validation")
    test_share: float = Field(0.15, gt=0.0, lt=1.0, description="simulation: share of the "
                              "data (stratified) held out for testing")
    partition: str = Field("dirichlet:0.5", description="iid | dirichlet:ALPHA | shards:K | "
                                                    "column:NAME (one client per value of a "
                                                    "CSV column, e.g. a device id)")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of a client's samples "
                                                                 "held out for early stopping")
    byzantine: float = Field(0.0, ge=0.0, lt=1.0, description="simulation: share of clients "
                             "that attack in every round (chosen by the seed)")
    attack: str | None = Field(None, description="simulation: signflip | scale | nan | "
                                                 "labelflip (needs --byzantine)")
    attack_scale: float = Field(100.0, gt=0.0, description="simulation: attack strength s: "
                                "signflip sends w − s·Δ, scale w + s·Δ")
    offline_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="simulation: chance a "
                                    "client is offline for a round (not sampled); at least "
                                    "min_clients stay online")
    drop_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="simulation: chance a "
                                 "sampled client drops out mid-round (counted as a failure)")
    slow_fraction: float = Field(0.0, ge=0.0, le=1.0, description="simulation: share of "
                                 "clients (chosen by the seed) that train `slowdown` times "
                                 "slower")
    slowdown: float = Field(10.0, ge=1.0, description="simulation: how many times slower a "
                            "slow client trains")
    samples_per_second: float = Field(100.0, gt=0.0, description="simulation: a client's "
                                      "training speed on the simulated clock; a round takes "
                                      "it epochs × samples / this seconds (× slowdown)")
    device: str = Field("auto", description="auto | cpu | cuda | mps (auto: CUDA, then MPS, "
                                            "then CPU)")
    backend: Literal["inprocess", "ray"] = Field("inprocess", description="inprocess | ray")
    workers: int | None = Field(None, description="in-process simulation: worker processes "
                                "that train a round's clients in parallel (default: the "
                                "machine's cores, at most the clients per round; 1: train in "
                                "this process); the Ray backend ignores it")
    vectorize: bool = Field(False, description="in-process simulation: train a round's "
                            "clients together as one batched computation (torch.func.vmap) "
                            "in this process; a model vmap cannot batch (BatchNorm) trains "
                            "in workers, with a warning")
    ray_address: str | None = Field(None, description="backend ray: HOST:PORT of a running "
                                    "Ray cluster's head (`ray start --head`) to run the "
                                    "clients on (default: a local Ray of this machine's "
                                    "cores, started for the run)")
    client_cpus: float = Field(1.0, gt=0.0, description="backend ray: CPUs each simulated "
                               "client reserves while it trains (fractions, e.g. 0.5, on a "
                               "local Ray; whole CPUs on a cluster)")
    client_gpus: float = Field(0.0, ge=0.0, description="backend ray: GPUs each simulated "
                               "client reserves (fractions share one, e.g. 0.25; needs CUDA)")


class DeviceSettings(Section):
    """Devices without Python, which train behind `fedge gateway`."""

    edge_programs: bool = Field(False, description="export ExecuTorch training programs "
                                "for devices without Python, which train behind `fedge "
                                "gateway` (needs pip install 'fedge[edge]')")


TRACKERS = ("mlflow", "tensorboard")


class TrackingSettings(Section):
    """Where a run's metrics go as it runs, besides its run folder."""

    track: list[str] = Field([], description="mlflow[:URI] (default: ./mlruns beside the "
                             "run folder) | tensorboard[:DIR] (default: tensorboard/ in the "
                             "run folder): log every round's metrics there as the run goes")
    track_timeout: float = Field(30.0, ge=0.0, description="seconds a run that has ended "
                                 "waits for a tracker it cannot reach before saying what the "
                                 "tracker lacks")

    @field_validator("track", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("track")
    @classmethod
    def _known_trackers(cls, targets: list[str]) -> list[str]:
        for target in targets:
            kind, _, where = target.partition(":")
            if kind not in TRACKERS:
                raise ValueError(f"{target!r} is no tracker: mlflow[:URI] or "
                                 "tensorboard[:DIR]")
            if _ and not where:
                raise ValueError(f"{target!r} names no place after the colon")
        return targets


SECTIONS: dict[str, type[Section]] = {
    "data": DataSettings, "task": TaskSettings, "model": ModelSettings,
    "training": TrainingSettings,
    "strategy": StrategySettings, "privacy": PrivacySettings,
    "simulation": SimulationSettings, "devices": DeviceSettings,
    "tracking": TrackingSettings,
}
TOP_LEVEL = ("seed",)  # settings of the whole run, outside every table
Command = Literal["simulate", "server"]
# The sections a command reads; a run.toml can serve both, each reading its own tables.
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "simulate": ("data", "task", "model", "training", "strategy", "privacy", "simulation",
                 "tracking"),
    "server": ("data", "task", "model", "training", "strategy", "privacy", "devices",
               "tracking"),
}
SECTION_READERS = {
    "simulation": "only fedge simulate does, from its options or the file's [simulation] table",
    "devices": "only fedge server does, for devices behind fedge gateway",
}


def setting_name(section: str, field: str) -> str:
    """A setting's one name, on the command line, in the API and in a flat file: its field's,
    except that a section's ``name`` is spelt as the section (``--model``, ``--strategy``)."""
    return section if field == "name" else field


@cache
def settings_index() -> dict[str, tuple[str, str]]:
    """Every setting's name → (its section, its field)."""
    return {setting_name(section, field): (section, field)
            for section, settings in SECTIONS.items() for field in settings.model_fields}


def default(name: str) -> Any:
    """A setting's default, for the places outside a run's configuration that take the
    same setting (``fedge client --val-fraction``), so that it is written once."""
    section, field = settings_index()[name]
    return SECTIONS[section].model_fields[field].default


def _is_table(key: str, value: object) -> bool:
    return key in SECTIONS and isinstance(value, dict | Section)


def _place(values: dict[str, object], name: str, value: object) -> None:
    """Put a setting given by name into its table in ``values`` (a name that is no setting
    stays where it is, to be refused by name)."""
    if name not in settings_index():
        values[name] = value
        return
    section, field = settings_index()[name]
    table = values.get(section, {})
    if isinstance(table, Section):
        table = table.model_dump(exclude_unset=True)
    values[section] = {**table, field: value}


class RunConfig(BaseModel):
    """Everything that defines a federated run, one section per concern; metrics.json and
    checkpoints keep it by setting name (:meth:`flat`), as they did before sections."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed (0 to 2³²−1): the "
                      "same seed gives the same run")
    data: DataSettings = Field(default_factory=DataSettings)
    task: TaskSettings = Field(default_factory=TaskSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    strategy: StrategySettings = Field(default_factory=StrategySettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    simulation: SimulationSettings = Field(default_factory=SimulationSettings)
    devices: DeviceSettings = Field(default_factory=DeviceSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)

    @model_validator(mode="before")
    @classmethod
    def _settings_by_name(cls, values: object) -> object:
        """Settings given by name (``lr=0.01``, as the API and the flat files of earlier
        fedge give them) join their section."""
        if not isinstance(values, dict):
            return values
        _refuse_booleans_for_numbers(cls, {k: values[k] for k in TOP_LEVEL if k in values})
        grouped = {key: value for key, value in values.items()
                   if key in TOP_LEVEL or _is_table(key, value)}
        named = {key: value for key, value in values.items() if key not in grouped}
        for key, value in named.items():
            _place(grouped, key, value)
        return grouped

    def flat(self) -> dict[str, object]:
        """Every setting by its name: ``{"lr": 0.003, "rounds": 20, ...}``."""
        values: dict[str, object] = {name: getattr(self, name) for name in TOP_LEVEL}
        for name, (section, field) in settings_index().items():
            values[name] = getattr(getattr(self, section), field)
        return values

    def updated(self, **settings: object) -> "RunConfig":
        """A copy with these settings (by name) changed, validated as a file's are."""
        values = self.model_dump(exclude_unset=True)
        for name, value in settings.items():
            _place(values, name, value)
        return RunConfig(**values)


def flat_settings(config: Mapping[str, object]) -> dict[str, object]:
    """A stored configuration (tables, or the flat one of runs before fedge had tables) by
    setting name."""
    values: dict[str, object] = {}
    for key, value in config.items():
        if _is_table(key, value):
            values.update({setting_name(key, field): entry
                           for field, entry in dict(value).items()})
        else:
            values[key] = value
    return values


DEFAULT_DATASET = "digits"
# Choices that the command line and the Python API both take, defined once.
Quantize = Literal["int8", "int8-dynamic"]  # fedge export --quantize
PredictOutput = Literal["names", "ids", "probabilities"]  # fedge.predict(output=)


def check_choice(value: object, choices: object, name: str) -> None:
    """``value`` is one of the ``Literal`` type ``choices``, or a :class:`FedgeError` names
    them: the check click makes on the command line, for the Python API."""
    allowed = get_args(choices)
    if not (isinstance(value, str) and value in allowed):
        raise FedgeError(f"{name} must be one of {', '.join(map(repr, allowed))}, not "
                         f"{value!r}")


def check_flag(value: object, name: str) -> None:
    """A yes-or-no setting is True or False: ``overwrite="no"`` would otherwise be true."""
    if not isinstance(value, bool):
        raise FedgeError(f"{name} must be True or False, not {value!r}")


def step_name(strategy: StrategySettings | str) -> str:
    """What one server step is called: a round, or a model version (fedbuff, no rounds);
    ``strategy``: its settings or its name."""
    name = strategy if isinstance(strategy, str) else strategy.name
    return "version" if name == "fedbuff" else "round"


def default_server_lr(strategy: str) -> float:
    """η_g 1.0 for fedbuff (with fresh updates, the buffer's mean); FedAdam's 0.1, as in
    Flower, for every other strategy."""
    return 1.0 if strategy == "fedbuff" else 0.1


def server_learning_rate(strategy: StrategySettings) -> float:
    """``server_lr``, or the strategy's default when it is not set."""
    if strategy.server_lr is not None:
        return strategy.server_lr
    return default_server_lr(strategy.name)


def load_config(path: Path | None = None, command: Command | None = None,
                **overrides: object) -> RunConfig:
    """Defaults, then the TOML file at ``path`` (if any), then the non-None ``overrides``
    (settings by name). A ``command`` reads only its sections: the file's other tables
    are not its own, and a setting of theirs given by name is refused."""
    sections = COMMAND_SECTIONS[command] if command else tuple(SECTIONS)
    values = _read_toml(path, sections, command) if path is not None else {}
    for name, value in overrides.items():
        if value is None:
            continue
        if name in settings_index():
            _check_taken(name, settings_index()[name][0], sections, command)
        _place(values, name, value)
    try:
        return RunConfig(**values)
    except ValidationError as error:
        raise FedgeError(f"invalid configuration: {validation_problems(error, _named)}"
                         ) from error


def _check_taken(name: str, section: str, sections: tuple[str, ...],
                 command: Command | None) -> None:
    if section not in sections:
        raise FedgeError(f"{name} is a setting of [{section}], which fedge {command} does "
                         f"not take; {SECTION_READERS[section]}")


def _named(location: tuple) -> str:
    """An error's place by the setting's name (``lr``), not its path (``training.lr``)."""
    if len(location) == 2 and settings_index().get(setting_name(*location)) == location:
        return setting_name(*location)
    return ".".join(map(str, location))


def _read_toml(path: Path, sections: tuple[str, ...], command: Command | None
               ) -> dict[str, dict[str, object] | object]:
    """The file's settings as RunConfig's tables, of ``sections`` only; a flat file (earlier
    fedge) is read too, with one line saying how to write it now."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise FedgeError(f"cannot read config file {path}: {error.strerror}") from error
    except UnicodeDecodeError:
        raise FedgeError(f"config file {path} is not UTF-8 text, as TOML must be") from None
    try:
        entries = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise FedgeError(f"config file {path} is not valid TOML: {error}") from error
    values: dict[str, object] = {}
    flat: dict[str, list[str]] = {}
    for key, value in entries.items():
        if _is_table(key, value):
            if key in sections:  # one file serves both commands: [simulation] is not the server's
                values[key] = _table(path, key, value)
        elif _underscored(key) in settings_index():
            section, field = settings_index()[_underscored(key)]
            _check_taken(key, section, sections, command)
            flat.setdefault(section, []).append(key)
            values.setdefault(section, {})[field] = value
        else:
            values[_underscored(key)] = value
    _check_spelt_once(path, entries)
    if flat:
        tables = "; ".join(f"[{section}] {', '.join(keys)}" for section, keys in flat.items())
        log.warning("config file %s: settings outside tables are read as before; write "
                    "them now in their tables: %s", path, tables)
    return values


def _table(path: Path, section: str, table: dict) -> dict[str, object]:
    """A table's entries by field (``[model] name`` or ``model``); a setting in another
    concern's table is refused, naming its own."""
    _check_spelt_once(path, table)
    fields: dict[str, object] = {}
    for key, value in table.items():
        name = _underscored(key)
        home = settings_index().get(name)
        if name in SECTIONS[section].model_fields or home is None:
            fields[name] = value  # an unknown key is refused by name when validated
        elif home[0] == section:
            fields[home[1]] = value
        else:
            raise FedgeError(f"config file {path}: {key} belongs in [{home[0]}], not "
                             f"[{section}]")
    return fields


def _underscored(key: str) -> str:
    return key.replace("-", "_")


def _check_spelt_once(path: Path, entries: dict) -> None:
    twice = sorted({k for k in entries if _underscored(k) != k and _underscored(k) in entries})
    if twice:
        raise FedgeError(f"config file {path} sets {twice[0]} twice (spelt with - and _)")
