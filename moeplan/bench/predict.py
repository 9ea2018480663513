"""The predicted side of `moeplan bench`: what the planner says each sweep point costs. Pure moeplan,
no torch: every time comes from moeplan.perf.step_cost, the function `perf`, `fit` and `check` use.

Per sweep point and built layer, three figures:
- the planner's time as it stands (a saved calibration for this device and dtype, else defaults);
- the layer's compute and memory terms at 100% of the device's peaks, which moeplan.calibration fits
  against the measured times;
- after a fit, the planner's time with the fitted calibration, to check it.
A bench times layers on their own: no engine per-step cost (sampling, scheduling) is charged
(Efficiency.step_s = 0); the per-layer overhead is the engine's (vLLM's with CUDA graphs, plain
PyTorch eager without: moeplan.engines) until a calibration replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moeplan.calibration import FitPoint
from moeplan.hardware import Gpu
from moeplan.layout import Layout
from moeplan.params import LM_HEAD, count_params, layer_params, vision_params
from moeplan.perf import Efficiency, StepCost, efficiency_for, step_cost
from moeplan.quant import get_scheme
from moeplan.routing import Routing, rank_load
from moeplan.spec import LayerSpec, ModelSpec

DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
AT_PEAK = Efficiency(memory=1.0, compute=1.0, layer_s=0.0, step_s=0.0, source="100% of peak, no overheads")


@dataclass(frozen=True)
class StepShape:
    """One sweep point: `batch` sequences each adding `tokens` tokens on `context` cached ones."""

    kind: str  # "decode" | "prefill"
    batch: int
    tokens: int
    context: int

    @property
    def label(self) -> str:
        return f"decode b{self.batch}" if self.kind == "decode" else f"prefill {self.tokens}"


def decode_shape(batch: int, context: int) -> StepShape:
    return StepShape("decode", batch, 1, context)


def prefill_shape(prompt: int) -> StepShape:
    return StepShape("prefill", 1, prompt, 0)


def engine_for(mode: str) -> tuple[str, bool]:
    """(engine, cuda_graphs) whose default overheads a bench mode compares with (moeplan.engines):
    replayed graphs as vLLM runs decode, an eager loop as plain PyTorch does."""
    return ("vllm", True) if mode == "cuda-graph" else ("pytorch", False)


def planner_efficiency(gpu: Gpu, dtype: str, mode: str) -> Efficiency:
    """The efficiency perf would use now: a saved calibration for this device and dtype, else the
    defaults (moeplan.perf.efficiency_for); with no per-step engine cost, which a bench does not run."""
    eff = efficiency_for(gpu, dtype, None, engine_for(mode)[0])
    return eff.model_copy(update={"step_s": 0.0})


def moe_ordinals(spec: ModelSpec, indices: Sequence[int]) -> dict[int, int]:
    """Layer index -> its position among the model's MoE layers (a routing file's row)."""
    moe = [i for i, layer in enumerate(spec.layers) if layer.ffn == "moe"]
    return {i: moe.index(i) for i in indices if i in moe}


def _layer_cost(spec: ModelSpec, gpu: Gpu, layer: LayerSpec, shape: StepShape, *, dtype: str, eff: Efficiency,
                mode: str, probs: Sequence[float] | None) -> StepCost:  # fmt: skip
    """moeplan.perf.step_cost of one layer alone on one GPU, as predict_layers sets it up."""
    sub = spec.model_copy(update={"layers": (layer,), "mtp_layers": 0})
    scheme = get_scheme("fp32" if dtype == "fp32" else "bf16")
    engine, graphs = engine_for(mode)
    context = shape.context if shape.kind == "decode" else shape.tokens  # a prefill as perf.speed times it
    return step_cost(sub, scheme, Layout(tp=1, ep=1, pp=1, stage_layers=(1,)), (gpu,), tokens_per_seq=shape.tokens,
                     batch=shape.batch, context=context, kv_dtype="fp32" if dtype == "fp32" else "bf16",
                     efficiency=eff, with_head=False, engine=engine, cuda_graphs=graphs, probs=probs)  # fmt: skip


def _head_terms(spec: ModelSpec, layer_at_peak: StepCost, shape: StepShape, dtype: str) -> tuple[float, float]:
    """(compute_s, memory_s) of the lm_head at peak, as step_cost charges it (logits for each
    sequence's last token); the peaks are read back from a layer's at-peak cost."""
    head = spec.vocab_size * spec.hidden_size
    flops_per_s = layer_at_peak.flops / layer_at_peak.compute_s if layer_at_peak.compute_s else 0.0
    bytes_per_s = layer_at_peak.bytes / layer_at_peak.memory_s if layer_at_peak.memory_s else 0.0
    scheme = get_scheme("fp32" if dtype == "fp32" else "bf16")
    c = 2 * head * shape.batch / flops_per_s if flops_per_s else 0.0
    m = head * scheme.bits_for(LM_HEAD) / 8 / bytes_per_s if bytes_per_s else 0.0
    return c, m


@dataclass(frozen=True)
class Predicted:
    seconds: float
    bound: str  # "memory" | "compute": the larger sum of terms at `eff`
    distinct_experts: float | None  # expected per MoE layer (moeplan.routing.rank_load), mean over layers


def predict_point(spec: ModelSpec, gpu: Gpu, layers: Sequence[int], shape: StepShape, *, dtype: str,
                  eff: Efficiency, mode: str, routing: Routing, full: bool) -> Predicted:  # fmt: skip
    """The planner's time for the built layers (and the lm_head of a full model) at `eff`."""
    ordinals = moe_ordinals(spec, layers)
    total = comp = mem = 0.0
    distinct: list[float] = []
    first: StepCost | None = None
    for i in layers:
        probs = routing.layer(ordinals[i]) if i in ordinals else None
        cost = _layer_cost(spec, gpu, spec.layers[i], shape, dtype=dtype, eff=eff, mode=mode, probs=probs)
        first = first or cost
        total, comp, mem = total + cost.seconds, comp + cost.compute_s, mem + cost.memory_s
        if i in ordinals:
            distinct.append(cost.distinct_experts)
    if full and first is not None:
        at_peak = _layer_cost(spec, gpu, spec.layers[layers[0]], shape, dtype=dtype, eff=AT_PEAK, mode=mode, probs=None)
        c, m = _head_terms(spec, at_peak, shape, dtype)
        total += max(c / eff.compute, m / eff.memory)
        comp, mem = comp + c / eff.compute, mem + m / eff.memory
    return Predicted(seconds=total, bound="compute" if comp > mem else "memory",
                     distinct_experts=sum(distinct) / len(distinct) if distinct else None)  # fmt: skip


def at_peak_terms(spec: ModelSpec, gpu: Gpu, layers: Sequence[int], shape: StepShape, *, dtype: str, mode: str,
                  routing: Routing, full: bool) -> list[tuple[float, float]]:  # fmt: skip
    """(compute_s, memory_s) at 100% of peak, per built layer (and the lm_head of a full model)."""
    ordinals = moe_ordinals(spec, layers)
    terms = []
    for i in layers:
        probs = routing.layer(ordinals[i]) if i in ordinals else None
        cost = _layer_cost(spec, gpu, spec.layers[i], shape, dtype=dtype, eff=AT_PEAK, mode=mode, probs=probs)
        terms.append((cost.compute_s, cost.memory_s))
    if full and layers:
        first = _layer_cost(spec, gpu, spec.layers[layers[0]], shape, dtype=dtype, eff=AT_PEAK, mode=mode, probs=None)
        terms.append(_head_terms(spec, first, shape, dtype))
    return terms


def fit_point(terms: Sequence[tuple[float, float]], measured_s: float, n_layers: int, label: str) -> FitPoint:
    return FitPoint(measured_s=measured_s, terms=tuple(terms), layers=n_layers, label=label)


def predicted_param_bytes(spec: ModelSpec, layers: Sequence[LayerSpec], dtype: str, *, full: bool) -> int:
    """Exact: params counted by moeplan.params times bytes per element (vision tower not built)."""
    if full:
        n = count_params(spec).total_params - vision_params(spec)
    else:
        n = sum(total for layer in layers for total, _ in layer_params(spec, layer).values())
    return n * DTYPE_BYTES[dtype]


def predicted_peak_bytes(spec: ModelSpec, layers: Sequence[LayerSpec], prompt: int, dtype: str, *, full: bool) -> int:
    """Weights + the prompt's KV + the prefill's activations (moeplan.memory, the planner's formulas):
    the peak of a prefill of one `prompt`-token sequence."""
    from moeplan.memory import activation_bytes, kv_cache_bytes

    nbytes = float(DTYPE_BYTES[dtype])
    act = activation_bytes(spec, prompt, nbytes, per_layer=not full)
    kv = kv_cache_bytes(spec, prompt, 1, dtype, layers=list(layers))
    return predicted_param_bytes(spec, layers, dtype, full=full) + int(kv) + int(act)


def expected_loads(spec: ModelSpec, routing: Routing, layers: Sequence[int], tokens: int,
                   ranks: int) -> tuple[float, float, float]:  # fmt: skip
    """(distinct experts, busiest rank's distinct experts, busiest rank's assignments) per MoE layer
    for `tokens` tokens over `ranks` EP ranks, averaged over the built MoE layers (moeplan.routing)."""
    ordinals = moe_ordinals(spec, layers)
    loads = [rank_load(spec.num_experts, spec.experts_per_token, tokens, ranks, routing.layer(j))
             for j in ordinals.values()]  # fmt: skip
    if not loads:
        return 0.0, 0.0, 0.0
    n = len(loads)
    return (sum(x.distinct_total for x in loads) / n, sum(x.distinct_max for x in loads) / n,
            sum(x.assignments_max for x in loads) / n)  # fmt: skip
