"""A run's configuration: defaults, then a TOML file, then the command line's options."""

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedge.config import (
    SECTIONS,
    PredictOutput,
    RunConfig,
    TrainingSettings,
    check_choice,
    default_server_lr,
    flat_settings,
    load_config,
    server_learning_rate,
    setting_name,
    settings_index,
)
from fedge.errors import FedgeError
from fedge.protocol import training_key


def test_the_file_overrides_the_defaults_and_the_options_override_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 7\nlocal-epochs = 2\nstrategy = "fedprox"\n')
    config = load_config(path, local_epochs=3, lr=None)
    assert (config.strategy.rounds, config.training.local_epochs) == (7, 3)
    assert config.strategy.name == "fedprox"
    assert config.training.lr == RunConfig().training.lr  # an option not given leaves it


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
    dumped = json.dumps(RunConfig().flat(), allow_nan=False)
    assert json.loads(dumped)["rounds"] == RunConfig().strategy.rounds


def test_the_server_learning_rate_defaults_per_strategy():
    def rate(**settings):
        return server_learning_rate(RunConfig(**settings).strategy)

    assert rate(strategy="fedadam") == default_server_lr("fedadam") == 0.1
    assert rate(strategy="fedbuff") == 1.0
    assert rate(strategy="fedbuff", server_lr=0.3) == 0.3


def test_a_choice_outside_its_literal_names_the_allowed_ones():
    check_choice("ids", PredictOutput, "output")
    with pytest.raises(FedgeError, match="output must be one of 'names', 'ids', "
                                         "'probabilities', not 'bogus'"):
        check_choice("bogus", PredictOutput, "output")


# Configuration by concern: tables, one name per setting, each command its sections.

def test_a_file_of_tables_sets_each_concern(tmp_path, caplog):
    path = tmp_path / "run.toml"
    path.write_text('seed = 7\n[model]\nname = "mlp"\nfreeze = ["features.*"]\n'
                    '[training]\nlocal-epochs = 2\nlr = 0.01\n[strategy]\nname = "fedprox"\n'
                    'rounds = 4\nclients = 3\n[simulation]\npartition = "iid"\n')
    config = load_config(path)
    assert (config.seed, config.model.name, config.model.freeze) == (7, "mlp", ["features.*"])
    assert (config.training.local_epochs, config.training.lr) == (2, 0.01)
    assert (config.strategy.name, config.strategy.rounds) == ("fedprox", 4)
    assert config.strategy.clients == 3 and config.simulation.partition == "iid"
    assert not caplog.records  # tables: nothing to say


def test_a_flat_file_of_earlier_fedge_loads_with_one_line_naming_the_tables(tmp_path, caplog):
    path = tmp_path / "run.toml"
    path.write_text('model = "mlp"\nrounds = 4\nlocal-epochs = 2\nclients = 3\n'
                    'partition = "iid"\n')
    config = load_config(path)
    assert (config.model.name, config.strategy.rounds) == ("mlp", 4)
    assert (config.training.local_epochs, config.strategy.clients) == (2, 3)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "[model] model" in line and "[strategy] rounds, clients" in line
    assert "[training] local-epochs" in line and "[simulation] partition" in line


def test_a_setting_in_another_concerns_table_is_refused_naming_its_own(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[training]\nrounds = 4\n")
    with pytest.raises(FedgeError, match=r"rounds belongs in \[strategy\], not \[training\]"):
        load_config(path)


def test_an_error_names_the_setting_as_the_user_spells_it(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[training]\nlr = -1\n[strategy]\nname = 3\n")
    with pytest.raises(FedgeError) as error:
        load_config(path)
    assert "lr: Input should be greater than 0" in str(error.value)
    assert "strategy: Input should be a valid string" in str(error.value)


def test_the_server_reads_its_sections_and_leaves_the_simulations_table(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[strategy]\nrounds = 4\n[simulation]\nattack = "signflip"\n')
    config = load_config(path, "server")
    assert config.strategy.rounds == 4 and config.simulation.attack is None
    with pytest.raises(FedgeError, match=r"attack is a setting of \[simulation\], which "
                                         "fedge server does not take"):
        load_config(None, "server", attack="signflip")
    path.write_text('attack = "signflip"\n')  # flat: no table says whose it is
    with pytest.raises(FedgeError, match="attack is a setting of"):
        load_config(path, "server")
    with pytest.raises(FedgeError, match="edge_programs is a setting of"):
        load_config(None, "simulate", edge_programs=True)


def test_settings_by_name_join_their_section_and_come_back_by_name():
    config = RunConfig(lr=0.1, model="cnn", strategy="krum", clients=4, seed=3)
    assert config.training.lr == 0.1 and config.model.name == "cnn"
    assert config.strategy.name == "krum" and config.strategy.clients == 4
    flat = config.flat()
    assert {k: flat[k] for k in ("lr", "model", "strategy", "clients", "seed")} == {
        "lr": 0.1, "model": "cnn", "strategy": "krum", "clients": 4, "seed": 3}
    assert RunConfig(**flat) == config  # metrics.json and checkpoints keep it by name
    assert RunConfig(**config.model_dump()) == config


def test_every_setting_has_one_name_across_the_sections():
    names = [setting_name(section, field)
             for section, settings in SECTIONS.items() for field in settings.model_fields]
    assert len(names) == len(set(names)) == len(settings_index())
    assert "seed" not in names  # the run's own, outside every table


def test_a_checkpoints_stored_configuration_of_either_layout_reads_by_name():
    tables = RunConfig(lr=0.1, rounds=3).model_dump()
    assert flat_settings(tables)["lr"] == 0.1 and flat_settings(tables)["rounds"] == 3
    assert flat_settings({"lr": 0.2, "strategy": "fedavg"}) == {"lr": 0.2, "strategy": "fedavg"}


def test_updated_changes_settings_by_name_and_keeps_what_was_given():
    config = RunConfig(partition="iid", strategy="fedprox").updated(strategy="fedavg", rounds=2)
    assert (config.strategy.name, config.strategy.rounds) == ("fedavg", 2)
    assert "partition" in config.simulation.model_fields_set
    with pytest.raises(ValidationError):
        config.updated(rounds=0)


def test_the_training_section_travels_in_the_train_config_by_name():
    training = TrainingSettings(local_epochs=2, lr=0.01, compress="int8")
    sent = training.as_config()
    assert sent["local-epochs"] == 2 and sent["lr"] == 0.01 and sent["compress"] == "int8"
    assert set(sent) == {training_key(name) for name in TrainingSettings.model_fields}
    assert TrainingSettings.from_config(sent) == training
    # no compression is said by saying nothing, as earlier clients expect
    assert "compress" not in TrainingSettings().as_config()
    assert TrainingSettings.from_config(TrainingSettings().as_config()) == TrainingSettings()
    assert TrainingSettings.from_config({}) == TrainingSettings()  # an earlier server
    with pytest.raises(FedgeError, match="local_epochs"):
        TrainingSettings.from_config({"local-epochs": 0})


def test_an_input_shape_is_a_list_in_toml_and_text_on_the_command_line():
    assert RunConfig(input_shape="1,8,8").data.input_shape == (1, 8, 8)
    assert RunConfig(input_shape=[1, 8, 8]).data.input_shape == (1, 8, 8)
    with pytest.raises(ValidationError, match="expected sizes such as 1,8,8"):
        RunConfig(input_shape="one")


def documented_toml_files() -> list:
    root, found = Path(__file__).resolve().parents[2], []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for block in re.findall(r"```toml\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            found.append(pytest.param(block, id=f"{page.name}:{block.splitlines()[0][:40]}"))
    return found


@pytest.mark.parametrize("text", documented_toml_files())
def test_every_documented_run_toml_loads_as_written(tmp_path, caplog, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    commands = [c for c in ("simulate", "server") if f"fedge {c}" in text.splitlines()[0]]
    for command in commands or ["simulate"]:
        load_config(path, command)
    assert not caplog.records  # written in tables, as fedge now reads them


def test_the_seed_is_a_number_too(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("seed = true\n")
    with pytest.raises(FedgeError, match="seed: expected a number, not true"):
        load_config(path)


def test_a_sections_name_given_after_its_settings_still_names_it():
    # `strategy="krum"` after `clients=`, a setting of the same section, as a dict keeps them
    config = RunConfig(clients=4, rounds=3, strategy="krum", model="mlp", dropout=0.1)
    assert (config.strategy.name, config.strategy.clients) == ("krum", 4)
    assert (config.model.name, config.model.dropout) == ("mlp", 0.1)
    assert load_config(None, clients=4, strategy="fedprox").strategy.name == "fedprox"
