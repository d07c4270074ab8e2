"""One definition per setting: the options of `fedge simulate` and `fedge server` come
from fedge.config's sections, and a command refuses what it does not take."""

import click
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from fedge.cli import app
from fedge.config import COMMAND_SECTIONS, TOP_LEVEL, settings_index


def options_of(command: str) -> set[str]:
    params = get_command(app).commands[command].params
    return {name.removeprefix("--") for p in params if isinstance(p, click.Option)
            for name in p.opts}


@pytest.mark.parametrize("command", sorted(COMMAND_SECTIONS))
def test_every_setting_of_a_commands_sections_is_its_option(command):
    taken = {name for name, (section, _) in settings_index().items()
             if section in COMMAND_SECTIONS[command]} | set(TOP_LEVEL)
    assert {name.replace("_", "-") for name in taken} <= options_of(command)


def test_the_server_takes_every_training_and_strategy_setting_simulate_does():
    shared = {name.replace("_", "-") for name, (section, _) in settings_index().items()
              if section in ("training", "strategy")}
    assert {"rounds", "lr", "local-epochs", "min-clients"} <= shared
    assert shared <= options_of("server") and shared <= options_of("simulate")


@pytest.mark.parametrize("command, option, value, taker", [
    ("server", "--attack", "signflip", "fedge simulate does"),
    ("server", "--partition", "iid", "fedge simulate does"),
    ("simulate", "--edge-programs", None, "fedge server does"),
])
def test_a_setting_the_command_does_not_take_is_one_error_naming_who_does(
        command, option, value, taker):
    args = [command, option] + ([value] if value else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"{option} is a setting of [" in lines[0] and taker in lines[0]


def test_the_servers_training_options_are_checked_before_anything_starts(tmp_path):
    result = CliRunner().invoke(app, ["server", "--insecure", "--val-data",
                                      str(tmp_path / "val.csv"), "--lr", "0",
                                      "--rounds", "0", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "lr: Input should be greater than 0" in result.output
    assert "rounds: Input should be greater than or equal to 1" in result.output
    assert not (tmp_path / "run").exists()


def test_help_groups_the_options_by_section():
    result = CliRunner().invoke(app, ["server", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for title in ("Local training (sent to clients)", "Strategy and rounds", "Privacy",
                  "Devices without Python"):
        assert title in result.output
    assert "Simulation" not in result.output
