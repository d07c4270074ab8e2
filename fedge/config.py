"""One run's configuration: defaults, a TOML file, and command-line overrides."""

import tomllib
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedge.errors import FedgeError, validation_problems


class RunConfig(BaseModel):
    """Everything that defines a federated run; stored in metrics.json and checkpoints."""

    # Infinity is no setting: an infinite learning rate or timeout is a typo, and JSON
    # (metrics.json keeps the config) cannot even write it down.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    dataset: str | None = Field(None, description="digits | breast_cancer | synthetic-sensor "
                                "| synthetic-text (default: digits, unless you give your "
                                "own data)")
    model: str | None = Field(None, description="cnn | mlp | sensor1d | tinytext, or your "
                              "own: FILE.py:NAME or package.module:NAME (default: the data "
                              "set's own)")
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
    data: str | None = Field(None, description="simulation: your labelled samples (CSV, NPZ "
                             "or image folder), split among clients by --partition")
    client_data: str | None = Field(None, description="simulation: a folder of one data "
                                    "file or image folder per client (a natural federation)")
    val_data: str | None = Field(None, description="simulation: the server's validation "
                                 "samples (default: val_share of the data)")
    test_data: str | None = Field(None, description="simulation: the test samples "
                                  "(default: test_share of the data)")
    label_column: str = Field("label", description="CSV column holding the label")
    val_share: float = Field(0.15, gt=0.0, lt=1.0, description="simulation: share of the "
                             "data (stratified) held out for the server's validation")
    test_share: float = Field(0.15, gt=0.0, lt=1.0, description="simulation: share of the "
                              "data (stratified) held out for testing")
    input_shape: tuple[int, ...] | None = Field(None, description="shape of one sample, e.g. "
                                                "[1, 8, 8] for flat CSV rows of 8×8 images")
    num_classes: int | None = Field(None, ge=2, description="default: largest label + 1")
    clients: int = Field(10, ge=1, description="simulated clients")
    rounds: int = Field(20, ge=1, description="maximum rounds (fedbuff: model versions)")
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="fraction of clients per round")
    min_clients: int = Field(2, ge=1, description="minimum clients per round")
    strategy: str = Field("fedavg", description="fedavg | fedprox | fedadam | fedmedian | "
                                                "fedtrimmedavg | krum | multikrum | fedbuff "
                                                "(asynchronous, no round barrier)")
    partition: str = Field("dirichlet:0.5", description="iid | dirichlet:ALPHA | shards:K | "
                                                    "column:NAME (one client per value of a "
                                                    "CSV column, e.g. a device id)")
    local_epochs: int = Field(5, ge=1, description="local epoch budget per round")
    batch_size: int = Field(32, ge=1, description="local mini-batch size")
    lr: float = Field(0.003, gt=0.0, description="client learning rate")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="client optimizer: adam | sgd")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout rate")
    patience: int = Field(3, ge=1, description="rounds without validation-loss improvement "
                                               "before the run stops")
    min_delta: float = Field(0.0, ge=0.0, description="smallest validation-loss drop that "
                                                      "counts as improvement")
    local_patience: int = Field(2, ge=1, description="local epochs without improvement "
                                                     "before a client stops")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of a client's samples "
                                                                 "held out for early stopping")
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
    byzantine: float = Field(0.0, ge=0.0, lt=1.0, description="simulation: share of clients "
                             "that attack in every round (chosen by the seed)")
    attack: str | None = Field(None, description="simulation: signflip | scale | nan | "
                                                 "labelflip (needs --byzantine)")
    attack_scale: float = Field(100.0, gt=0.0, description="simulation: attack strength s: "
                                "signflip sends w − s·Δ, scale w + s·Δ")
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
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed (0 to 2³²−1): the "
                      "same seed gives the same run")
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
    device: str = Field("auto", description="auto | cpu | cuda | mps (auto: CUDA, then MPS, "
                                            "then CPU)")
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
    edge_programs: bool = Field(False, description="export ExecuTorch training programs "
                                "for devices without Python, which train behind `fedge "
                                "gateway` (needs pip install 'fedge[edge]')")
    compress: Literal["none", "fp16", "int8"] = Field("none", description="none | fp16 | "
                                                      "int8: clients send their update "
                                                      "w_local − w quantized (int8: one "
                                                      "scale per array)")

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, values: object) -> object:
        """TOML's ``rounds = true`` would otherwise be one round."""
        if isinstance(values, dict):
            for key, value in values.items():
                field = cls.model_fields.get(key)
                if (isinstance(value, bool) and field
                        and bool not in (field.annotation, *get_args(field.annotation))):
                    raise ValueError(f"{key}: expected a number, not {str(value).lower()}")
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


def step_name(config: RunConfig) -> str:
    """What one server step is called: a round, or a model version (fedbuff, no rounds)."""
    return "version" if config.strategy == "fedbuff" else "round"


def default_server_lr(strategy: str) -> float:
    """η_g 1.0 for fedbuff (with fresh updates, the buffer's mean); FedAdam's 0.1, as in
    Flower, for every other strategy."""
    return 1.0 if strategy == "fedbuff" else 0.1


def server_learning_rate(config: RunConfig) -> float:
    """``server_lr``, or the strategy's default when it is not set."""
    if config.server_lr is not None:
        return config.server_lr
    return default_server_lr(config.strategy)


def load_config(path: Path | None = None, **overrides: object) -> RunConfig:
    """Defaults, then the TOML file at ``path`` (if any), then non-None ``overrides``."""
    values: dict[str, object] = {}
    if path is not None:
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
        values = {k.replace("-", "_"): v for k, v in entries.items()}
        if len(values) < len(entries):
            twice = sorted({k for k in entries if k.replace("-", "_") != k
                            and k.replace("-", "_") in entries})
            raise FedgeError(f"config file {path} sets {twice[0]} twice (spelt with - and _)")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**values)
    except ValidationError as error:
        raise FedgeError(f"invalid configuration: {validation_problems(error)}") from error
