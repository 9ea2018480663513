"""Predicted vs published (docs/validation.md): every ratio stays in the band the doc claims.

Modern engines are held to the issue's goal, predicted within 0.5x-2x of the published figure; the
documented outliers are held to their own band, so a change to the model that moves them is seen.
The published figures come from tests/fixtures/published_throughput.yaml; benchmarks/validate.py
computes the predictions with the same code that writes the doc's table.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "published_throughput.yaml"


def _load_validate():
    spec = importlib.util.spec_from_file_location("moeplan_validate", ROOT / "benchmarks" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


validate = _load_validate()
CASES = {case.id: case for case in validate.CASES}


@pytest.fixture(scope="module")
def rows():
    """Every row once, as `python benchmarks/validate.py` makes them (about 3 s: 144-GPU layout searches)."""
    return {case.id: validate.predict(case, with_cli=True) for case in validate.CASES}


def test_every_published_case_has_a_prediction_and_a_source():
    data = yaml.safe_load(FIXTURE.read_text(encoding="utf-8"))
    ids = [c["id"] for c in data["cases"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(CASES)
    for case in data["cases"]:
        assert case["source"] in data["sources"], case["id"]
        assert data["sources"][case["source"]]["url"], case["source"]
        assert case["value"] > 0
        if "range" in case:
            lo, hi = case["range"]
            assert lo <= case["value"] <= hi, case["id"]


@pytest.mark.parametrize("case_id", list(CASES))
def test_ratio_in_claimed_band(rows, case_id):
    row = rows[case_id]
    lo, hi = row.case.band
    assert lo <= row.ratio <= hi, f"{case_id}: predicted {row.value:.4g} / published {row.published['value']} = {row.ratio:.2f}"


def test_current_engines_are_claimed_within_half_to_double():
    for case in validate.CASES:
        if case.current:
            assert case.band == (0.5, 2.0) and not case.note, case.id
        if case.note:  # an outlier row names the note that explains it, and lies outside the goal
            assert not case.current and (case.band[0] > 2.0 or case.band[1] < 0.5), case.id
        else:
            assert case.band == (0.5, 2.0), case.id


def test_published_deployments_fit_per_gpu_in_moeplan(rows):
    # They ran, so a plan moeplan calls too big would be a memory-model bug, not a speed one.
    assert all(row.fits for row in rows.values()), [r.case.id for r in rows.values() if not r.fits]


def _doc() -> str:
    return (ROOT / "docs" / "validation.md").read_text(encoding="utf-8")


def test_doc_holds_the_script_output_verbatim(rows):
    doc = _doc()
    ordered = [rows[c.id] for c in validate.CASES]
    blocks = {"table": validate.table(ordered), "cli table": validate.cli_table(ordered),
              "summary": validate.summary(ordered), "0df33c3 table": validate.ablation()}
    for name, block in blocks.items():
        assert block in doc, f"docs/validation.md is stale ({name}): rerun python benchmarks/validate.py"
    for note in {c.note for c in validate.CASES if c.note}:
        assert f"### {note}" in doc, f"outlier note {note} is not explained in docs/validation.md"


def test_summary_counts(rows):
    # Changing a count is a decision: update this test, the doc's prose and the README together.
    ordered = [rows[c.id] for c in validate.CASES]
    assert validate.counts(ordered) == {
        "rows": (27, 31), "checks": (21, 25), "current_rows": (16, 16), "current_checks": (10, 10)}
    # A row that repeats another's check names a row of the same deployment that is itself independent.
    pub = validate.published()["cases"]
    for case in validate.CASES:
        if case.same_check:
            first = CASES[case.same_check]
            assert not first.same_check and pub[first.id]["source"] == pub[case.id]["source"], case.id


def test_prose_counts_match_the_summary(rows):
    ordered = [rows[c.id] for c in validate.CASES]
    c = validate.counts(ordered)
    pairs = {"rows": c["rows"], "independent checks": c["checks"], "current-engine rows": c["current_rows"],
             "current-engine checks": c["current_checks"]}
    doc = _doc()
    found = re.findall(r"(\d+) of (\d+) (current-engine rows|current-engine checks|independent checks|rows)\b", doc)
    assert found, "the doc's prose should quote the headline counts"
    for n, m, what in found:
        assert (int(n), int(m)) == pairs[what], f"docs/validation.md says {n} of {m} {what}; the script says {pairs[what]}"
    outside = c["rows"][1] - c["rows"][0]
    for n in re.findall(r"\b(\d+) rows outside\b", doc):
        assert int(n) == outside, f"docs/validation.md says {n} rows outside the goal; the script says {outside}"


def test_second_table_agrees_with_the_cli_field(rows):
    # Where `moeplan perf` prints the metric itself, the API in the CLI's layout gives the same number.
    for row in rows.values():
        if row.cli_value is not None and row.cli_metric is not None:
            assert row.cli_metric == pytest.approx(row.cli_value, rel=1e-9), row.case.id


def test_0df33c3_switches_restore_perf():
    from moeplan import perf

    original = perf._ep_alltoall
    validate.ablation()
    assert perf._ep_alltoall is original


def test_unknown_case_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        validate.main(["--case", "no-such-case"])
    assert exc.value.code == 2
    assert "unknown case 'no-such-case'" in capsys.readouterr().err


@pytest.mark.parametrize("case_id", ["m2max-q4_0", "trtllm-a100-ttft", "ds6-decode-user"])
def test_the_documented_command_prints_the_predicted_figure(rows, case_id, tmp_path, monkeypatch):
    from moeplan.cli import app

    monkeypatch.setenv("MOEPLAN_CACHE", str(tmp_path))  # no saved calibration, as validate.py
    row = rows[case_id]
    how = validate.reproduce(row)
    assert how.startswith("`moeplan perf "), how
    argv = how.split("`")[1].split()[1:]
    res = CliRunner().invoke(app, [a.strip("'") for a in argv])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    got = {"decode_tok_s": out["decode_tok_per_s"], "ttft_ms": out["ttft_s"] * 1e3,
           "decode_user": out["decode_tok_per_s"]}[row.case.metric]
    assert got == pytest.approx(row.value, rel=1e-9)
