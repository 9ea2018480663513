"""moeplan's speed predictions against published measurements, on a fitting set and a test set
(docs/validation.md).

- The FITTING SET (tests/fixtures/published_throughput.yaml, 56 rows) is what shaped moeplan's speed
  constants since issue 5: the default efficiencies and the fitted per-layer costs (vLLM/SGLang on
  NVIDIA, llama.cpp per backend) are fitted on it (--fit-efficiency), the two communication changes
  of 0df33c3 were judged by it. Its rows are predicted through the API
  with the layout the source states (multi-node DP+EP loads the CLI's --batch limit cannot hold).
- The TEST SET (tests/fixtures/published_throughput_test.yaml, 20 rows) was gathered on 2026-12-03,
  after the model changes of issue 13 were written and before any of its rows was predicted; no
  constant was fitted on it. Each row is predicted once through the CLI, `moeplan perf ... --tp N
  --json`, with the stated layout forced.
- The ERROR BANDS that `perf` and `fit` print (moeplan.perf.ERROR_BANDS) come from the fitting set's
  residuals per engine class and regime; `--bands` prints them as this script derives them, and
  tests/test_validation.py checks the constants equal that. The test set then says how often the
  published figure falls inside the printed band.

Predictions only: nothing is measured. Calibrations saved by `moeplan bench` are ignored (the
script points MOEPLAN_CACHE at an empty folder), so the defaults of moeplan.perf.Efficiency apply.

Run: python benchmarks/validate.py             (the tables and counts in docs/validation.md)
     python benchmarks/validate.py --case ID   (how one row is computed)
     python benchmarks/validate.py --bands     (the error bands, as moeplan.perf.ERROR_BANDS holds them)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
import sys

import yaml

# This checkout's moeplan, whatever is installed (`python benchmarks/validate.py` puts only benchmarks/
# on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moeplan.hardware import Gpu, parse_gpus  # noqa: E402
from moeplan.layout import Layout, Scenario, even_stages  # noqa: E402
from moeplan.perf import ERROR_BANDS, StepCost, band_key, slowest_gpu, step_cost  # noqa: E402
from moeplan.plan import Plan, evaluate  # noqa: E402
from moeplan.quant import QuantScheme, get_scheme  # noqa: E402
from moeplan.sources import resolve  # noqa: E402
from moeplan.spec import ModelSpec  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
FIT_FIXTURE = FIXTURES / "published_throughput.yaml"
TEST_FIXTURE = FIXTURES / "published_throughput_test.yaml"
GOAL = (0.5, 2.0)
CLOSE = (0.8, 1.25)
TIME_METRICS = ("tpot_ms", "ttft_ms")


@dataclass(frozen=True)
class Case:
    """How moeplan is asked about one published figure.

    layout: (tp, ep, dp_attention) as the source states it (fitting rows through the API), or None
    with `cli` set (test rows through `moeplan perf`)."""

    id: str
    model: str
    gpus: str
    quant: str
    metric: str
    batch: int = 1
    context: int = 1024
    prompt: int = 1024
    output: int = 0  # generated tokens per request, for end-to-end rates
    nodes: int = 1
    layout: tuple[int, int, bool] | None = None
    cpu_mem: str | None = None  # for `fit --cpu-mem` (expert offload)
    cpu_bw: str | None = None  # `fit --cpu-bw`: the host RAM bandwidth the source measured
    n_cpu_moe: int | None = None  # `fit --n-cpu-moe`: the layers the source offloaded
    current: bool = True  # an engine release of 2025 or later
    same_check: str = ""  # the row whose check this one repeats (one deployment read twice), or ""
    set: str = "fit"
    cli: tuple[str, ...] = ()  # test rows: the moeplan perf arguments
    engine: str = "sglang"
    outlier: str = ""  # an engine release far slower than its hardware (docs/validation.md O1, O2, O3): no band

    @property
    def check(self) -> str:
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
# The engine classes whose per-layer cost is fitted with their efficiency, and the table of
# moeplan.engines and the key in it each one sets.
LAYER_FITS = {"llama.cpp": ("LLAMACPP_LAYER_S", "nvidia"), "llama.cpp (Apple)": ("LLAMACPP_LAYER_S", "apple"),
              "gpu serving": ("SERVING_LAYER_S", "nvidia")}
M2MAX_QUANTS = ("q2_k", "q3_k_m", "q4_k_m", "q4_0", "q5_k_m", "q6_k", "q8_0")  # the source's rows moeplan has

FIT_CASES: tuple[Case, ...] = (
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
         output=256, layout=(8, 1, False), current=False, outlier="O1"),
    Case("sglang041-b8", "deepseek-v3", "8xH200", "fp8", "static_batch_out", batch=8, context=256, prompt=128,
         output=256, layout=(8, 1, False), current=False, outlier="O1"),
    Case("sglang041-b32", "deepseek-v3", "8xH200", "fp8", "static_batch_out", batch=32, context=256, prompt=128,
         output=256, layout=(8, 1, False), current=False, outlier="O1"),
    # InferenceX #870: a fixed number of requests in flight, each 1k in / 1k out; TPOT at the mean
    # context. The per-GPU rate is Little's law over the same TPOT, so it counts with the TPOT row.
    *(Case(f"inferencex-c{c}-tpot", "deepseek-v3", "8xH200", "fp8", "tpot_ms", batch=c, context=1536, prompt=1024,
           output=1024, layout=(8, 1, False)) for c in (8, 16, 32, 64)),
    *(Case(f"inferencex-c{c}-gpu", "deepseek-v3", "8xH200", "fp8", "concurrency_out_per_gpu", batch=c,
           context=1536, prompt=1024, output=1024, layout=(8, 1, False), same_check=f"inferencex-c{c}-tpot")
      for c in (8, 16, 32, 64)),
    # llama.cpp, December 2023, three days after Mixtral support landed.
    Case("llamacpp-a100-q5km", "mixtral-8x7b", "1xA100", "q5_k_m", "decode_tok_s", context=256, prompt=9, current=False,
         outlier="O2"),
    Case("llamacpp-h100-q5km", "mixtral-8x7b", "1xH100", "q5_k_m", "decode_tok_s", context=256, prompt=9, current=False,
         outlier="O2"),
    *(Case(f"m2max-{q}", "mixtral-8x7b", "1xM2-Max", q, "decode_tok_s", context=128, prompt=128, current=False)
      for q in M2MAX_QUANTS),
    # XiongjieDai (May 2024): dense Llama-3 Q4_K_M, tg 512 (the context grows 0 -> 512: 256 on average).
    *(Case(f"xd-{g.lower().replace('-', '')}-{m}", f"llama-3.1-{m}", f"1x{g}", "q4_k_m", "decode_tok_s", context=256,
           prompt=1, current=False)
      for g, m in (("M2-Ultra", "8b"), ("M2-Ultra", "70b"), ("M3-Max", "8b"), ("M3-Max", "70b"), ("RTX4090", "8b"),
                   ("RTX3090", "8b"), ("A6000", "8b"), ("A6000", "70b"))),
    # Quantization not stated in the comment: 20 layers filling a 24 GB card is ~1 GB a layer, Q5_K_M's
    # size (Q4_0 layers are ~0.8 GB and would let ~26 fit). fit picks 12 CPU-MoE layers, as many as the
    # 12 decoder layers the user left on the CPU.
    Case("rtx4090-offload", "mixtral-8x7b", "1xRTX4090", "q5_k_m", "offload_decode_tok_s", context=8192,
         prompt=512, cpu_mem="64GB", current=False),
    # llama.cpp --n-cpu-moe 36 on an 8 GB card, the host's quad-channel DDR4 measured at ~102 GB/s by the
    # source; context not stated (4,096 assumed; it moves little at batch 1).
    Case("llmfit-755-qwen3-30b", "qwen3-30b-a3b", "1xRTX2080", "q4_k_m", "offload_decode_tok_s", context=4096,
         prompt=512, cpu_mem="62GB", cpu_bw="102", n_cpu_moe=36),
    # TensorRT-LLM int8 weight-only (baseten-truss): int8 expert weights, bf16 GEMMs.
    Case("trtllm-a100-ttft", "mixtral-8x7b", "1xA100", "experts=int8,rest=bf16", "ttft_ms", context=640, prompt=512,
         current=False),
    Case("trtllm-a100-tps", "mixtral-8x7b", "1xA100", "experts=int8,rest=bf16", "request_out", context=640,
         prompt=512, output=128, current=False),
    # AMD MI300X, TP8 as launched (`--tp 8`), costed like the InferenceX rows: TPOT at the mean context
    # (prompt + output / 2). sgl-cookbook: the printed mean prompt and output lengths, and the printed
    # mean concurrency as the load (13.92 and 14.76 at max concurrency 16). dstack: exact lengths.
    *(Case(f"mi300x-{m}-c{c}", f"llama-4-{m}", "8xMI300X", "bf16", "tpot_ms", batch=b, context=i + o // 2, prompt=i,
           output=o, layout=(8, 1, False))
      for m, c, b, i, o in (("maverick", 1, 1, 610, 422), ("maverick", 16, 14, 496, 510), ("scout", 1, 1, 610, 422),
                            ("scout", 16, 15, 621, 510))),
    # NVIDIA B200, TP8 as launched, costed as the MI300X rows above (sgl-cookbook-b200).
    *(Case(f"b200-{name}-c{c}", model, "8xB200", quant, "tpot_ms", batch=b, context=i + o // 2, prompt=i, output=o,
           layout=(8, 1, False))
      for name, model, quant, c, b, i, o in (
          ("qwen3-235b", "qwen3-235b-a22b", "bf16", 1, 1, 610, 421),
          ("qwen3-235b", "qwen3-235b-a22b", "bf16", 16, 14, 496, 509),
          ("dsr1", "deepseek-v3", "fp8", 1, 1, 610, 421), ("dsr1", "deepseek-v3", "fp8", 16, 14, 496, 509),
          ("glm46", "glm-4.5", "bf16", 1, 1, 610, 421), ("glm46", "glm-4.5", "bf16", 16, 14, 496, 509),
          ("gptoss120b", "gpt-oss-120b", "mxfp4", 1, 1, 332, 213),
          ("qwen3next", "qwen3-next-80b-a3b", "bf16", 1, 1, 338, 216))),
    *(Case(f"mi300x-dsr1-{e}-c{c}", "deepseek-v3", "8xMI300X", "fp8", "tpot_ms", batch=c, context=3600, prompt=3200,
           output=800, layout=(8, 1, False), engine=e, outlier="O3")
      for e, c in (("sglang", 4), ("sglang", 16), ("vllm", 4), ("vllm", 32))),
)




def _test_cases() -> tuple[Case, ...]:
    """The test set as `moeplan perf` arguments, from the fixture's `ask` of each row."""
    out = []
    for row in yaml.safe_load(TEST_FIXTURE.read_text(encoding="utf-8"))["cases"]:
        a = row["ask"]
        decode = a["metric"] != "prefill"
        context = a["prompt"] + (a["output"] // 2 if decode else 0)  # decode steps see the mean context
        args = [a["model"], "--gpus", a["gpus"], "--quant", a["quant"], "--tp", str(a["tp"]), "--batch",
                str(a["batch"]), "--context", str(max(context, 1)), "--prompt", str(min(a["prompt"], max(context, 1)))]
        if a.get("kv_dtype"):
            args += ["--kv-dtype", a["kv_dtype"]]
        if a.get("mem_fraction"):
            args += ["--mem-fraction", str(a["mem_fraction"])]
        engine = "llama.cpp" if a["quant"].startswith(("q", "mxfp4_")) else (
            "sglang" if "sglang" in row["engine"].lower() else "vllm")
        out.append(Case(row["id"], a["model"], a["gpus"], a["quant"], a["metric"], batch=a["batch"],
                        context=max(context, 1), prompt=a["prompt"], output=a["output"], set="test",
                        cli=tuple(args), engine=engine, same_check=row.get("same_check", "")))
    return tuple(out)


TEST_CASES = _test_cases()
CASES = FIT_CASES + TEST_CASES


@dataclass
class Prediction:
    case: Case
    published: dict[str, Any]
    value: float
    layout: str
    fits: bool
    low: float = 0.0  # the band moeplan prints around `value`, in the metric's unit
    high: float = 0.0
    steps: dict[str, StepCost] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """predicted / published, as printed (for a time above 1 is pessimistic)."""
        return self.value / self.published["value"]

    @property
    def speed_ratio(self) -> float:
        """predicted speed / published speed: above 1 is optimistic, for rates and times alike."""
        return 1 / self.ratio if self.case.metric in TIME_METRICS else self.ratio

    @property
    def in_band(self) -> bool:
        return self.low <= self.published["value"] <= self.high

    def within(self, band: tuple[float, float]) -> bool:
        return band[0] <= self.speed_ratio <= band[1]


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
    fit_data = yaml.safe_load(FIT_FIXTURE.read_text(encoding="utf-8"))
    test_data = yaml.safe_load(TEST_FIXTURE.read_text(encoding="utf-8"))
    return {"sources": {**fit_data["sources"], **test_data["sources"]},
            "cases": {c["id"]: c for c in fit_data["cases"] + test_data["cases"]},
            "excluded": test_data.get("excluded", [])}


@cache
def _spec(model: str) -> ModelSpec:
    return resolve(model)


def _setup(case: Case) -> tuple[ModelSpec, QuantScheme, tuple[Gpu, ...], int]:
    spec = _spec(case.model)
    gpus, nodes = parse_gpus(case.gpus, case.nodes)
    return spec, get_scheme(case.quant).for_model(spec), gpus, nodes


def cli_command(case: Case) -> str:
    """The `moeplan` command a row is (test rows) or would be nearest to (fitting rows)."""
    if case.cli:
        return "moeplan perf " + " ".join(shlex.quote(a) for a in case.cli) + " --json"
    nodes = f" --nodes {case.nodes}" if case.nodes > 1 else ""
    quant = f"'{case.quant}'" if "," in case.quant else case.quant
    if case.cpu_mem:
        return f"moeplan fit {case.model} --gpus {case.gpus}{nodes} --quant {quant} " + " ".join(_offload_args(case))
    forced = ""
    if case.layout is not None:
        tp, ep, dp = case.layout
        forced = f" --tp {max(tp, ep)} --dp-attention" if dp else f" --tp {tp}" + (f" --ep {ep}" if ep > 1 else "")
    return (f"moeplan perf {case.model} --gpus {case.gpus}{nodes} --quant {quant}{forced} --batch {case.batch} "
            f"--context {case.context} --prompt {case.prompt} --json")


@cache
def _run_cli(args: tuple[str, ...]) -> dict[str, Any]:
    from typer.testing import CliRunner

    from moeplan.cli import app

    result = CliRunner().invoke(app, [*args, "--json"])
    if result.exit_code != 0:
        raise SystemExit(f"`moeplan {' '.join(args)}` exited {result.exit_code}: {result.output[-400:]}")
    data: dict[str, Any] = json.loads(result.output)
    return data


def _cli_value(case: Case, out: dict[str, Any], suffix: str = "") -> float:
    """The row's metric from `moeplan perf --json` fields (suffix "_low"/"_high": its band edge)."""
    tpot, ttft = out["tpot_s" + suffix], out["ttft_s" + _flip(suffix)]
    if case.metric in ("decode_user", "decode_tok_s", "offload_decode_tok_s"):
        return float(out["decode_tok_per_s" + suffix])
    if case.metric == "tpot_ms":
        return float(tpot) * 1e3
    if case.metric == "prefill":
        return case.prompt / float(out["ttft_s" + _flip(suffix)])
    if case.metric == "concurrency_out":  # Little's law: requests in flight / seconds per request
        return case.batch * case.output / (ttft + case.output * _tpot_for_rate(out, suffix))
    if case.metric == "static_batch_out":  # the batch prefilled together, then decoded together
        return case.batch * case.output / (case.batch * ttft + case.output * _tpot_for_rate(out, suffix))
    raise ValueError(f"{case.id}: metric {case.metric} has no `moeplan perf` form")


def _flip(suffix: str) -> str:
    """A rate's low edge comes from the time's high edge."""
    return {"_low": "_high", "_high": "_low"}.get(suffix, "")


def _tpot_for_rate(out: dict[str, Any], suffix: str) -> float:
    return float(out["tpot_s" + _flip(suffix)])


def _layout(case: Case, spec: ModelSpec) -> Layout:
    assert case.layout is not None
    tp, ep, dp = case.layout
    return Layout(tp=tp, ep=ep, pp=1, dp_attention=dp, stage_layers=even_stages(spec.num_layers, 1))


def _steps(case: Case) -> tuple[Plan, dict[str, StepCost]]:
    """The forced layout's plan (for its fit verdict) and the steps the metric needs."""
    spec, scheme, gpus, nodes = _setup(case)
    layout = _layout(case, spec)
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
        return case.batch * case.output / (steps["prefill"].seconds + case.output * dec) / n_gpus
    raise ValueError(f"{case.id}: metric {case.metric} needs the CLI path")


def _offload_args(case: Case) -> list[str]:
    args = ["--context", str(case.context), "--cpu-mem", str(case.cpu_mem)]
    args += ["--cpu-bw", case.cpu_bw] if case.cpu_bw else []
    args += ["--n-cpu-moe", str(case.n_cpu_moe)] if case.n_cpu_moe else []
    return [*args, "--json"]


@cache
def _fit_cli(case: Case) -> dict[str, Any]:
    """Fitting rows without a stated layout: exactly the CLI command (llama.cpp, offload, TensorRT-LLM)."""
    if case.cpu_mem:
        out = _run_cli(("fit", case.model, "--gpus", case.gpus, "--quant", case.quant,
                        *_offload_args(case)[:-1]))
        speed = out["best"]["speed"]
        return {**speed, "layout": out["best"]["layout"], "fits": True}
    out = _run_cli(("perf", case.model, "--gpus", case.gpus, "--quant", case.quant, "--batch", str(case.batch),
                    "--context", str(case.context), "--prompt", str(case.prompt)))
    return {**out, "fits": True}


def _fit_cli_value(case: Case, out: dict[str, Any]) -> float:
    if case.metric in ("decode_tok_s", "offload_decode_tok_s"):
        return float(out["decode_tok_per_s"])
    if case.metric == "ttft_ms":
        return float(out["ttft_s"]) * 1e3
    if case.metric == "request_out":  # output tokens over the whole request, TTFT included
        return case.output / (out["ttft_s"] + case.output * out["tpot_s"])
    raise ValueError(f"{case.id}: metric {case.metric}")


def predict(case: Case) -> Prediction:
    pub = published()["cases"][case.id]
    with defaults_only():
        if case.cli:
            out = _run_cli(("perf", *case.cli))
            value = _cli_value(case, out)
            low, high = _cli_value(case, out, "_low"), _cli_value(case, out, "_high")
            return Prediction(case, pub, value, out["layout"], True, min(low, high), max(low, high))
        if case.layout is None:
            out = _fit_cli(case)
            return Prediction(case, pub, _fit_cli_value(case, out), out["layout"], out["fits"])
        plan, steps = _steps(case)
        n_gpus = len(parse_gpus(case.gpus, case.nodes)[0])
        return Prediction(case, pub, _metric(case, steps, n_gpus), plan.layout, plan.fits, steps=steps)


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def _as_published(x: float) -> str:
    return f"{x:,g}" if x < 1000 else f"{x:,.0f}"


def _published_text(pub: dict[str, Any]) -> str:
    if "range" in pub:
        lo, hi = pub["range"]
        return f"{_as_published(lo)}-{_as_published(hi)} {pub['unit']}"
    return f"{_as_published(pub['value'])} {pub['unit']}"


def regime(case: Case) -> str:
    """The band a row belongs to (moeplan.perf.band_key): engine class and load."""
    engine = "llama.cpp" if case.quant.startswith(("q", "mxfp4_")) or case.gpus.startswith("1xM") else case.engine
    vendor = slowest_gpu(parse_gpus(case.gpus, case.nodes)[0]).vendor
    return band_key(engine, case.batch, offload=bool(case.cpu_mem), vendor=vendor)


def table(rows: list[Prediction], *, bands: bool) -> str:
    head = "| case | metric | published | predicted | ratio | speed ratio | layout |"
    sep = "|---|---|---|---|---|---|---|"
    if bands:
        head += " printed band | inside |"
        sep += "---|---|"
    head += " reproduce |"
    sep += "---|"
    lines = [head, sep]
    for r in rows:
        fits = "" if r.fits else " (does not fit)"
        line = (f"| {r.case.id} | {r.published['metric']} | {_published_text(r.published)} | "
                f"{_fmt(r.value)} {r.published['unit']} | {r.ratio:.2f} | {r.speed_ratio:.2f} | {r.layout}{fits} |")
        if bands:
            line += f" {_fmt(r.low)}-{_fmt(r.high)} | {'yes' if r.in_band else 'no'} |"
        how = f"`{cli_command(r.case)}`" if r.case.cli or r.case.layout is None else (
            f"`python benchmarks/validate.py --case {r.case.id}`")
        lines.append(line + f" {how} |")
    return "\n".join(lines)


def counts(rows: list[Prediction], band: tuple[float, float]) -> tuple[int, int]:
    return sum(r.within(band) for r in rows), len(rows)


def summary(fit_rows: list[Prediction], test_rows: list[Prediction]) -> str:
    cur = [r for r in fit_rows if r.case.current]
    lines = [
        f"- fitting set: {counts(fit_rows, GOAL)[0]} of {len(fit_rows)} rows within 0.5x-2x, "
        f"{counts(fit_rows, CLOSE)[0]} within 0.8x-1.25x; current engines (2025+): {counts(cur, GOAL)[0]} of "
        f"{len(cur)} within 0.5x-2x, {counts(cur, CLOSE)[0]} within 0.8x-1.25x",
        f"- test set: {counts(test_rows, CLOSE)[0]} of {len(test_rows)} rows within 0.8x-1.25x, "
        f"{counts(test_rows, GOAL)[0]} within 0.5x-2x",
        f"- test set, published figure inside the printed error band: {sum(r.in_band for r in test_rows)} of "
        f"{len(test_rows)}",
        f"- test rows that repeat another row's deployment: "
        + (", ".join(f"{r.case.id} with {r.case.same_check}" for r in test_rows if r.case.same_check) or "none"),
        f"- test rows outside 0.5x-2x: " + (", ".join(r.case.id for r in test_rows if not r.within(GOAL)) or "none"),
        f"- rows found but not used (excluded before predicting): {len(published()['excluded'])}",
    ]
    return "\n".join(lines)


def derive_bands(fit_rows: list[Prediction]) -> dict[str, tuple[float, float, int]]:
    """Per band key: (lowest, highest speed ratio, rows) over the fitting set. A printed figure's band
    is [figure / highest, figure / lowest] for a speed; times scale the other way."""
    out: dict[str, list[float]] = {}
    for r in fit_rows:
        if not r.case.outlier:
            out.setdefault(regime(r.case), []).append(r.speed_ratio)
    every = [x for v in out.values() for x in v]
    bands = {k: (round(min(v), 2), round(max(v), 2), len(v)) for k, v in sorted(out.items())}
    bands["any"] = (round(min(every), 2), round(max(every), 2), len(every))
    return bands


def bands_table(bands: dict[str, tuple[float, float, int]]) -> str:
    lines = ["| band (engine class, load) | fitting rows | lowest speed ratio | highest speed ratio |",
             "|---|---|---|---|"]
    for k, (lo, hi, n) in bands.items():
        lines.append(f"| {k} | {n} | {lo:.2f} | {hi:.2f} |")
    return "\n".join(lines)


def excluded_table() -> str:
    lines = ["| id | setup | metric | published | why not used |", "|---|---|---|---|---|"]
    for e in published()["excluded"]:
        lines.append(f"| {e['id']} | {e['setup']} | {e['metric']} | {_as_published(e['value'])} {e['unit']} | "
                     f"{e['why']} |")
    return "\n".join(lines)


def explain(case: Case) -> str:
    r = predict(case)
    out = [f"case {case.id} ({case.set} set): {r.published['setup']}",
           f"published {r.published['metric']}: {_published_text(r.published)} [{r.published['source']}]",
           f"command: {cli_command(case)}  (layout {r.layout})"]
    for name, s in r.steps.items():
        out.append(f"  {name} step (moeplan.perf.step_cost): {s.seconds * 1e3:.2f} ms; summed over layers: compute "
                   f"{s.compute_s * 1e3:.2f} ms, memory {s.memory_s * 1e3:.2f} ms (a layer takes the larger), "
                   f"communication {s.comm_s * 1e3:.2f} ms, plus per-layer floors, the head and the engine's "
                   f"per-step cost; {s.bound}-bound")
    out.append(f"predicted {_fmt(r.value)} {r.published['unit']}, ratio {r.ratio:.2f} (speed ratio {r.speed_ratio:.2f})"
               + (f", printed band {_fmt(r.low)}-{_fmt(r.high)}" if case.cli else ""))
    return "\n".join(out)


def report() -> str:
    fit_rows = [predict(c) for c in FIT_CASES]
    test_rows = [predict(c) for c in TEST_CASES]
    return "\n\n".join([table(fit_rows, bands=False), bands_table(derive_bands(fit_rows)),
                        table(test_rows, bands=True), summary(fit_rows, test_rows), excluded_table()])


def _clear() -> None:
    _run_cli.cache_clear()
    _fit_cli.cache_clear()


def _seconds_per_token(case: Case, value: float) -> float:
    """A decode row's figure as seconds per generated token of one sequence (TPOT or tok/s)."""
    return value / 1e3 if case.metric == "tpot_ms" else 1 / value


def fit_with_layer_cost(cls: str, ids: tuple[str, ...]) -> tuple[float, float]:
    """The memory efficiency E and per-layer cost L of one engine class, fitted together on its
    EFFICIENCY_FIT_ROWS: a decode step costs M / E + n L + c (M: its weight and cache reads at full
    bandwidth, n: its layers, c: the rest), so each row's M, n and c come from three predictions, and
    (1/E, L) is the least-squares fit of the relative errors, a 2 x 2 linear solve. L is set in the
    moeplan.engines table LAYER_FITS names. Rounded to 0.001 and 1 us."""
    from moeplan import engines, perf

    by_id = {c.id: c for c in FIT_CASES}
    layer_table = getattr(engines, LAYER_FITS[cls][0])
    key = LAYER_FITS[cls][1]
    saved_e, saved_l = perf.ENGINE_MEMORY_EFFICIENCY[cls], layer_table[key]
    terms = []
    try:
        for i in ids:
            t = []
            for e, layer in ((1.0, 0.0), (0.5, 0.0), (1.0, 1e-3)):
                perf.ENGINE_MEMORY_EFFICIENCY[cls], layer_table[key] = e, layer
                _clear()
                t.append(_seconds_per_token(by_id[i], predict(by_id[i]).value))
            m, n = t[1] - t[0], (t[2] - t[0]) / 1e-3
            terms.append((m, n, t[0] - m, _seconds_per_token(by_id[i], published()["cases"][i]["value"])))
    finally:
        perf.ENGINE_MEMORY_EFFICIENCY[cls], layer_table[key] = saved_e, saved_l
        _clear()
    # minimize sum(((a m + L n + c) - t) / t)^2 over a = 1/E and L
    saa = sum((m / t) ** 2 for m, _, _, t in terms)
    sal = sum(m * n / t**2 for m, n, _, t in terms)
    sll = sum((n / t) ** 2 for _, n, _, t in terms)
    ya = sum(m * (t - c) / t**2 for m, _, c, t in terms)
    yl = sum(n * (t - c) / t**2 for _, n, c, t in terms)
    det = saa * sll - sal**2
    a, layer = (ya * sll - yl * sal) / det, (saa * yl - sal * ya) / det
    return round(1 / a, 3), round(max(layer, 0.0), 6)


def fit_efficiency() -> dict[str, float]:
    """The memory efficiency per engine class that brings the geometric mean speed ratio of its
    EFFICIENCY_FIT_ROWS (fitting set only) to 1, by bisection on moeplan.perf.ENGINE_MEMORY_EFFICIENCY;
    for the classes of LAYER_FITS, efficiency and per-layer cost together (fit_with_layer_cost; the
    per-layer cost under "<class> layer_s")."""
    import math

    from moeplan import perf

    by_id = {c.id: c for c in FIT_CASES}
    saved = dict(perf.ENGINE_MEMORY_EFFICIENCY)
    out: dict[str, float] = {}
    try:
        for cls, ids in perf.EFFICIENCY_FIT_ROWS.items():
            if cls in LAYER_FITS:
                out[cls], out[f"{cls} layer_s"] = fit_with_layer_cost(cls, ids)
                continue
            lo, hi = 0.2, 1.0
            for _ in range(30):
                mid = (lo + hi) / 2
                perf.ENGINE_MEMORY_EFFICIENCY[cls] = mid
                _clear()
                mean = math.exp(sum(math.log(predict(by_id[i]).speed_ratio) for i in ids) / len(ids))
                lo, hi = (lo, mid) if mean > 1 else (mid, hi)
            out[cls] = round((lo + hi) / 2, 3)
            perf.ENGINE_MEMORY_EFFICIENCY[cls] = saved[cls]
    finally:
        perf.ENGINE_MEMORY_EFFICIENCY.update(saved)
        _clear()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="explain one case by id")
    parser.add_argument("--bands", action="store_true", help="print the error bands the fitting set gives")
    parser.add_argument("--fit-efficiency", action="store_true",
                        help="print the memory efficiencies (moeplan.perf.ENGINE_MEMORY_EFFICIENCY) and per-layer "
                             "costs (moeplan.engines) the fitting set gives")
    args = parser.parse_args(argv)
    by_id = {c.id: c for c in CASES}
    if args.case:
        if args.case not in by_id:
            parser.error(f"unknown case {args.case!r}; one of: {', '.join(by_id)}")
        print(explain(by_id[args.case]))
        return
    if args.fit_efficiency:
        print(fit_efficiency())
        return
    if args.bands:
        derived = derive_bands([predict(c) for c in FIT_CASES])
        print(bands_table(derived))
        print("\nmoeplan.perf.ERROR_BANDS =", {k: v[:2] for k, v in derived.items()})
        print("in moeplan.perf:", dict(ERROR_BANDS))
        return
    print(report())


if __name__ == "__main__":
    main()
