"""The floor for `benchmarks/startup.py`: a typer app of moeplan fit's shape and nothing else.

Two commands, six options on the one that runs, one rich table printed, the same Console setup as
moeplan's cli.py. What moeplan costs above this is its own (imports, the fit search, its tables);
what this costs is Python, typer, click and rich, which every typer CLI pays.

Run: python -m startup_reference fit mixtral-8x7b --gpus 2x24GB   (from benchmarks/, as startup.py does)
"""

# No `from __future__ import annotations`, as in moeplan's cli.py: typer evaluates string annotations.
import sys

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
out = Console(highlight=False, soft_wrap=False, emoji=False, width=None if sys.stdout.isatty() else 120)


@app.command()
def fit(
    model: str = typer.Argument(..., help="Model name."),
    gpus: str = typer.Option(..., "--gpus", "-g", help="e.g. 2x24GB"),
    quant: str | None = typer.Option(None, "--quant", "-q", help="Quantization."),
    context: int = typer.Option(4096, "--context", "-c", help="Tokens per sequence."),
    batch: int = typer.Option(1, "--batch", "-b", help="Concurrent sequences."),
    kv_dtype: str = typer.Option("bf16", "--kv-dtype", help="KV cache dtype."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """One rich table, with the columns of moeplan's plans table and a few rows."""
    table = Table(title=f"plans for {model} on {gpus} (memory per GPU in GiB; best first)", title_justify="left")
    for col in ("quant", "layout", "fits", "max GPU use", "max context", "max batch", "tok/s/seq"):
        table.add_column(col, justify="left" if col in ("quant", "layout", "fits") else "right")
    for q, layout, use in (("bf16", "tp2 ep1 pp1", 44.9), ("fp8", "tp2 ep1 pp1", 22.6), ("int4", "tp1 ep1 pp2", 12.1)):
        table.add_row(quant or q, layout, "yes" if use < 21.6 else "no", f"{use:.1f}/21.6", f"{context:,}", f"{batch}",
                      kv_dtype)
    out.print(table)


@app.command()
def perf(
    model: str = typer.Argument(..., help="Model name."),
    gpus: str = typer.Option(..., "--gpus", "-g", help="e.g. 2x24GB"),
) -> None:
    """The second command: present so typer builds a group, as moeplan's app is one."""
    out.print(f"{model} on {gpus}")


if __name__ == "__main__":
    app()
