"""moeplan's predictions against published measurements of MoE inference (docs/validation.md).

Every case in tests/fixtures/published_throughput.yaml is predicted here with moeplan's Python API
and printed as a markdown table: published, predicted, ratio = predicted / published, the ratio
band docs/validation.md claims for it, and the command that reproduces the prediction. Rates and
times alike: for a rate a ratio above 1 means moeplan is optimistic, for a time (TPOT, TTFT, ITL)
that it is pessimistic.

Predictions only: nothing is measured. Calibrations saved by `moeplan bench` are ignored (the
script points MOEPLAN_CACHE at an empty folder), so the defaults of moeplan.perf.Efficiency apply.

Run: python benchmarks/validate.py             (the tables and counts in docs/validation.md)
     python benchmarks/validate.py --case ID   (how one row is computed, step by step)

The output has four blocks, each in docs/validation.md verbatim: the predicted-vs-published table,
the same scenarios in the layout `moeplan perf` picks itself, the summary counts, and the effect of
the two communication changes of commit 0df33c3 on the multi-node rows.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from moeplan import perf
from moeplan.hardware import Gpu, parse_gpus
from moeplan.layout import Layout, Scenario, even_stages
from moeplan.perf import StepCost, perf_report, rank_plan, ranker, step_cost
from moeplan.plan import Plan, evaluate, fit, layout_of
from moeplan.quant import QuantScheme, get_scheme
from moeplan.sources import resolve
from moeplan.spec import ModelSpec

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "published_throughput.yaml"
GOAL = (0.5, 2.0)  # the goal for modern engines: predicted within 0.5x-2x of published


@dataclass(frozen=True)
class Case:
    """How moeplan is asked about one published figure.

    layout: None = whatever `moeplan perf`/`fit` picks (the row is then exactly that command);
    else (tp, ep, dp_attention) as the source states it, evaluated through the API."""

    id: str
    model: str
    gpus: str
    quant: str
    metric: str  # one of METRICS
    batch: int = 1
    context: int = 1024
    prompt: int = 1024
    output: int = 0  # generated tokens per request, for end-to-end rates
    nodes: int = 1
    layout: tuple[int, int, bool] | None = None
    cpu_mem: str | None = None  # for `fit --cpu-mem` (expert offload)
    band: tuple[float, float] = GOAL  # the ratio docs/validation.md claims; outliers carry their own
    current: bool = True  # an engine release of 2025 or later: held to the 0.5x-2x goal
    note: str = ""  # the doc's outlier note ("O1"), or "" for rows within 0.5x-2x
    same_check: str = ""  # the row whose check this one repeats (one deployment read twice), or ""

    @property
    def check(self) -> str:
        """The independent check this row belongs to: rows that re-read one prediction share it."""
        return self.same_check or self.id


# Loads are inputs, not predictions. Where a source gives throughput and latency of one deployment
# but not its concurrency, the concurrency follows from Little's law (sequences in flight = tok/s x
# seconds per token); the two rows then test one step time, so the second counts with the first.
DS6_DECODE_BATCH = round(18 * 14800 / 21)  # 18 nodes x 14.8k tok/s per node / 21 tok/s per user
# LMSYS states its loads: decode 256 sequences per GPU at a KV length of 2,000 ("Profile Results"
# table); prefill 16,384 tokens per GPU, stated for the 4K-prompt run whose 50,302 tok/s the same
# table repeats and assumed for the 1K and 2K runs.
LMSYS_DECODE_BATCH = 9 * 8 * 256
LMSYS_PREFILL_TOKENS_PER_GPU = 16384
M2MAX_QUANTS = ("q2_k", "q3_k_m", "q4_k_m", "q4_0", "q5_k_m", "q6_k", "q8_0")  # the source's rows moeplan has

CASES: tuple[Case, ...] = (
    # DeepSeek's own serving: one prefill sequence of the average KV length per DP rank.
    Case("ds6-prefill-node", "deepseek-v3", "8xH800", "fp8", "prefill_node_incl_cache", batch=32, context=4989,
         prompt=4989, nodes=4, layout=(1, 32, True)),
    Case("ds6-decode-node", "deepseek-v3", "8xH800", "fp8", "decode_node", batch=DS6_DECODE_BATCH, context=4989,
         prompt=4989, nodes=18, layout=(1, 144, True)),
    Case("ds6-decode-user", "deepseek-v3", "8xH800", "fp8", "decode_user", batch=DS6_DECODE_BATCH, context=4989,
         prompt=4989, nodes=18, layout=(1, 144, True), same_check="ds6-decode-node"),
    *(Case(f"lmsys-prefill-{s // 1024}k", "deepseek-v3", "8xH100", "fp8", "prefill_node",
           batch=32 * LMSYS_PREFILL_TOKENS_PER_GPU // s, context=s, prompt=s, nodes=4, layout=(1, 32, True))
      for s in (1024, 2048, 4096)),
    Case("lmsys-decode-node", "deepseek-v3", "8xH100", "fp8", "decode_node", batch=LMSYS_DECODE_BATCH, context=2000,
         prompt=2000, nodes=9, layout=(1, 72, True)),
    Case("lmsys-decode-itl", "deepseek-v3", "8xH100", "fp8", "tpot_ms", batch=LMSYS_DECODE_BATCH, context=2000,
         prompt=2000, nodes=9, layout=(1, 72, True), same_check="lmsys-decode-node"),
    # SGLang 0.4.1 (December 2024): a static batch, every prompt prefilled together, then 256 steps,
    # costed at their mean context (128 + 256 / 2). Flags not given for these runs: plain TP8 assumed.
    Case("sglang041-b1", "deepseek-v3", "8xH200", "fp8", "static_batch_out", batch=1, context=256, prompt=128,
         output=256, layout=(8, 1, False), band=(2.4, 3.2), current=False, note="O1"),
    Case("sglang041-b8", "deepseek-v3", "8xH200", "fp8", "static_batch_out", batch=8, context=256, prompt=128,
         output=256, layout=(8, 1, False), band=(2.1, 2.8), current=False, note="O1"),
    Case("sglang041-b32", "deepseek-v3", "8xH200", "fp8", "static_batch_out", batch=32, context=256, prompt=128,
         output=256, layout=(8, 1, False), current=False),
    # InferenceX #870: a fixed number of requests in flight, each 1k in / 1k out; TPOT at the mean
    # context. The per-GPU rate is Little's law over the same TPOT, so it counts with the TPOT row.
    *(Case(f"inferencex-c{c}-tpot", "deepseek-v3", "8xH200", "fp8", "tpot_ms", batch=c, context=1536, prompt=1024,
           output=1024, layout=(8, 1, False)) for c in (8, 16, 32, 64)),
    *(Case(f"inferencex-c{c}-gpu", "deepseek-v3", "8xH200", "fp8", "concurrency_out_per_gpu", batch=c,
           context=1536, prompt=1024, output=1024, layout=(8, 1, False), same_check=f"inferencex-c{c}-tpot")
      for c in (8, 16, 32, 64)),
    # llama.cpp, December 2023, three days after Mixtral support landed.
    Case("llamacpp-a100-q5km", "mixtral-8x7b", "1xA100", "q5_k_m", "decode_tok_s", context=256, prompt=9,
         band=(2.7, 3.6), current=False, note="O2"),
    Case("llamacpp-h100-q5km", "mixtral-8x7b", "1xH100", "q5_k_m", "decode_tok_s", context=256, prompt=9,
         band=(3.2, 4.3), current=False, note="O2"),
    *(Case(f"m2max-{q}", "mixtral-8x7b", "1xM2-Max", q, "decode_tok_s", context=128, prompt=128, current=False)
      for q in M2MAX_QUANTS),
    # Quantization not stated in the comment: 20 layers filling a 24 GB card is ~1 GB a layer, Q5_K_M's
    # size (Q4_0 layers are ~0.8 GB and would let ~26 fit). fit picks 12 CPU-MoE layers, as many as the
    # 12 decoder layers the user left on the CPU.
    Case("rtx4090-offload", "mixtral-8x7b", "1xRTX4090", "q5_k_m", "offload_decode_tok_s", context=8192,
         prompt=512, cpu_mem="64GB", current=False),
    # TensorRT-LLM int8 weight-only (baseten-truss): int8 expert weights, bf16 GEMMs.
    Case("trtllm-a100-ttft", "mixtral-8x7b", "1xA100", "experts=int8,rest=bf16", "ttft_ms", context=640, prompt=512,
         current=False),
    Case("trtllm-a100-tps", "mixtral-8x7b", "1xA100", "experts=int8,rest=bf16", "request_out", context=640,
         prompt=512, output=128, current=False),
)


@dataclass
class Prediction:
    case: Case
    published: dict[str, Any]
    value: float
    ratio: float
    layout: str
    fits: bool
    steps: dict[str, StepCost] = field(default_factory=dict)
    cli_layout: str | None = None  # what the CLI picks for the same scenario, when not `layout`
    cli_value: float | None = None  # the CLI's own field for the metric, where it has one
    cli_metric: float | None = None  # the row's metric computed in the CLI's layout

    @property
    def in_goal(self) -> bool:
        return GOAL[0] <= self.ratio <= GOAL[1]


@contextmanager
def defaults_only() -> Iterator[None]:
    """No saved `moeplan bench` calibration: the published defaults of moeplan.perf.Efficiency."""
    old = os.environ.get("MOEPLAN_CACHE")
    with tempfile.TemporaryDirectory() as empty:
        os.environ["MOEPLAN_CACHE"] = empty
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("MOEPLAN_CACHE", None)
            else:
                os.environ["MOEPLAN_CACHE"] = old


@cache
def published() -> dict[str, Any]:
    data = yaml.safe_load(FIXTURE.read_text(encoding="utf-8"))
    return {"sources": data["sources"], "cases": {c["id"]: c for c in data["cases"]}}


@cache
def _spec(model: str) -> ModelSpec:
    return resolve(model)


def _setup(case: Case) -> tuple[ModelSpec, QuantScheme, tuple[Gpu, ...], int]:
    spec = _spec(case.model)
    gpus, nodes = parse_gpus(case.gpus, case.nodes)
    return spec, get_scheme(case.quant).for_model(spec), gpus, nodes


def cli_command(case: Case) -> str:
    """The `moeplan` command for the case's scenario (exact for rows without a forced layout)."""
    nodes = f" --nodes {case.nodes}" if case.nodes > 1 else ""
    quant = f"'{case.quant}'" if "," in case.quant else case.quant
    if case.cpu_mem:
        return (f"moeplan fit {case.model} --gpus {case.gpus}{nodes} --quant {quant} --context {case.context} "
                f"--cpu-mem {case.cpu_mem} --json")
    return (f"moeplan perf {case.model} --gpus {case.gpus}{nodes} --quant {quant} --batch {case.batch} "
            f"--context {case.context} --prompt {case.prompt} --json")


def _cli_path(case: Case) -> tuple[Plan, dict[str, float]]:
    """What `moeplan perf` (or `fit --cpu-mem`) does: the best plan of fit, then its speed."""
    return _cli_scenario(case.model, case.gpus, case.nodes, case.quant, case.batch, case.context, case.prompt,
                         case.cpu_mem)


@cache  # rows that read two fields of one command share its run
def _cli_scenario(model: str, gpus_text: str, n: int, quant: str, batch: int, context: int, prompt: int,
                  cpu_mem: str | None) -> tuple[Plan, dict[str, float]]:
    case = Case("", model, gpus_text, quant, "", batch=batch, context=context, prompt=prompt, nodes=n,
                cpu_mem=cpu_mem)
    spec, scheme, gpus, nodes = _setup(case)
    cpu = int(float(case.cpu_mem.rstrip("GB")) * 1e9) if case.cpu_mem else None
    # As the CLI ranks: `perf` with the node count and prompt, `fit --cpu-mem` (one node here) with neither.
    rank = rank_plan if case.cpu_mem else ranker(nodes=nodes, prompt=case.prompt)
    res = fit(spec, gpus, nodes=nodes, context=case.context, batch=case.batch, quant=case.quant,
              cpu_mem_bytes=cpu, rank=rank)
    if res.best is None:
        raise SystemExit(f"moeplan finds no plan for {cli_command(case)}")
    if case.cpu_mem:
        assert res.best.speed is not None
        return res.best, res.best.speed.model_dump()
    sc = Scenario(context=case.context, batch=case.batch)
    scheme = get_scheme(res.best.quant).for_model(spec)
    rep = perf_report(spec, scheme, res.best, gpus, sc, prompt=case.prompt, nodes=nodes, sweep=False)
    return res.best, rep.model_dump()


def _layout(case: Case, spec: ModelSpec) -> Layout:
    assert case.layout is not None
    tp, ep, dp = case.layout
    return Layout(tp=tp, ep=ep, pp=1, dp_attention=dp, stage_layers=even_stages(spec.num_layers, 1))


def _steps(case: Case, layout: Layout | None = None) -> tuple[Plan, dict[str, StepCost]]:
    """The plan of the forced layout, or of `layout`, (for its fit verdict) and the steps the metric needs."""
    spec, scheme, gpus, nodes = _setup(case)
    layout = layout or _layout(case, spec)
    plan = evaluate(spec, scheme, layout, gpus, Scenario(context=case.context, batch=case.batch))

    def step(tokens_per_seq: int, batch: int, context: int) -> StepCost:
        return step_cost(spec, scheme, layout, gpus, tokens_per_seq=tokens_per_seq, batch=batch, context=context,
                         nodes=nodes)

    steps = {"decode": step(1, case.batch, case.context)}
    if case.metric.startswith("prefill"):
        steps["prefill"] = step(case.prompt, case.batch, case.prompt)  # one sequence per DP rank
    elif case.metric == "static_batch_out":
        steps["prefill"] = step(case.prompt, case.batch, case.prompt)  # the whole batch prefilled at once
    elif case.metric == "concurrency_out_per_gpu":
        steps["prefill"] = step(case.prompt, 1, case.prompt)  # requests arrive one by one
    return plan, steps


def _metric(case: Case, steps: dict[str, StepCost], n_gpus: int) -> float:
    dec = steps["decode"].seconds
    if case.metric == "decode_node":
        return case.batch / dec / case.nodes
    if case.metric == "decode_user":
        return 1 / dec
    if case.metric == "tpot_ms":
        return dec * 1e3
    if case.metric in ("prefill_node", "prefill_node_incl_cache"):
        rate = case.batch * case.prompt / steps["prefill"].seconds / case.nodes
        if case.metric == "prefill_node_incl_cache":
            # Cache hits count as input tokens but cost no prefill compute.
            rate /= 1 - published()["cases"][case.id]["facts"]["cache_hit_fraction"]
        return rate
    if case.metric == "static_batch_out":
        return case.batch * case.output / (steps["prefill"].seconds + case.output * dec)
    if case.metric == "concurrency_out_per_gpu":
        # Little's law: requests in flight / seconds per request, times tokens per request.
        return case.batch * case.output / (steps["prefill"].seconds + case.output * dec) / n_gpus
    raise ValueError(f"{case.id}: metric {case.metric} needs the CLI path")


def _cli_metric(case: Case, out: dict[str, float]) -> float:
    if case.metric in ("decode_tok_s", "offload_decode_tok_s"):
        return out["decode_tok_per_s"]
    if case.metric == "ttft_ms":
        return out["ttft_s"] * 1e3
    if case.metric == "request_out":  # output tokens over the whole request, TTFT included
        return case.output / (out["ttft_s"] + case.output * out["tpot_s"])
    if case.metric == "tpot_ms":
        return out["tpot_s"] * 1e3
    if case.metric == "decode_node":
        return out["decode_tok_per_s_total"] / case.nodes
    if case.metric == "decode_user":
        return out["decode_tok_per_s"]
    raise ValueError(f"{case.id}: metric {case.metric} has no single `moeplan perf` field")


def predict(case: Case, *, with_cli: bool = False) -> Prediction:
    """One row. with_cli: also what the CLI's own layout choice gives (slow for 144 GPUs)."""
    pub = published()["cases"][case.id]
    with defaults_only():
        if case.layout is None:
            plan, out = _cli_path(case)
            steps: dict[str, StepCost] = {}
            value, cli_layout, cli_value, cli_metric = _cli_metric(case, out), None, None, None
        else:
            plan, steps = _steps(case)
            n_gpus = len(parse_gpus(case.gpus, case.nodes)[0])
            value = _metric(case, steps, n_gpus)
            cli_layout = cli_value = cli_metric = None
            if with_cli:
                cli_plan, out = _cli_path(case)
                cli_layout = cli_plan.layout
                try:
                    cli_value = _cli_metric(case, out)
                except ValueError:  # a throughput of many prefills: no single CLI field holds it
                    cli_value = None
                cli_metric = _metric(case, _steps(case, layout_of(cli_plan))[1], n_gpus)
    return Prediction(case=case, published=pub, value=value, ratio=value / pub["value"], layout=plan.layout,
                      fits=plan.fits, steps=steps, cli_layout=cli_layout, cli_value=cli_value, cli_metric=cli_metric)


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def _as_published(x: float) -> str:
    return f"{x:,g}" if x < 1000 else f"{x:,.0f}"


def _published_text(pub: dict[str, Any]) -> str:
    if "range" in pub:
        lo, hi = pub["range"]
        return f"{_as_published(lo)}-{_as_published(hi)} {pub['unit']}"
    return f"{_as_published(pub['value'])} {pub['unit']}"


# Which field of the command's JSON a metric reads (n = nodes, B = batch, out = output tokens).
_FIELD = {
    "decode_tok_s": "decode_tok_per_s", "offload_decode_tok_s": "best.speed.decode_tok_per_s",
    "ttft_ms": "ttft_s x 1000", "tpot_ms": "tpot_s x 1000", "decode_user": "decode_tok_per_s",
    "decode_node": "decode_tok_per_s_total / n", "request_out": "out / (ttft_s + out x tpot_s)",
}


def reproduce(r: Prediction) -> str:
    """The `moeplan` command when it computes this very figure, else this script's --case."""
    c = r.case
    same = c.layout is None or (r.cli_value is not None and r.cli_layout == r.layout
                                and abs(r.cli_value / r.value - 1) < 1e-9)
    if same and c.metric in _FIELD:
        return f"`{cli_command(c)}` -> {_FIELD[c.metric]}"
    return f"`python benchmarks/validate.py --case {c.id}`"


def table(rows: list[Prediction]) -> str:
    head = ("| case | metric | published | predicted | ratio | claimed band | layout | reproduce |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        c = r.case
        band = f"{c.band[0]:g}-{c.band[1]:g}" + (f" (outlier {c.note})" if c.note else "")
        fits = "" if r.fits else " (does not fit)"
        lines.append(f"| {c.id} | {r.published['metric']} | {_published_text(r.published)} | "
                     f"{_fmt(r.value)} {r.published['unit']} | {r.ratio:.2f} | {band} | {r.layout}{fits} | "
                     f"{reproduce(r)} |")
    return "\n".join(lines)


def cli_table(rows: list[Prediction]) -> str:
    """Rows `moeplan perf` cannot reproduce: the same scenario in the layout the CLI picks itself."""
    lines = ["| case | `moeplan perf` command | layout it picks | this row's metric in that layout | ratio |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r.case.layout is None or reproduce(r).startswith("`moeplan"):
            continue
        assert r.cli_metric is not None, r.case.id
        field = f" (`{_FIELD[r.case.metric]}`)" if r.cli_value is not None else ""
        lines.append(f"| {r.case.id} | `{cli_command(r.case)}` | {r.cli_layout} | "
                     f"{_fmt(r.cli_metric)} {r.published['unit']}{field} | {r.cli_metric / r.published['value']:.2f} |")
    return "\n".join(lines)


def counts(rows: list[Prediction]) -> dict[str, tuple[int, int]]:
    """(within 0.5x-2x, total) for rows and for independent checks, all and current engines only.

    A check is within the goal when every row of it is."""
    checks: dict[str, list[Prediction]] = {}
    for r in rows:
        checks.setdefault(r.case.check, []).append(r)

    def tally(groups: list[list[Prediction]]) -> tuple[int, int]:
        return sum(all(r.in_goal for r in g) for g in groups), len(groups)

    return {
        "rows": tally([[r] for r in rows]),
        "checks": tally(list(checks.values())),
        "current_rows": tally([[r] for r in rows if r.case.current]),
        "current_checks": tally([g for g in checks.values() if g[0].case.current]),
    }


def summary(rows: list[Prediction]) -> str:
    """The counts docs/validation.md quotes, as a markdown list."""
    c = counts(rows)
    lo, hi = GOAL
    goal = f"{lo:g}x-{hi:g}x"
    repeats = ", ".join(f"{r.case.id} with {r.case.same_check}" for r in rows if r.case.same_check)
    outside = ", ".join(f"{r.case.id}" + (f" ({r.case.note})" if r.case.note else "") for r in rows if not r.in_goal)
    return "\n".join([
        f"- rows within {goal}: {c['rows'][0]} of {c['rows'][1]}",
        f"- independent checks within {goal}: {c['checks'][0]} of {c['checks'][1]}",
        f"- rows that repeat another row's check (one deployment read twice; counted once): {repeats}",
        (f"- current-engine rows (releases of 2025 or later) within {goal}: "
         f"{c['current_rows'][0]} of {c['current_rows'][1]}; as independent checks: "
         f"{c['current_checks'][0]} of {c['current_checks'][1]}"),
        f"- rows outside {goal}: {outside}",
    ])


# --- The two changes of commit 0df33c3 to moeplan/perf.py, switched off again for comparison.

FP8_DISPATCH_BYTES = 1 + 4 / 128  # bytes per value step_cost dispatches to fp8 experts (fp32 scale per 128)


@contextmanager
def perf_0df33c3(*, split_links: bool, fp8_dispatch: bool) -> Iterator[None]:
    """moeplan.perf with either communication change of commit 0df33c3 switched off.

    split_links=False: an EP all-to-all that spans nodes is charged at the NIC's rate for every peer
    (perf._alltoall over perf._link of the EP group, as step_cost did before 0df33c3).
    fp8_dispatch=False: the dispatch moves bf16, like the combine.
    step_cost calls perf._ep_alltoall twice per MoE layer, dispatch then combine; the patch checks
    that order by the two calls' byte ratio and raises if perf.py no longer matches it. Only for
    fp8 schemes (every multi-node row is one)."""
    original = perf._ep_alltoall
    pending: list[float] = []

    def ep_alltoall(nbytes: float, ranks: int, gpus: tuple[Gpu, ...], nodes: int) -> float:
        if not pending:  # the dispatch
            pending.append(nbytes)
            if not fp8_dispatch:
                nbytes *= 2 / FP8_DISPATCH_BYTES
        elif abs(pending.pop() / nbytes - FP8_DISPATCH_BYTES / 2) > 1e-9:  # the combine, bf16
            raise RuntimeError("moeplan.perf.step_cost no longer dispatches fp8 then combines bf16; "
                               "update perf_0df33c3 in benchmarks/validate.py")
        if not split_links:
            return perf._alltoall(nbytes, ranks, *perf._link(gpus, ranks, nodes))
        return original(nbytes, ranks, gpus, nodes)

    perf._ep_alltoall = ep_alltoall
    try:
        yield
    finally:
        perf._ep_alltoall = original
    if pending:
        raise RuntimeError("an EP dispatch without its combine; update perf_0df33c3 in benchmarks/validate.py")


ABLATION = (("before 0df33c3", {"split_links": False, "fp8_dispatch": False}),
            ("change 1 only", {"split_links": True, "fp8_dispatch": False}),
            ("both (now)", {"split_links": True, "fp8_dispatch": True}))


def ablation(cases: tuple[Case, ...] = CASES) -> str:
    """Ratio of each multi-node row with the changes of 0df33c3 off, one on, both on; with the
    communication time of the step the metric reads. Rows that repeat another row's check are left out."""
    head = "| case | " + " | ".join(name for name, _ in ABLATION) + " |"
    lines = [head, "|---|" + "---|" * len(ABLATION)]
    for case in cases:
        if case.nodes == 1 or case.layout is None or case.same_check:
            continue
        pub = published()["cases"][case.id]["value"]
        n_gpus = len(parse_gpus(case.gpus, case.nodes)[0])
        cells = []
        for _, switches in ABLATION:
            with defaults_only(), perf_0df33c3(**switches):
                _, steps = _steps(case)
            step = steps["prefill" if "prefill" in steps else "decode"]
            cells.append(f"{_metric(case, steps, n_gpus) / pub:.2f} (comm {step.comm_s * 1e3:,.0f} of "
                         f"{step.seconds * 1e3:,.0f} ms)")
        lines.append(f"| {case.id} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def explain(case: Case) -> str:
    """The API calls behind one row, with each step's time split."""
    r = predict(case, with_cli=True)
    _, scheme, gpus, nodes = _setup(case)
    out = [f"case {case.id}: {r.published['setup']}",
           f"published {r.published['metric']}: {_published_text(r.published)} [{r.published['source']}]",
           (f"model {case.model}, {len(gpus)} GPUs ({case.gpus} x {nodes} node(s)), quant {scheme.name}, "
            f"batch {case.batch}, context {case.context}, prompt {case.prompt}, output {case.output}")]
    if case.layout is None:
        out.append(f"computed exactly as: {cli_command(case)}  (layout {r.layout})")
    else:
        tp, ep, dp = case.layout
        out.append(f"layout forced (as stated, or assumed: docs/validation.md): "
                   f"Layout(tp={tp}, ep={ep}, pp=1, dp_attention={dp}) = {r.layout}, "
                   f"fits per GPU: {r.fits} (moeplan.plan.evaluate)")
        for name, s in r.steps.items():
            out.append(f"  {name} step (moeplan.perf.step_cost): {s.seconds * 1e3:.2f} ms; summed over layers: compute "
                       f"{s.compute_s * 1e3:.2f} ms, memory {s.memory_s * 1e3:.2f} ms (a layer takes the larger), "
                       f"communication {s.comm_s * 1e3:.2f} ms, plus per-layer floors and the head; {s.bound}-bound")
        out.append(f"metric {case.metric} (see _metric in benchmarks/validate.py)")
        assert r.cli_metric is not None
        out.append(f"nearest CLI: {cli_command(case)} -> layout {r.cli_layout}; this metric in that layout "
                   f"{_fmt(r.cli_metric)} {r.published['unit']}, ratio {r.cli_metric / r.published['value']:.2f}")
    out.append(f"predicted {_fmt(r.value)} {r.published['unit']}, ratio {r.ratio:.2f}, claimed band "
               f"{case.band[0]:g}-{case.band[1]:g}")
    return "\n".join(out)


def report() -> str:
    """Everything `python benchmarks/validate.py` prints: four blocks, each in docs/validation.md."""
    rows = [predict(c, with_cli=True) for c in CASES]
    return "\n\n".join([table(rows), cli_table(rows), summary(rows), ablation()])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="explain one case by id")
    args = parser.parse_args(argv)
    by_id = {c.id: c for c in CASES}
    if args.case:
        if args.case not in by_id:
            parser.error(f"unknown case {args.case!r}; one of: {', '.join(by_id)}")
        print(explain(by_id[args.case]))
        return
    print(report())


if __name__ == "__main__":
    main()
