"""moeplan.record: computed values are plain classes built without validation in normal runs (start-up time,
issue 17). The rest of the suite validates every one (tests/conftest.py); this checks that the
unvalidated path gives the same answers, byte for byte, and still fails loudly on a bug."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from moeplan import record
from moeplan.cli import app
from moeplan.layout import Scenario

runner = CliRunner()

COMMANDS = [
    ["fit", "mixtral-8x7b", "--gpus", "2x24GB", "--json"],
    ["fit", "deepseek-v3", "--gpus", "8xH200", "--json"],
    ["fit", "qwen3-30b-a3b", "--gpus", "1xRTX4090", "--quant", "q4_k_m", "--cpu-mem", "64GB", "--json"],
    ["fit", "qwen3-next-80b-a3b", "--gpus", "1xRTX4090", "--cpu-mem", "128GB", "--json"],
    ["perf", "gpt-oss-120b", "--gpus", "8xH100", "--quant", "mxfp4", "--tp", "8", "--json"],
    ["perf", "deepseek-v3", "--gpus", "8xH200", "--batch", "64", "--routing", "zipf:1.2", "--json"],
    ["memory", "gemma-4-26b-a4b", "--context", "32k", "--json"],
    ["params", "deepseek-v4-flash", "--json"],
    ["fit", "llama-3.1-70b", "--gpus", "4xA100", "--price", "1.5", "--json"],
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_unvalidated_records_print_the_same_json(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setattr(record, "VALIDATE", True)
    checked = runner.invoke(app, args)
    monkeypatch.setattr(record, "VALIDATE", False)
    trusted = runner.invoke(app, args)
    assert checked.exit_code in (0, 1), checked.output
    assert (trusted.exit_code, trusted.stdout) == (checked.exit_code, checked.stdout)


def test_the_suite_validates_records() -> None:
    assert record.VALIDATE  # conftest.py; without it the other tests would not check the types


def test_an_unvalidated_record_still_refuses_a_missing_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(record, "VALIDATE", False)
    with pytest.raises(TypeError, match="Scenario: missing required field 'batch'"):
        Scenario(context=4096)
    sc = Scenario(context=4096, batch=2)
    assert (sc.kv_dtype, sc.mem_fraction, sc.model_fields_set) == ("bf16", 0.90, {"context", "batch"})
    with pytest.raises(Exception):  # frozen, as a validated one
        sc.batch = 3  # type: ignore[misc]
    monkeypatch.setattr(record, "VALIDATE", True)
    assert Scenario(context=4096, batch=2) == sc


@pytest.mark.parametrize("args", [["gpus", "--json"], ["fit", "mixtral-8x7b", "--gpus", "2x24GB", "--json"]],
                         ids=["gpus", "fit"])
def test_whole_processes_print_the_same_json_either_way(args: list[str]) -> None:
    # The built-in tables (GPUs, links, engines, quantizations) are made at import, so only a fresh
    # process shows what a user's run prints; 448 in a float field must still print 448.0.
    import os
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-m", "moeplan", *args], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "MOEPLAN_VALIDATE_RECORDS": flag}) for flag in ("1", "0")]
    assert runs[0].returncode in (0, 1), runs[0].stderr
    assert (runs[1].returncode, runs[1].stdout) == (runs[0].returncode, runs[0].stdout)


def test_a_record_refuses_an_unknown_field_and_compares_copies_and_pickles_by_value(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import copy
    import pickle

    monkeypatch.setattr(record, "VALIDATE", False)
    with pytest.raises(TypeError, match="Scenario: unknown field"):
        Scenario(context=4096, batch=2, bogus=1)
    sc = Scenario(context=4096, batch=2)
    assert sc == copy.copy(sc) == copy.deepcopy(sc) == pickle.loads(pickle.dumps(sc))
    assert hash(sc) == hash(Scenario(context=4096, batch=2)) and sc != Scenario(context=4096, batch=3)
    moved = sc.model_copy(update={"batch": 8})
    assert (moved.batch, sc.batch, moved.model_fields_set) == (8, 2, {"context", "batch"})
    with pytest.raises(TypeError, match="unknown field"):
        sc.model_copy(update={"bogus": 1})
    assert Scenario.record_fields()[:2] == ("context", "batch")


def test_a_record_in_a_pydantic_model_is_validated_and_dumped_by_its_twin() -> None:
    from pydantic import BaseModel, ValidationError

    class Holder(BaseModel):
        scenario: Scenario | None = None

    sc = Scenario(context=4096, batch=2)
    assert Holder(scenario=sc).scenario is sc  # an instance passes as it is
    made = Holder.model_validate({"scenario": {"context": 1024, "batch": 4}}).scenario
    assert isinstance(made, Scenario) and (made.context, made.batch) == (1024, 4)
    assert Holder(scenario=sc).model_dump()["scenario"] == sc.model_dump()
    with pytest.raises(ValidationError):
        Holder.model_validate({"scenario": {"context": "many", "batch": 4}})
    assert "Scenario" in Holder.model_json_schema()["$defs"]


def test_a_plain_fit_builds_no_pydantic_twin() -> None:
    # Start-up (issue 17): a Record's pydantic twin is built only for JSON, schemas or validation.
    import os
    import subprocess
    import sys

    code = ("import sys, io; from moeplan import cli, record; sys.argv = ['moeplan', 'fit', 'mixtral-8x7b', '--gpus', "
            "'2x24GB']\ntry: cli.main()\nexcept SystemExit: pass\n"
            "def walk(c):\n    for s in c.__subclasses__():\n        yield s\n        yield from walk(s)\n"
            "print('TWINS', sorted(c.__name__ for c in walk(record.Record) if '__record_twin__' in c.__dict__), "
            "file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MOEPLAN_VALIDATE_RECORDS": "0"})
    assert "TWINS []" in run.stderr, run.stderr
