"""A run's configuration: defaults, then a TOML file, then the command line's options."""

import json

import pytest

from fedge.config import (
    PredictOutput,
    RunConfig,
    check_choice,
    default_server_lr,
    load_config,
    server_learning_rate,
)
from fedge.errors import FedgeError


def test_the_file_overrides_the_defaults_and_the_options_override_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 7\nlocal-epochs = 2\nstrategy = "fedprox"\n')
    config = load_config(path, local_epochs=3, lr=None)
    assert (config.rounds, config.local_epochs, config.strategy) == (7, 3, "fedprox")
    assert config.lr == RunConfig().lr  # an option not given (None) leaves the value


def test_a_key_spelt_with_a_dash_and_an_underscore_is_refused(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("local-epochs = 2\nlocal_epochs = 3\n")
    with pytest.raises(FedgeError, match="sets local-epochs twice"):
        load_config(path)


@pytest.mark.parametrize("text, message", [
    ("rounds = true\n", "rounds: expected a number, not true"),
    ("roundz = 3\n", "roundz"),
    ("rounds = 0\n", "rounds"),
    ("lr = inf\n", "lr"),
    ("rounds = \n", "is not valid TOML"),
])
def test_a_bad_file_is_one_error_naming_the_setting(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(FedgeError, match=message) as error:
        load_config(path)
    assert "\n" not in str(error.value).strip()


def test_a_file_that_is_not_utf8_or_missing_is_named(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(b"rounds = 3 \xff\n")
    with pytest.raises(FedgeError, match="is not UTF-8 text"):
        load_config(path)
    with pytest.raises(FedgeError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


def test_every_default_is_strict_json_as_metrics_json_keeps_it():
    dumped = json.dumps(RunConfig().model_dump(), allow_nan=False)
    assert json.loads(dumped)["rounds"] == RunConfig().rounds


def test_the_server_learning_rate_defaults_per_strategy():
    assert server_learning_rate(RunConfig(strategy="fedadam")) == default_server_lr("fedadam")
    assert server_learning_rate(RunConfig(strategy="fedbuff")) == 1.0
    assert server_learning_rate(RunConfig(strategy="fedbuff", server_lr=0.3)) == 0.3


def test_a_choice_outside_its_literal_names_the_allowed_ones():
    check_choice("ids", PredictOutput, "output")
    with pytest.raises(FedgeError, match="output must be one of 'names', 'ids', "
                                         "'probabilities', not 'bogus'"):
        check_choice("bogus", PredictOutput, "output")
