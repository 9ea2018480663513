"""Measured efficiencies per GPU and dtype: fitted from a bench sweep, kept in a user cache file, read
back by perf, fit, check and bench. Pure: no torch.

The model being calibrated is the planner's own (moeplan.perf.step_cost), per decoder layer:

    time = max(compute_s / compute_eff, memory_s / memory_eff) + layer_s

with compute_s and memory_s the layer's FLOPs and bytes at 100% of the device's peaks. A sweep of
decode batches and prefill lengths measures points in both regimes; `fit_calibration` finds the
three terms by least squares over the points' relative errors: memory efficiency from the points
the planner rates memory-bound, compute efficiency from the compute-bound ones (long prefills),
and the per-layer overhead from the intercept. A term no point informs keeps its prior value.

Efficiencies are clipped to (0.05, 1.0]: above 1 would mean the datasheet peak is wrong, not that
the run beat it. A device whose peaks are moeplan's assumption (the host CPU, a generic card)
stores "peaks": "assumed" and may exceed 1 (up to 100): there the efficiency corrects the peak.

File (JSON): {"<gpu name>|<dtype>": {"memory": 0.71, "compute": 0.55, "layer_s": 2.1e-05,
"peaks": "datasheet", "source": "...", "date": "2025-..."}}
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from moeplan.errors import MoeplanError
from moeplan.record import Record

MIN_EFFICIENCY = 0.05
MAX_EFFICIENCY = 1.0
MAX_ASSUMED_EFFICIENCY = 100.0  # devices whose peaks moeplan assumes (the CPU): a correction factor
MAX_LAYER_S = 1.0
FILE_NAME = "calibration.json"


def calibration_path() -> Path:
    """$MOEPLAN_CACHE/calibration.json, else $XDG_CACHE_HOME/moeplan/calibration.json, else
    ~/.cache/moeplan/calibration.json (the XDG base-directory default)."""
    env = os.environ
    return _path_for(env.get("MOEPLAN_CACHE") or "", env.get("XDG_CACHE_HOME") or "", env.get("HOME") or "")


@lru_cache(maxsize=8)
def _path_for(moeplan_cache: str, xdg_cache_home: str, home: str) -> Path:
    """calibration_path for these variables (HOME is what "~" expands to): a fit asks ~20 times."""
    from moeplan.safeio import expand_user

    if moeplan_cache:
        return expand_user(moeplan_cache, "MOEPLAN_CACHE") / FILE_NAME
    return expand_user(xdg_cache_home or "~/.cache", "XDG_CACHE_HOME") / "moeplan" / FILE_NAME


def clip_efficiency(value: float, upper: float = MAX_EFFICIENCY) -> float:
    """Into (0.05, upper]: above 1 on a datasheet peak means the peak was wrong, not a faster-than-peak run."""
    if not math.isfinite(value) or value <= 0:
        raise MoeplanError(f"an efficiency must be a positive number, got {value!r}")
    return min(upper, max(MIN_EFFICIENCY, value))


def efficiency(predicted_at_peak_s: float, measured_s: float, upper: float = MAX_EFFICIENCY) -> float:
    """predicted-at-peak time / measured time, clipped."""
    if measured_s <= 0 or predicted_at_peak_s <= 0:
        raise MoeplanError(
            f"efficiency needs positive times, got predicted {predicted_at_peak_s!r} s and measured {measured_s!r} s"
        )
    return clip_efficiency(predicted_at_peak_s / measured_s, upper)


# ----------------------------------------------------------------------------------------------
# The fit
# ----------------------------------------------------------------------------------------------


class FitPoint(Record):
    """One measured step and the planner's terms for it at 100% of the peaks."""

    measured_s: float
    # (compute_s, memory_s) at peak per term: one per decoder layer (and the lm_head of a full model)
    terms: tuple[tuple[float, float], ...]
    layers: int  # decoder layers, each charged one per-layer overhead
    label: str = ""


class CalibrationFit(Record):
    """The fitted terms, which points informed them, and how well the fitted model predicts the points."""

    memory: float
    compute: float
    layer_s: float
    memory_points: int  # points the fitted model rates memory-bound
    compute_points: int  # and compute-bound
    memory_fitted: bool  # False: no memory-bound point, the prior is kept
    compute_fitted: bool
    layer_s_fitted: bool
    bounds: list[str]  # per point, in order: "memory" | "compute"
    errors: list[float]  # per point: (fitted model - measured) / measured
    max_abs_error: float
    notes: list[str]


def model_seconds(point: FitPoint, memory: float, compute: float, layer_s: float) -> float:
    """The planner's roofline for the point's terms (moeplan.perf.step_cost, per layer)."""
    return point.layers * layer_s + sum(max(c / compute, m / memory) for c, m in point.terms)


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when (near) singular."""
    n = len(b)
    m = [row[:] + [rhs] for row, rhs in zip(a, b)]
    scale = max((abs(x) for row in a for x in row), default=0.0) or 1.0
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-12 * scale:
            return None
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    return [m[i][n] / m[i][i] for i in range(n)]


def _bounded_least_squares(rows: list[list[float]], lo: list[float], hi: list[float],
                           fixed: list[float | None]) -> list[float]:  # fmt: skip
    """min sum (row . x - 1)^2 with lo <= x <= hi, x[j] = fixed[j] where given.

    Three unknowns at most: every face of the box is tried (each free unknown free, at its lower
    or at its upper bound) and the best feasible solution kept, which is the exact optimum of this
    convex problem (the optimum is the unconstrained optimum of its own face)."""
    n = len(lo)
    best: tuple[float, list[float]] | None = None
    free = [j for j in range(n) if fixed[j] is None]
    for states in itertools.product(("free", "lo", "hi"), repeat=len(free)):
        x = [fixed[j] if fixed[j] is not None else 0.0 for j in range(n)]
        open_ = []
        for j, state in zip(free, states):
            if state == "lo":
                x[j] = lo[j]
            elif state == "hi":
                x[j] = hi[j]
            else:
                open_.append(j)
        if open_:
            rhs_rows = [1.0 - sum(r[j] * x[j] for j in range(n) if j not in open_) for r in rows]
            ata = [[sum(r[i] * r[k] for r in rows) for k in open_] for i in open_]
            atb = [sum(r[i] * y for r, y in zip(rows, rhs_rows)) for i in open_]
            sol = _solve(ata, atb)
            if sol is None:
                continue
            for j, v in zip(open_, sol):
                x[j] = v
        if any(x[j] < lo[j] - 1e-12 or x[j] > hi[j] + 1e-12 for j in range(n)):
            continue
        sse = sum((sum(r[j] * x[j] for j in range(n)) - 1.0) ** 2 for r in rows)
        if best is None or sse < best[0] - 1e-15:
            best = (sse, x)
    assert best is not None  # the all-bounds corner is always feasible
    return best[1]


def fit_calibration(points: Sequence[FitPoint], *, prior_memory: float, prior_compute: float,
                    prior_layer_s: float, max_efficiency: float = MAX_EFFICIENCY) -> CalibrationFit:  # fmt: skip
    """Least squares of the points' relative errors for (layer_s, 1/memory, 1/compute).

    The max() in each layer makes the model piecewise linear: each layer of each point is rated
    memory- or compute-bound at the current estimate (the prior first), the linear problem of that
    rating is solved within the bounds, and the ratings are redone until they no longer change.
    An unknown that no point depends on (no compute-bound point, say) keeps its prior."""
    pts = [p for p in points if p.measured_s > 0 and math.isfinite(p.measured_s)]
    if not pts:
        raise MoeplanError("a calibration needs at least one measured point")
    lo = [0.0, 1 / max_efficiency, 1 / max_efficiency]  # x = (layer_s, 1/memory, 1/compute)
    hi = [MAX_LAYER_S, 1 / MIN_EFFICIENCY, 1 / MIN_EFFICIENCY]
    prior = [min(max(prior_layer_s, 0.0), MAX_LAYER_S), 1 / clip_efficiency(prior_memory, max_efficiency),
             1 / clip_efficiency(prior_compute, max_efficiency)]  # fmt: skip
    x = prior[:]
    seen: list[tuple[tuple[bool, ...], ...]] = []
    fitted = (False, False, False)
    for _ in range(20):
        rating = tuple(tuple(x[2] * c > x[1] * m for c, m in p.terms) for p in pts)  # True: compute-bound
        if rating in seen:
            break
        seen.append(rating)
        rows = []
        for p, rate in zip(pts, rating):
            mem = sum(m for (c, m), cb in zip(p.terms, rate) if not cb)
            comp = sum(c for (c, m), cb in zip(p.terms, rate) if cb)
            rows.append([p.layers / p.measured_s, mem / p.measured_s, comp / p.measured_s])
        # A column of zeros (no point in that regime) cannot be fitted: keep the prior there.
        fitted = tuple(any(r[j] > 0 for r in rows) for j in range(3))  # type: ignore[assignment]
        fixed = [None if fitted[j] else prior[j] for j in range(3)]
        x = _bounded_least_squares(rows, lo, hi, fixed)
    layer_s, memory, compute = x[0], 1 / x[1], 1 / x[2]
    bounds = ["compute" if sum(c / compute for c, _ in p.terms) > sum(m / memory for _, m in p.terms) else "memory"
              for p in pts]  # fmt: skip
    errors = [model_seconds(p, memory, compute, layer_s) / p.measured_s - 1 for p in pts]
    notes = []
    if not fitted[2]:
        notes.append(f"compute efficiency not measured (no compute-bound point: add a longer --prompt); kept "
                     f"{compute:.2f}")
    if not fitted[1]:
        notes.append(f"memory efficiency not measured (no memory-bound point: add a decode --batch); kept {memory:.2f}")
    return CalibrationFit(
        memory=memory, compute=compute, layer_s=layer_s, memory_points=bounds.count("memory"),
        compute_points=bounds.count("compute"), memory_fitted=bool(fitted[1]), compute_fitted=bool(fitted[2]),
        layer_s_fitted=bool(fitted[0]), bounds=bounds, errors=errors, max_abs_error=max(abs(e) for e in errors),
        notes=notes,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The cache file
# ----------------------------------------------------------------------------------------------


# perf asks by the scheme's compute class, where fp16 and bf16 are one 16-bit class (both run at
# the same tensor-core rate on the GPUs in the catalog); bench saves by the dtype it ran.
_COMPUTE_CLASS = {"fp16": "bf16", "float16": "bf16", "bfloat16": "bf16", "float32": "fp32"}


def _key(gpu_name: str, dtype: str) -> str:
    d = dtype.strip().lower()
    return f"{gpu_name.strip()}|{_COMPUTE_CLASS.get(d, d)}"


def _read(path: Path) -> dict[str, Any]:
    """The file's entries; a missing or unreadable file is an empty cache (it is only a cache)."""
    from moeplan.safeio import loads_json, read_text

    if not path.exists():
        return {}
    try:  # a regular file of bounded size (a FIFO planted there would block forever), checked JSON
        data = loads_json(read_text(path, what="calibration cache", max_bytes=4 * 2**20), str(path))
    except MoeplanError:
        return {}
    return data if isinstance(data, dict) else {}


_LAST: dict[str, Any] = {}  # the file last read: its path and stat signature, and its entries


def _entries(path: Path) -> dict[str, Any]:
    """_read(path), read again only when the file changed (another path, size, mtime or inode: a save
    renames a new file over it): a fit asks for the calibration of every plan it ranks."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return {}
    signature = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    if _LAST.get("signature") != signature:
        _LAST.clear()
        _LAST.update(signature=signature, entries=_read(path))
    return _LAST["entries"]  # type: ignore[no-any-return]


def save_calibration(gpu_name: str, dtype: str, memory_eff: float, compute_eff: float, source: str, *,
                     layer_s: float | None = None, step_s: float | None = None,
                     peaks_assumed: bool = False, mode: str | None = None) -> Path:  # fmt: skip
    """Record (or replace) the efficiencies of one GPU and dtype, and, when measured, the per-layer and
    per-step overheads (seconds) that replace the engine's defaults. peaks_assumed: the device's peaks
    are moeplan's assumption (the host CPU), so efficiencies above 1 are kept. Returns the file written."""
    path = calibration_path()
    data = _read(path)
    upper = MAX_ASSUMED_EFFICIENCY if peaks_assumed else MAX_EFFICIENCY
    entry: dict[str, Any] = {
        "memory": clip_efficiency(memory_eff, upper),
        "compute": clip_efficiency(compute_eff, upper),
        "peaks": "assumed" if peaks_assumed else "datasheet",
        "source": source,
        "date": datetime.now(timezone.utc).date().isoformat(),
    }
    if mode is not None:  # cuda-graph | eager: the overheads measured hold for that launch mode only
        entry["mode"] = mode
    for name, value in (("layer_s", layer_s), ("step_s", step_s)):
        if value is not None:
            if not math.isfinite(value) or value < 0 or value > MAX_LAYER_S:
                raise MoeplanError(f"a calibration's {name} must be between 0 and 1 s, got {value!r}")
            entry[name] = value
    data[_key(gpu_name, dtype)] = entry
    from moeplan.safeio import write_atomic

    try:  # a temporary file renamed over: a crash or a full disk never leaves half a file
        import json  # only when saving: start-up imports no json

        write_atomic(path, lambda f: json.dump(data, f, indent=2, sort_keys=True))
    except OSError as exc:
        raise MoeplanError(f"cannot write calibration to {path}: {exc.strerror}; set MOEPLAN_CACHE") from None
    return path


def load_calibration(gpu_name: str, dtype: str) -> dict[str, Any] | None:
    """{'memory', 'compute', 'source', 'date'} (and 'layer_s', 'step_s' when measured) for this GPU
    and dtype, or None if never measured."""
    entry = _entries(calibration_path()).get(_key(gpu_name, dtype))
    if not isinstance(entry, dict):
        return None
    upper = MAX_ASSUMED_EFFICIENCY if entry.get("peaks") == "assumed" else MAX_EFFICIENCY
    try:
        out: dict[str, Any] = {
            "memory": clip_efficiency(float(entry["memory"]), upper),
            "compute": clip_efficiency(float(entry["compute"]), upper),
            "source": str(entry.get("source", "")),
            "date": str(entry.get("date", "")),
        }
        if entry.get("mode") in ("cuda-graph", "eager"):
            out["mode"] = entry["mode"]
        for name in ("layer_s", "step_s"):
            if entry.get(name) is not None:
                value = float(entry[name])
                if not math.isfinite(value) or not 0 <= value <= MAX_LAYER_S:
                    return None
                out[name] = value
        return out
    except (KeyError, TypeError, ValueError, MoeplanError):
        return None  # a damaged entry is as good as none
