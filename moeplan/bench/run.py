"""`moeplan bench`: build real layers, measure them, and set the measurements beside the predictions.

The entry the CLI calls is `run_bench`; the CLI draws the progress bar from `on_step` and prints
`BenchResult.model_dump()` for --json. This module imports torch only inside run_bench, so it can be
imported (and raise BenchUnavailableError) where torch is missing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from moeplan.errors import BenchUnavailableError, MoeplanError
from moeplan.hardware import Gpu, host_memory_bytes
from moeplan.params import count_params, layer_params, vision_params
from moeplan.spec import LayerSpec, ModelSpec

Device = Literal["cuda", "cpu", "mps"]
DType = Literal["bf16", "fp16", "fp32"]
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
NO_TORCH = "torch is not installed: pip install 'moeplan[bench]' (or pip install torch)"
# Leave this share of the host's available RAM unused: on CPU the kernel kills the process instead
# of raising, so a size that cannot fit is reported, not tried.
CPU_RAM_HEADROOM = 0.9
KEYS = ("param_bytes", "peak_bytes", "decode_s", "prefill_s")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Numbers(_Frozen):
    """The four figures predicted and measured side by side. Bytes are bytes; times are seconds."""

    param_bytes: int | None = None
    peak_bytes: int | None = None  # peak device memory of the prefill, weights and KV included
    decode_s: float | None = None  # one decode step: `batch` tokens attending `context` cached tokens
    prefill_s: float | None = None  # one sequence of `prompt` tokens (the time to first token)


class Spread(_Frozen):
    min_s: float
    max_s: float
    repeats: int


class Achieved(_Frozen):
    """What the measured runs moved, against the device's peaks (GB = 1e9 bytes)."""

    decode_bytes: int  # weights the batch touched (distinct experts only) + KV read
    decode_gb_per_s: float
    decode_fraction_of_peak: float
    prefill_flops: float
    prefill_tflops: float
    prefill_fraction_of_peak: float
    peak_gb_per_s: float
    peak_tflops: float
    distinct_experts: list[int]  # per MoE layer, in the timed decode step


class EpTimes(_Frozen):
    ranks: int
    experts_per_rank: list[int]
    tokens: int
    dispatch_s: float
    experts_s: float
    combine_s: float
    path: str
    # moeplan.perf's communication model for the same all-to-alls; None where it has no link (CPU).
    predicted_dispatch_s: float | None = None
    predicted_combine_s: float | None = None


class BenchResult(_Frozen):
    """`model_dump()` of this is exactly `moeplan bench --json`."""

    model: str
    device: str  # cuda | cpu | mps
    device_name: str  # as the driver names it
    gpu: str  # the catalog entry whose peaks are used (calibration is saved under this name)
    path: str  # MoE kernel path that ran: grouped_mm | loop | none (no MoE layer)
    dtype: str
    layers: list[int]  # indices of the decoder layers built
    full: bool
    batch: int
    context: int
    prompt: int
    repeats: int
    predicted: Numbers
    measured: Numbers
    errors: dict[str, float | None]  # (measured - predicted) / predicted per key
    spread: dict[str, Spread]
    achieved: Achieved | None
    efficiency: dict[str, float] | None  # {"memory", "compute"}: predicted-at-peak / measured, clipped
    fits: bool
    oom: str | None = None  # what ran out of memory, when fits is False
    ep: EpTimes | None = None
    notes: list[str]


OnStep = Callable[[str, int, int], None]


class _Progress:
    """Counts steps for the caller's on_step(description, done, total)."""

    def __init__(self, total: int, on_step: OnStep | None) -> None:
        self.total, self.done, self.on_step = total, 0, on_step

    def __call__(self, description: str) -> None:
        self.done = min(self.done + 1, self.total)
        if self.on_step is not None:
            self.on_step(description, self.done, self.total)


# ----------------------------------------------------------------------------------------------
# Predicted side: pure moeplan
# ----------------------------------------------------------------------------------------------


def predicted_param_bytes(spec: ModelSpec, layers: tuple[LayerSpec, ...], dtype: str, *, full: bool) -> int:
    """Exact: params counted by moeplan.params times bytes per element (vision tower not built)."""
    if full:
        n = count_params(spec).total_params - vision_params(spec)
    else:
        n = sum(total for layer in layers for total, _ in layer_params(spec, layer).values())
    return n * DTYPE_BYTES[dtype]


def _kv_bytes(spec: ModelSpec, layers: tuple[LayerSpec, ...], tokens: int, batch: int, dtype: str) -> int:
    """KV bytes of these layers for `batch` sequences of `tokens`, windowed layers capped at their
    window (moeplan.memory.kv_cache_bytes, the formula the planner uses)."""
    memory = importlib.import_module("moeplan.memory")
    return int(memory.kv_cache_bytes(spec, tokens, batch, dtype, layers=list(layers)))


def predict(spec: ModelSpec, gpu: Gpu, layers: tuple[LayerSpec, ...], *, dtype: str, batch: int, context: int,
            prompt: int, full: bool) -> tuple[Numbers, Any]:  # fmt: skip
    """(predicted numbers, the same prediction at 100% efficiency for calibration)."""
    memory = importlib.import_module("moeplan.memory")
    perf = importlib.import_module("moeplan.perf")
    nbytes = DTYPE_BYTES[dtype]
    kw: dict[str, Any] = dict(layers=layers, batch=batch, context=context, prompt=prompt, dtype_bytes=float(nbytes))
    pred = perf.predict_layers(spec, gpu, **kw)
    at_peak = perf.predict_layers(spec, gpu, efficiency=perf.Efficiency(memory=1.0, compute=1.0), **kw)
    weights = predicted_param_bytes(spec, layers, dtype, full=full)
    # The prefill is one sequence of `prompt` tokens, as perf.predict_layers times it.
    act = memory.activation_bytes(spec, prompt, float(nbytes), per_layer=not full)
    peak = weights + _kv_bytes(spec, layers, prompt, 1, dtype) + int(act)
    numbers = Numbers(param_bytes=weights, peak_bytes=peak, decode_s=float(pred.decode_s), prefill_s=float(pred.prefill_s))
    return numbers, at_peak


def relative_errors(predicted: Numbers, measured: Numbers) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in KEYS:
        p, m = getattr(predicted, key), getattr(measured, key)
        out[key] = None if p is None or m is None or p == 0 else (m - p) / p
    return out


# ----------------------------------------------------------------------------------------------
# Measured side
# ----------------------------------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, MPS's and CPU allocators' RuntimeErrors, Python's MemoryError."""
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom_type is not None and isinstance(exc, oom_type)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _needed_bytes(spec: ModelSpec, n_layers: int, *, dtype: str, start_layer: int | None, full: bool,
                  batch: int, context: int, prompt: int) -> int:  # fmt: skip
    """Weights and the larger cache, counted on the meta device (allocates nothing)."""
    import torch

    from moeplan.bench.layers import build_layers, param_bytes

    meta = build_layers(spec, n_layers, dtype, torch.device("meta"), start_layer=start_layer, full=full)
    decode = sum(c.nbytes for c in meta.new_caches(batch, context + 1))
    prefill = sum(c.nbytes for c in meta.new_caches(1, prompt))
    return param_bytes(meta) + max(decode, prefill)


def _defaults(device: str, repeats: int | None, prompt: int | None) -> tuple[int, int, int]:
    """(repeats, warmup, prompt): a CPU has 2 cores in CI, a GPU has time for more repeats."""
    on_cpu = device == "cpu"
    return (repeats or (3 if on_cpu else 20), 1 if on_cpu else 3, prompt or (128 if on_cpu else 512))


def run_bench(
    spec: ModelSpec,
    *,
    device: Device = "cuda",
    dtype: DType = "bf16",
    batch: int = 1,
    context: int = 1024,
    prompt: int | None = None,
    layers: int = 1,
    full: bool = False,
    ep: int = 1,
    repeats: int | None = None,
    start_layer: int | None = None,
    path: Literal["grouped_mm", "loop"] | None = None,
    on_step: OnStep | None = None,
) -> BenchResult:
    """Build `layers` decoder layers of `spec` (or the whole model with full) on `device`, measure
    weight bytes, the peak memory and time of a prefill of one `prompt`-token sequence, and the time
    of a decode step of `batch` tokens over a KV cache of `context` tokens each; predict the same
    with moeplan (memory.activation_bytes, memory.kv_cache_bytes, perf.predict_layers).

    Defaults on CPU: prompt 128, repeats 3; elsewhere prompt 512, repeats 20. An out-of-memory is a
    result (fits False, the CLI exits 1), not an error. Raises BenchUnavailableError without torch.
    """
    try:
        import torch
    except ImportError:
        raise BenchUnavailableError(NO_TORCH) from None
    from moeplan.bench import harness
    from moeplan.bench.layers import DTYPES, build_layers, pick_layers

    for name, value in (("batch", batch), ("context", context), ("layers", layers), ("ep", ep)):
        if value < 1:
            raise MoeplanError(f"--{name} must be at least 1, got {value}")
    if dtype not in DTYPES:
        raise MoeplanError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchUnavailableError("no CUDA device: this torch sees none (use --device cpu, or install a CUDA torch)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise BenchUnavailableError("no MPS device: use --device cpu")
    if device not in ("cuda", "cpu", "mps"):
        raise MoeplanError(f"--device must be cuda, cpu or mps, got {device!r}")
    repeats, warmup, prompt = _defaults(device, repeats, prompt)
    if prompt < 1 or repeats < 1:
        raise MoeplanError(f"--prompt and --repeats must be at least 1, got {prompt} and {repeats}")

    dev = torch.device(device)
    device_name, gpu, notes = harness.device_info(dev)
    indices = list(range(spec.num_layers)) if full else pick_layers(spec, layers, start_layer)
    layer_specs = tuple(spec.layers[i] for i in indices)
    predicted, at_peak = predict(spec, gpu, layer_specs, dtype=dtype, batch=batch, context=context, prompt=prompt,
                                 full=full)  # fmt: skip
    if dtype == "fp32":
        notes.append("fp32 compared against the device's bf16 peak (the catalog has no fp32 figure)")
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    if device == "cpu" and dtype != "fp32" and capability in ("DEFAULT", "AVX2"):
        # NOTE: without AVX512-BF16/AMX, oneDNN has no bf16 GEMM and torch runs a generic kernel
        # (Mixtral layer prefill on a 2-core AVX2 EPYC: 5.2 s in bf16, 2.2 s in fp32).
        notes.append(f"this CPU ({capability}) has no native {dtype} matmul; --quant fp32 runs faster here")

    steps = 1 + 1 + 2 * (warmup + repeats) + (1 if ep > 1 else 0)
    progress = _Progress(steps, on_step)
    common: dict[str, Any] = dict(
        model=spec.name, device=device, device_name=device_name, gpu=gpu.name, dtype=dtype, layers=indices,
        full=full, batch=batch, context=context, prompt=prompt, repeats=repeats, predicted=predicted,
    )  # fmt: skip

    def no_fit(oom: str, measured: Numbers) -> BenchResult:
        return BenchResult(**common, path="none", measured=measured, errors=relative_errors(predicted, measured),
                           spread={}, achieved=None, efficiency=None, fits=False, oom=oom, notes=notes)  # fmt: skip

    if device == "cpu":
        needed = _needed_bytes(spec, layers, dtype=dtype, start_layer=indices[0], full=full, batch=batch,
                               context=context, prompt=prompt)  # fmt: skip
        _, available = host_memory_bytes()
        if available and needed > CPU_RAM_HEADROOM * available:
            return no_fit(
                f"not tried: {len(indices)} layer(s) of {spec.name} in {dtype} need {needed / 2**30:.1f} GiB, "
                f"{available / 2**30:.1f} GiB of host RAM is available (the kernel would kill, not raise)",
                Numbers(),
            )

    stage = ["building the layers"]  # what ran out of memory, for the message
    measured_params: int | None = None
    try:
        model = build_layers(spec, layers, dtype, dev, start_layer=indices[0], full=full)
        measured_params = harness.param_bytes(model)
        for block in model.moe_blocks():
            block.path = path
        progress(f"built {len(indices)} layer(s) on {device}")
        m = _measure(model, dev, batch=batch, prompt=prompt, context=context, warmup=warmup, repeats=repeats,
                     progress=progress, stage=stage)  # fmt: skip
        del model  # free the device before the EP ranks allocate on it
        if device == "cuda":
            torch.cuda.empty_cache()
        ep_times = None
        if ep > 1:
            stage[0] = f"running expert parallel over {ep} ranks"
            ep_times = _run_ep(spec, ep=ep, dtype=dtype, device=device, batch=batch, repeats=repeats, warmup=warmup)
            ep_times = _with_comm_model(ep_times, spec, gpu, dtype=dtype, batch=batch, notes=notes)
            progress(f"expert parallel over {ep} ranks")
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is a result; the rest re-raises
        if not is_oom(exc):
            raise
        return no_fit(f"out of memory on {device} while {stage[0]}: {str(exc).splitlines()[0][:200]}",
                      Numbers(param_bytes=measured_params))  # fmt: skip
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    if m.peak_approximate:
        notes.append(f"measured peak_bytes on {device} is approximate (resident tensors + RSS rise)")

    measured = Numbers(param_bytes=measured_params, peak_bytes=m.peak_bytes, decode_s=m.decode.median_s,
                       prefill_s=m.prefill.median_s)  # fmt: skip
    peak_tflops = gpu.peak_tflops(weight_bits=16)
    gb_per_s = m.decode_bytes / m.decode.median_s / 1e9
    tflops = m.prefill_flops / m.prefill.median_s / 1e12
    achieved = Achieved(
        decode_bytes=m.decode_bytes, decode_gb_per_s=gb_per_s, decode_fraction_of_peak=gb_per_s / gpu.hbm_gb_per_s,
        prefill_flops=m.prefill_flops, prefill_tflops=tflops, prefill_fraction_of_peak=tflops / peak_tflops,
        peak_gb_per_s=gpu.hbm_gb_per_s, peak_tflops=peak_tflops, distinct_experts=m.distinct_experts,
    )  # fmt: skip
    return BenchResult(
        **common, path=m.path, measured=measured, errors=relative_errors(predicted, measured),
        spread={
            "decode_s": Spread(min_s=m.decode.min_s, max_s=m.decode.max_s, repeats=repeats),
            "prefill_s": Spread(min_s=m.prefill.min_s, max_s=m.prefill.max_s, repeats=repeats),
        },
        achieved=achieved, efficiency=_efficiency(at_peak, m.decode.median_s, m.prefill.median_s), fits=True,
        ep=ep_times, notes=notes,
    )  # fmt: skip


@dataclass(frozen=True)
class _Measured:
    peak_bytes: int
    peak_approximate: bool
    prefill: Any  # harness.Timing
    prefill_flops: float
    decode: Any  # harness.Timing
    decode_bytes: int
    distinct_experts: list[int]
    path: str


def _measure(model: Any, dev: Any, *, batch: int, prompt: int, context: int, warmup: int, repeats: int,
             progress: _Progress, stage: list[str]) -> _Measured:  # fmt: skip
    """Prefill (one sequence) peak and time, then a decode step's time on a random, full cache."""
    import torch

    from moeplan.bench import harness

    with torch.inference_mode():
        stage[0] = f"prefilling {prompt} tokens"
        x = _inputs(model, 1, prompt, dev)
        caches = model.new_caches(1, prompt)
        prefill = partial(model, x, caches, 0)
        prefill()  # warm: first-call allocations and kernel selection stay out of the peak
        resident = harness.param_bytes(model) + sum(c.nbytes for c in caches) + harness.tensors_bytes(x)
        peak, approximate = harness.peak_bytes_of(prefill, device=dev, resident_bytes=resident)
        progress("measured the prefill peak")
        t_prefill = harness.time_fn(prefill, device=dev, warmup=warmup, repeats=repeats,
                                    on_tick=lambda: progress(f"prefill {prompt} tokens"))  # fmt: skip
        del prefill, caches, x

        stage[0] = f"decoding {batch} token(s) over {context} cached"
        caches = model.new_caches(batch, context + 1, fill=True)  # random KV: only its size matters
        decode = partial(model, _inputs(model, batch, 1, dev), caches, context)
        t_decode = harness.time_fn(decode, device=dev, warmup=warmup, repeats=repeats,
                                   on_tick=lambda: progress(f"decode step, batch {batch}, context {context}"))  # fmt: skip
        return _Measured(
            peak_bytes=peak, peak_approximate=approximate, prefill=t_prefill,
            prefill_flops=harness.prefill_flops(model, 1, prompt), decode=t_decode,
            decode_bytes=harness.decode_bytes(model, caches, batch),  # after a decode: distinct experts known
            distinct_experts=harness.distinct_experts(model),
            path=next((b.last_path for b in model.moe_blocks()), "none"),
        )  # fmt: skip


def _inputs(model: Any, batch: int, tokens: int, device: Any) -> Any:
    """Random hidden states (B, T, H) for layers, or random token ids (B, T) for a full model."""
    import torch

    spec = model.model_spec
    if model.full:
        return torch.randint(0, spec.vocab_size, (batch, tokens), device=device)
    dtype = next(model.parameters()).dtype
    return torch.randn(batch, tokens, spec.hidden_size, device=device, dtype=dtype)


def _efficiency(at_peak: Any, decode_s: float, prefill_s: float) -> dict[str, float] | None:
    from moeplan.calibration import efficiency

    try:
        return {"memory": efficiency(float(at_peak.decode_s), decode_s),
                "compute": efficiency(float(at_peak.prefill_s), prefill_s)}  # fmt: skip
    except (MoeplanError, TypeError, ValueError):
        return None


def _run_ep(spec: ModelSpec, *, ep: int, dtype: str, device: str, batch: int, repeats: int, warmup: int) -> EpTimes:
    """Each rank routes `batch` decode tokens of its own (data-parallel attention, expert-parallel
    MoE, as DeepSeek's decode deployment)."""
    from moeplan.bench.ep import run_ep

    r = run_ep(spec, ep=ep, dtype=dtype, device=device, tokens_per_rank=batch, repeats=repeats, warmup=warmup)
    return EpTimes(ranks=r.ranks, experts_per_rank=r.experts_per_rank, tokens=r.tokens, dispatch_s=r.dispatch_s,
                   experts_s=r.experts_s, combine_s=r.combine_s, path=r.path)  # fmt: skip


def _with_comm_model(times: EpTimes, spec: ModelSpec, gpu: Gpu, *, dtype: str, batch: int,
                     notes: list[str]) -> EpTimes:
    """Attach perf's prediction for the measured dispatch and combine: each rank sends its `batch`
    tokens x top-k x hidden in the bench dtype (bf16/fp16 2 bytes, fp32 4) over the GPU's link."""
    if gpu.link_gb_per_s <= 0:
        notes.append("expert parallel: no link model for processes on the CPU (gloo); dispatch and combine "
                     "are measured only")
        return times
    from moeplan.perf import ep_alltoall_seconds

    nbytes = batch * spec.experts_per_token * spec.hidden_size * (4 if dtype == "fp32" else 2)
    predicted = ep_alltoall_seconds(nbytes, times.ranks, gpu)
    return times.model_copy(update={"predicted_dispatch_s": predicted, "predicted_combine_s": predicted})


def save_result_calibration(result: BenchResult) -> Path | None:
    """Store a result's efficiencies under its GPU and dtype (for `bench --calibrate`); None if the
    run measured none (it did not fit)."""
    from moeplan.calibration import save_calibration

    if result.efficiency is None:
        return None
    source = f"moeplan bench {result.model} on {result.device_name}, layers {result.layers}, batch {result.batch}"
    return save_calibration(result.gpu, result.dtype, result.efficiency["memory"], result.efficiency["compute"], source)
