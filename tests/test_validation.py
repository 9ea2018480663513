"""Predicted vs published (docs/validation.md), on a fitting set and a held-out test set.

- The doc holds benchmarks/validate.py's output verbatim, and the counts its prose quotes.
- The constants fitted on the fitting set (moeplan.perf.ENGINE_MEMORY_EFFICIENCY, ERROR_BANDS) are
  what the script derives from it, so nobody can move them by hand or tune them on the test set.
- Every test-set row is predicted through the CLI with its stated layout forced.
The published figures come from tests/fixtures/published_throughput.yaml (fitting set) and
tests/fixtures/published_throughput_test.yaml (test set), each with its sources.
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
FIXTURES = ROOT / "tests" / "fixtures"


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
    with validate.defaults_only():
        return {case.id: validate.predict(case) for case in validate.CASES}


def test_every_case_has_a_prediction_and_a_source():
    for path, cases in ((FIXTURES / "published_throughput.yaml", validate.FIT_CASES),
                        (FIXTURES / "published_throughput_test.yaml", validate.TEST_CASES)):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        ids = [c["id"] for c in data["cases"]]
        assert len(ids) == len(set(ids)) and set(ids) == {c.id for c in cases}
        for case in data["cases"] + data.get("excluded", []):
            assert case["source"] in data["sources"], case["id"]
            assert data["sources"][case["source"]]["url"], case["source"]
            assert case["value"] > 0
    assert not set(validate.published()["cases"]) & {e["id"] for e in validate.published()["excluded"]}


def test_the_sets_do_not_overlap():
    pub = validate.published()
    fit_ids = {c.id for c in validate.FIT_CASES}
    test_ids = {c.id for c in validate.TEST_CASES}
    assert not fit_ids & test_ids
    # Test rows that repeat a fitting row's deployment were excluded before predicting.
    assert any("already in the fitting set" in e["why"] for e in pub["excluded"])
    for case in validate.TEST_CASES:
        assert case.set == "test" and case.cli, case.id
        assert "--tp" in case.cli  # the stated layout, forced


def test_fitted_efficiencies_are_what_the_fitting_set_gives():
    from moeplan import engines, perf

    fitted = validate.fit_efficiency()
    layer = {k.removesuffix(" layer_s"): fitted.pop(k) for k in list(fitted) if k.endswith(" layer_s")}
    assert fitted == pytest.approx(perf.ENGINE_MEMORY_EFFICIENCY, abs=1e-3)
    # the per-layer costs fitted with their efficiency (llama.cpp per backend, vLLM/SGLang on NVIDIA)
    for cls, value in layer.items():
        table, key = validate.LAYER_FITS[cls]
        assert value == pytest.approx(getattr(engines, table)[key], abs=1e-6), cls
    for cls, ids in perf.EFFICIENCY_FIT_ROWS.items():
        assert all(CASES[i].set == "fit" for i in ids), cls


def test_error_bands_are_what_the_fitting_set_gives(rows):
    from moeplan import perf

    derived = validate.derive_bands([rows[c.id] for c in validate.FIT_CASES])
    assert {k: v[:2] for k, v in derived.items()} == perf.ERROR_BANDS
    assert {k: v[2] for k, v in derived.items()} == perf.BAND_ROWS


def test_published_deployments_fit_per_gpu_in_moeplan(rows):
    # They ran, so a plan moeplan calls too big would be a memory-model bug, not a speed one.
    assert all(row.fits for row in rows.values()), [r.case.id for r in rows.values() if not r.fits]


def _doc() -> str:
    return (ROOT / "docs" / "validation.md").read_text(encoding="utf-8")


def test_doc_holds_the_script_output_verbatim(rows):
    doc = _doc()
    fit_rows = [rows[c.id] for c in validate.FIT_CASES]
    test_rows = [rows[c.id] for c in validate.TEST_CASES]
    blocks = {"fitting table": validate.table(fit_rows, bands=False),
              "bands": validate.bands_table(validate.derive_bands(fit_rows)),
              "test table": validate.table(test_rows, bands=True),
              "summary": validate.summary(fit_rows, test_rows), "excluded": validate.excluded_table()}
    for name, block in blocks.items():
        assert block in doc, f"docs/validation.md is stale ({name}): rerun python benchmarks/validate.py"
    for note in {c.outlier for c in validate.CASES if c.outlier}:
        assert f"### {note}" in doc, f"outlier note {note} is not explained in docs/validation.md"


def test_summary_counts(rows):
    # Changing a count is a decision: update this test, the doc's prose and the README together.
    test_rows = [rows[c.id] for c in validate.TEST_CASES]
    assert validate.counts(test_rows, validate.CLOSE) == (12, 20)
    assert validate.counts(test_rows, validate.GOAL) == (20, 20)
    assert sum(r.in_band for r in test_rows) == 16


def test_prose_counts_match_the_summary(rows):
    test_rows = [rows[c.id] for c in validate.TEST_CASES]
    close, goal = validate.counts(test_rows, validate.CLOSE), validate.counts(test_rows, validate.GOAL)
    inside = sum(r.in_band for r in test_rows)
    doc = _doc()
    for n, m, what in re.findall(r"(\d+) of (\d+) test rows (within 0\.8x-1\.25x|within 0\.5x-2x|inside)", doc):
        want = {"within 0.8x-1.25x": close, "within 0.5x-2x": goal, "inside": (inside, len(test_rows))}[what]
        assert (int(n), int(m)) == want, f"docs/validation.md says {n} of {m} test rows {what}; the script: {want}"


@pytest.mark.parametrize("case_id", ["c01", "c25", "c34"])
def test_the_documented_command_prints_the_predicted_figure(rows, case_id, tmp_path, monkeypatch):
    from moeplan.cli import app

    monkeypatch.setenv("MOEPLAN_CACHE", str(tmp_path))  # no saved calibration, as validate.py
    row = rows[case_id]
    argv = validate.cli_command(row.case).split()[1:]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert validate._cli_value(row.case, out) == pytest.approx(row.value, rel=1e-9)
    assert out[{"decode_user": "decode_tok_per_s_low"}.get(row.case.metric, "tpot_s_low")] > 0


def test_unknown_case_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        validate.main(["--case", "no-such-case"])
    assert exc.value.code == 2
    assert "unknown case 'no-such-case'" in capsys.readouterr().err
