"""The typer app: thin commands, each one call into the core. The only module that prints or exits.

Exit codes everywhere: 0 success / fits / passes, 1 does not fit or misses a target, 2 bad input.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from moeplan.errors import MoeplanError

EXIT_OK, EXIT_MISS, EXIT_BAD_INPUT = 0, 1, 2


class _Boundary(TyperGroup):
    """Turns every MoeplanError and usage error into one red line on stderr and exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except MoeplanError as exc:
            _fail(str(exc))
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(EXIT_BAD_INPUT)
        except click.UsageError as exc:
            cmd = exc.ctx.command_path if exc.ctx else "moeplan"
            _fail(f"{exc.format_message()} (see `{cmd} --help`)")
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            _fail("aborted")
        except KeyboardInterrupt:
            _fail("interrupted")
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"[red]error:[/red] {message}", markup=True)
    sys.exit(code)


app = typer.Typer(
    cls=_Boundary,
    help="Plan GPUs for Mixture-of-Experts models: parameters, memory, fit, speed, and a real-layer bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
out = Console(highlight=False, soft_wrap=False)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


ModelArg = typer.Argument(..., help="Card name (mixtral-8x7b), Hub id (org/name[@rev]) or path to config.json / card")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of tables.")
FromHubOpt = typer.Option(False, "--from-hub", help="Read the Hub even when a bundled card matches.")


@app.command()
def params(model: str = ModelArg, as_json: bool = JsonOpt, from_hub: bool = FromHubOpt) -> None:
    """Total and active parameters, by component."""
    from moeplan.params import count_params
    from moeplan.report import params_notes, params_table
    from moeplan.sources import resolve

    spec = resolve(model, from_hub=from_hub)
    count = count_params(spec)
    stored = spec.checkpoint
    if as_json:
        data = count.model_dump()
        if stored is not None:
            from moeplan.report import checkpoint_json

            data["checkpoint"] = checkpoint_json(stored, count)
        _print_json(data)
        return
    out.print(params_table(count))
    out.print(params_notes(count))
    if stored is not None:
        from moeplan.report import checkpoint_lines

        out.print(checkpoint_lines(stored, count))


@app.command()
def models(as_json: bool = JsonOpt) -> None:
    """List the bundled model cards with total and active parameters."""
    from moeplan.params import count_params
    from moeplan.report import models_table
    from moeplan.sources import bundled_cards

    rows = [(card, count_params(card.spec())) for card in bundled_cards()]
    if as_json:
        _print_json(
            [
                {"name": c.name, "hub_id": c.hub_id, "aliases": list(c.aliases), "total_params": n.total_params,
                 "active_params": n.active_params}
                for c, n in rows
            ]
        )
        return
    out.print(models_table(rows))


QuantOpt = typer.Option(None, "--quant", "-q", help="bf16, fp16, fp32, fp8, int8, int4, awq, gptq, nf4, mxfp4, nvfp4, "
                        "q4_k_m, ... or experts=int4,rest=bf16. Default: the checkpoint as shipped.")
KvOpt = typer.Option("bf16", "--kv-dtype", help="KV cache dtype: bf16, fp16, fp8, int8, q8_0, q4.")


@app.command()
def memory(
    model: str = ModelArg,
    quant: str | None = QuantOpt,
    context: int = typer.Option(4096, "--context", "-c", help="Tokens per sequence."),
    batch: int = typer.Option(1, "--batch", "-b", help="Concurrent sequences."),
    kv_dtype: str = KvOpt,
    mla_naive: bool = typer.Option(False, "--mla-naive", help="MLA: size the expanded per-head K/V cache."),
    mtp: bool = typer.Option(False, "--mtp", help="Load MTP layers (speculative decoding): their weights and KV."),
    as_json: bool = JsonOpt,
    from_hub: bool = FromHubOpt,
) -> None:
    """Weights by component, KV cache, activations and runtime overhead, before any split."""
    from moeplan.memory import memory_report
    from moeplan.quant import get_scheme, native_scheme
    from moeplan.report import memory_table

    spec = resolve_model(model, from_hub)
    scheme = get_scheme(quant) if quant else native_scheme(spec)
    rep = memory_report(spec, scheme, context=context, batch=batch, kv_dtype=kv_dtype, mla_naive=mla_naive, mtp=mtp)
    if as_json:
        _print_json(rep.model_dump())
        return
    out.print(memory_table(rep))
    for note in rep.notes:
        out.print(f"[dim]- {note}[/dim]")


def resolve_model(model: str, from_hub: bool = False) -> Any:
    from moeplan.sources import resolve

    return resolve(model, from_hub=from_hub)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
