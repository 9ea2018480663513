"""Timing and memory measurements for `moeplan bench`, and the bytes and FLOPs the work really moved.

Honest benchmarking (STYLE.md habit 7): warm up, synchronize around every timer, report the median
and the spread, name the kernel path that ran, and count achieved bandwidth from the weights a batch
actually touches: distinct experts only (gpt-fast's MoE "bandwidth achieved" counts every expert,
which overstates it E/K-fold at batch 1), against the device's measured copy bandwidth and its peak.

Two ways to time a step on CUDA, both with CUDA events (no host clock, no host sync inside the timed
region; one synchronize after all repeats):
- "cuda-graph": the step is captured once (torch.cuda.graphs, after warm-up on a side stream, as the
  PyTorch CUDA-graph docs prescribe) and replayed; what is timed is the kernels, as vLLM and SGLang
  run decode;
- "eager": the step's Python runs each time, launch overheads included, as an engine without graphs
  (vLLM --enforce-eager, SGLang --disable-cuda-graph, plain PyTorch) runs it.
Before each timed run on CUDA a 256 MiB buffer is zeroed, so weights come from HBM and not from L2
(triton.testing.do_bench does the same). CPU and MPS time eagerly with the host clock around a
synchronize, each sample as many back-to-back calls as fill 25 ms.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from moeplan.bench.layers import BenchModel, GQAttention, KVCache, MoEBlock, param_bytes
from moeplan.hardware import Gpu, find_gpu, generic_gpu, host_cpu, match_device_name

OnStep = Callable[[str, int, int], None]
GRAPH, EAGER = "cuda-graph", "eager"
L2_FLUSH_BYTES = 256 * 2**20  # triton.testing.do_bench's cache-clearing buffer
# Device-to-device copy used as the achievable-bandwidth reference (BabelStream's Copy kernel,
# counted as read + write as nvbandwidth and BabelStream do).
COPY_BYTES_CUDA = 2**30
COPY_BYTES_CPU = 256 * 2**20
HOST_SAMPLE_S = 0.025  # a host-clock sample lasts at least this long (several scheduler slices)
MAX_CALLS_PER_SAMPLE = 64


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float
    q1_s: float  # first and third quartiles (inclusive method): the interquartile range
    q3_s: float
    repeats: int


def summarize(samples: list[float]) -> Timing:
    """Median, min/max and quartiles of the timed samples."""
    if not samples:
        raise ValueError("no timed samples")
    med = statistics.median(samples)
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else (med, med, med)
    return Timing(median_s=med, min_s=min(samples), max_s=max(samples), q1_s=q1, q3_s=q3, repeats=len(samples))


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_fn(fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int,
            on_tick: Callable[[], None] | None = None) -> Timing:  # fmt: skip
    """Eager timing: median and spread over `repeats` samples after `warmup` untimed calls. CUDA:
    events around each call, the queue drained before each (a step starts from an idle GPU, as a step
    of an eager engine does after its sampling sync) and L2 flushed. Elsewhere the host clock, each
    sample as many back-to-back calls as fill HOST_SAMPLE_S (timeit's `number`), so a host that
    preempts the bench now and then slows every sample alike instead of a few by a whole slice."""
    if device.type == "cuda":
        return _time_cuda(fn, device=device, warmup=warmup, repeats=repeats, on_tick=on_tick, drain=True)
    calls, samples = 1, []
    for i in range(warmup + repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls if i >= warmup else 1):
            fn()
        synchronize(device)
        seconds = time.perf_counter() - t0
        if i >= warmup:
            samples.append(seconds / calls)
        else:
            calls = max(calls, min(MAX_CALLS_PER_SAMPLE, math.ceil(HOST_SAMPLE_S / max(seconds, 1e-9))))
        if on_tick is not None:
            on_tick()
    return summarize(samples)


def _time_cuda(fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int,
               on_tick: Callable[[], None] | None, drain: bool) -> Timing:  # fmt: skip
    """CUDA events around each call; one synchronize at the end reads them all. drain: synchronize
    before each call (outside the timed region) so queued work does not hide launch gaps."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for _ in range(warmup):
        fn()
        if on_tick is not None:
            on_tick()
    for start, end in events:
        flush.zero_()
        if drain:
            torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        if on_tick is not None:
            on_tick()
    torch.cuda.synchronize(device)
    del flush
    return summarize([start.elapsed_time(end) / 1e3 for start, end in events])


class GraphUnavailable(Exception):
    """The step cannot be captured into a CUDA graph here; the message says why."""


def capture_graph(fn: Callable[[], object], device: torch.device, *, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Capture `fn` once into a CUDA graph. Inputs and outputs live in the tensors `fn` closes over
    (static addresses), so a replay recomputes the same step. Raises GraphUnavailable off CUDA or
    when the step synchronizes with the host (capture forbids it)."""
    if device.type != "cuda":
        raise GraphUnavailable(f"CUDA graphs need a CUDA device, not {device.type}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream (torch.cuda.graphs docs, "whole network capture")
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as exc:
        torch.cuda.synchronize(device)
        raise GraphUnavailable(f"capture failed: {str(exc).splitlines()[0][:160]}") from None
    return graph


def time_graph(graph: torch.cuda.CUDAGraph, *, device: torch.device, warmup: int, repeats: int,
               on_tick: Callable[[], None] | None = None) -> Timing:  # fmt: skip
    """Replays of a captured step between CUDA events, no host sync until all are queued."""
    return _time_cuda(graph.replay, device=device, warmup=warmup, repeats=repeats, on_tick=on_tick, drain=False)


def time_step(fn: Callable[[], object], *, device: torch.device, mode: str, warmup: int, repeats: int,
              on_tick: Callable[[], None] | None = None) -> tuple[Timing, str, str | None]:  # fmt: skip
    """Time one step in `mode` (GRAPH or EAGER). Returns (timing, mode that ran, why not the graph)."""
    if mode == GRAPH:
        try:
            graph = capture_graph(fn, device)
        except GraphUnavailable as exc:
            return time_fn(fn, device=device, warmup=warmup, repeats=repeats, on_tick=on_tick), EAGER, str(exc)
        try:
            return time_graph(graph, device=device, warmup=warmup, repeats=repeats, on_tick=on_tick), GRAPH, None
        finally:
            del graph
    return time_fn(fn, device=device, warmup=warmup, repeats=repeats, on_tick=on_tick), EAGER, None


def copy_bandwidth_gb_per_s(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """The device's own achievable bandwidth: a large device-to-device copy, read + write bytes over
    its median time (GB = 1e9 bytes). Allocated and freed here, before the model is built."""
    if nbytes is None:
        nbytes = COPY_BYTES_CUDA if device.type == "cuda" else COPY_BYTES_CPU
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(nbytes, free // 4)
    n = max(nbytes // 4, 1)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(functools.partial(dst.copy_, src), device=device, warmup=2, repeats=repeats)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n * 4 / t.median_s / 1e9


# ----------------------------------------------------------------------------------------------
# The kernel path that ran
# ----------------------------------------------------------------------------------------------

# ATen ops torch._grouped_mm's fallback runs per expert (GroupedMMUtils.h _grouped_mm_fallback: a loop
# of mm_out/bmm_out over offs read to the host); the fused kernel (CUTLASS bf16 on SM90/SM100, CK on
# ROCm) runs none of them.
_FALLBACK_CHILDREN = frozenset({"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::item",
                                "aten::_local_scalar_dense"})  # fmt: skip


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence fd 2 (kineto logs "profiler_start" lines from C++), restoring it afterwards."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w", encoding="ascii") as null:
            sys.stderr.flush()
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _descendants(event: object) -> Iterator[object]:
    for child in getattr(event, "cpu_children", []):
        yield child
        yield from _descendants(child)


@dataclass(frozen=True)
class KernelPath:
    path: str  # "grouped_mm" | "grouped_mm/fallback" | "loop" | "none"
    kernels: tuple[str, ...]  # device kernels the grouped GEMMs launched (CUDA), else ()
    how: str  # how it was found


def detect_kernel_path(fn: Callable[[], object], model: BenchModel, device: torch.device) -> KernelPath:
    """Profile one call of `fn` (torch.profiler) and read which MoE path really ran: torch._grouped_mm
    as one fused kernel, torch._grouped_mm falling back to a per-expert mm loop inside ATen (CPU
    always; CUDA for fp16/fp32, and bf16 before Hopper), or bench's own Python loop."""
    blocks = model.moe_blocks()
    if not blocks:
        return KernelPath("none", (), "no MoE layer built")
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with _quiet_stderr(), profile(activities=activities) as prof:
            fn()
            synchronize(device)
        events = list(prof.events())
    except (RuntimeError, AssertionError) as exc:  # no profiler here: say what the Python side chose
        return KernelPath(blocks[0].last_path or "none", (), f"profiler unavailable ({str(exc)[:80]}); as chosen")
    grouped = [e for e in events if getattr(e, "name", "") == "aten::_grouped_mm"]
    if not grouped:
        return KernelPath(blocks[0].last_path or "loop", (), "profiled: no aten::_grouped_mm ran")
    names = {getattr(c, "name", "") for e in grouped for c in _descendants(e)}
    kernels = sorted({k.name for e in grouped for op in (e, *_descendants(e)) for k in getattr(op, "kernels", [])})
    if names & _FALLBACK_CHILDREN:
        ran = ", ".join(sorted(names & _FALLBACK_CHILDREN))
        how = f"profiled: aten::_grouped_mm ran {ran} per expert"
        return KernelPath("grouped_mm/fallback", tuple(kernels[:4]), how)
    return KernelPath("grouped_mm", tuple(kernels[:4]), "profiled: aten::_grouped_mm ran as one fused kernel")


# ----------------------------------------------------------------------------------------------
# Peak memory of one call
# ----------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Linux resets the process's peak RSS (VmHWM) when "5" is written to clear_refs (proc(5))."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes_of(fn: Callable[[], object], *, device: torch.device, resident_bytes: int) -> tuple[int, bool]:
    """Peak memory while `fn` runs, resident tensors included. Returns (bytes, approximate).

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (exact for torch's tensors).
    CPU: `resident_bytes` (weights, caches, inputs already allocated) plus the rise of the peak RSS
    over the RSS before the call (Linux VmHWM, else getrusage ru_maxrss): approximate, since the
    allocator's caching and other threads move RSS too. MPS: allocated bytes after the call.
    """
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)), False
    if device.type == "mps":
        fn()
        synchronize(device)
        return int(torch.mps.current_allocated_memory()), True
    before = _proc_status_kib("VmRSS")
    if before is not None and _reset_rss_peak():
        fn()
        after = _proc_status_kib("VmHWM") or before
        return resident_bytes + max(0, after - before) * 1024, True
    # ru_maxrss: KiB on Linux, bytes on macOS; only a rise above the earlier peak shows.
    unit = 1 if sys.platform == "darwin" else 1024
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    rise = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
    return resident_bytes + max(0, rise) * unit, True


# ----------------------------------------------------------------------------------------------
# What the work moved: bytes of a decode step, FLOPs of a prefill
# ----------------------------------------------------------------------------------------------


def _expert_bytes(block: MoEBlock) -> int:
    """Bytes of one routed expert: its gate_up and down slices (and biases)."""
    e = block.experts
    per = (e.gate_up[0].numel() + e.down[0].numel()) * e.gate_up.element_size()
    for bias in (e.gate_up_bias, e.down_bias):
        if bias is not None:
            per += bias[0].numel() * bias.element_size()
    return per


def distinct_experts(model: BenchModel) -> list[int]:
    """Experts that received at least one token in each MoE layer's last call (or graph replay)."""
    return [int((b.last_counts > 0).sum()) if b.last_counts is not None else 0 for b in model.moe_blocks()]


def step_bytes(model: BenchModel, caches: list[KVCache], batch: int) -> int:
    """Bytes one step moves: every weight except the experts no token chose (and all of the embedding
    table but B rows), plus each layer's whole KV cache (read by a decode step; written by a
    prefill, whose cache holds only the prompt). Reads the counts of the last MoE call, so call it
    after the step."""
    total = param_bytes(model)
    for block, used in zip(model.moe_blocks(), distinct_experts(model)):
        total -= (block.experts.num_experts - used) * _expert_bytes(block)
    if model.embed_tokens is not None:
        emb = model.embed_tokens.weight
        total -= (emb.shape[0] - batch) * emb.shape[1] * emb.element_size()
    return total + sum(c.nbytes for c in caches)


def _matmul_params_per_token(model: BenchModel) -> int:
    """Weights one token multiplies in the decoder layers: all but the E - K experts it skips."""
    n = sum(p.numel() for layer in model.layers for p in layer.parameters())
    for block in model.moe_blocks():
        e = block.experts
        one = sum(t[0].numel() for t in (e.gate_up, e.down, e.gate_up_bias, e.down_bias) if t is not None)
        n -= (e.num_experts - block.router.k) * one
    return n


def _causal_pairs(tokens: int, window: int | None) -> int:
    """(query, key) pairs a causal prefill scores, each query seeing at most `window` keys."""
    if window is None or window >= tokens:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window


def step_flops(model: BenchModel, batch: int, tokens: int, context: int = 0) -> float:
    """FLOPs of a step of `batch` sequences adding `tokens` tokens each to `context` cached ones
    (a prefill: context 0; a decode step: tokens 1): 2 per weight per token (Kaplan et al. 2020,
    arXiv:2001.08361, table 1), the attention scores and values (QK^T and PV, 2 each per pair per
    dim; MLA decode in its absorbed form scores R + Dr wide and sums R wide), and the lm_head on
    each sequence's last token when the model is full."""
    flops = 2.0 * batch * tokens * _matmul_params_per_token(model)
    spec = model.model_spec
    for layer in model.decoders():
        attn = layer.self_attn
        if isinstance(attn, GQAttention):
            qk, v, window = spec.head_dim, spec.head_dim, attn.window
        elif tokens == 1:  # absorbed MLA decode attends the latent (its W_UK/W_UV products are weights above)
            qk, v, window = attn.r + attn.dr, attn.r, None
        else:  # MLA prefill attends per head with Dn + Dr keys and Dv values
            qk, v, window = attn.dn + attn.dr, attn.dv, None
        if context == 0:
            pairs = _causal_pairs(tokens, window)
        else:
            pairs = tokens * min(context + tokens, window or context + tokens)
        flops += 2.0 * batch * spec.num_attention_heads * pairs * (qk + v)
    if model.full:
        flops += 2.0 * batch * spec.hidden_size * spec.vocab_size
    return flops


# ----------------------------------------------------------------------------------------------
# The device and its peaks
# ----------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def host_gpu() -> Gpu:
    """The host CPU as a 'device' for predictions: moeplan.hardware.host_cpu, named "cpu" so a saved
    calibration is found by perf, fit and check (`--gpus cpu`)."""
    return host_cpu()


def device_info(device: torch.device) -> tuple[str, Gpu, list[str]]:
    """(driver's device name, catalog entry for its peaks, notes)."""
    notes: list[str] = []
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        gpu = match_device_name(name)
        if gpu is None:
            total = torch.cuda.get_device_properties(device).total_memory
            gpu = generic_gpu(total, name)
            notes.append(f"'{name}' is not in the GPU catalog: peaks are {gpu.source}")
        return name, gpu, notes
    if device.type == "mps":
        brand = platform.processor() or "Apple GPU"
        try:
            import subprocess

            brand = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                   timeout=5, check=False).stdout.strip() or brand  # fmt: skip
        except OSError:
            pass
        gpu = find_gpu(brand.replace("Apple ", "").replace(" ", "-"))
        if gpu is None:
            gpu = host_gpu()
            notes.append(f"'{brand}' is not in the GPU catalog: peaks are the host CPU assumption")
        return brand, gpu, notes
    name = cpu_name()
    notes.append("CPU peaks are moeplan's desktop assumption (hardware.HOST_RAM_GB_PER_S, HOST_TFLOPS)")
    return name, host_gpu(), notes


def tensors_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
