"""GPU catalog (data with sources) and the `--gpus` grammar.

Grammar (case and spaces forgiven):
    GPUS   := GROUP ("," GROUP)*
    GROUP  := [COUNT "x"] (NAME | SIZE)
    SIZE   := NUMBER ("GB" | "GiB")          generic card of that memory
    NAME   := a catalog name or alias: H100, H100-SXM, A100-80GB, RTX4090, MI300X, M2-Ultra-192GB ...
Nodes: `--nodes N` repeats the list on N nodes; or write `2x(8xH100)`.
"""

from __future__ import annotations

import re
from functools import lru_cache


from moeplan.record import Record
from moeplan.errors import GpuSpecError

GiB = 2**30
GB = 10**9


class Gpu(Record):

    name: str
    aliases: tuple[str, ...] = ()
    memory_bytes: int  # as marketed (GB = 1e9, or GiB where the vendor means GiB)
    usable_bytes: int  # what the driver reports as total (nvidia-smi MiB)
    hbm_gb_per_s: float  # memory bandwidth, GB/s
    bf16_tflops: float  # dense
    fp8_tflops: float | None = None  # dense; None = no native fp8
    int8_tops: float | None = None
    fp4_tflops: float | None = None  # dense; None = no native fp4
    # Intra-node link per GPU, one direction, GB/s, and its latency per collective step.
    link: str = "PCIe4"
    link_gb_per_s: float = 25.0
    link_latency_us: float = 10.0
    pcie_gb_per_s: float = 25.0  # host <-> GPU, one direction (for expert offload streaming)
    vendor: str = "nvidia"
    unified_memory: bool = False  # Apple: GPU shares system RAM
    generic: bool = False  # a card known only by its memory size
    source: str = ""

    def peak_tflops(self, weight_bits: float, act_bits: int = 16) -> float:
        """Dense peak for the GEMM dtype a quantization runs in (weight-only int4 runs in bf16)."""
        if act_bits <= 8 and weight_bits <= 8 and self.fp8_tflops:
            return self.fp8_tflops
        return self.bf16_tflops


# Links, one direction per GPU. Sources: NVIDIA datasheets via [aic] ai-dynamo/aiconfigurator
# systems/*.yaml (300/450/900 GB/s per direction for NVLink3/4/5); PCIe: 32 GB/s x16 Gen4 raw,
# ~25 effective; Gen5 ~50 effective; Gen3 16 raw, ~12.5 effective (PCI-SIG rates less protocol overhead).
PCIE3, PCIE4, PCIE5 = 12.5, 25.0, 50.0
_SRC_AIC = "[aic] ai-dynamo/aiconfigurator systems/*.yaml; NVIDIA datasheet"


def _mib(n: int) -> int:
    return n * 2**20


CATALOG: tuple[Gpu, ...] = (
    # Turing has no bf16: the 16-bit figure is FP16 with FP32 accumulate (GeForce rate), as llama.cpp runs it.
    Gpu(name="RTX2080", aliases=("2080", "RTX-2080", "GEFORCE-RTX-2080"), memory_bytes=8 * GB,
        usable_bytes=_mib(8192), hbm_gb_per_s=448, bf16_tflops=40.3, int8_tops=161.1, link="PCIe3",
        link_gb_per_s=PCIE3, pcie_gb_per_s=PCIE3,
        source="NVIDIA Turing TU104 whitepaper (RTX 2080 reference: 448 GB/s, 40.3 FP16 TFLOPS FP32-acc)"),
    Gpu(name="RTX3090", aliases=("3090", "RTX-3090", "GEFORCE-RTX-3090"), memory_bytes=24 * GB,
        usable_bytes=_mib(24576), hbm_gb_per_s=936, bf16_tflops=71, int8_tops=284, link="PCIe4",
        link_gb_per_s=PCIE4, pcie_gb_per_s=PCIE4, source="leiblog; NVIDIA Ampere GA102 whitepaper (71 TFLOPS FP32-acc)"),
    Gpu(name="RTX4090", aliases=("4090", "RTX-4090", "GEFORCE-RTX-4090"), memory_bytes=24 * GB,
        usable_bytes=_mib(24564), hbm_gb_per_s=1008, bf16_tflops=165.2, fp8_tflops=330.3, int8_tops=660.6,
        link="PCIe4", link_gb_per_s=PCIE4, pcie_gb_per_s=PCIE4, source="NVIDIA Ada whitepaper; waredb.com"),
    Gpu(name="RTX5090", aliases=("5090", "RTX-5090", "GEFORCE-RTX-5090"), memory_bytes=32 * GB,
        usable_bytes=_mib(32607), hbm_gb_per_s=1792, bf16_tflops=209.5, fp8_tflops=419, fp4_tflops=838,
        link="PCIe5", link_gb_per_s=PCIE5, pcie_gb_per_s=PCIE5,
        source="NVIDIA Blackwell GB202 whitepaper (419 dense FP16 with FP16 acc, half with FP32 acc); spheron.network"),
    Gpu(name="A6000", aliases=("RTXA6000", "RTX-A6000"), memory_bytes=48 * GB, usable_bytes=_mib(49140),
        hbm_gb_per_s=768, bf16_tflops=154.8, int8_tops=309.7, link="PCIe4", link_gb_per_s=PCIE4,
        pcie_gb_per_s=PCIE4, source="[lla] cli99/llm-analysis gpu_configs; NVIDIA datasheet"),
    Gpu(name="L4", memory_bytes=24 * GB, usable_bytes=_mib(23034), hbm_gb_per_s=300, bf16_tflops=121,
        fp8_tflops=242, int8_tops=242, link="PCIe4", link_gb_per_s=PCIE4, pcie_gb_per_s=PCIE4, source=_SRC_AIC),
    Gpu(name="L40S", memory_bytes=48 * GB, usable_bytes=_mib(46068), hbm_gb_per_s=864, bf16_tflops=362,
        fp8_tflops=733, int8_tops=733, link="PCIe4", link_gb_per_s=PCIE4, pcie_gb_per_s=PCIE4, source=_SRC_AIC),
    Gpu(name="A10G", memory_bytes=24 * GB, usable_bytes=_mib(23028), hbm_gb_per_s=600, bf16_tflops=70,
        int8_tops=140, link="PCIe4", link_gb_per_s=PCIE4, pcie_gb_per_s=PCIE4, source="[lla] gpu_configs (AWS A10G)"),
    Gpu(name="A100-40GB", aliases=("A100-40G", "A100-SXM-40GB", "A100-PCIE-40GB"), memory_bytes=40 * GB,
        usable_bytes=_mib(40960), hbm_gb_per_s=1555, bf16_tflops=312, int8_tops=624, link="NVLink3",
        link_gb_per_s=300, link_latency_us=8, pcie_gb_per_s=PCIE4, source="[lla] gpu_configs; NVIDIA A100 datasheet"),
    Gpu(name="A100-80GB", aliases=("A100", "A100-80G", "A100-SXM", "A100-SXM-80GB", "A100-SXM4-80GB"),
        memory_bytes=80 * GB, usable_bytes=_mib(81920), hbm_gb_per_s=2039, bf16_tflops=312, int8_tops=624,
        link="NVLink3", link_gb_per_s=300, link_latency_us=8, pcie_gb_per_s=PCIE4, source=_SRC_AIC),
    Gpu(name="H100-PCIe", aliases=("H100PCIE", "H100-PCIE-80GB"), memory_bytes=80 * GB, usable_bytes=_mib(81559),
        hbm_gb_per_s=2000, bf16_tflops=756, fp8_tflops=1513, int8_tops=1513, link="PCIe5", link_gb_per_s=PCIE5,
        pcie_gb_per_s=PCIE5, source="NVIDIA H100 datasheet (PCIe)"),
    Gpu(name="H100", aliases=("H100-SXM", "H100-SXM5", "H100-80GB", "H100-SXM-80GB", "H800"), memory_bytes=80 * GB,
        usable_bytes=_mib(81559), hbm_gb_per_s=3350, bf16_tflops=989, fp8_tflops=1979, int8_tops=1979,
        link="NVLink4", link_gb_per_s=450, link_latency_us=5, pcie_gb_per_s=PCIE5, source=_SRC_AIC),
    Gpu(name="H200", aliases=("H200-SXM", "H200-141GB"), memory_bytes=141 * GB, usable_bytes=_mib(143771),
        hbm_gb_per_s=4800, bf16_tflops=989, fp8_tflops=1979, int8_tops=1979, link="NVLink4", link_gb_per_s=450,
        link_latency_us=5, pcie_gb_per_s=PCIE5, source=_SRC_AIC),
    Gpu(name="B200", aliases=("B200-HGX",), memory_bytes=180 * GB, usable_bytes=_mib(183359), hbm_gb_per_s=7700,
        bf16_tflops=2250, fp8_tflops=4500, int8_tops=4500, fp4_tflops=9000, link="NVLink5", link_gb_per_s=900,
        link_latency_us=4, pcie_gb_per_s=PCIE5, source=_SRC_AIC),
    Gpu(name="GB200", memory_bytes=186 * GB, usable_bytes=_mib(189471), hbm_gb_per_s=8000, bf16_tflops=2500,
        fp8_tflops=5000, int8_tops=5000, fp4_tflops=10000, link="NVLink5", link_gb_per_s=900, link_latency_us=4,
        pcie_gb_per_s=PCIE5, source=_SRC_AIC),
    Gpu(name="MI300X", aliases=("MI300",), memory_bytes=192 * GB, usable_bytes=205822885888, hbm_gb_per_s=5300,
        bf16_tflops=1307, fp8_tflops=2615, int8_tops=2615, link="InfinityFabric", link_gb_per_s=448,
        link_latency_us=8, pcie_gb_per_s=PCIE5, vendor="amd",
        source="[genz] GenZ system_configs; AMD MI300X datasheet (7 x 64 GB/s per direction IF links)"),
    Gpu(name="MI325X", memory_bytes=256 * GB, usable_bytes=256 * GB, hbm_gb_per_s=6000, bf16_tflops=1307,
        fp8_tflops=2615, int8_tops=2615, link="InfinityFabric", link_gb_per_s=448, link_latency_us=8,
        pcie_gb_per_s=PCIE5, vendor="amd", source="[genz]; AMD MI325X datasheet (usable not measured: marketed)"),
    # Apple: the GPU may wire about 2/3 to 3/4 of unified memory by default (recommendedMaxWorkingSetSize;
    # llama.cpp#2011). usable = 3/4 of the RAM; raise with `sudo sysctl iogpu.wired_limit_mb`.
    Gpu(name="M2-Ultra-192GB", aliases=("M2-ULTRA", "M2ULTRA"), memory_bytes=192 * GiB, usable_bytes=144 * GiB,
        hbm_gb_per_s=800, bf16_tflops=27, link="none", link_gb_per_s=0, pcie_gb_per_s=800, vendor="apple",
        unified_memory=True, source="Apple M2 Ultra spec; [llmfit] hardware.rs"),
    # M2 Max: 400 GB/s, up to 96 GB unified memory, up to 38 GPU cores (Apple Newsroom, "Apple unveils M2 Pro
    # and M2 Max", 2023-01-17). Apple gives no GPU TFLOPS; the M2 Ultra is two M2 Max dies joined by
    # UltraFusion (Apple Newsroom, "Apple introduces M2 Ultra", 2023-06-05), so compute is half the entry above.
    Gpu(name="M2-Max-96GB", aliases=("M2-MAX", "M2MAX"), memory_bytes=96 * GiB, usable_bytes=72 * GiB,
        hbm_gb_per_s=400, bf16_tflops=13.5, link="none", link_gb_per_s=0, pcie_gb_per_s=400, vendor="apple",
        unified_memory=True, source="Apple M2 Max spec (38-core GPU, 400 GB/s); compute half of M2 Ultra's"),
    # M3 Ultra: 819 GB/s, up to 512 GB unified memory, 80-core GPU (Apple Newsroom, "Apple unveils new Mac
    # Studio", 2025-03-05); two M3 Max dies joined by UltraFusion, so compute twice the M3 Max entry's.
    Gpu(name="M3-Ultra-512GB", aliases=("M3-ULTRA", "M3ULTRA"), memory_bytes=512 * GiB, usable_bytes=384 * GiB,
        hbm_gb_per_s=819, bf16_tflops=28, link="none", link_gb_per_s=0, pcie_gb_per_s=819, vendor="apple",
        unified_memory=True, source="Apple M3 Ultra spec (80-core GPU, 819 GB/s); compute twice M3 Max's"),
    Gpu(name="M3-Max-128GB", aliases=("M3-MAX", "M3MAX"), memory_bytes=128 * GiB, usable_bytes=96 * GiB,
        hbm_gb_per_s=400, bf16_tflops=14, link="none", link_gb_per_s=0, pcie_gb_per_s=400, vendor="apple",
        unified_memory=True, source="Apple M3 Max spec (40-core GPU); [llmfit]"),
    Gpu(name="M4-Max-128GB", aliases=("M4-MAX", "M4MAX"), memory_bytes=128 * GiB, usable_bytes=96 * GiB,
        hbm_gb_per_s=546, bf16_tflops=18, link="none", link_gb_per_s=0, pcie_gb_per_s=546, vendor="apple",
        unified_memory=True, source="Apple M4 Max spec (40-core GPU); [llmfit]"),
)

# Between nodes: one 400 Gb/s InfiniBand NDR / RoCE NIC per GPU = 50 GB/s per direction, ~10 us
# (NVIDIA ConnectX-7 datasheet; DGX H100 has eight). Used for any collective that spans nodes.
INTER_NODE_GB_PER_S = 50.0
INTER_NODE_LATENCY_US = 10.0

# A generic card (`2x24GB`) has no datasheet. For speed we assume an RTX 4090-class card per 24 GB
# step is wrong in general, so we take the bandwidth and compute of the catalog card with the
# nearest memory size and say so in the output.
GENERIC_NOTE = "generic {size} card: speed assumes {like}'s bandwidth and compute; name the GPU for a real estimate"


def _norm(text: str) -> str:
    return re.sub(r"[\s_]+", "-", text.strip().upper()).replace("NVIDIA-", "").replace("GEFORCE-", "")


@lru_cache(maxsize=1)
def _index() -> dict[str, Gpu]:
    index: dict[str, Gpu] = {}
    for gpu in CATALOG:
        for key in (gpu.name, *gpu.aliases):
            index[_norm(key)] = gpu
            index[_norm(key).replace("-", "")] = gpu
    return index


def find_gpu(name: str) -> Gpu | None:
    key = _norm(name)
    if key in ("CPU", "HOST", "HOST-CPU"):
        return host_cpu()
    return _index().get(key) or _index().get(key.replace("-", ""))


def host_memory_bytes() -> tuple[int, int]:
    """(total, available) RAM of this host from /proc/meminfo or sysconf; (0, 0) when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
        return info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemTotal", 0))
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total
    except (OSError, ValueError, AttributeError):
        return 0, 0


def host_cpu() -> Gpu:
    """This host's CPU as a device (`--gpus cpu`, `bench --device cpu`): its RAM, and moeplan's desktop
    assumption for bandwidth and compute (HOST_RAM_GB_PER_S, HOST_TFLOPS), which a saved `moeplan bench
    --device cpu --save-calibration` corrects. Named "cpu", the key calibrations are stored under."""
    total, avail = host_memory_bytes()
    return Gpu(
        name="cpu", memory_bytes=total or 16 * GB, usable_bytes=avail or total or 16 * GB,
        hbm_gb_per_s=HOST_RAM_GB_PER_S, bf16_tflops=HOST_TFLOPS, link="none", link_gb_per_s=0,
        pcie_gb_per_s=HOST_RAM_GB_PER_S, vendor="cpu", unified_memory=True,
        source="moeplan.hardware HOST_RAM_GB_PER_S / HOST_TFLOPS: a desktop assumption, not this CPU's datasheet",
    )  # fmt: skip


def match_device_name(device_name: str) -> Gpu | None:
    """Map a driver's device name ('NVIDIA H100 80GB HBM3', 'NVIDIA H200') to a catalog entry."""
    text = device_name.upper()
    checks = [
        ("GB200", "GB200"), ("B200", "B200"), ("H200", "H200"), ("H100 PCIE", "H100-PCIe"), ("H100", "H100"),
        ("H800", "H100"), ("A100-SXM4-40GB", "A100-40GB"), ("A100-PCIE-40GB", "A100-40GB"), ("A100", "A100-80GB"),
        ("L40S", "L40S"), ("A10G", "A10G"), ("L4", "L4"), ("RTX A6000", "A6000"), ("4090", "RTX4090"),
        ("5090", "RTX5090"), ("3090", "RTX3090"), ("2080", "RTX2080"), ("MI300X", "MI300X"), ("MI325X", "MI325X"),
    ]  # fmt: skip
    for needle, name in checks:
        if needle in text:
            return find_gpu(name)
    return None


def generic_gpu(size_bytes: int, label: str) -> Gpu:
    """A card known only by its size. Usable memory: the size itself (a 24GB card reports ~24 GiB,
    more than 24 GB, so taking the label as usable is the cautious side); speed from the nearest card."""
    like = min((g for g in CATALOG if not g.unified_memory), key=lambda g: abs(g.memory_bytes - size_bytes))
    return like.model_copy(
        update=dict(
            name=label, aliases=(), memory_bytes=size_bytes, usable_bytes=size_bytes, generic=True,
            source=GENERIC_NOTE.format(size=label, like=like.name),
        )
    )


GRAMMAR = "e.g. 2x24GB, 4x80GiB, 8xH100, 2xRTX4090, 1xA100-80GB,1xRTX4090 (known GPUs: `moeplan gpus`)"
_GROUP = re.compile(r"^(?:(\d+)\s*[X*×]\s*)?(.+)$", re.IGNORECASE)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(GB|GIB|G)$", re.IGNORECASE)


def parse_gpus(text: str, nodes: int = 1) -> tuple[tuple[Gpu, ...], int]:
    """'2x24GB' -> ((gpu, gpu), nodes). Every GPU of every node is listed (node-major order)."""
    if nodes < 1 or nodes > 4096:
        raise GpuSpecError(f"--nodes must be between 1 and 4096, got {nodes}")
    raw = text.strip()
    nested = re.match(r"^(\d+)\s*[x*×]\s*\((.+)\)$", raw, re.IGNORECASE) if "(" in raw else None
    if nested:
        nodes *= int(nested.group(1))
        raw = nested.group(2)
    if not raw:
        raise GpuSpecError(f"--gpus is empty; {GRAMMAR}")
    per_node: list[Gpu] = []
    for part in raw.split(","):
        part = part.strip()
        m = _GROUP.match(part)
        if not part or not m:
            raise GpuSpecError(f"cannot read GPU group '{part}' in '{text}'; {GRAMMAR}")
        count = int(m.group(1) or 1)
        what = m.group(2).strip()
        if count < 1 or count > 4096:
            raise GpuSpecError(f"GPU count must be 1..4096, got {count} in '{part}'; {GRAMMAR}")
        size = _SIZE.match(what.replace(" ", ""))
        if size:
            amount = float(size.group(1))
            if amount <= 0 or amount > 4096:
                raise GpuSpecError(f"GPU memory must be between 0 and 4096, got '{what}'; {GRAMMAR}")
            unit = GiB if size.group(2).upper() == "GIB" else GB
            gpu = generic_gpu(int(amount * unit), f"{size.group(1)}{'GiB' if unit == GiB else 'GB'}")
        else:
            found = find_gpu(what)
            if found is None:
                raise GpuSpecError(f"unknown GPU '{what}' in '{text}'; {GRAMMAR}")
            gpu = found
        per_node.extend([gpu] * count)
    if len(per_node) * nodes > 4096:
        raise GpuSpecError(f"{len(per_node) * nodes} GPUs is more than moeplan plans for (4096)")
    return tuple(per_node * nodes), nodes


# A host CPU for offload and for `bench --device cpu` predictions: one DDR5 server socket streams
# ~100-300 GB/s; a desktop dual-channel DDR5 ~60-80 GB/s. We assume a desktop (llama.cpp users).
HOST_RAM_GB_PER_S = 60.0
HOST_TFLOPS = 1.0  # AVX-512/AMX-less desktop, bf16 matmul in practice
