"""One run's configuration: defaults, a TOML file, and command-line overrides."""

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedge.errors import FedgeError


class RunConfig(BaseModel):
    """Everything that defines a federated run; stored in metrics.json and checkpoints."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dataset: str = "digits"
    model: str | None = Field(None, description="network; default: the data set's own")
    clients: int = Field(10, ge=1)
    rounds: int = Field(20, ge=1)
    fraction: float = Field(1.0, gt=0.0, le=1.0, description="clients sampled per round")
    min_clients: int = Field(2, ge=1, description="minimum clients per round")
    strategy: str = "fedavg"
    partition: str = "dirichlet:0.5"
    local_epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.003, gt=0.0)
    optimizer: Literal["adam", "sgd"] = "adam"
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    patience: int = Field(3, ge=1, description="rounds without val-loss improvement")
    min_delta: float = Field(0.0, ge=0.0, description="smallest val-loss drop that counts")
    local_patience: int = Field(2, ge=1, description="local epochs without improvement")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="client's local validation")
    proximal_mu: float = Field(0.01, ge=0.0, description="FedProx proximal weight")
    server_lr: float = Field(0.01, gt=0.0, description="FedAdam server learning rate")
    round_timeout: float = Field(600.0, gt=0.0, description="seconds to wait for replies")
    seed: int = 0
    backend: Literal["inprocess", "ray"] = "inprocess"
    device: str = "auto"


def load_config(path: Path | None = None, **overrides: object) -> RunConfig:
    """Defaults, then the TOML file at ``path`` (if any), then non-None ``overrides``."""
    values: dict[str, object] = {}
    if path is not None:
        try:
            text = path.read_text()
        except OSError as error:
            raise FedgeError(f"cannot read config file {path}: {error.strerror}") from error
        try:
            values = {k.replace("-", "_"): v for k, v in tomllib.loads(text).items()}
        except tomllib.TOMLDecodeError as error:
            raise FedgeError(f"config file {path} is not valid TOML: {error}") from error
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig(**values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise FedgeError(f"invalid configuration: {problems}") from error
