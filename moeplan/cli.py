"""The typer app: thin commands, each one call into the core. The only module that prints or exits.

Exit codes everywhere: 0 success / fits / passes, 1 does not fit or misses a target, 2 bad input.
"""

# No `from __future__ import annotations` here, unlike the rest of the package: typer reads every
# command parameter's annotation, and string annotations cost it an eval each (~1.5 ms of fit's start-up).

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

try:  # typer >= 0.20 vendors click as typer._click; older typer uses the click package.
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover
    from click import exceptions as _cx


def _kinds(name: str) -> tuple[type[BaseException], ...]:
    """An exception class from typer's click (vendored or not), typer itself, and the click package
    when something else has loaded it (importing a second click costs start-up time)."""
    click = sys.modules.get("click")
    found = (getattr(getattr(click, "exceptions", None), name, None), getattr(_cx, name, None),
             getattr(typer, name, None))
    return tuple(dict.fromkeys(k for k in found if isinstance(k, type)))


_NO_ARGS, _USAGE, _EXIT, _ABORT = (_kinds(n) for n in ("NoArgsIsHelpError", "UsageError", "Exit", "Abort"))
from rich.console import Console, Group
from rich.markup import escape

from moeplan.escape import printable
from typer.core import TyperGroup

from moeplan.errors import MoeplanError
from moeplan.tables import responsive

EXIT_OK, EXIT_MISS, EXIT_BAD_INPUT = 0, 1, 2


class _GivesNone:
    """What typer's coercion (RuntimeParam.coerce) does with None, without what it needs for a value."""

    @staticmethod
    def coerce(value: Any, param: Any = None, ctx: Any = None) -> None:
        return None


def _coerce_none_without_an_adapter() -> None:
    """typer (0.2x) builds a pydantic TypeAdapter for an option before coercing its value, ~0.15 ms
    each, even when the value is None (an option not given, as 20 of `fit`'s 28 are in a plain run),
    which its coercion then returns untouched without using the adapter. This lets such an option take
    typer's own process_value (required check, callbacks) with None passed straight through; any other
    value, and a typer without these internals, goes the usual way. tests/test_cli_conventions.py checks
    the options still come out as typer gives them."""
    cls = getattr(getattr(typer, "core", None), "_TyperParameter", None)
    original = getattr(cls, "process_value", None)
    if cls is None or original is None or not hasattr(cls, "get_runtime_param") or getattr(original, "_moeplan", False):
        return

    def process_value(self: Any, ctx: Any, value: Any) -> Any:
        if value is not None or getattr(self, "_runtime_param", 0) is not None or self.multiple or self.nargs != 1:
            return original(self, ctx, value)
        self._runtime_param = _GivesNone
        try:
            return original(self, ctx, value)
        finally:
            self._runtime_param = None

    process_value._moeplan = True  # type: ignore[attr-defined]
    process_value._typer = original  # type: ignore[attr-defined]  # for the test that compares the two
    cls.process_value = process_value


_coerce_none_without_an_adapter()


class _Boundary(TyperGroup):
    """Turns every MoeplanError and usage error into one red line on stderr and exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except MoeplanError as exc:
            _fail(str(exc))
        except _NO_ARGS as exc:
            typer.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(EXIT_BAD_INPUT)
        except _USAGE as exc:
            cmd = exc.ctx.command_path if exc.ctx else "moeplan"
            _fail(f"{exc.format_message()} (see `{cmd} --help`)")
        except _EXIT as exc:
            if isinstance(exc.__cause__, KeyboardInterrupt):  # typer turns Ctrl-C into Exit(130), silently
                _fail("interrupted", EXIT_INTERRUPTED)
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        except _ABORT:  # click turns Ctrl-C in a prompt into Abort
            _fail("interrupted", EXIT_INTERRUPTED)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:  # the reader left (`| head`) before the verdict was reached
            _stdout_gone()
            sys.exit(EXIT_OK)
        except OSError as exc:  # stdout on a full disk (/dev/full) or closed
            _fail(f"cannot write the output: {exc.strerror or exc}")
        if rv == EXIT_INTERRUPTED:  # typer's Ctrl-C: Exit(130), returned as 130 without a word
            _fail("interrupted", EXIT_INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a program stopped by Ctrl-C
MAX_ERROR_CHARS = 2000  # an error line names the bad value; past this it quotes the start of it


def one_line(message: str) -> str:
    """The first line of a message, without pydantic's 'For further information visit' tail."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    cut = text.find("For further information visit")
    return (text[:cut] if cut >= 0 else text).strip().rstrip(";,") or "unknown error"


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    try:
        err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False, width=_width(sys.stderr))
        # User text (a model name of `[/]`, a file `deploy[prod].yaml`) is escaped, never markup.
        # Terminal escapes a user typed are shown, not obeyed; a value megabytes long is cut.
        from moeplan.escape import printable

        line = printable(one_line(message))
        if len(line) > MAX_ERROR_CHARS:
            line = line[:MAX_ERROR_CHARS] + f"... ({len(line) - MAX_ERROR_CHARS:,} more characters)"
        err.print(f"[red]error:[/red] {escape(line)}", markup=True)
    except Exception:  # stderr itself is unusable: the exit code still says it
        pass
    sys.exit(code)


def _width(stream: Any) -> int | None:
    """COLUMNS when set to something usable (honoured when piped too), else the terminal's own width
    on a terminal, else 120 so plan tables stay readable in pipes and CI logs. COLUMNS=0 or junk is
    ignored rather than letting rich print nothing."""
    import os

    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if 20 <= columns <= 1000:
        return columns
    try:
        return None if stream is not None and stream.isatty() else 120
    except (AttributeError, ValueError, OSError):
        return 120


def _stdout_gone() -> None:
    """The reader of stdout left: point fd 1 at /dev/null so later writes and the final flush are
    silent, and let the command finish with its own exit code."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


class _ReaderMayLeave:
    """sys.stdout for the whole run: when the reader leaves (`moeplan --version | true`, `check ... |
    head -1`), later output goes nowhere and the command ends with its own exit code. Without it click
    catches the broken pipe wherever it surfaces (help, --version, typer.echo) and exits 1, which
    reads as "does not fit"."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._gone = False

    def write(self, text: str) -> int:
        if not self._gone:
            try:
                return int(self._stream.write(text))
            except BrokenPipeError:
                self._leave()
        return len(text)

    def flush(self) -> None:
        if not self._gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._leave()

    def _leave(self) -> None:
        self._gone = True
        _stdout_gone()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer, ...
        return getattr(self._stream, name)


class _Out(Console):
    """stdout's console: when the reader leaves (`moeplan fit ... | head -1`), keep going quietly so
    the exit code is the verdict's (rich's default exits 1, which reads as "does not fit")."""

    def on_broken_pipe(self) -> None:
        _stdout_gone()


_APP_SETTINGS: dict[str, Any] = {
    "cls": _Boundary,
    "help": "Plan GPUs for Mixture-of-Experts models: parameters, memory, fit, speed, and a real-layer bench.",
    "no_args_is_help": True,
    "add_completion": True,
    "pretty_exceptions_enable": False,
    "rich_markup_mode": None,
}
app = typer.Typer(**_APP_SETTINGS)
# emoji=False: a model, card or file named ":smile:" prints as written (user text is never markup), and
# rich does not load its 3,600 emoji codes (~3 ms) for every reason that has a colon in it.
out = _Out(highlight=False, soft_wrap=False, emoji=False, width=_width(sys.stdout))


# Every JSON output carries schema_version (an object's top level; each element of a list output);
# `moeplan schema --output KIND` prints its JSON Schema. Bump on any change that is not an addition.
SCHEMA_VERSION = 1


def _versioned(data: Any) -> Any:
    if isinstance(data, dict):
        return {"schema_version": SCHEMA_VERSION, **data}
    if isinstance(data, list):
        return [_versioned(d) for d in data]
    return data


def _finite(data: Any) -> Any:
    """JSON has no Infinity or NaN (json.dumps would write them anyway): a number that is not finite
    (a speed of a plan that cannot run) is written as null."""
    if isinstance(data, float):
        return data if data == data and data not in (float("inf"), float("-inf")) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def _print_json(data: Any, *, versioned: bool = True) -> None:
    import json  # only for --json: importing it is ~1.5 ms of every start-up

    text = json.dumps(_finite(_versioned(data) if versioned else data), indent=2, allow_nan=False) + "\n"
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()


def _version(value: bool) -> None:
    if value:
        from moeplan import __version__

        sys.stdout.write(f"moeplan {__version__}\n")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Plan GPUs for Mixture-of-Experts models: parameters, memory, fit, speed, and a real-layer bench."""


def _tokens(text: str) -> int:
    from moeplan.units import parse_tokens

    return parse_tokens(text)


ModelArg = typer.Argument(..., help="Card name (mixtral-8x7b), Hub id (org/name[@rev]), or a path to config.json, "
                          "a card, or a .gguf file (its header only; pip install 'moeplan[gguf]')")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of tables.")
FromHubOpt = typer.Option(False, "--from-hub", help="Read the Hub even when a bundled card matches.")


@app.command()
def params(model: str = ModelArg, as_json: bool = JsonOpt, from_hub: bool = FromHubOpt) -> None:
    """Total and active parameters, by component.

    Example: moeplan params deepseek-v3
    """
    from moeplan.params import count_params
    from moeplan.report import params_notes, params_table

    spec = resolve_model(model, from_hub)
    count = count_params(spec)
    stored = spec.checkpoint
    if as_json:
        data = count.model_dump()
        if stored is not None:
            from moeplan.report import checkpoint_json

            data["checkpoint"] = checkpoint_json(stored, count)
        data["notes"] = list(spec.notes)
        _print_json(data)
        return
    out.print(responsive(params_table(count), drop=("total (exact)",)))
    out.print(params_notes(count))
    _print_notes(spec.notes)
    if stored is not None:
        from moeplan.report import checkpoint_lines

        out.print(checkpoint_lines(stored, count))


@app.command()
def models(as_json: bool = JsonOpt) -> None:
    """List the bundled model cards with total and active parameters.

    Example: moeplan models --json
    """
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
    out.print(responsive(models_table(rows), drop=("hub id",)))


QuantOpt = typer.Option(None, "--quant", "-q", help="bf16, fp16, fp32, fp8, int8, int4, awq, gptq, nf4, mxfp4, nvfp4, "
                        "q4_k_m, ... or experts=int4,rest=bf16. Default: the checkpoint as shipped.")
KvOpt = typer.Option("bf16", "--kv-dtype", help="KV cache dtype: bf16, fp16, fp8, int8, q8_0, q4.")


@app.command()
def memory(
    model: str = ModelArg,
    quant: str | None = QuantOpt,
    context: int = typer.Option(4096, "--context", "-c", parser=_tokens, metavar="TOKENS",
                                help="Tokens per sequence: 4096, 32k (= 32,768), 1m."),
    batch: int = typer.Option(1, "--batch", "-b", help="Concurrent sequences."),
    kv_dtype: str = KvOpt,
    mla_naive: bool = typer.Option(False, "--mla-naive", help="MLA: size the expanded per-head K/V cache."),
    mtp: bool = typer.Option(False, "--mtp", help="Load MTP layers (speculative decoding): their weights and KV."),
    as_json: bool = JsonOpt,
    from_hub: bool = FromHubOpt,
) -> None:
    """Weights by component, KV cache, activations and runtime overhead, before any split.

    Example: moeplan memory mixtral-8x7b --quant q4_k_m --context 32k
    """
    from moeplan.memory import memory_report
    from moeplan.quant import get_scheme, native_scheme
    from moeplan.report import memory_table

    spec = resolve_model(model, from_hub)
    scheme = get_scheme(quant) if quant else native_scheme(spec)
    rep = memory_report(spec, scheme, context=context, batch=batch, kv_dtype=kv_dtype, mla_naive=mla_naive, mtp=mtp)
    if as_json:
        _print_json(rep.model_dump())
        return
    out.print(responsive(memory_table(rep)))
    _print_notes(rep.notes)


GpusOpt = typer.Option(..., "--gpus", "-g", help="e.g. 2x24GB, 8xH100, 2xRTX4090, 1xA100-80GB,1xRTX4090")
NodesOpt = typer.Option(1, "--nodes", help="Nodes, each with the --gpus list.")
ContextOpt = typer.Option(4096, "--context", "-c", parser=_tokens, metavar="TOKENS",
                          help="Tokens per sequence (prompt + output): 4096, 32k (= 32,768), 1m.")
BatchOpt = typer.Option(1, "--batch", "-b", help="Concurrent sequences.")
FractionOpt = typer.Option(0.90, "--mem-fraction", help="Engine memory fraction of each GPU (vLLM gpu_memory_utilization).")


TpOpt = typer.Option(None, "--tp", help="Force tensor-parallel GPUs per stage.")
EpOpt = typer.Option(None, "--ep", help="Force expert-parallel GPUs (1, the --tp size, or with --dp-attention a stage).")
PpOpt = typer.Option(None, "--pp", help="Force pipeline stages.")
DpOpt = typer.Option(False, "--dp-attention", help="Force attention data-parallel beside expert parallelism (SGLang).")
RoutingOpt = typer.Option(None, "--routing", help="Expert routing: uniform (default), zipf:S, or a file of per-layer "
                          "expert frequencies (JSON or CSV).")
CapacityOpt = typer.Option(None, "--capacity-factor", help="Per-expert token budget C (GShard), for engines that "
                           "enforce one; vLLM/SGLang do not.")
RedundantOpt = typer.Option(0, "--redundant-experts", help="EPLB replicas of the hottest experts per EP group.")
PreferOpt = typer.Option(None, "--prefer", help="Rank plans for latency, throughput or memory (default: latency at "
                         "batch 1, throughput otherwise).")


def _request(tp: int | None, ep: int | None, pp: int | None, dp_attention: bool) -> Any:
    from moeplan.plan import LayoutRequest

    if tp is None and ep is None and pp is None and not dp_attention:
        return None
    return LayoutRequest(tp=tp, ep=ep, pp=pp, dp_attention=dp_attention)


def _offload_options(cpu_bw: str | None, disk_bw: float | None, locality: float | None,
                     expert_cache: int | None, n_cpu_moe: int | None = None) -> Any:
    from moeplan.offload import disk_bandwidth, ram_bandwidth
    from moeplan.plan import OffloadOptions

    if locality is not None and not 0 <= locality <= 1:
        raise MoeplanError(f"--locality must be between 0 and 1, got {locality}")
    if expert_cache is not None and expert_cache < 0:
        raise MoeplanError(f"--expert-cache must be 0 or more slots per layer, got {expert_cache}")
    if n_cpu_moe is not None and n_cpu_moe < 1:
        raise MoeplanError(f"--n-cpu-moe must be at least 1 layer, got {n_cpu_moe}")
    return OffloadOptions(host_gb_per_s=ram_bandwidth(cpu_bw), disk_gb_per_s=disk_bandwidth(disk_bw),
                          locality=locality, cache_slots=expert_cache,
                          cpu_moe_layers=n_cpu_moe)


def _routing(text: str | None, spec: Any) -> Any:
    """--routing parsed against the model's experts (None for a dense model or uniform routing)."""
    if text is None:
        return None
    from moeplan.routing import parse_routing

    if not spec.is_moe:
        raise MoeplanError(f"--routing: {spec.name} has no experts to route to")
    return parse_routing(text, spec.num_experts, spec.num_moe_layers)


def _parse_size(text: str | None) -> int | None:
    if text is None:
        return None
    from moeplan.units import parse_bytes

    return parse_bytes(text)


@app.command(name="fit")
def fit_cmd(
    model: str = ModelArg,
    gpus: str = GpusOpt,
    nodes: int = NodesOpt,
    quant: str | None = QuantOpt,
    context: int = ContextOpt,
    batch: int = BatchOpt,
    kv_dtype: str = KvOpt,
    mem_fraction: float = FractionOpt,
    cpu_mem: str | None = typer.Option(None, "--cpu-mem", help="Host RAM for expert offload, e.g. 768GB."),
    emit: str | None = typer.Option(None, "--emit", help="Print the launch command: vllm, sglang or llamacpp."),
    tp: int | None = TpOpt,
    ep: int | None = EpOpt,
    pp: int | None = PpOpt,
    dp_attention: bool = DpOpt,
    prefer: str | None = PreferOpt,
    price: str | None = typer.Option(None, "--price", help="USD per GPU-hour: 2.49, or H100=2.49,A100-80GB=1.29."),
    plot: Path | None = typer.Option(None, "--plot", help="Draw the best plan's memory per GPU to FILE (.svg or "
                                     ".png; needs moeplan[plot])."),
    routing: str | None = RoutingOpt,
    capacity_factor: float | None = CapacityOpt,
    redundant_experts: int = RedundantOpt,
    cpu_bw: str | None = typer.Option(None, "--cpu-bw", help="Host RAM bandwidth for offload: ddr4, ddr5 (default), "
                                      "ddr5-server, or GB/s."),
    disk_bw: float | None = typer.Option(None, "--disk-bw", help="GB/s experts are read from disk when RAM is short "
                                         "(llama.cpp mmap; default 1.5)."),
    locality: float | None = typer.Option(None, "--locality", help="P(an expert is used again by the next token); "
                                          "default 0.34, measured for Mixtral-8x7B."),
    expert_cache: int | None = typer.Option(None, "--expert-cache", help="GPU expert-cache slots per layer for the "
                                            "cached-offload figures (default: what the GPUs have left)."),
    n_cpu_moe: int | None = typer.Option(None, "--n-cpu-moe", help="Keep the experts of blocks 0..N-1 in RAM, as "
                                         "llama.cpp --n-cpu-moe N (default: the fewest that fit)."),
    as_json: bool = JsonOpt,
    from_hub: bool = FromHubOpt,
) -> None:
    """Does it fit? Every layout checked per GPU; largest context and batch; expert offload.

    Example: moeplan fit mixtral-8x7b --gpus 2x24GB"""
    from moeplan.hardware import parse_gpus
    from moeplan.perf import ranker
    from moeplan.plan import fit
    from moeplan.report import fit_verdict, memory_bars, plans_table, speed_basis, verdict_table

    from moeplan.cost import NO_PRICE_NOTE, parse_price

    spec = resolve_model(model, from_hub)
    gpu_list, n_nodes = parse_gpus(gpus, nodes)
    cost_price = parse_price(price)
    if cost_price is not None:
        cost_price.per_hour(gpu_list)  # a price for a GPU the plan does not use: say so before planning
    if plot is not None:
        from moeplan.plot import check_target

        check_target(plot)
    label = gpus if n_nodes == 1 else f"{n_nodes} nodes x {gpus}"
    routed = _routing(routing, spec)
    rank = ranker(nodes=n_nodes, price=cost_price, routing=routed)
    res = fit(spec, gpu_list, nodes=n_nodes, context=context, batch=batch, quant=quant, kv_dtype=kv_dtype,
              mem_fraction=mem_fraction, cpu_mem_bytes=_parse_size(cpu_mem), rank=rank, gpus_label=label,
              layout=_request(tp, ep, pp, dp_attention), prefer=prefer, redundant_experts=redundant_experts,
              capacity_factor=capacity_factor, offload=_offload_options(cpu_bw, disk_bw, locality, expert_cache, n_cpu_moe))
    command, emit_error = None, None
    if emit is not None:  # `--emit ''` is a mistake to say, not a flag to ignore
        try:
            command = _emit(emit, spec, res, gpu_list, rank)
        except MoeplanError as exc:  # the plan is still printed; the failure is one line, exit 2
            emit_error = str(exc)
    extra = list(speed_basis(gpu_list, res.best))
    if cost_price is None:
        extra.append(NO_PRICE_NOTE)
    else:
        cheap = min((p for p in res.plans if p.fits and p.speed and p.speed.usd_per_million_output_tokens_at_capacity),
                    key=lambda p: p.speed.usd_per_million_output_tokens_at_capacity, default=None)  # type: ignore[union-attr]
        if cheap is not None and cheap.speed is not None:
            extra.append(f"cheapest per output token: {cheap.quant} {cheap.layout} at "
                         f"{cheap.speed.usd_per_million_output_tokens_at_capacity:,.3f} USD per million at batch "
                         f"{cheap.speed.capacity_batch:,}")
    if plot is not None and res.best is not None:
        from moeplan.plot import plot_memory

        plot_memory(res.best, plot)
        extra.append(f"plot written to {plot}")
    res = res.model_copy(update={"notes": [*res.notes, *extra]})
    if as_json:
        _print_json({**res.model_dump(), "command": command})  # null unless --emit
    else:
        parts: list[Any] = [fit_verdict(res), responsive(verdict_table(res))]
        if res.plans:
            parts.append(responsive(plans_table(res), drop=("at max batch", "engine", "TTFT ms", "tok/s total",
                                                           "max batch")))
        if res.best is not None:
            parts.append(responsive(memory_bars(res.best, out.width)))
        if res.notes:
            parts.append(_notes_markup(res.notes))
        out.print(Group(*parts))  # one print: each print is a render and a write of its own
        if command:
            out.print(f"\n[b]launch ({emit}):[/b]")
            out.print(command, markup=False, highlight=False, soft_wrap=True)
    if emit_error is not None:
        _fail(f"--emit {emit}: {emit_error}")
    raise typer.Exit(EXIT_OK if res.fits else EXIT_MISS)  # true or "offload": it runs


def _notes_markup(notes: Sequence[str]) -> str:
    """Each note on its own dim "- " line, user text escaped (never markup)."""
    return "\n".join(f"[dim]- {escape(printable(note))}[/dim]" for note in notes)


def _print_notes(notes: Sequence[str]) -> None:
    """The notes in one print (each print is a render and a write of its own)."""
    if notes:
        out.print(_notes_markup(notes))


def _emit(engine: str, spec: Any, res: Any, gpus: Any, rank: Any) -> str | None:
    try:
        from moeplan.deploy import emit_for_fit
    except ImportError:  # pragma: no cover
        raise MoeplanError("--emit needs moeplan.deploy") from None
    return emit_for_fit(engine, spec, res, gpus, rank)


@app.command()
def perf(
    model: str = ModelArg,
    gpus: str = GpusOpt,
    nodes: int = NodesOpt,
    quant: str | None = QuantOpt,
    context: int = ContextOpt,
    batch: int = BatchOpt,
    prompt: int = typer.Option(1024, "--prompt", parser=_tokens, metavar="TOKENS", help="Prompt tokens for TTFT "
                               "(1024, 8k)."),
    kv_dtype: str = KvOpt,
    mem_fraction: float = FractionOpt,
    sweep: bool = typer.Option(False, "--sweep", help="Show the batch sweep (1, 4, 16, 64, 256, 1024)."),
    price: str | None = typer.Option(None, "--price", help="USD per GPU-hour: 2.49, or H100=2.49,A100-80GB=1.29."),
    plot: Path | None = typer.Option(None, "--plot", help="Draw the batch sweep to FILE (.svg or .png; needs "
                                     "moeplan[plot])."),
    routing: str | None = RoutingOpt,
    capacity_factor: float | None = CapacityOpt,
    redundant_experts: int = RedundantOpt,
    tp: int | None = TpOpt,
    ep: int | None = EpOpt,
    pp: int | None = PpOpt,
    dp_attention: bool = DpOpt,
    prefer: str | None = PreferOpt,
    as_json: bool = JsonOpt,
    from_hub: bool = FromHubOpt,
) -> None:
    """Prefill and decode speed of the best plan: an MoE-aware roofline with communication.

    Example: moeplan perf deepseek-v3 --gpus 8xH200 --batch 64 --sweep
    """
    from moeplan.hardware import parse_gpus
    from moeplan.layout import Scenario
    from moeplan.perf import PerfResult, perf_report, ranker
    from moeplan.plan import fit
    from moeplan.quant import get_scheme
    from moeplan.report import fit_verdict, perf_table, sweep_chart, sweep_table

    from moeplan.cost import parse_price

    spec = resolve_model(model, from_hub)
    if prompt < 1 or prompt > context:
        raise MoeplanError(f"--prompt must be between 1 and --context ({context}), got {prompt}")
    gpu_list, n_nodes = parse_gpus(gpus, nodes)
    cost_price = parse_price(price)
    if cost_price is not None:
        cost_price.per_hour(gpu_list)  # a price for a GPU the plan does not use: say so before planning
    if plot is not None:
        from moeplan.plot import check_target

        check_target(plot)
    label = gpus if n_nodes == 1 else f"{n_nodes} nodes x {gpus}"
    routed = _routing(routing, spec)
    res = fit(spec, gpu_list, nodes=n_nodes, context=context, batch=batch, quant=quant, kv_dtype=kv_dtype,
              mem_fraction=mem_fraction, rank=ranker(nodes=n_nodes, prompt=prompt, price=cost_price, routing=routed),
              gpus_label=label, layout=_request(tp, ep, pp, dp_attention), prefer=prefer,
              redundant_experts=redundant_experts, capacity_factor=capacity_factor)
    if res.best is None:
        if as_json:  # perf's keys, null, beside fit's verdict: one shape whether or not a plan fits
            _print_json({**dict.fromkeys(PerfResult.record_fields()), **res.model_dump(), "fits": False})
        else:
            out.print(fit_verdict(res))
        raise typer.Exit(EXIT_MISS)
    scheme = get_scheme(res.best.quant).for_model(spec)
    sc = Scenario(context=context, batch=batch, kv_dtype=kv_dtype, mem_fraction=mem_fraction,
                  redundant_experts=redundant_experts, capacity_factor=capacity_factor)
    rep = perf_report(spec, scheme, res.best, gpu_list, sc, prompt=prompt, nodes=n_nodes, gpus_label=label,
                      sweep=sweep or plot is not None, price=cost_price, routing=routed)
    if plot is not None:
        from moeplan.plot import plot_sweeps

        plot_sweeps([rep], plot)
        rep = rep.model_copy(update={"notes": [*rep.notes, f"plot written to {plot}"]})
    if as_json:
        _print_json({**rep.model_dump(), "fits": True})
        return
    out.print(responsive(perf_table(rep), drop=("error band",)))
    if sweep:
        out.print(responsive(sweep_table(rep), drop=("dense TPOT ms", "GB read/step", "bound", "tok/s/seq",
                                                      "distinct experts/layer")))
        out.print(sweep_chart(rep, out.width))
    _print_notes(rep.notes)


@app.command(name="compare")
def compare_cmd(
    models: list[str] = typer.Argument(..., help="Two or more models: card names, Hub ids or paths."),
    gpus: str = GpusOpt,
    nodes: int = NodesOpt,
    quant: str | None = QuantOpt,
    context: int = ContextOpt,
    batch: int = BatchOpt,
    price: str | None = typer.Option(None, "--price", help="USD per GPU-hour: 2.49, or H100=2.49,A100-80GB=1.29."),
    plot: Path | None = typer.Option(None, "--plot", help="Draw every model's batch sweep on one chart (.svg/.png)."),
    as_json: bool = JsonOpt,
    from_hub: bool = FromHubOpt,
) -> None:
    """MoE or dense on these GPUs: models side by side, and which wins on latency, throughput and cost.

    Example: moeplan compare mixtral-8x7b llama-2-70b --gpus 2xA100-80GB --price 1.29"""
    from moeplan.compare import compare
    from moeplan.cost import parse_price
    from moeplan.hardware import parse_gpus
    from moeplan.report import compare_table

    if len(models) < 2:
        raise MoeplanError("compare needs at least two models, e.g. `moeplan compare mixtral-8x7b llama-2-70b "
                           "--gpus 2xA100-80GB`")
    specs = [resolve_model(m, from_hub) for m in models]
    gpu_list, n_nodes = parse_gpus(gpus, nodes)
    cost_price = parse_price(price)
    if plot is not None:
        from moeplan.plot import check_target

        check_target(plot)
    label = gpus if n_nodes == 1 else f"{n_nodes} nodes x {gpus}"
    res, reports = compare(specs, gpu_list, nodes=n_nodes, quant=quant, context=context, batch=batch,
                           price=cost_price, gpus_label=label)
    if plot is not None:
        from moeplan.plot import plot_sweeps

        plot_sweeps(reports, plot)
        res = res.model_copy(update={"notes": [*res.notes, f"plot written to {plot}"]})
    if as_json:
        _print_json(res.model_dump())
    else:
        out.print(responsive(compare_table(res)))
        for line in res.verdict:
            out.print(f"- {escape(line)}")
        _print_notes(res.notes)
    raise typer.Exit(EXIT_OK if any(r.fits for r in res.rows) else EXIT_MISS)


@app.command(name="gpus")
def gpus_cmd(as_json: bool = JsonOpt) -> None:
    """The GPU catalog: memory, bandwidth, compute, links.

    Example: moeplan gpus
    """
    from rich.table import Table

    from moeplan.hardware import CATALOG

    if as_json:
        _print_json([g.model_dump() for g in CATALOG])
        return
    table = Table(title="GPU catalog (GB = 1e9 B, GiB = 2^30 B)", title_justify="left")
    for col in ("name", "memory", "usable GiB", "GB/s", "bf16 TFLOPS", "fp8", "link"):
        table.add_column(col, justify="left" if col in ("name", "link") else "right")
    for g in CATALOG:
        table.add_row(g.name, f"{g.memory_bytes / 1e9:,.0f} GB", f"{g.usable_bytes / 2**30:,.2f}", f"{g.hbm_gb_per_s:,.0f}",
                      f"{g.bf16_tflops:,.0f}", f"{g.fp8_tflops:,.0f}" if g.fp8_tflops else "-",
                      f"{g.link} {g.link_gb_per_s:,.0f} GB/s")
    from moeplan.tables import responsive

    out.print(responsive(table, drop=("link", "fp8", "usable GiB")))


@app.command()
def card(
    model: str = typer.Argument(..., help="Hub id org/name[@revision]"),
    output: str | None = typer.Option(None, "--output", "-o", help="Write the card here instead of stdout."),
) -> None:
    """Write a model card YAML from a Hub config.json, ready for model_cards/.

    Example: moeplan card Qwen/Qwen3-30B-A3B -o qwen3.yaml
    """
    from pathlib import Path

    from moeplan.hub import card_yaml_from_hub

    text = card_yaml_from_hub(model)
    if not output:
        sys.stdout.write(text)
        return
    from moeplan.safeio import check_path_text, write_atomic

    check_path_text(output, "--output")
    try:
        write_atomic(Path(output), lambda f: f.write(text))  # a full disk leaves no half-written card
    except OSError as exc:
        raise MoeplanError(f"cannot write {output}: {exc.strerror or exc}") from None
    out.print(f"wrote {escape(output)}")


@app.command()
def bench(
    model: str = ModelArg,
    device: str = typer.Option("cuda", "--device", help="cuda, cpu or mps"),
    quant: str = typer.Option("bf16", "--quant", "-q", help="bf16, fp16 or fp32"),
    batch: str | None = typer.Option(None, "--batch", "-b", help="Decode batches to sweep, e.g. 1,8,64,256 "
                                     "(default 1,8,64,256 on CUDA, 1,8 elsewhere)"),
    context: int = typer.Option(1024, "--context", "-c", parser=_tokens, metavar="TOKENS",
                                help="KV cache tokens for the decode steps (1024, 4k)"),
    prompt: str | None = typer.Option(None, "--prompt", help="Prefill lengths to sweep, e.g. 512,2048 (default "
                                      "512,2048 on CUDA, 1024,2048 elsewhere)"),
    layers: int = typer.Option(1, "--layers", help="Decoder layers to stack (MoE layers first)"),
    start_layer: int | None = typer.Option(None, "--start-layer", help="Index of the first layer to build"),
    full: bool = typer.Option(False, "--full", help="Build the whole model when it fits"),
    ep: int = typer.Option(1, "--ep", help="Expert-parallel processes (nccl on GPUs, gloo on CPU)"),
    routing: str = typer.Option("uniform", "--routing", help="uniform (the router's own top-k), zipf:S, or a file "
                                "of per-layer expert frequencies (JSON or CSV)"),
    eager: bool = typer.Option(False, "--eager", help="Time without CUDA graphs (launches included)"),
    repeats: int | None = typer.Option(None, "--repeats", help="Timed runs per point (default 20 on CUDA, 3 "
                                       "elsewhere)"),
    save_calibration: bool = typer.Option(False, "--save-calibration", help="Save the calibration fitted over "
                                          "the sweep, for perf, fit, check and bench"),
    as_json: bool = JsonOpt,
    from_hub: bool = FromHubOpt,
) -> None:
    """Build a real MoE layer at the model's true size, sweep batches and prompts, print predicted vs measured.

    Example: moeplan bench mixtral-8x7b --device cuda --batch 1,8,64
    """
    if device not in ("cuda", "cpu", "mps"):
        raise MoeplanError(f"--device must be cuda, cpu or mps, got '{device}'")
    if quant not in ("bf16", "fp16", "fp32"):
        raise MoeplanError(f"bench runs bf16, fp16 or fp32 weights, got '{quant}'")
    for name, value in (("--context", context), ("--layers", layers), ("--ep", ep), ("--repeats", repeats or 1)):
        if value < 1:
            raise MoeplanError(f"{name} must be at least 1, got {value}")
    from moeplan.bench.run import parse_sizes

    batches, prompts = parse_sizes(batch, "--batch"), parse_sizes(prompt, "--prompt")  # bad lists: exit 2 first
    spec = resolve_model(model, from_hub)
    try:
        from moeplan.bench.run import run_bench
    except ImportError as exc:
        raise MoeplanError(f"bench needs torch ({exc}): pip install 'moeplan[bench]'") from None
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("bench", total=None)

        def on_step(description: str, done: int, total: int) -> None:
            progress.update(task, description=description, completed=done, total=total)

        result = run_bench(spec, device=device, dtype=quant, batch=batches, context=context, prompt=prompts,  # type: ignore[arg-type]
                           layers=layers, full=full, ep=ep, repeats=repeats, eager=eager, routing=routing,
                           start_layer=start_layer, on_step=on_step)
    saved = None
    if save_calibration and result.fits:
        from moeplan.bench.run import save_result_calibration

        saved = save_result_calibration(result)
    if as_json:
        _print_json(result.model_dump())
    else:
        from moeplan.bench.table import bench_renderables

        for part in bench_renderables(result):
            out.print(part)
        _print_notes(result.notes)
        if saved is not None:
            out.print(f"[dim]calibration saved to {escape(str(saved))}: perf, fit, check and bench read it for "
                      f"{escape(result.gpu)} ({result.dtype})[/dim]")
    raise typer.Exit(EXIT_OK if result.fits else EXIT_MISS)


_FORMATS = ("table", "json", "markdown", "github")


@app.command()
def check(
    specs: list[Path] = typer.Argument(None, help="Deployment spec YAML files (see `moeplan schema`).",
                                       show_default=False),
    fmt: str = typer.Option("table", "--format", "-f", help="table, json, markdown (PR comment) or github "
                            "(workflow annotations)."),
    print_schema: bool = typer.Option(False, "--schema", help="Print the spec's JSON Schema and exit."),
    as_json: bool = typer.Option(False, "--json", help="Same as --format json (as on every other command)."),
) -> None:
    """Plan each deployment spec and check its targets: exit 0 all pass, 1 any misses, 2 any invalid.

    Example: moeplan check deploy.yaml --format github
    """
    from moeplan import deploy

    fmt = "json" if as_json else fmt

    if print_schema:
        _print_json(deploy.schema(), versioned=False)
        return
    if fmt not in _FORMATS:
        raise MoeplanError(f"unknown --format {fmt!r}; use one of: {', '.join(_FORMATS)}")
    if not specs:
        raise MoeplanError("no spec given; try `moeplan check examples/mixtral-2x4090-pass.yaml`")
    results = deploy.check_paths(specs)
    if fmt == "json":
        _print_json([r.model_dump(mode="json") for r in results])
    elif fmt == "markdown":
        sys.stdout.write(deploy.render_markdown(results))
    elif fmt == "github":
        sys.stdout.write(deploy.render_github(results))
    else:
        _check_table(results)
    raise typer.Exit(deploy.exit_code(results))


def _check_table(results: list[Any]) -> None:
    """The summary table (the model and reason columns go below it, one full line per spec)."""
    from rich.table import Table

    from moeplan import deploy
    from moeplan.escape import printable

    style = {"pass": "green", "fail": "red", "invalid": "yellow"}
    cols = [c for c in deploy.SUMMARY_COLUMNS if c not in ("model", "engine", "reason")]
    table = Table(title="moeplan check", title_justify="left")
    for col in cols:
        table.add_column(col, justify="right" if "/s" in col or col.endswith((" s", "GiB")) else "left",
                         no_wrap=col in ("result", "spec", "gpus", "plan"))
    rows = deploy.summary_rows(results)
    for row in rows:
        # Paths, models and GPU lists are user text: escaped, so `deploy[prod].yaml` is not markup.
        cells = {**{c: escape(v) for c, v in row.items()}, "spec": escape(Path(row["spec"]).name),
                 "result": f"[{style[row['result']]}]{row['result']}[/]"}
        table.add_row(*(cells[c] for c in cols))
    out.print(responsive(table, drop=("free GiB", "TTFT s", "total tok/s", "gpus", "TPOT s")))
    for r, row in zip(results, rows, strict=True):
        word = row["result"]
        about = f", {r.model} on {r.gpus} with {r.engine}" if r.model else ""
        out.print(f"\n[b]{escape(printable(r.path or r.name))}[/b]: {escape(printable(word + about))}", highlight=False)
        for line in deploy.detail_lines(r):
            out.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        if r.command and r.exit_code == 0:
            out.print(f"  launch ({r.engine}):", markup=False)
            out.print(f"  {r.command}", markup=False, highlight=False, soft_wrap=True)
            for note in r.command_notes:
                out.print(f"  [dim]- {escape(printable(note))}[/dim]", soft_wrap=True)
        for note in r.notes:
            if not note.startswith("ranked for "):  # the same for every spec: --format json keeps it
                out.print(f"  [dim]note: {escape(printable(note))}[/dim]", soft_wrap=True)


_SCHEMA_KINDS = ("spec", "fit", "perf", "memory", "params", "check", "compare")


@app.command()
def schema(
    output: str = typer.Option("spec", "--output", "-o", help="spec (the deployment spec file), or the --json "
                               "output of: fit, perf, memory, params, check, compare."),
) -> None:
    """Print a JSON Schema: the deployment spec's (for editors and `moeplan check`), or a command's --json output.

    Example: moeplan schema --output fit
    """
    if output not in _SCHEMA_KINDS:
        raise MoeplanError(f"--output {output!r}: one of {', '.join(_SCHEMA_KINDS)}")
    if output == "spec":
        from moeplan.deploy import schema as spec_schema

        _print_json(spec_schema(), versioned=False)
        return
    _print_json(output_schema(output), versioned=False)


def output_schema(kind: str) -> dict[str, Any]:
    """JSON Schema of `moeplan KIND --json`: the result model's schema, plus what the command adds."""
    from pydantic import BaseModel

    extra: dict[str, Any] = {}
    model: type[BaseModel]
    if kind == "fit":
        from moeplan.plan import FitResult as model

        extra = {"command": {"anyOf": [{"type": "string"}, {"type": "null"}],
                             "description": "The launch command with --emit, else null."}}
    elif kind == "perf":
        from moeplan.perf import PerfResult as model

        extra = {"fits": {"type": "boolean", "description": "false: no plan fits; the speed keys are then null "
                                                             "and fit's keys say why."}}
    elif kind == "memory":
        from moeplan.memory import MemoryReport as model
    elif kind == "params":
        from moeplan.params import ParamCount as model

        extra = {"checkpoint": {"type": "object", "description": "Hub reads only: what the safetensors headers "
                                                                 "store."},
                 "notes": {"type": "array", "items": {"type": "string"},
                           "description": "What the config reader could not count or assumed (may be empty)."}}
    elif kind == "compare":
        from moeplan.compare import CompareResult as model
    else:
        from moeplan.deploy import CheckResult as model
    body = model.model_json_schema(mode="serialization")
    body.setdefault("properties", {}).update(
        {"schema_version": {"const": SCHEMA_VERSION, "description": "Bumped on any change that is not an addition."},
         **extra})
    body["title"] = f"moeplan {kind} --json"
    if kind == "check":  # a list, one result per spec file
        return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "moeplan check --format json",
                "type": "array", "items": {k: v for k, v in body.items() if k != "$defs"}, "$defs": body.get("$defs", {})}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **body}


def resolve_model(model: str, from_hub: bool = False) -> Any:
    from moeplan.sources import resolve

    spec = resolve(model, from_hub=from_hub)
    # A config read from a local cache because the Hub was not asked or not reached: the checkpoint's
    # notes say so when cached headers were used; otherwise nothing in the output would.
    hub = sys.modules.get("moeplan.hub")  # not imported: the model did not come from the Hub
    if hub is not None and spec.checkpoint is None and hub.FROM_CACHE in (spec.source or ""):
        from moeplan.escape import printable

        sys.stderr.write(f"note: {printable(spec.source)}; no safetensors headers cached, so sizes are counted "
                         "from the config\n")
    return spec


def _app_for(first: list[str], environ: Any) -> typer.Typer:
    """The app with only the command `first` names, when it names one: typer converts every option of
    every registered command before running any, ~10 ms for moeplan's dozen commands on a 2-core box
    (issue 17's start-up bound). The command's own parsing, help and errors are the same; `moeplan`,
    `moeplan --help`, an unknown command and shell completion get the whole app."""
    if not first or any(k.startswith("_") and k.endswith("_COMPLETE") for k in environ):
        return app
    chosen = [c for c in app.registered_commands
              if (c.name or typer.main.get_command_name(c.callback.__name__ if c.callback else "")) == first[0]]
    if len(chosen) != 1:
        return app
    lean = typer.Typer(**_APP_SETTINGS)
    lean.registered_callback = app.registered_callback
    lean.registered_commands = chosen
    return lean


def main() -> None:
    import os

    # pydantic scans installed packages for plugins when the first model is built; moeplan uses none.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    if sys.stdout is None:  # started with stdout closed (`moeplan fit ... >&-`)
        _fail("stdout is closed; give somewhere to write (a file or a pipe)")
    for stream in (sys.stdout, sys.stderr):  # PYTHONIOENCODING=cp1252: a "┏" or a model name cannot crash a run
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    sys.stdout = _ReaderMayLeave(sys.stdout)  # type: ignore[assignment]
    try:
        _app_for(sys.argv[1:2], os.environ)()
    except KeyboardInterrupt:  # Ctrl-C outside the command (while importing)
        _fail("interrupted", EXIT_INTERRUPTED)
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_gone()
        except OSError:
            pass


if __name__ == "__main__":  # pragma: no cover
    main()
