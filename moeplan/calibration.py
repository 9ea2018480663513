"""Measured efficiencies per GPU and dtype, kept in a user cache file so predictions can use them.

Efficiency = predicted time at the device's peak / measured time: for the memory-bound decode step
(memory) and the compute-bound prefill (compute), clipped to (0.05, 1.0]. `moeplan bench` measures
them; moeplan.perf reads them back instead of its defaults. Pure: no torch.

File (JSON): {"<gpu name>|<dtype>": {"memory": 0.71, "compute": 0.55, "source": "...", "date": "2025-..."}}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moeplan.errors import MoeplanError

MIN_EFFICIENCY = 0.05
MAX_EFFICIENCY = 1.0
FILE_NAME = "calibration.json"


def calibration_path() -> Path:
    """$MOEPLAN_CACHE/calibration.json, else $XDG_CACHE_HOME/moeplan/calibration.json, else
    ~/.cache/moeplan/calibration.json (the XDG base-directory default)."""
    if os.environ.get("MOEPLAN_CACHE"):
        return Path(os.environ["MOEPLAN_CACHE"]).expanduser() / FILE_NAME
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "moeplan" / FILE_NAME


def clip_efficiency(value: float) -> float:
    """Into (0.05, 1.0]: above 1 means the prediction's peak was wrong, not a faster-than-peak run."""
    if not math.isfinite(value) or value <= 0:
        raise MoeplanError(f"an efficiency must be a positive number, got {value!r}")
    return min(MAX_EFFICIENCY, max(MIN_EFFICIENCY, value))


def efficiency(predicted_at_peak_s: float, measured_s: float) -> float:
    """predicted-at-peak time / measured time, clipped."""
    if measured_s <= 0 or predicted_at_peak_s <= 0:
        raise MoeplanError(
            f"efficiency needs positive times, got predicted {predicted_at_peak_s!r} s and measured {measured_s!r} s"
        )
    return clip_efficiency(predicted_at_peak_s / measured_s)


def _key(gpu_name: str, dtype: str) -> str:
    return f"{gpu_name.strip()}|{dtype.strip().lower()}"


def _read(path: Path) -> dict[str, Any]:
    """The file's entries; a missing or unreadable file is an empty cache (it is only a cache)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_calibration(gpu_name: str, dtype: str, memory_eff: float, compute_eff: float, source: str, *,
                     layer_s: float | None = None, step_s: float | None = None) -> Path:
    """Record (or replace) the efficiencies of one GPU and dtype, and, when measured, the per-layer and
    per-step overheads (seconds) that replace the engine's defaults. Returns the file written."""
    path = calibration_path()
    data = _read(path)
    entry: dict[str, Any] = {
        "memory": clip_efficiency(memory_eff),
        "compute": clip_efficiency(compute_eff),
        "source": source,
        "date": datetime.now(timezone.utc).date().isoformat(),
    }
    for name, value in (("layer_s", layer_s), ("step_s", step_s)):
        if value is not None:
            if not math.isfinite(value) or value < 0 or value > 1.0:
                raise MoeplanError(f"a calibration's {name} must be between 0 and 1 s, got {value!r}")
            entry[name] = value
    data[_key(gpu_name, dtype)] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write a temporary file and rename it over, so a crash never leaves half a file.
        fd, tmp = tempfile.mkstemp(prefix=".calibration-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        raise MoeplanError(f"cannot write calibration to {path}: {exc.strerror}; set MOEPLAN_CACHE") from None
    return path


def load_calibration(gpu_name: str, dtype: str) -> dict[str, Any] | None:
    """{'memory', 'compute', 'source', 'date'} for this GPU and dtype, or None if never measured."""
    entry = _read(calibration_path()).get(_key(gpu_name, dtype))
    if not isinstance(entry, dict):
        return None
    try:
        out: dict[str, Any] = {
            "memory": clip_efficiency(float(entry["memory"])),
            "compute": clip_efficiency(float(entry["compute"])),
            "source": str(entry.get("source", "")),
            "date": str(entry.get("date", "")),
        }
        for name in ("layer_s", "step_s"):
            if entry.get(name) is not None:
                value = float(entry[name])
                if not math.isfinite(value) or not 0 <= value <= 1.0:
                    return None
                out[name] = value
        return out
    except (KeyError, TypeError, ValueError, MoeplanError):
        return None  # a damaged entry is as good as none
