"""The `params` and `models` commands through typer's CliRunner, and the error boundary: bad input is
one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

from moeplan import sources
from moeplan.cli import app

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()
MIXTRAL_TOTAL = 46_702_792_704


def mixtral_config() -> dict[str, Any]:
    card = sources.find_card("mixtral-8x7b")
    assert card is not None
    return dict(card.data["config"])


def assert_bad_input(result: Result, *needles: str) -> str:
    """Exit 2, nothing on stdout, exactly one line on stderr that starts with 'error:'."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: ")
    for needle in needles:
        assert needle in line, line
    return line


# ------------------------------------------------------------------------------------------------
# params
# ------------------------------------------------------------------------------------------------


def test_params_json_keys_and_values() -> None:
    result = runner.invoke(app, ["params", "mixtral-8x7b", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("total_params", "active_params", "active_params_excl_input_embedding", "mtp_params", "components"):
        assert key in data
    assert data["total_params"] == MIXTRAL_TOTAL
    assert data["active_params"] == 12_879_925_248
    assert data["active_params_excl_input_embedding"] == 12_748_853_248
    assert data["mtp_params"] == 0
    assert data["components"], "components must not be empty"
    for comp in data["components"]:
        assert set(comp) == {"name", "total", "active"}
    assert sum(c["total"] for c in data["components"]) == MIXTRAL_TOTAL
    assert result.stderr == ""


def test_params_json_reports_mtp() -> None:
    result = runner.invoke(app, ["params", "deepseek-v3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["total_params"] + data["mtp_params_stored"] == 684_489_845_504


def test_params_table_shows_exact_total() -> None:
    result = runner.invoke(app, ["params", "mixtral-8x7b"])
    assert result.exit_code == 0, result.output
    assert "46,702,792,704" in result.stdout
    assert "46.70B" in result.stdout
    assert "routed_experts" in result.stdout


@pytest.mark.parametrize("name", ["mistralai/Mixtral-8x7B-v0.1", "MIXTRAL-8X7B", "mixtral-8x7b-instruct"])
def test_params_by_hub_id_and_alias(name: str) -> None:
    result = runner.invoke(app, ["params", name, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total_params"] == MIXTRAL_TOTAL


def test_params_config_json_path(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(mixtral_config()))
    result = runner.invoke(app, ["params", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total_params"] == MIXTRAL_TOTAL


def test_params_directory_with_config_json(tmp_path: Path) -> None:
    model_dir = tmp_path / "Mixtral-8x7B-v0.1"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(mixtral_config()))
    result = runner.invoke(app, ["params", str(model_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["total_params"] == MIXTRAL_TOTAL
    assert data["model"] == "Mixtral-8x7B-v0.1"


def test_params_yaml_card_path(tmp_path: Path) -> None:
    card = {"name": "my-mixtral", "hub_id": "me/my-mixtral", "config": mixtral_config()}
    path = tmp_path / "my-mixtral.yaml"
    path.write_text(yaml.safe_dump(card))
    result = runner.invoke(app, ["params", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["model"], data["hub_id"], data["total_params"]) == ("my-mixtral", "me/my-mixtral", MIXTRAL_TOTAL)


def test_params_bundled_card_file_path() -> None:
    card = sources.find_card("qwen3-30b-a3b")
    assert card is not None
    result = runner.invoke(app, ["params", str(card.path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total_params"] == 30_532_122_624


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------


def test_models_lists_every_bundled_card() -> None:
    names = [card.name for card in sources.bundled_cards()]
    assert len(names) >= 20
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    for name in names:
        assert name in result.stdout, name


def test_models_json() -> None:
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == [card.name for card in sources.bundled_cards()]
    mixtral = next(row for row in rows if row["name"] == "mixtral-8x7b")
    assert mixtral["total_params"] == MIXTRAL_TOTAL
    assert mixtral["hub_id"] == "mistralai/Mixtral-8x7B-v0.1"


# ------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line on stderr, no traceback
# ------------------------------------------------------------------------------------------------


def test_unknown_model_suggests_close_names() -> None:
    result = runner.invoke(app, ["params", "mixtral-8x7"])
    line = assert_bad_input(result, "unknown model 'mixtral-8x7'", "did you mean", "mixtral-8x7b")
    assert "moeplan models" in line


def test_unknown_model_without_close_names() -> None:
    assert_bad_input(runner.invoke(app, ["params", "zzzz"]), "unknown model 'zzzz'", "moeplan models")


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "config.json"
    assert_bad_input(runner.invoke(app, ["params", str(missing)]), "no such file or directory")


def test_directory_without_config_json(tmp_path: Path) -> None:
    assert_bad_input(runner.invoke(app, ["params", str(tmp_path)]), "without config.json")


def test_malformed_config_json(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 4096,\n "num_hidden_layers": }')
    assert_bad_input(runner.invoke(app, ["params", str(path)]), "not valid JSON", "line 2")


def test_config_json_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("[1, 2, 3]")
    assert_bad_input(runner.invoke(app, ["params", str(path)]), "JSON object")


def test_config_lacking_a_key(tmp_path: Path) -> None:
    config = mixtral_config()
    del config["num_experts_per_tok"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert_bad_input(runner.invoke(app, ["params", str(path)]), "missing num_experts_per_tok")


def test_config_with_negative_size(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**mixtral_config(), "hidden_size": -4096}))
    assert_bad_input(runner.invoke(app, ["params", str(path)]), "hidden_size", "-4096")


def test_config_with_negative_window(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**mixtral_config(), "sliding_window": -1}))
    assert_bad_input(runner.invoke(app, ["params", str(path)]), "window")


def test_broken_yaml_card(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nconfig: {hidden_size: 4096\n  vocab_size: [1, 2\n")
    assert_bad_input(runner.invoke(app, ["params", str(path)]), "not valid YAML")


def test_yaml_card_without_config_or_spec(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("name: empty\n")
    assert_bad_input(runner.invoke(app, ["params", str(path)]), "'config'", "'spec'")


def test_missing_argument_is_bad_input() -> None:
    assert_bad_input(runner.invoke(app, ["params"]), "model")


def test_option_of_the_wrong_type_is_bad_input() -> None:
    assert_bad_input(runner.invoke(app, ["memory", "mixtral-8x7b", "--context", "lots"]), "--context")


def test_unknown_command_is_bad_input() -> None:
    assert_bad_input(runner.invoke(app, ["parms", "mixtral-8x7b"]), "parms")


def test_unknown_option_is_bad_input() -> None:
    assert_bad_input(runner.invoke(app, ["params", "mixtral-8x7b", "--jsn"]), "--jsn")


# ------------------------------------------------------------------------------------------------
# The installed entry point
# ------------------------------------------------------------------------------------------------


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moeplan", *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_python_m_moeplan_help() -> None:
    proc = _run_module("--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    for command in ("params", "models", "memory"):
        assert command in proc.stdout


def test_python_m_moeplan_bad_input_is_one_line() -> None:
    proc = _run_module("params", "mixtral-8x7")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "did you mean mixtral-8x7b" in proc.stderr and "Traceback" not in proc.stderr
