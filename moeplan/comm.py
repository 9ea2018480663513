"""Collectives as the libraries run them: latency + bytes / bandwidth, per link class and algorithm.

Each link class holds measured constants (sources per line). A collective's time is the fastest
algorithm the engine may use at that size:
- one-shot all-reduce (vLLM/SGLang custom all-reduce, every rank reads every peer's buffer):
  t = lat + (g - 1) n / B1; vLLM uses it at TP2 always, below 512 KiB at TP4, below 256 KiB at TP8
  (csrc/custom_all_reduce.cuh), on full NVLink only and for at most two PCIe GPUs;
- two-shot (reduce-scatter + all-gather inside the custom kernel, up to 8 MiB):
  t = lat + 2 (g - 1) / g n / B2;
- NCCL (ring / tree / NVLS): t = lat_nccl(g) + 2 (g - 1) / g n / busBW(g), nccl-tests' busBW;
- all-to-all: t = lat + (g - 1) / g n / busBW.
When an all-to-all spans nodes, the inter-node share moves over one NIC per GPU (NDR 400G:
46-48 GB/s measured, NVIDIA/nccl-tests#290; HDR 200G: ~24 GB/s, nccl-tests#160), the latency floor ~20-48 us (nccl-tests#150, NVIDIA/nccl#1244).

Latencies are CUDA-graph figures; an engine without graphs adds its launch cost per collective
(moeplan.engines).
"""

from __future__ import annotations


from moeplan.record import Record

US = 1e-6
GB = 1e9
KiB, MiB = 2**10, 2**20


class LinkClass(Record):
    """Measured collective constants for GPUs of one interconnect (per GPU, one direction)."""

    name: str
    # NCCL all-reduce latency floor by group size (us) and large-message busBW (GB/s).
    nccl_lat_us: dict[int, float]
    nccl_busbw: dict[int, float]
    # Custom all-reduce (graphs): floor (us) and the per-GPU read bandwidth of one-shot / two-shot.
    custom_lat_us: float | None = None
    oneshot_gb_per_s: float = 0.0
    twoshot_lat_us: float = 0.0
    twoshot_gb_per_s: float = 0.0
    custom_max_gpus: int = 8  # vLLM custom AR world sizes 2-8 on full NVLink; at most 2 PCIe GPUs
    # All-gather / all-to-all (NCCL alltoall_perf) floor and busBW, and an EP dispatch floor.
    a2a_lat_us: float = 10.0
    a2a_busbw: float = 0.0
    source: str = ""

    def _pick(self, table: dict[int, float], g: int) -> float:
        keys = sorted(table)
        for k in keys:
            if g <= k:
                return table[k]
        return table[keys[-1]]


# aiconfigurator's collected data ([aic] ai-dynamo/aiconfigurator @095f58a5, systems/data/<sys>/comm/:
# nccl-tests all_reduce_perf / alltoall_perf and each framework's all-reduce under CUDA graphs), read
# at 512 B - 64 KiB for the floors and at 512 MB for busBW; custom-AR bandwidths from the slope between
# 512 B and 64 KiB (one-shot) and at 1 MiB (two-shot).
LINKS: dict[str, LinkClass] = {
    "NVLink4": LinkClass(
        name="NVLink4", nccl_lat_us={2: 6.2, 4: 9.5, 8: 15.6}, nccl_busbw={2: 318, 4: 350, 8: 445},
        custom_lat_us=4.5, oneshot_gb_per_s=250, twoshot_lat_us=7.0, twoshot_gb_per_s=260,
        a2a_lat_us=7.4, a2a_busbw=315,
        source="[aic] H100 SXM: NCCL 2.29.2 AR 6.2/9.5/15.6 us, busBW 318/350/445 GB/s; vLLM 0.24 custom AR "
               "(graph) 4.2-4.7 us to 64 KiB, 15.0 us at 1 MiB TP8; NCCL alltoall 7.4 us, 315 GB/s",
    ),
    "NVLink3": LinkClass(
        name="NVLink3", nccl_lat_us={2: 10.0, 4: 14.5, 8: 22.6}, nccl_busbw={2: 193, 4: 217, 8: 222},
        custom_lat_us=5.3, oneshot_gb_per_s=175, twoshot_lat_us=8.0, twoshot_gb_per_s=134,
        a2a_lat_us=15.8, a2a_busbw=203,
        source="[aic] A100 SXM: NCCL 2.27.3 AR 10.0/14.5/22.6 us, busBW 193/217/222; vLLM 0.14 custom AR "
               "4.9-5.7 us, 21.7 us at 1 MiB TP8; alltoall 15.8 us, 203 GB/s",
    ),
    "NVLink5": LinkClass(
        name="NVLink5", nccl_lat_us={2: 10.3, 4: 15.1, 8: 25.1}, nccl_busbw={2: 534, 4: 634, 8: 704},
        custom_lat_us=7.3, oneshot_gb_per_s=500, twoshot_lat_us=9.0, twoshot_gb_per_s=450,
        a2a_lat_us=10.0, a2a_busbw=600,
        source="[aic] B200: NCCL 2.29.2 AR 10.3/15.1/25.1 us, busBW 534/634/704; vLLM 0.24 graph AR TP8 7.3 us, "
               "8.6 us at 64 KiB, 17.2 us at 1 MiB; alltoall assumed at NVLink4's floor with NVLink5's rate",
    ),
    "PCIe5": LinkClass(
        name="PCIe5", nccl_lat_us={2: 6.3, 4: 13.0, 8: 24.6}, nccl_busbw={2: 39, 4: 26, 8: 25},
        custom_lat_us=4.1, oneshot_gb_per_s=40, twoshot_lat_us=6.0, twoshot_gb_per_s=39, custom_max_gpus=2,
        a2a_lat_us=9.5, a2a_busbw=18,
        source="[aic] RTX PRO 6000 (PCIe Gen5): NCCL 2.29.2 AR 6.3/13.0/24.6 us, busBW 39/26/25; vLLM custom AR "
               "TP2 only (4.1 us, 30.1 us at 1 MiB); alltoall 9.5 us, 18 GB/s at 8 GPUs",
    ),
    "PCIe4": LinkClass(
        name="PCIe4", nccl_lat_us={2: 7.7, 4: 11.9, 8: 22.6}, nccl_busbw={2: 20, 4: 20, 8: 20},
        custom_lat_us=5.2, oneshot_gb_per_s=19, twoshot_lat_us=7.0, twoshot_gb_per_s=19, custom_max_gpus=2,
        a2a_lat_us=7.1, a2a_busbw=20,
        source="[aic] L40S (PCIe Gen4) TP2: NCCL AR 7.7 us, busBW 20 GB/s; vLLM custom AR 5.2 us, 60 us at 1 MiB; "
               "4/8-GPU busBW held at the 2-GPU figure (aic's 4/8-GPU L40S rows look topology-degraded)",
    ),
    "PCIe3": LinkClass(
        name="PCIe3", nccl_lat_us={2: 8.5, 4: 13.0, 8: 24.0}, nccl_busbw={2: 10, 4: 10, 8: 10},
        custom_lat_us=6.0, oneshot_gb_per_s=9.5, twoshot_lat_us=8.0, twoshot_gb_per_s=9.5, custom_max_gpus=2,
        a2a_lat_us=8.0, a2a_busbw=10,
        source="assumed (no measured Gen3 figures found): PCIe4's floors, busBW halved with the link (PCIe 3.0 x16 "
               "is 15.75 GB/s per direction, 4.0 x16 31.5; PCI-SIG)",
    ),
    "InfinityFabric": LinkClass(
        name="InfinityFabric", nccl_lat_us={2: 10.0, 4: 14.0, 8: 20.0}, nccl_busbw={2: 300, 4: 300, 8: 300},
        custom_lat_us=6.0, oneshot_gb_per_s=200, twoshot_lat_us=9.0, twoshot_gb_per_s=200,
        a2a_lat_us=12.0, a2a_busbw=250,
        source="assumed (no measured MI300X figures found): NVLink3-like floors, ~2/3 of 448 GB/s IF links",
    ),
}
NIC = {"lat_us": 25.0, "gb_per_s": 46.0,
       "source": "NDR 400G: 46-48 GB/s per NIC (NVIDIA/nccl-tests#290); small all-reduce across 2 nodes 19-48 us "
                 "(nccl-tests#150, NVIDIA/nccl#1244); DeepEP low-latency EP16-64 dispatch at 128 tokens fits "
                 "25 us + the remote share at 46 GB/s"}


def link_for(name: str) -> LinkClass | None:
    return LINKS.get(name)


def allreduce_s(nbytes: float, g: int, link: LinkClass, *, custom: bool = True) -> float:
    """One all-reduce of `nbytes` per rank over `g` GPUs of one node: the fastest algorithm allowed."""
    if g <= 1:
        return 0.0
    frac = 2 * (g - 1) / g
    best = link._pick(link.nccl_lat_us, g) * US + frac * nbytes / (link._pick(link.nccl_busbw, g) * GB)
    if custom and link.custom_lat_us is not None and g <= link.custom_max_gpus and nbytes <= 8 * MiB:
        one_shot_limit = 2**62 if g == 2 else (512 * KiB if g <= 4 else 256 * KiB)
        if nbytes < one_shot_limit:
            best = min(best, link.custom_lat_us * US + (g - 1) * nbytes / (link.oneshot_gb_per_s * GB))
        best = min(best, link.twoshot_lat_us * US + frac * nbytes / (link.twoshot_gb_per_s * GB))
    return best


def alltoall_s(nbytes: float, ranks: int, per_node: int, link: LinkClass | None) -> float:
    """An all-to-all where one rank sends (or receives) `nbytes`, spread evenly over `ranks` ranks that
    may span nodes of `per_node` GPUs: the same-node share over the link and the rest over the NIC at
    once (NCCL P2P transports and DeepEP move both concurrently), so the slower share sets the time."""
    if ranks <= 1:
        return 0.0
    local = min(per_node, ranks)
    intra_bw = (link.a2a_busbw if link else NIC["gb_per_s"]) * GB
    intra = (local - 1) / ranks * nbytes / intra_bw
    lat = (link.a2a_lat_us if link else NIC["lat_us"]) * US
    if ranks <= per_node:
        return lat + intra
    inter = (ranks - local) / ranks * nbytes / (NIC["gb_per_s"] * GB)
    return max(intra, inter) + NIC["lat_us"] * US
