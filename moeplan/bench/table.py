"""Rich tables for `moeplan bench` (a BenchResult; no torch): the sweep with measured median and
spread beside the planner's prediction before and after this run's calibration, memory, the
routing counts against the planner's formulas, and expert-parallel phases."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

GiB = 2**30


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:,.3f}" if ms < 10 else f"{ms:,.1f}"


def _pct(value: float | None, signed: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:+.0%}" if signed else f"{value:.0%}"


def _point_label(p: Any) -> str:
    return f"decode b{p.batch}" if p.kind == "decode" else f"prefill {p.tokens:,}"


def title(r: Any) -> str:
    return (f"{r.model} on {r.device_name} ({r.device}), {r.dtype}, layers {r.layers}, MoE path {r.path}, "
            f"timed {r.mode}, context {r.context:,}, routing {r.routing}, {r.repeats} repeats")  # fmt: skip


def sweep_table(r: Any) -> Table:
    """One row per point, times in ms: measured median and min-max over the repeats, the planner's
    prediction as it stood and with this run's calibration, errors as (measured - predicted) / predicted."""
    table = Table(title=escape(title(r)), title_justify="left")
    for col in ("point", "measured ms", "min-max", "IQR", "predicted", "error", "calibrated", "error", "bound"):
        table.add_column(col, justify="left" if col in ("point", "bound") else "right", no_wrap=True)
    for p in r.points:
        table.add_row(_point_label(p), _ms(p.measured_s), f"{_ms(p.min_s)}-{_ms(p.max_s)}",
                      f"{_ms(p.q1_s)}-{_ms(p.q3_s)}", _ms(p.predicted_s), _pct(p.error), _ms(p.calibrated_s),
                      _pct(p.calibrated_error), p.bound)  # fmt: skip
    return table


def moved_table(r: Any) -> Table:
    """What each point moved: bytes/s against the measured copy bandwidth and the datasheet peak,
    FLOP/s against the peak, and distinct experts per MoE layer, measured / the planner's expectation."""
    copy = f"{r.copy_gb_per_s:,.0f}" if r.copy_gb_per_s else "-"
    basis = "assumed" if r.peaks_assumed else "datasheet"
    table = Table(title=f"achieved (copy {copy} GB/s measured; peak {r.peak_gb_per_s:,.0f} GB/s and "
                  f"{r.peak_tflops:,.3g} TFLOP/s, {basis})", title_justify="left")  # fmt: skip
    for col in ("point", "GB moved", "GB/s", "of copy", "of peak", "TFLOP/s", "of peak", "experts meas/pred"):
        table.add_column(col, justify="left" if col == "point" else "right", no_wrap=True)
    for p in r.points:
        experts = "-"
        if p.distinct_experts:
            mean = sum(p.distinct_experts) / len(p.distinct_experts)
            pred = p.predicted_distinct_experts
            experts = f"{mean:.1f} / {pred:.1f}" if pred is not None else f"{mean:.1f}"
        table.add_row(_point_label(p), f"{p.bytes / 1e9:,.3f}", f"{p.gb_per_s:,.1f}", _pct(p.fraction_of_copy, False),
                      _pct(p.fraction_of_peak_bandwidth, False), f"{p.tflops:,.3f}",
                      _pct(p.fraction_of_peak_flops, False), experts)  # fmt: skip
    return table


def memory_table(r: Any) -> Table:
    table = Table(title="memory (GiB)", title_justify="left")
    for col in ("figure", "predicted", "measured", "error"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    pb, mb = r.predicted.param_bytes, r.measured.param_bytes
    table.add_row("param_bytes", _gib(pb), _gib(mb), _pct((mb - pb) / pb if pb and mb is not None else None))
    for p in r.points:
        if p.kind == "prefill" and p.peak_bytes is not None and p.predicted_peak_bytes:
            err = (p.peak_bytes - p.predicted_peak_bytes) / p.predicted_peak_bytes
            table.add_row(f"peak_bytes, prefill {p.tokens:,}", _gib(p.predicted_peak_bytes), _gib(p.peak_bytes),
                          _pct(err))
    return table


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:,.3f}"


def routing_table(r: Any) -> Table | None:
    if not r.routing_check:
        return None
    ep = r.routing_check[0].ranks > 1
    table = Table(title=f"routing {escape(r.routing)}: distinct experts per MoE layer over random batches, "
                  "vs moeplan.routing.rank_load", title_justify="left")  # fmt: skip
    cols = ["batch", "draws", "measured", "predicted", "error"]
    if ep:
        cols += ["busiest rank experts", "predicted", "busiest rank pairs", "predicted"]
    for col in cols:
        table.add_column(col, justify="right")
    for c in r.routing_check:
        row = [str(c.batch), str(c.draws), f"{c.distinct_measured:.2f}", f"{c.distinct_predicted:.2f}",
               _pct(c.distinct_error)]  # fmt: skip
        if ep:
            row += [f"{c.busiest_distinct_measured:.2f}", f"{c.busiest_distinct_predicted:.2f}",
                    f"{c.busiest_assignments_measured:.2f}", f"{c.busiest_assignments_predicted:.2f}"]  # fmt: skip
        table.add_row(*row)
    return table


def ep_table(r: Any) -> Table | None:
    ep = r.ep
    if ep is None:
        return None
    table = Table(title=f"expert parallel: {ep.ranks} ranks, {ep.tokens} tokens ({ep.tokens // ep.ranks} per rank), "
                  "slowest rank's median", title_justify="left")  # fmt: skip
    for col in ("phase", "predicted ms", "measured ms", "error"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for label, pred, meas in (("dispatch (all-to-all)", ep.predicted_dispatch_s, ep.dispatch_s),
                              ("combine (all-to-all)", ep.predicted_combine_s, ep.combine_s)):  # fmt: skip
        table.add_row(f"EP {label}", _ms(pred), _ms(meas), _pct(meas / pred - 1) if pred else "-")
    table.add_row("EP layout (counts, sizes to host)", "", _ms(ep.layout_s), "")
    table.add_row(f"EP experts ({ep.tokens} tokens)", "", _ms(ep.experts_s), "")
    err = ep.busiest_assignments / ep.predicted_busiest_assignments - 1 if ep.predicted_busiest_assignments else None
    table.add_row("busiest rank's token-expert pairs", f"{ep.predicted_busiest_assignments:.2f}",
                  str(ep.busiest_assignments), _pct(err))  # fmt: skip
    return table


def summary_lines(r: Any) -> list[str]:
    lines = []
    if r.copy_gb_per_s:
        basis = "moeplan's assumption" if r.peaks_assumed else "datasheet"
        after = f" ({r.copy_after_gb_per_s:,.1f} after the sweep)" if r.copy_after_gb_per_s else ""
        lines.append(f"device copy bandwidth, measured: {r.copy_gb_per_s:,.1f} GB/s{after} (read + write); peaks "
                     f"({basis}, {r.gpu}): {r.peak_gb_per_s:,.0f} GB/s, {r.peak_tflops:,.3g} TFLOP/s")  # fmt: skip
    kernels = f"; kernels: {', '.join(r.kernels)}" if r.kernels else ""
    lines.append(f"MoE kernel path: {r.path} ({r.path_detail}){kernels}")
    c = r.calibration
    if c is not None:
        lines.append(
            f"calibration fitted over {len(r.points)} points (timed {c.mode}): memory {c.memory:.3g} "
            f"({c.memory_points} memory-bound{'' if c.memory_fitted else ', kept'}), compute {c.compute:.3g} "
            f"({c.compute_points} compute-bound{'' if c.compute_fitted else ', kept'}), {c.layer_s * 1e6:,.1f} us per "
            f"layer; largest |error| {c.max_abs_error_before:.0%} before, {c.max_abs_error_after:.0%} after"
        )  # fmt: skip
        lines.extend(c.notes)
    return lines


def bench_renderables(r: Any) -> list[RenderableType]:
    """Everything `moeplan bench` prints, in order."""
    out: list[RenderableType] = []
    if r.fits:
        out.extend([sweep_table(r), moved_table(r)])
    out.append(memory_table(r))
    for extra in (routing_table(r), ep_table(r)):
        if extra is not None:
            out.append(extra)
    if not r.fits:
        out.append(Text.from_markup(f"[red]does not fit:[/red] {escape(str(r.oom))}"))
    else:
        out.append(Group(*(Text(line) for line in summary_lines(r))))
    return out
