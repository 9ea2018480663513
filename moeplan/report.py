"""Rich tables and bars, built from result models. No computation here beyond formatting."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:  # the result models are only read here; importing them would load compare (for fit too)
    from moeplan.compare import CompareResult, CompareRow
    from moeplan.hardware import Gpu
    from moeplan.memory import MemoryReport
    from moeplan.params import ParamCount
    from moeplan.perf import PerfResult
    from moeplan.plan import FitResult, Plan
    from moeplan.sources import Card
    from moeplan.spec import StoredCheckpoint

GB = 1e9
GiB = 2**30


def billions(n: int | float) -> str:
    if n == 0:
        return "0"
    return f"{n / 1e9:,.2f}B" if abs(n) >= 1e8 else f"{n / 1e6:,.1f}M"


def gib(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def gb(n: float) -> str:
    return f"{n / GB:,.2f} GB"


def both(n: float) -> str:
    """Bytes as 'GiB (GB)': every memory label says which unit it is."""
    return f"{n / GiB:,.2f} GiB ({n / GB:,.2f} GB)"


def params_table(count: ParamCount) -> Table:
    table = Table(title=f"{escape(count.model)} parameters", title_justify="left")
    table.add_column("component")
    table.add_column("total", justify="right")
    table.add_column("active / token", justify="right")
    table.add_column("total (exact)", justify="right", style="dim")
    for comp in count.components:
        table.add_row(comp.name, billions(comp.total), billions(comp.active), f"{comp.total:,}")
    table.add_section()
    table.add_row("[b]total[/b]", f"[b]{billions(count.total_params)}[/b]", f"[b]{billions(count.active_params)}[/b]",
                  f"{count.total_params:,}")
    table.add_row("active excl. input embedding", "", billions(count.active_params_excl_input_embedding),
                  f"{count.active_params_excl_input_embedding:,}")
    if count.mtp_params:
        table.add_row("MTP layers (apart)", billions(count.mtp_params), "", f"{count.mtp_params:,}")
    return table


def params_notes(count: ParamCount) -> Text:
    lines = [
        "total: every weight of the main model (MTP layers apart); active: what one token touches, "
        "input embedding and lm_head included (Mixtral/Qwen convention).",
        "active excl. input embedding: the DeepSeek-V3 / gpt-oss convention.",
    ]
    if count.mtp_params:
        lines.append(
            f"MTP: {billions(count.mtp_params)} unique; the checkpoint stores {billions(count.mtp_params_stored)} "
            "with its copies of the embedding and lm_head."
        )
    return Text("\n".join(lines), style="dim")


def models_table(rows: list[tuple[Card, ParamCount]]) -> Table:
    table = Table(title="bundled model cards", title_justify="left")
    table.add_column("name")
    table.add_column("hub id", style="dim")
    table.add_column("total", justify="right")
    table.add_column("active", justify="right")
    table.add_column("experts", justify="right")
    for card, count in rows:
        spec = card.spec()
        experts = f"{spec.experts_per_token}/{spec.num_experts}" if spec.is_moe else "-"
        if spec.num_shared_experts:
            experts += f" +{spec.num_shared_experts}s"
        table.add_row(escape(card.name), escape(card.hub_id or ""), billions(count.total_params), billions(count.active_params), experts)
    return table


def checkpoint_json(stored: StoredCheckpoint, count: ParamCount) -> dict[str, object]:
    """Counted vs stored, with the difference explained (MTP layers, scales, packed 4-bit blocks)."""
    return {
        "stored_params": stored.total_params,
        "stored_params_by_dtype": dict(stored.params_by_dtype),
        "stored_bytes": stored.total_bytes,
        "num_files": stored.num_files,
        "counted_params": count.total_params,
        "difference": stored.total_params - count.total_params,
        "explanation": list(stored.notes),
    }


def checkpoint_lines(stored: StoredCheckpoint, count: ParamCount) -> Text:
    dtypes = ", ".join(f"{k} {billions(v)}" for k, v in sorted(stored.params_by_dtype.items()))
    lines = [
        f"checkpoint stores {billions(stored.total_params)} elements ({dtypes}) in {stored.num_files} file(s), "
        f"{both(stored.total_bytes)}; counted from the config: {billions(count.total_params)}",
        *stored.notes,
    ]
    return Text("\n".join(lines))


def memory_table(rep: MemoryReport) -> Table:
    table = Table(title=f"{escape(rep.model)} memory, {rep.quant} weights, {rep.batch} x {rep.context:,} tokens, "
                  f"KV {rep.kv_dtype}", title_justify="left")
    table.add_column("part")
    table.add_column("GiB (2^30 B)", justify="right")
    table.add_column("GB (1e9 B)", justify="right")
    table.add_column("bytes", justify="right", style="dim")
    for name, n in rep.weights.items():
        table.add_row(f"weights: {name}", f"{n / GiB:,.2f}", f"{n / GB:,.2f}", f"{n:,}")
    table.add_section()
    rows = [("weights", rep.weights_bytes)]
    if rep.kv_window_bytes or rep.state_bytes:
        # Each kind of cache on its own line: what grows with context, what windows cap, what is fixed.
        if rep.kv_grows_bytes:
            rows.append((f"KV cache, grows ({rep.kv_bytes_per_token_beyond_windows:,} B/token)", rep.kv_grows_bytes))
        if rep.kv_window_bytes:
            rows.append(("KV cache, sliding windows (capped)", rep.kv_window_bytes))
        if rep.state_bytes:
            rows.append((f"fixed state ({rep.state_bytes_per_sequence:,} B/sequence)", rep.state_bytes))
    else:
        rows.append((f"KV cache ({rep.kv_bytes_per_token:,} B/token)", rep.kv_cache_bytes))
    rows += [
        (f"activations ({rep.chunk_tokens:,}-token prefill chunk)", rep.activation_bytes),
        ("runtime overhead (CUDA context, graphs)", rep.overhead_bytes),
    ]
    for name, n in rows:
        table.add_row(name, f"{n / GiB:,.2f}", f"{n / GB:,.2f}", f"{n:,}")
    if len(rep.cache_by_term) > 1:
        table.add_section()
        for name, n in rep.cache_by_term.items():
            table.add_row(f"[dim]cache: {name}[/dim]", f"{n / GiB:,.2f}", f"{n / GB:,.2f}", f"{n:,}")
    table.add_section()
    table.add_row("[b]total[/b]", f"[b]{rep.total_bytes / GiB:,.2f}[/b]", f"[b]{rep.total_bytes / GB:,.2f}[/b]",
                  f"{rep.total_bytes:,}")
    return table


def _speed_cells(plan: Plan) -> tuple[str, str, str]:
    if plan.speed is None:
        return "", "", ""
    s = plan.speed
    return f"{s.decode_tok_per_s:,.1f}", f"{s.decode_tok_per_s_total:,.0f}", f"{s.ttft_s * 1000:,.0f}"


def speed_basis(gpus: tuple[Gpu, ...], plan: Plan | None) -> list[str]:
    """Which efficiencies the speed columns assume, per GPU type: a calibration saved by `moeplan
    bench --save-calibration` for this GPU and compute dtype, else the defaults (and how to measure)."""
    if plan is None or plan.speed is None:
        return []
    from moeplan.calibration import calibration_path
    from moeplan.perf import efficiency_for
    from moeplan.quant import get_scheme

    dtype = get_scheme(plan.quant).compute
    notes = []
    for name, gpu in {g.name: g for g in gpus}.items():
        eff = efficiency_for(gpu, dtype, engine=plan.engine)
        basis = f"memory {eff.memory:.2f}, compute {eff.compute:.2f}"
        if eff.source.startswith("calibration"):
            notes.append(f"speed on {name} ({dtype}) uses your {eff.source}: {basis} ({calibration_path()})")
        else:
            notes.append(f"speed on {name} ({dtype}) uses default efficiencies ({basis}); "
                         "`moeplan bench --save-calibration` on this GPU measures yours")
    return notes


def fit_verdict(res: FitResult) -> Text:
    best = res.best
    if res.fits is True and best is not None:
        msg = (f"FITS: {res.model} on {res.gpus} with {best.quant}, {best.layout} "
               f"(up to {best.max_context:,} tokens at batch {res.batch}, or batch {best.max_batch:,} at "
               f"{res.context:,} tokens)")
        return Text(msg, style="bold green")
    if best is not None and best.offload is not None:
        o = best.offload
        where = "CPU RAM" if o.tier == "ram" else f"CPU RAM and disk ({o.ram_share:.0%} in RAM)"
        lines = [f"DOES NOT FIT on the GPUs alone; RUNS WITH EXPERT OFFLOAD: {best.quant}, routed experts of "
                 f"{o.cpu_moe_layers} of {o.moe_layers} MoE layers in {where} ({o.cpu_bytes / GiB:,.1f} GiB of "
                 f"{o.cpu_budget_bytes / GiB:,.1f} GiB usable)"]
        sp = best.speed
        if sp is not None:
            from moeplan.perf import ENGINE_MEMORY_EFFICIENCY

            cpu_eff = ENGINE_MEMORY_EFFICIENCY["llama.cpp cpu experts"]
            lines.append(f"  llama.cpp (--n-cpu-moe; experts run on the CPU from {o.host_gb_per_s:g} GB/s RAM, "
                         f"{cpu_eff:.0%} of it reached, fitted): "
                         f"{sp.tpot_s * 1e3:,.1f} ms per token mean, {(sp.offload_p99_tpot_s or sp.tpot_s) * 1e3:,.1f}"
                         " ms p99")
            if sp.cache_tpot_s is not None:
                lines.append(f"  an engine with a GPU expert cache (every layer's experts in RAM, {o.cache_slots} slot{'' if o.cache_slots == 1 else 's'} "
                             f"per layer on the GPU, LRU, locality {sp.cache_locality or o.locality:.2g}): hit rate "
                             f"{sp.cache_hit_rate:.0%}, {sp.cache_tpot_s * 1e3:,.1f} ms mean, "
                             f"{(sp.cache_p99_tpot_s or 0) * 1e3:,.1f} ms p99 (misses over PCIe)")
        return Text("\n".join(lines), style="bold yellow")
    return Text(f"DOES NOT FIT: {res.model} on {res.gpus} at {res.context:,} tokens x batch {res.batch}",
                style="bold red")


def verdict_table(res: FitResult) -> Table:
    table = Table(title="quantizations tried (weights in GiB)", title_justify="left")
    table.add_column("quant")
    table.add_column("weights", justify="right")
    table.add_column("fits")
    table.add_column("why")
    for v in res.verdicts:
        table.add_row(v.quant, f"{v.weights_bytes / GiB:,.1f}", "[green]yes[/green]" if v.fits else "[red]no[/red]",
                      v.reason)
    return table


def plans_table(res: FitResult) -> Table:
    table = Table(title="plans (memory per GPU in GiB; best first)", title_justify="left")
    for col, just in (("quant", "left"), ("layout", "left"), ("engine", "left"), ("fits", "left"),
                      ("max GPU use", "right"),
                      ("max context", "right"), ("max batch", "right"), ("tok/s/seq", "right"),
                      ("tok/s total", "right"), ("TTFT ms", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    priced = any(p.speed is not None and p.speed.usd_per_hour is not None for p in res.plans)
    if priced:  # at the batch asked (beside tok/s total), and at the largest batch that fits
        table.add_column("USD/Mtok out", justify="right")
        table.add_column("at max batch", justify="right")
    for plan in res.plans:
        worst = max(plan.per_gpu, key=lambda r: r.used_bytes / max(r.budget_bytes, 1)) if plan.per_gpu else None
        use = f"{worst.used_bytes / GiB:,.1f}/{worst.budget_bytes / GiB:,.1f}" if worst else ""
        cost = []
        if priced:
            sp = plan.speed
            cost = [f"{usd:,.3f}" if usd is not None else "" for usd in (
                sp.usd_per_million_output_tokens if sp else None,
                sp.usd_per_million_output_tokens_at_capacity if sp else None)]
        table.add_row(plan.quant, plan.layout, plan.engine, "[green]yes[/green]" if plan.fits else "[red]no[/red]", use,
                      f"{plan.max_context:,}" if plan.fits else "-", f"{plan.max_batch:,}" if plan.fits else "-",
                      *_speed_cells(plan), *cost)
    return table


def _bar_width(term_width: int | None, *cells: Sequence[str], widest: int = 40) -> int:
    """How wide a bar can be beside columns holding `cells` (each kept whole) in `term_width` columns:
    at most `widest`, at least 8; box-less rich tables pad every column with one space each side."""
    if term_width is None:
        return widest
    fixed = sum(max((len(c) for c in col), default=0) for col in cells) + 2 * (len(cells) + 1)
    return max(8, min(widest, term_width - fixed))


def memory_bars(plan: Plan, width: int | None = None) -> Table:
    """One bar per GPU: weights, KV, activations, overhead, free (of the engine's budget); `width`, the
    terminal's, narrows the bars so the numbers beside them stay whole."""
    state = any(row.state_bytes for row in plan.per_gpu)
    table = Table(title=f"per-GPU memory, {plan.quant} {plan.layout} "
                  "([blue]w[/blue]eights [magenta]k[/magenta]v " + ("[cyan]s[/cyan]tate " if state else "")
                  + "[yellow]a[/yellow]ct [red]o[/red]verhead "
                  "[dim].[/dim] free; GiB of budget)", title_justify="left", show_header=False, box=None)
    table.add_column("gpu")
    table.add_column("bar", no_wrap=True)
    table.add_column("use", justify="right", no_wrap=True)
    rows = plan.per_gpu[:16]
    labels = [f"GPU {row.index} {row.name}" + (f" (x{row.count})" if row.count > 1 else "") for row in rows]
    uses = [f"{row.used_bytes / GiB:,.1f}/{row.budget_bytes / GiB:,.1f}" + ("" if row.fits else " OVER")
            for row in rows]
    bar_width = _bar_width(width, labels, uses)
    for row, label, use in zip(rows, labels, uses):
        scale = bar_width / max(row.budget_bytes, row.used_bytes, 1)
        parts = [("w", row.weights_bytes, "blue"), ("k", row.kv_bytes - row.state_bytes, "magenta"),
                 ("s", row.state_bytes, "cyan"), ("a", row.activation_bytes, "yellow"),
                 ("o", row.overhead_bytes, "red")]
        bar = Text()
        for ch, n, style in parts:
            bar.append(ch * round(n * scale), style=style)
        bar.append("." * max(0, bar_width - len(bar.plain)), style="dim")
        table.add_row(escape(label), bar, use.replace(" OVER", " [red]OVER[/red]"))
    if len(plan.per_gpu) > 16:
        table.add_row("...", f"{len(plan.per_gpu) - 16} more rows in --json", "")
    return table


def perf_table(res: PerfResult) -> Table:
    table = Table(title=f"{escape(res.model)} on {escape(res.gpus)}: {res.quant}, {res.layout}, batch {res.batch}, "
                  f"context {res.context:,}", title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("error band", justify="right", style="dim")
    rows = [
        (f"TTFT ({res.prompt:,}-token prompt)", f"{res.ttft_s * 1000:,.1f} ms",
         f"{res.ttft_s_low * 1000:,.1f}-{res.ttft_s_high * 1000:,.1f} ms"),
        ("prefill", f"{res.prefill_tok_per_s:,.0f} tok/s", ""),
        ("TPOT", f"{res.tpot_s * 1000:,.2f} ms", f"{res.tpot_s_low * 1000:,.2f}-{res.tpot_s_high * 1000:,.2f} ms"),
        ("decode per sequence", f"{res.decode_tok_per_s:,.1f} tok/s",
         f"{res.decode_tok_per_s_low:,.1f}-{res.decode_tok_per_s_high:,.1f}"),
        ("decode all sequences", f"{res.decode_tok_per_s_total:,.1f} tok/s",
         f"{res.decode_tok_per_s_total_low:,.1f}-{res.decode_tok_per_s_total_high:,.1f}"),
        ("decode bound", res.bound, ""),
        ("bytes read per decode step", f"{res.decode_bytes_per_step / GB:,.2f} GB", ""),
        ("distinct experts per MoE layer", f"{res.decode_distinct_experts:,.1f}", ""),
        ("communication per step", f"{res.comm_s_per_step * 1000:,.2f} ms", ""),
        ("engine assumed", res.engine, f"band: {res.band_regime}"),
    ]
    if res.usd_per_hour is not None:
        rows += [("price of the GPUs", f"{res.usd_per_hour:,.2f} USD/h", ""),
                 ("USD per million output tokens", f"{res.usd_per_million_output_tokens:,.3f}",
                  f"at batch {res.batch}"),
                 ("USD per million input tokens", f"{res.usd_per_million_input_tokens:,.3f}", "at the prefill rate")]
    for k, v, band in rows:
        table.add_row(k, v, band)
    return table


def sweep_table(res: PerfResult) -> Table:
    moe = any("moe_advantage" in r for r in res.sweep)
    priced = any("usd_per_million_output_tokens" in r for r in res.sweep)
    table = Table(title="batch sweep (decode)", title_justify="left")
    cols = ["batch", "fits", "TPOT ms", "tok/s/seq", "tok/s total", "GB read/step", "bound"]
    cols += ["distinct experts/layer", "dense TPOT ms", "MoE vs dense"] if moe else []
    cols += ["USD/Mtok out"] if priced else []
    for col in cols:
        table.add_column(col, justify="left" if col == "fits" else "right")
    for r in res.sweep:
        fits = str(r["fits"])
        cells = [str(r["batch"]), "[green]yes[/green]" if fits == "yes" else "[red]no[/red]",
                 f"{float(r['tpot_s']) * 1000:,.2f}", f"{float(r['decode_tok_per_s']):,.1f}",
                 f"{float(r['decode_tok_per_s_total']):,.0f}", f"{float(r['bytes_per_step']) / GB:,.2f}", str(r["bound"])]
        if moe:
            cells += [f"{float(r['distinct_experts']):,.1f}", f"{float(r['dense_tpot_s']) * 1000:,.2f}",
                      f"{float(r['moe_advantage']):.2f}x"]
        if priced:
            cells.append(f"{float(r['usd_per_million_output_tokens']):,.3f}")
        table.add_row(*cells, style=None if fits == "yes" else "dim")
    return table


def compare_table(res: CompareResult) -> Table:
    """One column per model, one row per figure."""
    table = Table(title=f"compare on {escape(res.gpus)}, context {res.context:,}, batch {res.batch}", title_justify="left")
    table.add_column("figure")
    for r in res.rows:
        table.add_column(escape(r.model), justify="right")

    def cells(fn: Callable[[CompareRow], str]) -> list[str]:
        return [fn(r) if r.fits else "-" for r in res.rows]

    table.add_row("kind", *[r.kind for r in res.rows])
    table.add_row("total / active params", *[f"{billions(r.total_params)} / {billions(r.active_params)}"
                                             for r in res.rows])
    table.add_row("fits", *["[green]yes[/green]" if r.fits else "[red]no[/red]" for r in res.rows])
    table.add_row("best plan", *cells(lambda r: f"{r.quant} {r.layout} ({r.engine})"))
    table.add_row("weights", *cells(lambda r: both(r.weights_bytes or 0)))
    table.add_row(f"KV + state per sequence at {res.context:,}", *[both(r.kv_bytes_per_sequence) for r in res.rows])
    table.add_row("weights read per token (all GPUs)", *cells(lambda r: gb(r.weights_read_per_token_bytes or 0)))
    table.add_row(f"GB read per step, busiest GPU (batch {res.batch})",
                  *cells(lambda r: gb(r.decode_bytes_per_step or 0)))
    table.add_row("TTFT", *cells(lambda r: f"{(r.ttft_s or 0) * 1e3:,.1f} ms"))
    table.add_row(f"TPOT (batch {res.batch})", *cells(lambda r: f"{(r.tpot_s or 0) * 1e3:,.2f} ms"))
    table.add_row(f"tok/s per user (batch {res.batch})", *cells(lambda r: f"{r.decode_tok_per_s or 0:,.1f}"))
    table.add_row(f"tok/s per user (batch {res.common_batch:,})",
                  *cells(lambda r: f"{r.tok_per_s_per_user_at_common_batch or 0:,.1f}"))
    table.add_row("largest batch that fits", *cells(lambda r: f"{r.max_batch:,}"))
    table.add_row("tok/s total at capacity", *cells(lambda r: f"{r.capacity_tok_per_s or 0:,.0f} (batch "
                                                              f"{r.capacity_batch:,})"))
    table.add_row("tok/s per user at capacity",
                  *cells(lambda r: f"{(r.capacity_tok_per_s or 0) / max(r.capacity_batch, 1):,.1f}"))
    if any(r.usd_per_million_output_tokens is not None for r in res.rows):
        table.add_row("USD per million output tokens (capacity)",
                      *cells(lambda r: f"{r.usd_per_million_output_tokens:,.3f}"
                             if r.usd_per_million_output_tokens is not None else ""))
        table.add_row("USD per million input tokens (prefill)",
                      *cells(lambda r: f"{r.usd_per_million_input_tokens:,.3f}"
                             if r.usd_per_million_input_tokens is not None else ""))
    return table


def sweep_chart(res: PerfResult, width: int | None = None) -> Table:
    """The sweep as a compact chart: one bar of total tok/s per batch, per-user tok/s beside it; `width`,
    the terminal's, narrows the bars so the numbers beside them stay whole."""
    table = Table(title="tok/s total by batch (bar) and per user (right); dim: does not fit", title_justify="left",
                  show_header=False, box=None)
    table.add_column("batch", justify="right", no_wrap=True)
    table.add_column("bar", no_wrap=True)
    table.add_column("tok/s", justify="right", no_wrap=True)
    top = max((float(r["decode_tok_per_s_total"]) for r in res.sweep), default=1.0) or 1.0
    batches = [str(r["batch"]) for r in res.sweep]
    speeds = [f"{float(r['decode_tok_per_s_total']):,.0f} / {float(r['decode_tok_per_s']):,.1f} per user"
              for r in res.sweep]
    bar_width = _bar_width(width, batches, speeds)
    for r, batch, speed in zip(res.sweep, batches, speeds):
        total = float(r["decode_tok_per_s_total"])
        style = "cyan" if r["fits"] == "yes" else "dim"
        bar = Text("#" * max(1, round(total / top * bar_width)), style=style)
        table.add_row(batch, bar, speed)
    return table
