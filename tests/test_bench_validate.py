"""benchmarks/gpu_validate.py, dry-run on the CPU: the pipeline a person runs on one H100/H200."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_validate_dry_run(tmp_path: Any, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("MOEPLAN_CACHE", str(tmp_path / "cache"))  # main() sets it too: restored after
    spec = importlib.util.spec_from_file_location("moeplan_gpu_validate", ROOT / "benchmarks" / "gpu_validate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    out = tmp_path / "results.json"
    assert module.main(["--dry-run", "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "predicted vs measured, before (defaults) and after the saved calibration" in text
    assert "calibration for cpu (fp32)" in text and (tmp_path / "cache" / "calibration.json").exists()
    assert "parameter bytes" in text and "0 check(s) failed" in text
    assert out.exists() and '"fit"' in out.read_text()
    # the GPU run covers the four models the issue names, at batch 1/8/64
    models = {c.model for c in module.GPU_CASES}
    assert models == {"mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b", "gpt-oss-120b"}
    assert all(c.batches == "1,8,64" for c in module.GPU_CASES if c.in_fit)
