"""`moeplan bench`: build real layers, sweep decode batches and prefill lengths on them, set each
measured point beside the planner's prediction, and fit a calibration from the sweep.

The entry the CLI calls is `run_bench`; the CLI draws the progress bar from `on_step` and prints
`BenchResult.model_dump()` for --json. Every input is checked before torch allocates anything (bad
input is one line and exit 2). This module imports torch only inside run_bench, so it can be
imported (and raise BenchUnavailableError) where torch is missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from moeplan.bench.predict import (
    StepShape, at_peak_terms, decode_shape, expected_loads, fit_point, moe_ordinals, planner_efficiency,
    predict_point, predicted_param_bytes, predicted_peak_bytes, prefill_shape,
)  # fmt: skip
from moeplan.errors import BenchUnavailableError, MoeplanError
from moeplan.hardware import Gpu, host_memory_bytes
from moeplan.routing import Routing, parse_routing, pick_probs, rank_load
from moeplan.spec import ModelSpec

__all__ = ["BenchResult", "parse_sizes", "predicted_param_bytes", "run_bench", "save_result_calibration"]

Device = Literal["cuda", "cpu", "mps"]
DType = Literal["bf16", "fp16", "fp32"]
DTYPES = ("bf16", "fp16", "fp32")
NO_TORCH = "torch is not installed: pip install 'moeplan[bench]' (or pip install torch)"
# Leave this share of the host's available RAM unused: on CPU the kernel kills the process instead
# of raising, so a size that cannot fit is reported, not tried.
CPU_RAM_HEADROOM = 0.9
KEYS = ("param_bytes", "peak_bytes", "decode_s", "prefill_s")
# Sweeps by default: a GPU has time for batches up to 256 and a compute-bound 2048-token prefill; a
# CPU for two of each. NOTE: a CPU's grouped GEMMs reach their rate only with many rows per expert
# (OLMoE layer, 2-core Sapphire Rapids bf16: 0.31 TFLOP/s at a 256-token prefill, 0.76 at 2048), which
# the planner's one compute efficiency does not model, so the CPU's prefills are long ones.
DEFAULT_BATCHES = {"cuda": (1, 8, 64, 256), "cpu": (1, 8), "mps": (1, 8)}
DEFAULT_PROMPTS = {"cuda": (512, 2048), "cpu": (1024, 2048), "mps": (1024, 2048)}
MAX_SWEEP = 16  # values per list
MAX_SIZE = 1 << 20
ROUTING_DRAWS = 128  # random batches whose routing is counted per sweep batch
NOISY_IQR = 0.25  # a point whose interquartile range passes this share of its median is flagged
COPY_DRIFT = 0.15  # copy bandwidth before and after the sweep differing by more: the device was shared


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)


class Numbers(_Frozen):
    """The four headline figures predicted and measured side by side. Bytes are bytes; times are seconds."""

    param_bytes: int | None = None
    peak_bytes: int | None = None  # peak device memory of the first prefill, weights and KV included
    decode_s: float | None = None  # the first decode point: `batch` tokens attending `context` cached tokens
    prefill_s: float | None = None  # the first prefill point: one sequence of `prompt` tokens


class Spread(_Frozen):
    min_s: float
    max_s: float
    repeats: int


class Achieved(_Frozen):
    """What the headline runs moved, against the device's peaks (GB = 1e9 bytes)."""

    decode_bytes: int  # weights the batch touched (distinct experts only) + KV read
    decode_gb_per_s: float
    decode_fraction_of_peak: float
    decode_fraction_of_copy: float | None  # of the measured device copy bandwidth
    prefill_flops: float
    prefill_tflops: float
    prefill_fraction_of_peak: float
    peak_gb_per_s: float
    peak_tflops: float
    copy_gb_per_s: float | None
    distinct_experts: list[int]  # per MoE layer, in the timed decode step


class Point(_Frozen):
    """One sweep point: measured (median and spread over repeats), predicted, and what it moved."""

    kind: Literal["decode", "prefill"]
    batch: int  # sequences
    tokens: int  # tokens each sequence adds: 1 for decode, the prompt for prefill
    context: int  # cached tokens each sequence attends (0 for a prefill from an empty cache)
    mode: str  # cuda-graph | eager: how it was timed
    measured_s: float  # median
    min_s: float
    max_s: float
    q1_s: float  # interquartile range
    q3_s: float
    repeats: int
    predicted_s: float  # the planner as it stands (a saved calibration for this device, else defaults)
    error: float  # (measured - predicted) / predicted
    calibrated_s: float | None = None  # the planner with this run's fitted calibration
    calibrated_error: float | None = None
    bound: str  # the planner's regime for it, at the fitted efficiencies when there is a fit
    at_peak: list[tuple[float, float]]  # (compute_s, memory_s) at 100% of peak, per built layer
    bytes: int  # weights touched (distinct experts only) + KV read or written
    flops: float
    gb_per_s: float
    fraction_of_copy: float | None  # of the measured device copy bandwidth
    fraction_of_peak_bandwidth: float  # of the datasheet (catalog) bandwidth
    tflops: float
    fraction_of_peak_flops: float
    distinct_experts: list[int]  # per MoE layer, in the timed step
    predicted_distinct_experts: float | None  # the planner's expectation per MoE layer
    peak_bytes: int | None = None  # prefill: peak memory, weights and KV included
    predicted_peak_bytes: int | None = None


class RoutingCheck(_Frozen):
    """Distinct experts (and busiest-rank loads under --ep) counted over random batches routed as the
    layers route them, against moeplan.routing.rank_load for the same distribution."""

    batch: int
    draws: int
    distinct_measured: float  # per MoE layer, mean over draws
    distinct_predicted: float
    distinct_error: float  # (measured - predicted) / predicted
    ranks: int
    busiest_distinct_measured: float | None = None
    busiest_distinct_predicted: float | None = None
    busiest_assignments_measured: float | None = None
    busiest_assignments_predicted: float | None = None


class Calibration(_Frozen):
    """The terms fitted over the sweep (moeplan.calibration.fit_calibration) and how they predict it."""

    memory: float
    compute: float
    layer_s: float
    memory_fitted: bool
    compute_fitted: bool
    memory_points: int
    compute_points: int
    mode: str  # the timing mode of the points it was fitted on
    peaks_assumed: bool  # the device's peaks are moeplan's assumption (CPU): efficiencies may pass 1
    max_abs_error_before: float  # |measured / predicted - 1| over the points, the planner as it stood
    max_abs_error_after: float  # and with this calibration, through the planner's own step_cost
    notes: list[str]


class EpTimes(_Frozen):
    ranks: int
    experts_per_rank: list[int]
    tokens: int  # over all ranks, `batch` distinct tokens each
    layout_s: float  # count exchange and split sizes to the host (not modelled: DeepEP folds it in)
    dispatch_s: float  # the token all-to-all alone
    experts_s: float
    combine_s: float  # the reverse all-to-all alone
    path: str
    busiest_assignments: int  # token copies the busiest rank received
    predicted_busiest_assignments: float  # moeplan.routing.rank_load's assignments_max
    # moeplan.perf's communication model for the same all-to-alls; None where it has no link (CPU).
    predicted_dispatch_s: float | None = None
    predicted_combine_s: float | None = None


class BenchResult(_Frozen):
    """`model_dump()` of this is exactly `moeplan bench --json`."""

    model: str
    device: str  # cuda | cpu | mps
    device_name: str  # as the driver names it
    gpu: str  # the catalog entry whose peaks are used (calibration is saved under this name)
    path: str  # MoE kernel path that ran: grouped_mm | grouped_mm/fallback | loop | none
    kernels: list[str]  # device kernels of the grouped GEMMs (CUDA), from the profiler
    path_detail: str  # how the path was found
    mode: str  # how the points were timed: cuda-graph | eager
    dtype: str
    layers: list[int]  # indices of the decoder layers built
    full: bool
    context: int
    repeats: int
    warmup: int
    routing: str  # uniform | zipf:S | the frequency file
    predicted_with: str  # the efficiency the predicted column uses
    copy_gb_per_s: float | None  # measured device-to-device copy bandwidth (read + write), before the sweep
    copy_after_gb_per_s: float | None = None  # and after it: a shared or throttled device shows here
    peak_gb_per_s: float  # datasheet (catalog) bandwidth
    peak_tflops: float
    peaks_assumed: bool  # the peaks are moeplan's assumption (the host CPU, a generic card), not a datasheet's
    points: list[Point]
    calibration: Calibration | None
    routing_check: list[RoutingCheck]
    # The headline: the first decode batch and the first prefill, as earlier versions reported.
    batch: int
    prompt: int
    predicted: Numbers
    measured: Numbers
    errors: dict[str, float | None]  # (measured - predicted) / predicted per key
    spread: dict[str, Spread]
    achieved: Achieved | None
    efficiency: dict[str, float] | None  # the fitted {"memory", "compute", "layer_s"}
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
# Input, checked before anything is built
# ----------------------------------------------------------------------------------------------


def parse_sizes(text: str | int | Sequence[int] | None, flag: str) -> tuple[int, ...] | None:
    """'1,8,64' (or an int, or a list) -> (1, 8, 64), kept in order without repeats; None stays None.
    Raises MoeplanError with one line for anything but whole numbers from 1 to 2^20."""
    if text is None:
        return None
    items: list[Any] = [text] if isinstance(text, int) else list(text.split(",") if isinstance(text, str) else text)
    out: list[int] = []
    for item in items:
        word = str(item).strip()
        try:
            value = int(word)
        except ValueError:
            raise MoeplanError(f"{flag} takes whole numbers separated by commas, e.g. 1,8,64; got {word!r}") from None
        if not 1 <= value <= MAX_SIZE:
            raise MoeplanError(f"{flag} values must be between 1 and {MAX_SIZE:,}, got {value}")
        if value not in out:
            out.append(value)
    if not out:
        raise MoeplanError(f"{flag} needs at least one value, e.g. 1,8,64")
    if len(out) > MAX_SWEEP:
        raise MoeplanError(f"{flag} takes at most {MAX_SWEEP} values, got {len(out)}")
    return tuple(out)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_ep(spec: ModelSpec, ep: int, device: str, cuda_devices: int) -> None:
    """--ep N needs N devices (one GPU per rank; on CPU one core per gloo process) and N <= experts."""
    if ep < 1:
        raise MoeplanError(f"--ep must be at least 1, got {ep}")
    if ep == 1:
        return
    if device == "mps":
        raise MoeplanError("--ep runs on cuda (nccl) or cpu (gloo), not mps")
    have = cuda_devices if device == "cuda" else _cores()
    what = "CUDA GPUs" if device == "cuda" else "CPU cores"
    if ep > have:
        raise MoeplanError(f"--ep {ep} needs {ep} {what} (one per rank); this machine has {have}")
    if not spec.is_moe:
        raise MoeplanError(f"--ep needs an MoE model; {spec.name} has no MoE layers")
    if ep > spec.num_experts:
        raise MoeplanError(f"--ep {ep} is more ranks than {spec.name}'s {spec.num_experts} experts")


def check_routing(spec: ModelSpec, routing: str | None) -> Routing:
    """--routing uniform | zipf:S | FILE (moeplan.routing.parse_routing), checked against the model."""
    if routing is not None and routing.strip().lower() not in ("", "uniform") and not spec.is_moe:
        raise MoeplanError(f"--routing needs an MoE model; {spec.name} has no MoE layers")
    if not spec.is_moe:
        return Routing()
    return parse_routing(routing, spec.num_experts, spec.num_moe_layers)


MAX_REPEATS = 10_000  # a median needs tens; more only makes a run that never ends
MAX_BENCH_CONTEXT = 1_048_576  # the longest context any model plans for (2^20 tokens)


def _defaults(device: str, repeats: int | None) -> tuple[int, int]:
    """(repeats, warmup): a CPU has 2 cores in CI; a GPU has time for more repeats."""
    on_cpu = device != "cuda"
    return (repeats or (3 if on_cpu else 20), 1 if on_cpu else 3)


# ----------------------------------------------------------------------------------------------
# run_bench
# ----------------------------------------------------------------------------------------------


def run_bench(
    spec: ModelSpec,
    *,
    device: Device = "cuda",
    dtype: DType = "bf16",
    batch: int | Sequence[int] | str | None = None,
    context: int = 1024,
    prompt: int | Sequence[int] | str | None = None,
    layers: int = 1,
    full: bool = False,
    ep: int = 1,
    repeats: int | None = None,
    start_layer: int | None = None,
    path: Literal["grouped_mm", "loop"] | None = None,
    eager: bool = False,
    routing: str | None = None,
    on_step: OnStep | None = None,
) -> BenchResult:
    """Build `layers` decoder layers of `spec` (or the whole model with full) on `device`; time a
    prefill of one sequence at each `prompt` length and a decode step at each `batch` over a KV cache
    of `context` tokens, under CUDA graphs on CUDA (eager with `eager`, and everywhere else); predict
    each with moeplan.perf.step_cost; fit a calibration over the points and predict them again with it.

    Defaults: batches 1,8,64,256 and prompts 512,2048 on CUDA (1,8 and 1024,2048 elsewhere); repeats
    20 on CUDA, 3 elsewhere. An out-of-memory is a result (fits False, the CLI exits 1), not an error.
    Raises MoeplanError for bad input before anything is allocated, BenchUnavailableError without torch.
    """
    batches = parse_sizes(batch, "--batch")
    prompts = parse_sizes(prompt, "--prompt")
    for name, value in (("context", context), ("layers", layers)):
        if value < 1:
            raise MoeplanError(f"--{name} must be at least 1, got {value}")
    if repeats is not None and not 1 <= repeats <= MAX_REPEATS:
        raise MoeplanError(f"--repeats must be between 1 and {MAX_REPEATS:,}, got {repeats}")
    if context > MAX_BENCH_CONTEXT:  # its KV cache is allocated for real
        raise MoeplanError(f"--context {context:,} is more than bench builds ({MAX_BENCH_CONTEXT:,} tokens); "
                           "plan longer contexts with `moeplan memory` / `perf`")
    if dtype not in DTYPES:
        raise MoeplanError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device not in ("cuda", "cpu", "mps"):
        raise MoeplanError(f"--device must be cuda, cpu or mps, got {device!r}")
    try:
        import torch
    except ImportError:
        raise BenchUnavailableError(NO_TORCH) from None
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchUnavailableError("no CUDA device: this torch sees none (use --device cpu, or install a CUDA torch)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise BenchUnavailableError("no MPS device: use --device cpu")
    check_ep(spec, ep, device, torch.cuda.device_count() if device == "cuda" else 0)
    route = check_routing(spec, routing)
    from moeplan.bench.layers import pick_layers, unbuildable

    indices = list(range(spec.num_layers)) if full else pick_layers(spec, layers, start_layer)
    for i in indices:
        reason = unbuildable(spec, spec.layers[i])
        if reason:
            raise MoeplanError(f"bench does not build {reason} (layer {i} of {spec.name}); "
                               "pick attention layers with --start-layer, or plan it with memory/fit/perf")  # fmt: skip
    batches = batches or DEFAULT_BATCHES[device]
    prompts = prompts or DEFAULT_PROMPTS[device]
    reps, warmup = _defaults(device, repeats)
    return _Run(spec, device=device, dtype=dtype, batches=batches, prompts=prompts, context=context, indices=indices,
                full=full, ep=ep, repeats=reps, warmup=warmup, path=path, eager=eager, routing=route,
                on_step=on_step).run()  # fmt: skip


class _Run:
    """One bench run, after its input is checked: the steps run_bench takes, one method each."""

    def __init__(self, spec: ModelSpec, *, device: str, dtype: str, batches: tuple[int, ...],
                 prompts: tuple[int, ...], context: int, indices: list[int], full: bool, ep: int, repeats: int,
                 warmup: int, path: str | None, eager: bool, routing: Routing,
                 on_step: OnStep | None) -> None:  # fmt: skip
        import torch

        from moeplan.bench import harness

        self.spec, self.device, self.dtype, self.context = spec, device, dtype, context
        self.indices, self.full, self.ep, self.repeats, self.warmup = indices, full, ep, repeats, warmup
        self.force_path, self.eager, self.routing = path, eager, routing
        self.dev = torch.device(device)
        self.device_name, self.gpu, self.notes = harness.device_info(self.dev)
        self.peaks_assumed = self.gpu.vendor == "cpu" or self.gpu.generic
        self.shapes: list[StepShape] = [prefill_shape(p) for p in prompts] + [decode_shape(b, context) for b in batches]
        per_point = warmup + repeats
        steps = 4 + sum(per_point + (s.kind == "prefill") for s in self.shapes) + 1 + (1 if ep > 1 else 0)
        self.progress = _Progress(steps, on_step)
        self.layer_specs = tuple(spec.layers[i] for i in indices)

    # -- the steps --------------------------------------------------------------------------

    def run(self) -> BenchResult:
        from moeplan.bench import harness, sweep
        from moeplan.bench.layers import build_layers

        if self.dtype == "fp32":
            self.notes.append("fp32 compared against a quarter of the device's bf16 peak (as moeplan.perf does)")
        self._cpu_dtype_note()
        if self.device == "cpu":
            refused = self._too_big_for_ram()
            if refused:
                return self._no_fit(refused, measured_params=None)
        import torch

        self._host_load_note()
        copy_gb_per_s = harness.copy_bandwidth_gb_per_s(self.dev)
        self.progress("measured the device copy bandwidth")
        stage = ["building the layers"]
        measured_params: int | None = None
        try:
            model = build_layers(self.spec, len(self.indices), self.dtype, self.dev, start_layer=self.indices[0],
                                 full=self.full)  # fmt: skip
            measured_params = harness.param_bytes(model)
            for block in model.moe_blocks():
                block.path = self.force_path
            ordinals = moe_ordinals(self.spec, self.indices)
            sweep.set_routing(model, [self.routing.layer(ordinals[i]) for i in self.indices if i in ordinals], self.dev)
            self.progress(f"built {len(self.indices)} layer(s) on {self.device}")
            found, mode, measured = self._sweep(model, stage)
            checks = self._routing_check(model)
            self.progress("counted the routing")
            del model
            if self.device == "cuda":
                torch.cuda.empty_cache()
            copy_after = harness.copy_bandwidth_gb_per_s(self.dev)
            self.progress("measured the copy bandwidth again")
            ep_times = None
            if self.ep > 1:
                stage[0] = f"running expert parallel over {self.ep} ranks"
                ep_times = self._run_ep(found.path)
                self.progress(f"expert parallel over {self.ep} ranks")
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is a result; the rest re-raises
            if not is_oom(exc):
                raise
            return self._no_fit(f"out of memory on {self.device} while {stage[0]}: {str(exc).splitlines()[0][:200]}",
                                measured_params=measured_params)  # fmt: skip
        finally:
            if self.device == "cuda":
                torch.cuda.empty_cache()
        if abs(copy_after / copy_gb_per_s - 1) > COPY_DRIFT:
            self.notes.append(f"the device's copy bandwidth moved from {copy_gb_per_s:,.1f} to {copy_after:,.1f} GB/s "
                              "during the run: it was shared or throttled, so the timings are suspect")  # fmt: skip
        result = self._result(measured, found, mode, copy_gb_per_s, measured_params, checks, ep_times)
        return result.model_copy(update={"copy_after_gb_per_s": copy_after})

    def _host_load_note(self) -> None:
        """On a CPU, other processes take the cores the bench times (and OpenMP threads then wait at
        barriers): say so when the host was already busy."""
        cores = _cores()
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return
        if self.device == "cpu" and load > 0.5 * cores:
            self.notes.append(f"the host was busy at the start (load average {load:.2f} on {cores} cores): "
                              "CPU timings are then slower and noisier")  # fmt: skip

    def _sweep(self, model: Any, stage: list[str]) -> tuple[Any, str, list[Any]]:
        """The kernel path (profiled), the timing mode it allows, and every point measured in it."""
        from moeplan.bench import sweep

        found = sweep.kernel_path(model, self.dev, self.shapes[-1].batch, self.context)
        mode = self._mode(found.path)
        self.progress(f"MoE kernel path: {found.path}")
        measured = []
        for n, shape in enumerate(self.shapes):
            stage[0] = f"timing {shape.label}" + ("" if shape.kind == "prefill" else f" over {self.context} cached")
            measured.append(sweep.measure_point(model, shape, device=self.dev, mode=mode, warmup=self.warmup,
                                                repeats=self.repeats, seed=n + 1,
                                                on_tick=lambda s=shape: self.progress(s.label)))  # fmt: skip
            if shape.kind == "prefill":
                self.progress(f"{shape.label}: peak memory")
        return found, mode, measured

    def _cpu_dtype_note(self) -> None:
        import torch

        capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
        if self.device == "cpu" and self.dtype != "fp32" and capability in ("DEFAULT", "AVX2"):
            # NOTE: without AVX512-BF16/AMX, oneDNN has no bf16 GEMM and torch runs a generic kernel
            # (Mixtral layer prefill on a 2-core AVX2 EPYC: 5.2 s in bf16, 2.2 s in fp32).
            self.notes.append(f"this CPU ({capability}) has no native {self.dtype} matmul; --quant fp32 runs "
                              "faster here")

    def _too_big_for_ram(self) -> str | None:
        needed = _needed_bytes(self.spec, len(self.indices), dtype=self.dtype, start_layer=self.indices[0],
                               full=self.full, shapes=self.shapes)  # fmt: skip
        _, available = host_memory_bytes()
        if available and needed > CPU_RAM_HEADROOM * available:
            return (f"not tried: {len(self.indices)} layer(s) of {self.spec.name} in {self.dtype} need "
                    f"{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB of host RAM is available (the kernel "
                    "would kill, not raise)")  # fmt: skip
        return None

    def _mode(self, kernel_path: str) -> str:
        from moeplan.bench.harness import EAGER, GRAPH

        if self.device != "cuda":
            self.notes.append(f"timed eagerly on {self.device} (CUDA graphs need CUDA): launch overheads included")
            return EAGER
        if self.eager:
            self.notes.append("--eager: timed without CUDA graphs, launch overheads included (as vLLM --enforce-eager)")
            return EAGER
        if kernel_path in ("grouped_mm/fallback", "loop"):
            self.notes.append(f"MoE path {kernel_path} reads expert offsets to the host (a sync CUDA graphs cannot "
                              "capture): timed eagerly; bf16 on SM90/SM100 runs the fused grouped GEMM")  # fmt: skip
            return EAGER
        return GRAPH

    def _routing_check(self, model: Any) -> list[RoutingCheck]:
        from moeplan.bench import sweep

        if not model.moe_blocks():
            return []
        out = []
        for b in sorted({s.batch for s in self.shapes if s.kind == "decode"}):
            counts = sweep.routing_counts(model, b, draws=ROUTING_DRAWS, ranks=self.ep, device=self.dev)
            distinct, busy_d, busy_a = expected_loads(self.spec, self.routing, self.indices, b, self.ep)
            out.append(RoutingCheck(
                batch=b, draws=counts.draws, distinct_measured=counts.distinct, distinct_predicted=distinct,
                distinct_error=counts.distinct / distinct - 1 if distinct else 0.0, ranks=self.ep,
                busiest_distinct_measured=counts.busiest_distinct,
                busiest_distinct_predicted=busy_d if self.ep > 1 else None,
                busiest_assignments_measured=counts.busiest_assignments,
                busiest_assignments_predicted=busy_a if self.ep > 1 else None,
            ))  # fmt: skip
        return out

    def _run_ep(self, kernel_path: str) -> EpTimes:
        """Each rank routes the first sweep batch of tokens of its own (data-parallel attention,
        expert-parallel MoE, as DeepSeek's decode deployment); compared with perf's all-to-all model
        and the busiest rank's expected assignments."""
        from moeplan.bench.ep import run_ep

        batch = next(s.batch for s in self.shapes if s.kind == "decode")
        ordinals = moe_ordinals(self.spec, self.indices)
        shares = self.routing.layer(next(iter(ordinals.values()), 0))
        spec = self.spec
        q = None if shares is None else pick_probs(list(shares), spec.num_experts, spec.experts_per_token)
        r = run_ep(spec, ep=self.ep, dtype=self.dtype, device=self.device, tokens_per_rank=batch,
                   repeats=self.repeats, warmup=self.warmup, route_q=q)  # fmt: skip
        load = rank_load(spec.num_experts, spec.experts_per_token, batch * self.ep, self.ep, shares)
        times = EpTimes(ranks=r.ranks, experts_per_rank=r.experts_per_rank, tokens=r.tokens, layout_s=r.layout_s,
                        dispatch_s=r.dispatch_s, experts_s=r.experts_s, combine_s=r.combine_s,
                        path=kernel_path if r.path == "grouped_mm" else r.path,
                        busiest_assignments=max(r.received),
                        predicted_busiest_assignments=load.assignments_max)  # fmt: skip
        return with_comm_model(times, spec, self.gpu, dtype=self.dtype, batch=batch, notes=self.notes)

    # -- assembling the result ---------------------------------------------------------------

    def _result(self, measured: list[Any], found: Any, mode: str, copy_gb_per_s: float, measured_params: int | None,
                checks: list[RoutingCheck], ep_times: EpTimes | None) -> BenchResult:  # fmt: skip
        from moeplan.calibration import fit_calibration

        ran_mode = _sweep_mode(measured, mode)
        for m in measured:
            if m.graph_note:
                self.notes.append(f"{m.shape.label}: timed eagerly, CUDA graph {m.graph_note}")
                break
        before = planner_efficiency(self.gpu, self.dtype, ran_mode)
        terms = [at_peak_terms(self.spec, self.gpu, self.indices, m.shape, dtype=self.dtype, mode=ran_mode,
                               routing=self.routing, full=self.full) for m in measured]  # fmt: skip
        fit_pts = [fit_point(t, m.timing.median_s, len(self.indices), m.shape.label) for t, m in zip(terms, measured)]
        upper = 100.0 if self.peaks_assumed else 1.0
        fit = fit_calibration(fit_pts, prior_memory=before.memory, prior_compute=before.compute,
                              prior_layer_s=before.layer_s if before.layer_s is not None else _engine_layer_s(ran_mode),
                              max_efficiency=upper)  # fmt: skip
        after = before.model_copy(update={"memory": fit.memory, "compute": fit.compute, "layer_s": fit.layer_s,
                                          "source": "this run's fit"})  # fmt: skip
        points = [self._point(m, t, before, after) for m, t in zip(measured, terms)]
        cal = Calibration(
            memory=fit.memory, compute=fit.compute, layer_s=fit.layer_s, memory_fitted=fit.memory_fitted,
            compute_fitted=fit.compute_fitted, memory_points=fit.memory_points, compute_points=fit.compute_points,
            mode=ran_mode, peaks_assumed=self.peaks_assumed,
            max_abs_error_before=max(abs(p.error) for p in points),
            max_abs_error_after=max(abs(p.calibrated_error or 0.0) for p in points), notes=fit.notes,
        )  # fmt: skip
        self.notes.append(f"predicted: {before.source}; calibrated: this run's fit, memory {fit.memory:.3g}, "
                          f"compute {fit.compute:.3g}, {fit.layer_s * 1e6:.1f} us per layer")  # fmt: skip
        if self.peaks_assumed:
            self.notes.append("this device's peaks are moeplan's assumption: a fitted efficiency above 1 corrects it")
        noisy = [m.shape.label for m in measured if m.timing.q3_s > NOISY_IQR * m.timing.median_s + m.timing.q1_s]
        if noisy:
            self.notes.append(f"noisy: {', '.join(noisy)} (interquartile range over {NOISY_IQR:.0%} of the median); "
                              "rerun on an idle machine or with more --repeats before trusting a calibration")
        if any(m.peak_approximate for m in measured):
            self.notes.append(f"measured peak_bytes on {self.device} is approximate (resident tensors + RSS rise)")
        return self._assemble(points, found, ran_mode, copy_gb_per_s, measured_params, checks, ep_times, cal, before)

    def _point(self, m: Any, terms: list[tuple[float, float]], before: Any, after: Any) -> Point:
        kw = dict(dtype=self.dtype, mode=m.mode, routing=self.routing, full=self.full)
        pred = predict_point(self.spec, self.gpu, self.indices, m.shape, eff=before, **kw)
        cal = predict_point(self.spec, self.gpu, self.indices, m.shape, eff=after, **kw)
        t, gpu = m.timing, self.gpu
        gb_per_s = m.bytes / t.median_s / 1e9
        tflops = m.flops / t.median_s / 1e12
        peak_tflops = gpu.bf16_tflops / (4 if self.dtype == "fp32" else 1)
        peak = (predicted_peak_bytes(self.spec, self.layer_specs, m.shape.tokens, self.dtype, full=self.full)
                if m.shape.kind == "prefill" else None)  # fmt: skip
        return Point(
            kind=m.shape.kind, batch=m.shape.batch, tokens=m.shape.tokens, context=m.shape.context, mode=m.mode,
            measured_s=t.median_s, min_s=t.min_s, max_s=t.max_s, q1_s=t.q1_s, q3_s=t.q3_s, repeats=t.repeats,
            predicted_s=pred.seconds, error=t.median_s / pred.seconds - 1, calibrated_s=cal.seconds,
            calibrated_error=t.median_s / cal.seconds - 1, bound=cal.bound, at_peak=terms, bytes=m.bytes,
            flops=m.flops, gb_per_s=gb_per_s, fraction_of_copy=None,
            fraction_of_peak_bandwidth=gb_per_s / gpu.hbm_gb_per_s,
            tflops=tflops, fraction_of_peak_flops=tflops / peak_tflops, distinct_experts=m.distinct_experts,
            predicted_distinct_experts=pred.distinct_experts, peak_bytes=m.peak_bytes, predicted_peak_bytes=peak,
        )  # fmt: skip

    def _assemble(self, points: list[Point], found: Any, mode: str, copy_gb_per_s: float, measured_params: int | None,
                  checks: list[RoutingCheck], ep_times: EpTimes | None, cal: Calibration,
                  before: Any) -> BenchResult:  # fmt: skip
        points = [p.model_copy(update={"fraction_of_copy": p.gb_per_s / copy_gb_per_s if copy_gb_per_s else None})
                  for p in points]  # fmt: skip
        dec = next(p for p in points if p.kind == "decode")
        pre = next(p for p in points if p.kind == "prefill")
        weights = predicted_param_bytes(self.spec, self.layer_specs, self.dtype, full=self.full)
        predicted = Numbers(param_bytes=weights, peak_bytes=pre.predicted_peak_bytes, decode_s=dec.predicted_s,
                            prefill_s=pre.predicted_s)  # fmt: skip
        measured = Numbers(param_bytes=measured_params, peak_bytes=pre.peak_bytes, decode_s=dec.measured_s,
                           prefill_s=pre.measured_s)  # fmt: skip
        achieved = Achieved(
            decode_bytes=dec.bytes, decode_gb_per_s=dec.gb_per_s,
            decode_fraction_of_peak=dec.fraction_of_peak_bandwidth,
            decode_fraction_of_copy=dec.fraction_of_copy, prefill_flops=pre.flops, prefill_tflops=pre.tflops,
            prefill_fraction_of_peak=pre.fraction_of_peak_flops, peak_gb_per_s=self.gpu.hbm_gb_per_s,
            peak_tflops=self.gpu.bf16_tflops / (4 if self.dtype == "fp32" else 1), copy_gb_per_s=copy_gb_per_s,
            distinct_experts=dec.distinct_experts,
        )  # fmt: skip
        return BenchResult(
            **self._common(before), path=found.path, kernels=list(found.kernels), path_detail=found.how, mode=mode,
            copy_gb_per_s=copy_gb_per_s, points=points, calibration=cal, routing_check=checks, batch=dec.batch,
            prompt=pre.tokens, predicted=predicted, measured=measured, errors=relative_errors(predicted, measured),
            spread={"decode_s": Spread(min_s=dec.min_s, max_s=dec.max_s, repeats=dec.repeats),
                    "prefill_s": Spread(min_s=pre.min_s, max_s=pre.max_s, repeats=pre.repeats)},
            achieved=achieved, efficiency={"memory": cal.memory, "compute": cal.compute, "layer_s": cal.layer_s},
            fits=True, ep=ep_times, notes=self.notes,
        )  # fmt: skip

    def _common(self, before: Any) -> dict[str, Any]:
        return dict(
            model=self.spec.name, device=self.device, device_name=self.device_name, gpu=self.gpu.name, dtype=self.dtype,
            layers=self.indices, full=self.full, context=self.context, repeats=self.repeats, warmup=self.warmup,
            routing=self.routing.label, predicted_with=before.source, peak_gb_per_s=self.gpu.hbm_gb_per_s,
            peaks_assumed=self.peaks_assumed,
            peak_tflops=self.gpu.bf16_tflops / (4 if self.dtype == "fp32" else 1),
        )  # fmt: skip

    def _no_fit(self, oom: str, *, measured_params: int | None) -> BenchResult:
        from moeplan.bench.harness import EAGER

        before = planner_efficiency(self.gpu, self.dtype, EAGER)
        dec = next(s for s in self.shapes if s.kind == "decode")
        pre = next(s for s in self.shapes if s.kind == "prefill")
        kw = dict(dtype=self.dtype, eff=before, mode=EAGER, routing=self.routing, full=self.full)
        predicted = Numbers(
            param_bytes=predicted_param_bytes(self.spec, self.layer_specs, self.dtype, full=self.full),
            peak_bytes=predicted_peak_bytes(self.spec, self.layer_specs, pre.tokens, self.dtype, full=self.full),
            decode_s=predict_point(self.spec, self.gpu, self.indices, dec, **kw).seconds,
            prefill_s=predict_point(self.spec, self.gpu, self.indices, pre, **kw).seconds,
        )  # fmt: skip
        measured = Numbers(param_bytes=measured_params)
        return BenchResult(
            **self._common(before), path="none", kernels=[], path_detail="not run", mode="none", copy_gb_per_s=None,
            points=[], calibration=None, routing_check=[], batch=dec.batch, prompt=pre.tokens, predicted=predicted,
            measured=measured, errors=relative_errors(predicted, measured), spread={}, achieved=None, efficiency=None,
            fits=False, oom=oom, notes=self.notes,
        )  # fmt: skip


def _sweep_mode(measured: list[Any], mode: str) -> str:
    """The mode the sweep ran in: the requested one, unless a point fell back to eager."""
    return "eager" if any(m.mode == "eager" for m in measured) else mode


def _engine_layer_s(mode: str) -> float:
    from moeplan.bench.predict import engine_for
    from moeplan.engines import overhead

    return overhead(*engine_for(mode)).layer_s


def relative_errors(predicted: Numbers, measured: Numbers) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in KEYS:
        p, m = getattr(predicted, key), getattr(measured, key)
        out[key] = None if p is None or m is None or p == 0 else (m - p) / p
    return out


def is_oom(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, MPS's and CPU allocators' RuntimeErrors, Python's MemoryError."""
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom_type is not None and isinstance(exc, oom_type)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _needed_bytes(spec: ModelSpec, n_layers: int, *, dtype: str, start_layer: int | None, full: bool,
                  shapes: Sequence[StepShape]) -> int:  # fmt: skip
    """Weights and the largest cache of the sweep, counted on the meta device (allocates nothing)."""
    import torch

    from moeplan.bench.layers import build_layers, param_bytes

    meta = build_layers(spec, n_layers, dtype, torch.device("meta"), start_layer=start_layer, full=full)
    caches = [sum(c.nbytes for c in meta.new_caches(s.batch, (s.context + 1) if s.kind == "decode" else s.tokens))
              for s in shapes]  # fmt: skip
    return param_bytes(meta) + max(caches, default=0)


def with_comm_model(times: EpTimes, spec: ModelSpec, gpu: Gpu, *, dtype: str, batch: int,
                    notes: list[str]) -> EpTimes:  # fmt: skip
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


_with_comm_model = with_comm_model  # the name earlier tests use


def save_result_calibration(result: BenchResult) -> Path | None:
    """Store a result's fitted calibration under its GPU and dtype (`bench --save-calibration`), for
    perf, fit, check and bench to read back; None if the run measured none (it did not fit)."""
    from moeplan.calibration import save_calibration

    cal = result.calibration
    if cal is None:
        return None
    measured = [name for name, ok in (("memory", cal.memory_fitted), ("compute", cal.compute_fitted)) if ok]
    kept = [name for name, ok in (("memory", cal.memory_fitted), ("compute", cal.compute_fitted)) if not ok]
    sweep = ",".join(f"b{p.batch}" if p.kind == "decode" else f"p{p.tokens}" for p in result.points)
    source = (f"moeplan bench {result.model} on {result.device_name}, layers {result.layers}, {cal.mode}, "
              f"sweep {sweep}; fitted {', '.join(measured + ['layer_s']) or 'layer_s'}"
              + (f"; kept {', '.join(kept)}" if kept else ""))  # fmt: skip
    return save_calibration(result.gpu, result.dtype, cal.memory, cal.compute, source, layer_s=cal.layer_s,
                            peaks_assumed=cal.peaks_assumed, mode=cal.mode)  # fmt: skip
