"""Per-step engine overhead: what a decode or prefill step costs beyond its kernels' roofline time.

overhead(step) = fixed per step (scheduling, sampling, output processing) + a floor per decoder
layer (the layer's 10-30 kernels each take a few microseconds even when their data is tiny) + a
launch cost per collective when the engine runs without CUDA graphs. Figures and their sources:
- vLLM V1 and SGLang with CUDA graphs: ~0.3 ms per step fixed (assumed: no published figure isolates
  it; these bound it). vLLM's full CUDA graphs took 0.5 ms off piecewise ones at Llama-8B's 7.6 ms
  TPOT (vllm-project/vllm#16072); SGLang's overlap scheduler hides its CPU work ("no single idle
  time on the GPU", SGLang v0.4 blog). Per layer on NVIDIA GPUs SERVING_LAYER_S["nvidia"], FITTED with
  the serving engines' memory efficiency on the fitting set's InferenceX H200 and sgl-cookbook B200
  rows (36-94 layers, concurrency 1-64; docs/validation.md step 6). On other vendors (ROCm) 30 us,
  the floor moeplan charged since issue 5 (an estimate: 10-20 kernels of 1.5-3 us each under graphs).
- Without CUDA graphs (vLLM --enforce-eager, SGLang --disable-cuda-graph): +69 us per layer
  (SGLang#1401: Llama-3-8B bs1 7.06 ms with graphs, 9.28 ms without, over 32 layers) and +16 us per
  collective on Hopper, +39 us on A100 (aiconfigurator: vLLM eager vs graph all-reduce floors,
  ~20-23 us vs 4.2-4.7 us on H100, ~44 us vs 4.9-5.7 us on A100).
- llama.cpp: a per-layer cost FITTED with its memory efficiency on the fitting set's dense llama-bench
  rows (benchmarks/validate.py --fit-efficiency; docs/validation.md), one pair per backend, because
  a batch-1 token costs bytes / (bandwidth x efficiency) + layers x cost and the two only separate
  across model sizes: Llama-3 8B (32 layers) and 70B (80 layers) Q4_K_M tg512, XiongjieDai's
  GPU-Benchmarks-on-LLM-Inference (May 2024). On NVIDIA GPUs (CUDA, graphs by default since PR#6766)
  LLAMACPP_LAYER_S["nvidia"]; without graphs +27 us per layer (issue #6763: llama-2-7b Q4_K_M on H100
  143 -> 164 tok/s with graphs, 0.87 ms over 32 layers). On Apple GPUs (Metal, no graphs: every
  kernel is encoded per token) LLAMACPP_LAYER_S["apple"], fitted with the M2 Max Mixtral table too.
  Other vendors take NVIDIA's. Its per-step fixed cost, sampling on the CPU: 0.3 ms, assumed like vLLM's.
- A plain eager PyTorch loop (HF generate-style): +0.9 ms per layer (gpt-fast: Llama-2-7B eager
  25.5 tok/s against 105 tok/s compiled on A100, ~30 ms per token over 32 layers), 1 ms fixed.
"""

from __future__ import annotations


from moeplan.record import Record
from moeplan.errors import MoeplanError


class EngineOverhead(Record):
    name: str
    cuda_graphs: bool
    step_s: float  # fixed per step
    layer_s: float  # per decoder layer per step
    collective_s: float = 0.0  # extra launch cost per collective (eager engines)
    source: str = ""


_GRAPH_LAYER_S = 30e-6
_EAGER_LAYER_S = 69e-6  # SGLang#1401
_LLAMACPP_EAGER_LAYER_S = 27e-6  # llama.cpp#6763
_STEP_S = 0.3e-3  # assumed, see the docstring
# FITTED (docs/validation.md, `python benchmarks/validate.py --fit-efficiency`; tests/test_validation.py
# checks these equal its output): llama.cpp's per-layer cost per token, by GPU vendor.
LLAMACPP_LAYER_S: dict[str, float] = {"nvidia": 74e-6, "apple": 208e-6}
# FITTED the same way: vLLM's and SGLang's per-layer cost under CUDA graphs on NVIDIA GPUs. Other vendors
# (ROCm) keep the 30 us floor their efficiency was fitted with.
SERVING_LAYER_S: dict[str, float] = {"nvidia": 67e-6}

ENGINES: dict[tuple[str, bool], EngineOverhead] = {
    ("vllm", True): EngineOverhead(name="vllm", cuda_graphs=True, step_s=_STEP_S, layer_s=_GRAPH_LAYER_S,
                                   source="vllm#16072; moeplan's 30 us layer floor (ROCm)"),
    ("vllm", False): EngineOverhead(name="vllm", cuda_graphs=False, step_s=_STEP_S,
                                    layer_s=_GRAPH_LAYER_S + _EAGER_LAYER_S, collective_s=16e-6,
                                    source="SGLang#1401 per-layer eager cost; [aic] eager all-reduce floors"),
    ("sglang", True): EngineOverhead(name="sglang", cuda_graphs=True, step_s=_STEP_S, layer_s=_GRAPH_LAYER_S,
                                     source="SGLang v0.4 overlap scheduler; moeplan's 30 us layer floor (ROCm)"),
    ("sglang", False): EngineOverhead(name="sglang", cuda_graphs=False, step_s=_STEP_S,
                                      layer_s=_GRAPH_LAYER_S + _EAGER_LAYER_S, collective_s=16e-6,
                                      source="SGLang#1401: 7.06 vs 9.28 ms per step for 32 layers"),
    ("llama.cpp", True): EngineOverhead(name="llama.cpp", cuda_graphs=True, step_s=_STEP_S, layer_s=_GRAPH_LAYER_S,
                                        source="llama.cpp PR#6766 (CUDA graphs by default)"),
    ("llama.cpp", False): EngineOverhead(name="llama.cpp", cuda_graphs=False, step_s=_STEP_S,
                                         layer_s=_GRAPH_LAYER_S + _LLAMACPP_EAGER_LAYER_S,
                                         source="llama.cpp#6763: 0.87 ms per token over 32 layers"),
    ("pytorch", False): EngineOverhead(name="pytorch", cuda_graphs=False, step_s=1e-3, layer_s=0.9e-3,
                                       collective_s=16e-6, source="gpt-fast blog: eager 25.5 vs 105 tok/s"),
    ("pytorch", True): EngineOverhead(name="pytorch", cuda_graphs=True, step_s=_STEP_S, layer_s=_GRAPH_LAYER_S,
                                      source="torch.compile(mode='reduce-overhead'), gpt-fast"),
}
ENGINE_NAMES = ("vllm", "sglang", "llama.cpp", "pytorch")


def overhead(engine: str, cuda_graphs: bool = True, *, a100: bool = False, vendor: str | None = None) -> EngineOverhead:
    key = {"llamacpp": "llama.cpp", "torch": "pytorch", "eager": "pytorch"}.get(engine, engine)
    found = ENGINES.get((key, cuda_graphs))
    if found is None:
        raise MoeplanError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINE_NAMES)}")
    fitted = _fitted_layer_s(key, cuda_graphs, vendor)
    if fitted is not None:
        layer_s, where = fitted
        found = found.model_copy(update={"layer_s": layer_s, "source": f"{found.source}; per-layer cost fitted for "
                                         f"{where} GPUs (docs/validation.md)"})
    if a100 and found.collective_s:
        # [aic] vLLM eager all-reduce on A100: ~44 us against 4.9-5.7 us under graphs.
        return found.model_copy(update={"collective_s": 39e-6})
    return found


def _fitted_layer_s(key: str, cuda_graphs: bool, vendor: str | None) -> tuple[float, str] | None:
    """The fitted per-layer cost that replaces the 30 us floor for this engine and GPU vendor, and the
    GPUs it was fitted for; None where the floor stands (the PyTorch loop; vLLM and SGLang on GPUs
    other than NVIDIA's, ROCm among them)."""
    if key == "llama.cpp":
        backend = "apple" if vendor == "apple" else "nvidia"
        # Metal has no graphs to turn off: every kernel is encoded per token either way.
        eager = 0.0 if cuda_graphs or backend == "apple" else _LLAMACPP_EAGER_LAYER_S
        return LLAMACPP_LAYER_S[backend] + eager, backend
    if key in ("vllm", "sglang") and vendor in (None, "nvidia"):
        return SERVING_LAYER_S["nvidia"] + (0.0 if cuda_graphs else _EAGER_LAYER_S), "NVIDIA"
    return None
