"""Pictures: the batch sweep (tok/s per user against total tok/s, one line per model or layout) and
memory per GPU by component. matplotlib is an optional extra (`pip install 'moeplan[plot]'`),
imported only here, only when a plot is asked for, so the planner starts fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moeplan.errors import MoeplanError

FORMATS = (".svg", ".png")


def check_target(path: Path) -> None:
    """Refuse a plot file moeplan cannot write, before any planning: wrong suffix, missing folder, no
    matplotlib."""
    if path.suffix.lower() not in FORMATS:
        raise MoeplanError(f"--plot {path}: write a .svg or .png file")
    if not path.parent.exists():
        raise MoeplanError(f"--plot {path}: folder {path.parent} does not exist")
    if path.exists() and not path.is_file():  # a FIFO would block the write forever; a folder fails late
        raise MoeplanError(f"--plot {path}: exists and is not a regular file; name a new .svg or .png file")
    _pyplot()


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no screen
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoeplanError("--plot needs matplotlib: pip install 'moeplan[plot]'") from None
    return plt


def _save(fig: Any, path: Path) -> None:
    from moeplan.safeio import write_atomic

    import warnings

    fmt = path.suffix.lower().lstrip(".")
    try:  # whole or not at all: a full disk leaves no half-written plot
        with warnings.catch_warnings():  # matplotlib's layout advice is not the user's to read on stderr
            warnings.simplefilter("ignore")
            write_atomic(path, lambda f: fig.savefig(f, format=fmt, bbox_inches="tight"), binary=True)
    except OSError as exc:
        raise MoeplanError(f"cannot write {path}: {exc.strerror or exc}") from None


def plot_sweeps(results: Sequence[Any], path: Path, *, target_tok_per_s: float | None = None) -> None:
    """Per-user decode tok/s against total tok/s over the batch sweep, one line per result (a
    PerfResult with its `sweep`); hollow markers where the batch does not fit, a star where the
    planned batch is. `target_tok_per_s`: a horizontal line at the per-user target."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for res in results:
        rows = res.sweep
        if not rows:
            continue
        x = [float(r["decode_tok_per_s_total"]) for r in rows]
        y = [float(r["decode_tok_per_s"]) for r in rows]
        (line,) = ax.plot(x, y, "-", label=f"{res.model} ({res.quant}, {res.layout})")
        for r, xi, yi in zip(rows, x, y):
            filled = r["fits"] == "yes"
            ax.plot([xi], [yi], "o", color=line.get_color(), markerfacecolor=line.get_color() if filled else "none")
            ax.annotate(str(r["batch"]), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.plot([res.decode_tok_per_s_total], [res.decode_tok_per_s], "*", color=line.get_color(), markersize=12)
    if target_tok_per_s:
        ax.axhline(target_tok_per_s, linestyle="--", color="grey", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("total output tok/s (log)")
    ax.set_ylabel("output tok/s per user")
    ax.set_title("decode: per-user vs total throughput by batch (hollow: does not fit; star: planned)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing fits: an empty chart, no legend to draw
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def plot_memory(plan: Any, path: Path) -> None:
    """Memory per GPU row by component (weights by component, KV, activations, overhead) against the
    engine's budget, in GiB."""
    plt = _pyplot()
    gib = 2**30
    rows = plan.per_gpu[:32]
    names = sorted({k for r in rows for k in r.weights})
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.5 * len(rows) + 1.5))
    labels = [f"GPU {r.index} {r.name}" + (f" x{r.count}" if r.count > 1 else "") for r in rows]
    left = [0.0] * len(rows)
    parts = [(f"weights: {n}", [r.weights.get(n, 0) / gib for r in rows]) for n in names]
    parts += [("KV cache", [(r.kv_bytes - r.state_bytes) / gib for r in rows]),
              ("fixed state", [r.state_bytes / gib for r in rows]),
              ("activations", [r.activation_bytes / gib for r in rows]),
              ("overhead", [r.overhead_bytes / gib for r in rows])]
    for label, widths in parts:
        if not any(widths):
            continue
        ax.barh(labels, widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths)]
    for i, r in enumerate(rows):
        ax.plot([r.budget_bytes / gib] * 2, [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax.set_xlabel("GiB (2^30 bytes); black mark: the engine's budget")
    ax.set_title(f"memory per GPU: {plan.quant} {plan.layout}")
    ax.legend(fontsize=7, loc="lower right")
    ax.invert_yaxis()
    _save(fig, path)
    plt.close(fig)
