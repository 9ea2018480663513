"""Experts offloaded to host RAM (or disk) with a GPU expert cache: hit rate, mean and p99 time per token.

The GPU keeps `slots` experts of each offloaded layer; a token's k experts per layer either hit
that cache or miss. A miss costs one expert's bytes over PCIe (an engine that streams experts into
the cache, as mixtral-offloading does) or, with no cache at all, the CPU running the expert from RAM
(llama.cpp --n-cpu-moe). Experts that do not fit RAM are read from disk (llama.cpp mmap), RAM then
caching them in turn.

Hit rate of an LRU cache of S slots: Che's approximation for independent requests (H. Che, Y.
Tung, Z. Wang, IEEE JSAC 2002): with pick shares r_e, the characteristic time T solves
sum_e (1 - exp(-r_e T)) = S and the hit rate is sum_e r_e (1 - exp(-r_e T)). Routing locality across
consecutive tokens adds to it: `locality` is the measured probability that an expert a token uses in
a layer is used again by the next token; its excess over what popularity alone gives (q_e) is
served by the previous token's experts, which an LRU cache of S >= k slots still holds.

Misses per token are a sum of independent Bernoullis (offloaded layers x k picks, each missing with
1 - hit), so the p99 token waits for mean + 2.326 sd misses (normal approximation; when that is less
than one miss above the mean, the mean rounded up to a whole miss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


from moeplan.record import Record
from moeplan.errors import MoeplanError
from moeplan.routing import pick_probs

# Host memory bandwidth, GB/s sustained (a CPU running offloaded experts streams them at about this):
# - ddr4: dual-channel DDR4-3200, 51.2 GB/s rated (JEDEC 25.6 per channel), ~40 sustained (~78%);
# - ddr5: dual-channel DDR5-6000, 96 GB/s rated, 60-65 measured on a Ryzen 7800X3D (AIDA64 read);
# - ddr5-server: 12-channel DDR5-4800 (EPYC Genoa), 460.8 rated, ~340 assumed (no clean STREAM found).
RAM_GB_PER_S = {"ddr4": 40.0, "ddr5": 62.0, "ddr5-server": 340.0}
DEFAULT_RAM = "ddr5"
# llama.cpp reads mmap'd weights through the page cache: ~1-2 GB/s effective from NVMe whatever the
# drive's rated 7 (Gen4) to 12-15 GB/s (Gen5) sequential (llama.cpp discussions; RAID0 did not help).
DISK_GB_PER_S = 1.5
# P(an expert a token uses in a layer is used again by the next token), Mixtral-8x7B: 0.34, from the
# LRU hit rate with 2 cached experts per layer under top-2 routing (that cache holds exactly the
# previous token's experts), 0.337-0.351 in mixtral-offloading benchmark logs (h39s/mlsys fork of
# dvmazur/mixtral-offloading, ~2,800 tokens per run); uniform routing would give 0.25. The same logs
# give 0.17 / 0.34 / 0.46 / 0.59 for 1-4 cached experts, which hit_rate reproduces (tests).
DEFAULT_LOCALITY = 0.34
DEFAULT_LOCALITY_SOURCE = "Mixtral-8x7B, mixtral-offloading LRU logs (k = 2 cached experts)"
P99_Z = 2.326


class OffloadSpeed(Record):
    cache_slots: int  # experts per offloaded layer kept on the GPU
    hit_rate: float
    locality: float
    tier: str  # "ram" or "disk": where misses are served from
    miss_s: float  # one missing expert, per token
    misses_per_token: float
    p99_misses_per_token: float
    base_tpot_s: float  # the token's time with every expert resident
    mean_tpot_s: float
    p99_tpot_s: float
    host_gb_per_s: float
    disk_gb_per_s: float


def ram_bandwidth(text: str | None) -> float:
    """--cpu-bw: a catalog name (ddr4, ddr5, ddr5-server) or GB/s."""
    if text is None:
        return RAM_GB_PER_S[DEFAULT_RAM]
    key = text.strip().lower()
    if key in RAM_GB_PER_S:
        return RAM_GB_PER_S[key]
    try:
        value = float(key.removesuffix("gb/s").removesuffix("gbps"))
    except ValueError:
        raise MoeplanError(f"--cpu-bw {text!r}: give GB/s or one of {', '.join(RAM_GB_PER_S)}") from None
    if not math.isfinite(value) or not 1 <= value <= 10_000:
        raise MoeplanError(f"--cpu-bw must be between 1 and 10,000 GB/s, got {text}")
    return value


def disk_bandwidth(value: float | None) -> float:
    if value is None:
        return DISK_GB_PER_S
    if not math.isfinite(value) or not 0.05 <= value <= 1000:
        raise MoeplanError(f"--disk-bw must be between 0.05 and 1,000 GB/s, got {value}")
    return value


def che_hit_rate(shares: Sequence[float], slots: float) -> float:
    """LRU hit rate under independent requests with these shares (Che's approximation)."""
    total = sum(shares)
    r = [s / total for s in shares if s > 0]
    if slots <= 0:
        return 0.0
    if slots >= len(r):
        return 1.0
    lo, hi = 0.0, 1.0
    while sum(1 - math.exp(-x * hi) for x in r) < slots:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(1 - math.exp(-x * mid) for x in r) < slots:
            lo = mid
        else:
            hi = mid
    return sum(x * (1 - math.exp(-x * hi)) for x in r)


def independent_reuse(num_experts: int, top_k: int, probs: Sequence[float] | None = None) -> float:
    """P(an expert a token uses is used by the next token) if tokens routed independently with these
    shares: sum_e share_e x q_e (k / E under uniform routing). Measured locality is at least this."""
    q = pick_probs(probs, num_experts, top_k)
    return sum(x * x for x in q) / top_k


def hit_rate(num_experts: int, top_k: int, slots: int, locality: float,
             probs: Sequence[float] | None = None) -> float:
    """A pick's chance to find its expert in an LRU cache of `slots` experts of its layer."""
    if not 0 <= locality <= 1:
        raise MoeplanError(f"--locality must be between 0 and 1, got {locality}")
    if slots <= 0:
        return 0.0
    if slots >= num_experts:
        return 1.0  # every expert of the layer is on the GPU
    q = pick_probs(probs, num_experts, top_k)
    base = independent_reuse(num_experts, top_k, probs)
    che = che_hit_rate(q, slots)
    if locality < base:
        # Consecutive tokens avoid each other's experts more than popularity predicts: fewer hits. With
        # S = k slots (the previous token's experts) the cache hits che x locality / base, `locality`
        # exactly under uniform routing; the penalty fades as the cache grows beyond them (a cache of
        # every expert hits whatever the routing).
        r = locality / base
        return che * (r + (1 - r) * max(0, slots - top_k) / max(num_experts - top_k, 1))
    excess = (locality - base) / (1 - base) if base < 1 else 0.0
    held = min(1.0, slots / top_k)  # the previous token's experts the cache still holds
    return min(1.0, excess * held + (1 - excess * held) * che)


def offload_speed(
    *, base_tpot_s: float, offloaded_layers: int, num_experts: int, top_k: int, expert_bytes: float,
    slots: int, locality: float, pcie_gb_per_s: float, host_gb_per_s: float, disk_gb_per_s: float,
    ram_share: float = 1.0, probs: Sequence[float] | None = None, cpu_efficiency: float = 1.0,
) -> OffloadSpeed:
    """Mean and p99 time per token (batch 1) of a plan whose `offloaded_layers` keep their experts in
    host memory. `ram_share`: the share of offloaded expert bytes RAM holds (the rest on disk);
    `cpu_efficiency`: the share of host_gb_per_s the CPU's expert kernels reach (no cache only)."""
    h = hit_rate(num_experts, top_k, slots, locality, probs)
    if slots > 0:  # streamed into the GPU cache over PCIe
        ram_miss = expert_bytes / (min(pcie_gb_per_s, host_gb_per_s) * 1e9)
    else:  # run on the CPU from RAM (llama.cpp --n-cpu-moe)
        ram_miss = expert_bytes / (host_gb_per_s * cpu_efficiency * 1e9)
    disk_miss = expert_bytes / (disk_gb_per_s * 1e9)
    # RAM holds ram_share of the bytes: its own LRU hit rate over the offloaded experts.
    in_ram = 1.0 if ram_share >= 1 else che_hit_rate(pick_probs(probs, num_experts, top_k),
                                                      ram_share * num_experts)
    miss_s = in_ram * ram_miss + (1 - in_ram) * disk_miss
    picks = offloaded_layers * top_k
    mean_misses = picks * (1 - h)
    sd = math.sqrt(picks * h * (1 - h))
    p99_misses = min(picks, mean_misses + P99_Z * sd) if mean_misses else 0.0
    if 0 < mean_misses and p99_misses < mean_misses + 1 and picks > mean_misses:
        p99_misses = min(picks, math.ceil(mean_misses + 1e-9))
    # Each pick costs 0 (hit), ram_miss or disk_miss; the token is the sum of `picks` such draws, so its
    # p99 is mean + z sd of that sum (normal approximation), at least the whole-miss count above, at
    # most every pick missing to the slowest tier.
    e1 = (1 - h) * miss_s
    e2 = (1 - h) * (in_ram * ram_miss**2 + (1 - in_ram) * disk_miss**2)
    extra_sd = math.sqrt(max(0.0, picks * (e2 - e1 * e1)))
    worst = picks * (disk_miss if in_ram < 1 else ram_miss) if h < 1 else 0.0
    p99_extra = min(worst, picks * e1 + P99_Z * extra_sd)
    if extra_sd > 0:
        p99_extra = min(worst, max(p99_extra, (p99_misses - mean_misses) * ram_miss + picks * e1))
    return OffloadSpeed(
        cache_slots=slots, hit_rate=h, locality=locality, tier="ram" if ram_share >= 1 else "disk", miss_s=miss_s,
        misses_per_token=mean_misses, p99_misses_per_token=p99_misses, base_tpot_s=base_tpot_s,
        mean_tpot_s=base_tpot_s + picks * e1, p99_tpot_s=base_tpot_s + p99_extra,
        host_gb_per_s=host_gb_per_s, disk_gb_per_s=disk_gb_per_s,
    )  # fmt: skip
