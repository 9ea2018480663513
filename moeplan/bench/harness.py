"""Timing and memory measurements for `moeplan bench`, and the bytes and FLOPs the work really moved.

Honest benchmarking (STYLE.md habit 7): warm up, synchronize around every timer, report the median
and the spread, and count achieved bandwidth from the weights a batch actually touches: distinct
experts only (gpt-fast's MoE "bandwidth achieved" counts every expert, which overstates it E/K-fold
at batch 1).
"""

from __future__ import annotations

import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from moeplan.bench.layers import BenchModel, GQAttention, KVCache, MoEBlock, param_bytes
from moeplan.hardware import Gpu, find_gpu, generic_gpu, host_cpu, match_device_name

OnStep = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_fn(fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int,
            on_tick: Callable[[], None] | None = None) -> Timing:  # fmt: skip
    """Median and min/max over `repeats` calls after `warmup` untimed ones."""
    samples: list[float] = []
    for i in range(warmup + repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
        if on_tick is not None:
            on_tick()
    return Timing(median_s=statistics.median(samples), min_s=min(samples), max_s=max(samples), repeats=repeats)


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
    """Experts that received at least one token in each MoE layer's last call."""
    return [int((b.last_counts > 0).sum()) if b.last_counts is not None else 0 for b in model.moe_blocks()]


def decode_bytes(model: BenchModel, caches: list[KVCache], batch: int) -> int:
    """Bytes one decode step reads: every weight except the experts no token chose (and all of the
    embedding table but B rows), plus the whole KV cache of each layer (the ring holds only what
    is attended). Reads after the last MoE call, so call it after a decode step."""
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


def prefill_flops(model: BenchModel, batch: int, prompt: int) -> float:
    """FLOPs of a prefill of `batch` sequences of `prompt` tokens: 2 per weight per token (Kaplan
    et al. 2020, arXiv:2001.08361, table 1), the attention scores and values (QK^T and PV, 2 each
    per pair per dim), and the lm_head on each sequence's last token when the model is full."""
    tokens = batch * prompt
    flops = 2.0 * tokens * _matmul_params_per_token(model)
    spec = model.model_spec
    for layer in model.decoders():
        attn = layer.self_attn
        if isinstance(attn, GQAttention):
            qk, v, window = spec.head_dim, spec.head_dim, attn.window
        else:  # MLA prefill attends per head with Dn + Dr keys and Dv values
            qk, v, window = attn.dn + attn.dr, attn.dv, None
        flops += 2.0 * batch * spec.num_attention_heads * _causal_pairs(prompt, window) * (qk + v)
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
