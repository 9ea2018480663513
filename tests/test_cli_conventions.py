"""Issue 17: the conventions of a mature typer/rich CLI (version, units, narrow terminals, JSON
schemas with schema_version, an example in every --help)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from moeplan import __version__
from moeplan.cli import SCHEMA_VERSION, app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HUB_OFFLINE": "1", **env}
    full["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "moeplan", *args], env=full, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_version() -> None:
    for flag in ("--version", "-V"):
        res = runner.invoke(app, [flag])
        assert res.exit_code == 0 and res.stdout.strip() == f"moeplan {__version__}"


def test_context_takes_units() -> None:
    out = json.loads(runner.invoke(app, ["fit", "mixtral-8x7b", "--gpus", "2x24GB", "--context", "32k",
                                         "--json"]).stdout)
    assert out["context"] == 32768
    mem = json.loads(runner.invoke(app, ["memory", "mixtral-8x7b", "--context", "8K", "--json"]).stdout)
    assert mem["context"] == 8192
    perf = json.loads(runner.invoke(app, ["perf", "mixtral-8x7b", "--gpus", "2xH100", "--context", "4k",
                                          "--prompt", "1k", "--json"]).stdout)
    assert perf["context"] == 4096 and perf["prompt"] == 1024
    bad = runner.invoke(app, ["fit", "mixtral-8x7b", "--gpus", "2x24GB", "--context", "32x"])
    assert bad.exit_code == 2 and "32k (32,768)" in bad.output


def test_sizes_take_units() -> None:
    base = ["fit", "mixtral-8x7b", "--gpus", "1x24G", "--quant", "q4_k_m", "--json"]
    for text, expected in (("64G", 64e9), ("64GB", 64e9), ("64GiB", 64 * 2**30), ("0.0625T", 62.5e9)):
        out = json.loads(runner.invoke(app, [*base, "--cpu-mem", text]).stdout)
        assert out["best"]["offload"]["cpu_budget_bytes"] == int(int(expected) * 0.9), text


NUMBERS = re.compile(r"\d[\d,]*(?:\.\d+)?")


@pytest.mark.parametrize("args", [
    ["fit", "mixtral-8x7b", "--gpus", "2x24GB"],
    ["perf", "deepseek-v3", "--gpus", "8xH200", "--sweep"],
    ["models"],
    ["gpus"],
    ["compare", "mixtral-8x7b", "llama-2-70b", "--gpus", "2xA100-80GB", "--price", "1.29"],
    ["params", "deepseek-v3"],
])
def test_tables_at_80_columns_cut_no_number(args: list[str]) -> None:
    narrow, wide = _run(*args, COLUMNS="80"), _run(*args, COLUMNS="200")
    assert narrow.returncode == wide.returncode == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
    table_lines = [line for line in narrow.stdout.splitlines() if line.startswith(("│", "┃"))]
    assert not any("…" in line for line in table_lines)
    # Every number of the narrow tables is one the wide tables print (none cut short).
    wide_numbers = set(NUMBERS.findall(wide.stdout))
    assert set(NUMBERS.findall("\n".join(table_lines))) <= wide_numbers


@pytest.mark.parametrize("columns", ["50", "60"])
def test_bars_narrow_with_the_terminal_and_keep_their_numbers(columns: str) -> None:
    fit = _run("fit", "mixtral-8x7b", "--gpus", "2x24GB", COLUMNS=columns)
    perf = _run("perf", "mixtral-8x7b", "--gpus", "2x24GB", "--sweep", COLUMNS=columns)
    gpu_bar = next(line for line in fit.stdout.splitlines() if line.startswith(" GPU 0"))
    assert gpu_bar.rstrip().endswith("14.8/20.1") and "…" not in gpu_bar  # the 80-column figure, whole
    chart = [line for line in perf.stdout.splitlines() if re.match(r"^ +\d+  #", line)]
    assert len(chart) >= 5
    for line in chart:  # one line per batch, bar and figures whole
        assert "…" not in line and line.rstrip().endswith("per user") and len(line) <= int(columns)


def test_columns_when_piped_and_no_color() -> None:
    res = _run("gpus", COLUMNS="100")
    assert max(len(line) for line in res.stdout.splitlines()) <= 100 and "\x1b[" not in res.stdout
    forced = _run("fit", "mixtral-8x7b", "--gpus", "2x24GB", FORCE_COLOR="1", NO_COLOR="1")
    assert "\x1b[" in forced.stdout  # a terminal's bold and dim, but no colour (SGR 30-37, 38, 90-97)
    assert not re.search(r"\x1b\[(?:[0-9;]*;)?(?:3[0-8]|9[0-7])[;m]", forced.stdout)
    junk = _run("gpus", COLUMNS="0")
    assert junk.returncode == 0 and junk.stdout.strip()  # COLUMNS=0 ignored, not an empty table


@pytest.mark.parametrize("kind", ["fit", "perf", "memory", "params", "check", "compare"])
def test_schema_output_validates_the_json(kind: str) -> None:
    res = runner.invoke(app, ["schema", "--output", kind])
    assert res.exit_code == 0
    schema = json.loads(res.stdout)
    commands = {
        "fit": ["fit", "mixtral-8x7b", "--gpus", "2x24GB", "--json"],
        "perf": ["perf", "mixtral-8x7b", "--gpus", "2xH100", "--json"],
        "memory": ["memory", "mixtral-8x7b", "--json"],
        "params": ["params", "mixtral-8x7b", "--json"],
        "check": ["check", "examples/mixtral-2x4090-pass.yaml", "--format", "json"],
        "compare": ["compare", "mixtral-8x7b", "llama-2-70b", "--gpus", "2xA100-80GB", "--json"],
    }
    data = json.loads(runner.invoke(app, commands[kind]).stdout)
    jsonschema.validate(data, schema)
    first = data[0] if isinstance(data, list) else data
    assert first["schema_version"] == SCHEMA_VERSION


def test_one_shape_whether_or_not_a_plan_fits() -> None:
    fits = json.loads(runner.invoke(app, ["fit", "mixtral-8x7b", "--gpus", "2x24GB", "--json"]).stdout)
    misses = json.loads(runner.invoke(app, ["fit", "deepseek-v3", "--gpus", "1x24GB", "--json"]).stdout)
    assert set(fits) == set(misses) and misses["fits"] is False and misses["best"] is None
    ok = runner.invoke(app, ["perf", "mixtral-8x7b", "--gpus", "2xH100", "--json"])
    none = runner.invoke(app, ["perf", "deepseek-v3", "--gpus", "1x24GB", "--json"])
    assert ok.exit_code == 0 and none.exit_code == 1
    ok_keys, none_data = set(json.loads(ok.stdout)), json.loads(none.stdout)
    assert ok_keys <= set(none_data) and none_data["fits"] is False and none_data["tpot_s"] is None
    bad = runner.invoke(app, ["schema", "--output", "nope"])
    assert bad.exit_code == 2


def test_every_command_help_has_an_example() -> None:
    import typer

    names = list(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert len(names) >= 10
    for name in names:
        res = runner.invoke(app, [name or "", "--help"])
        assert res.exit_code == 0 and "Example: moeplan " in res.output, name


def test_completion_is_offered() -> None:
    res = runner.invoke(app, ["--help"])
    assert "--install-completion" in res.output


def _exit_with_reader_gone(*args: str) -> subprocess.CompletedProcess[str]:
    """Run moeplan with stdout a pipe whose reader has already left (`moeplan ... | true`)."""
    read, write = os.pipe()
    os.close(read)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HUB_OFFLINE": "1",
                                                                               "PYTHONPATH": str(ROOT)}
    try:
        return subprocess.run([sys.executable, "-m", "moeplan", *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT, timeout=60)
    finally:
        os.close(write)


def test_a_reader_that_leaves_never_changes_the_exit_code(tmp_path) -> None:
    good = tmp_path / "pass.yaml"
    good.write_text("model: mixtral-8x7b\nengine: vllm\ngpus: 2xA100-80GB\nserving: {context: 4096, batch: 1}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: mixtral-8x7b\nengine: vllm\ngpus: 2xA100-80GB\nserving: {context: 0, batch: 1}\n")
    for args, code in ((["--version"], 0), (["fit", "--help"], 0), (["check", str(good), "--format", "markdown"], 0),
                       (["check", str(good), "--format", "github"], 0), (["check", str(bad), "--format", "github"], 2),
                       (["fit", "mixtral-8x7b", "--gpus", "1x8GB"], 1), (["models", "--json"], 0)):
        res = _exit_with_reader_gone(*args)
        assert (res.returncode, res.stderr) == (code, ""), args


def test_check_table_at_80_columns_cuts_no_number(tmp_path) -> None:
    spec = tmp_path / "deploy.yaml"
    spec.write_text("model: mixtral-8x7b\nengine: vllm\ngpus: 2xA100-80GB\nserving: {context: 4096, batch: 64}\n")
    narrow, wide = _run("check", str(spec), COLUMNS="80"), _run("check", str(spec), COLUMNS="200")
    assert narrow.returncode == wide.returncode == 0, narrow.stderr
    table_lines = [line for line in narrow.stdout.splitlines() if line.startswith(("│", "┃", "┏", "└"))]
    assert table_lines and max(len(line) for line in table_lines) <= 80 and not any("…" in x for x in table_lines)
    assert set(NUMBERS.findall("\n".join(table_lines))) <= set(NUMBERS.findall(wide.stdout))
    assert "decode tok/s" in narrow.stdout  # the figure a check is about stays


def test_options_not_given_come_out_as_typer_gives_them_without_an_adapter_each(monkeypatch) -> None:
    """moeplan.cli passes an option's None straight through typer's process_value instead of having
    typer build a pydantic adapter for it first (start-up); values, callbacks, lists and errors must
    come out exactly as typer's own coercion gives them."""
    import typer.core

    patched = typer.core._TyperParameter.process_value
    assert getattr(patched, "_moeplan", False), "moeplan.cli did not install its None pass-through"
    built: list[object] = []
    real = typer.core.build_runtime_param
    monkeypatch.setattr(typer.core, "build_runtime_param", lambda d: built.append(d.annotation) or real(d))

    def run(args: list[str]) -> tuple[int, str, dict[str, object], int]:
        seen: dict[str, object] = {}
        demo = typer.Typer()

        @demo.command()
        def go(a: int | None = typer.Option(None), b: str | None = typer.Option(None, callback=lambda v: f"cb:{v}"),
               c: float = typer.Option(2.5), d: list[str] | None = typer.Option(None),
               p: Path | None = typer.Option(None), req: str = typer.Option(...)) -> None:
            seen.update(a=a, b=b, c=c, d=d, p=p, req=req)

        before = len(built)
        res = CliRunner().invoke(demo, args)
        return res.exit_code, res.output, seen, len(built) - before

    cases = (["--req", "x"], ["--req", "x", "--a", "3", "--b", "y", "--d", "1", "--d", "2", "--p", "f"],
             ["--req", "x", "--a", "three"], [])
    ours = [run(args) for args in cases]
    monkeypatch.setattr(typer.core._TyperParameter, "process_value", patched._typer)
    theirs = [run(args) for args in cases]
    assert [o[:3] for o in ours] == [t[:3] for t in theirs]
    assert ours[0][2] == {"a": None, "b": "cb:None", "c": 2.5, "d": None, "p": None, "req": "x"}
    assert ours[0][3] < theirs[0][3]  # fewer adapters built when options are not given
