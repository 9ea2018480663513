"""docs/offload.md holds benchmarks/offload_report.py's output verbatim (figures are the commands')."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _report() -> ModuleType:
    spec = importlib.util.spec_from_file_location("offload_report", ROOT / "benchmarks" / "offload_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["offload_report"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_offload_doc_holds_the_script_output():
    module = _report()
    doc = (ROOT / "docs" / "offload.md").read_text(encoding="utf-8")
    for block in module.report().rstrip("\n").split("\n\n"):
        assert block in doc, "docs/offload.md is stale: rerun python benchmarks/offload_report.py"


def test_offload_figures_move_the_right_way():
    module = _report()
    # Fewer cache slots: worse mean and p99; lower locality: worse mean and p99 (issue 15).
    slots = [module.best((*module.BASE, "--expert-cache", str(s)))[2] for s in module.CACHE_SLOTS]
    means, p99s = [s["cache_tpot_s"] for s in slots], [s["cache_p99_tpot_s"] for s in slots]
    assert means == sorted(means) and p99s == sorted(p99s) and len(set(means)) == len(means)
    locs = [module.best((*module.BASE, "--expert-cache", "2", "--locality", f"{x:g}"))[2] for x in module.LOCALITIES]
    means, p99s = [s["cache_tpot_s"] for s in locs], [s["cache_p99_tpot_s"] for s in locs]
    assert means == sorted(means) and p99s == sorted(p99s) and len(set(means)) == len(means)
    assert all(p >= m for p, m in zip(p99s, means))
