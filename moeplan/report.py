"""Rich tables and bars, built from result models. No computation here beyond formatting."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text

from moeplan.memory import MemoryReport
from moeplan.params import ParamCount
from moeplan.spec import StoredCheckpoint

if TYPE_CHECKING:
    from moeplan.sources import Card

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
    table = Table(title=f"{count.model} parameters", title_justify="left")
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
        table.add_row(card.name, card.hub_id or "", billions(count.total_params), billions(count.active_params), experts)
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
    table = Table(title=f"{rep.model} memory, {rep.quant} weights, {rep.batch} x {rep.context:,} tokens, "
                  f"KV {rep.kv_dtype}", title_justify="left")
    table.add_column("part")
    table.add_column("GiB (2^30 B)", justify="right")
    table.add_column("GB (1e9 B)", justify="right")
    table.add_column("bytes", justify="right", style="dim")
    for name, n in rep.weights.items():
        table.add_row(f"weights: {name}", f"{n / GiB:,.2f}", f"{n / GB:,.2f}", f"{n:,}")
    table.add_section()
    rows = [
        ("weights", rep.weights_bytes),
        (f"KV cache ({rep.kv_bytes_per_token:,} B/token)", rep.kv_cache_bytes),
        (f"activations ({rep.chunk_tokens:,}-token prefill chunk)", rep.activation_bytes),
        ("runtime overhead (CUDA context, graphs)", rep.overhead_bytes),
    ]
    for name, n in rows:
        table.add_row(name, f"{n / GiB:,.2f}", f"{n / GB:,.2f}", f"{n:,}")
    table.add_section()
    table.add_row("[b]total[/b]", f"[b]{rep.total_bytes / GiB:,.2f}[/b]", f"[b]{rep.total_bytes / GB:,.2f}[/b]",
                  f"{rep.total_bytes:,}")
    return table
