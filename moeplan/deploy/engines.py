"""The engines' launch commands for a plan, written with only flags the engines document
(ENGINE_FLAGS, each with the file and version it was read from: docs/research/engine_flags.md).
Every token is shell-quoted here (shlex.quote), whatever a card or a spec put in it."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from pydantic import BaseModel, ConfigDict

from moeplan.escape import printable
from moeplan.errors import MoeplanError, QuantError
from moeplan.layout import Scenario
from moeplan.plan import Plan
from moeplan.quant import QuantScheme, get_scheme, native_scheme
from moeplan.sources import HUB_ID, looks_like_path
from moeplan.spec import ModelSpec

if TYPE_CHECKING:  # types only: the spec module imports this one
    from moeplan.deploy.spec import DeploySpec, Serving

Engine = Literal["vllm", "sglang", "llama.cpp"]

# ---------------------------------------------------------------------------------------------
# What the engines accept. V11/V33 = vllm 0.11.0 / 0.33.0 wheels, vllm/engine/arg_utils.py;
# S52/S23 = sglang 0.5.2 / 0.5.23 wheels (server_args.py; 0.5.23 arg_groups/fields/*.py);
# L = ggml-org/llama.cpp@0c1e57098 common/arg.cpp. Line numbers from docs/research/engine_flags.md.
# ---------------------------------------------------------------------------------------------

ENGINE_FLAGS: dict[str, dict[str, str]] = {
    "vllm": {
        "--tensor-parallel-size": "V11 arg_utils.py:655; V33 :1208",
        "--pipeline-parallel-size": "V11 arg_utils.py:653; V33 :1171",
        "--data-parallel-size": "V11 arg_utils.py:660; V33 :1240",
        "--enable-expert-parallel": "V11 arg_utils.py:697; V33 :1305 (EP size = TP x DP, no size flag)",
        "--max-model-len": "V11 arg_utils.py:546; V33 :991",
        "--max-num-seqs": "V11 arg_utils.py:885; V33 :1753",
        "--max-num-batched-tokens": "V11 arg_utils.py:883; V33 :1739",
        "--kv-cache-dtype": "V11 arg_utils.py:769; V33 :1397",
        "--gpu-memory-utilization": "V11 arg_utils.py:764 (default 0.9); V33 :1388 (default 0.92)",
        "--quantization": "V11 arg_utils.py:548; V33 :992",
        "--enable-eplb": "vllm/config/parallel.py ParallelConfig.enable_eplb (v0.10+); docs.vllm.ai expert parallel "
                         "deployment, EPLB",
        "--eplb-config": "vllm/config/parallel.py EPLBConfig (num_redundant_experts, default 0; v0.11+)",
    },
    "sglang": {
        "--model-path": "S52 server_args.py:860; S23 fields/model.py:51",
        "--tp-size": "S52 server_args.py:1125; S23 fields/parallel.py:45",
        "--pp-size": "S52 server_args.py:1132; S23 fields/parallel.py (pp_size)",
        "--ep-size": "S52 server_args.py:1602; S23 fields/parallel.py:281",
        "--enable-dp-attention": "S52 server_args.py:1959; S23 server_args.py:414 (deprecated alias of "
                                 "--attn-dp-size, accepted until 2026-12-31)",
        "--dp-size": "S52 server_args.py:1389; S23 fields/parallel.py (dp_size)",
        "--context-length": "S52 server_args.py:927; S23 fields/model.py:110",
        "--mem-fraction-static": "S52 server_args.py:1037; S23 fields/schedule.py:27",
        "--kv-cache-dtype": "S52 server_args.py:1028; S23 fields/model.py:197",
        "--max-running-requests": "S52 server_args.py:1043; S23 fields/schedule.py:31",
        "--chunked-prefill-size": "S52 server_args.py:1062; S23 fields/schedule.py:52",
        "--quantization": "S52 server_args.py:1012; S23 fields/model.py:177",
        "--nnodes": "S52 server_args.py:1421; S23 fields/parallel.py (nnodes)",
        "--node-rank": "S52 server_args.py:1424; S23 fields/parallel.py (node_rank)",
        "--dist-init-addr": "S52 server_args.py:1415; S23 fields/parallel.py (dist_init_addr)",
        "--enable-eplb": "S52 server_args.py (enable_eplb); docs.sglang.io advanced_features/expert_parallelism",
        "--ep-num-redundant-experts": "S52 server_args.py (ep_num_redundant_experts, default 0)",
    },
    "llama.cpp": {
        "-m": "L common/arg.cpp:3035",
        "-ngl": "L common/arg.cpp:2789",
        "--n-cpu-moe": "L common/arg.cpp:2767 (experts of the first N layers stay in CPU RAM)",
        "-c": "L common/arg.cpp:1639",
        "-np": "L common/arg.cpp:2544 (server slots)",
        "-ctk": "L common/arg.cpp:2437",
        "-ctv": "L common/arg.cpp:2450",
        "-fa": "L common/arg.cpp:1754 (takes on|off|auto)",
        "--tensor-split": "L common/arg.cpp:2831",
    },
}

# Environment variables a command may set, with where the engine reads them.
ENGINE_ENV: dict[str, dict[str, str]] = {
    "vllm": {"VLLM_PP_LAYER_PARTITION": "vllm/distributed/utils.py get_pp_indices (vllm/envs.py); "
                                        "tests/distributed/test_pipeline_partition.py"},
    "sglang": {"SGLANG_PP_LAYER_PARTITION": "sglang python/sglang/srt/distributed/utils.py get_pp_indices"},
    "llama.cpp": {},
}

# moeplan KV dtype -> the engine's value. vLLM: "auto" is the model dtype, fp8 = fp8_e4m3 (V11/V33
# CacheDType doc). SGLang has no plain "fp8" (S52 choices auto, fp8_e5m2, fp8_e4m3). llama.cpp cache
# types (L kv_cache_types, arg.cpp:304): f16 is its default, and we write f16 for bf16 (same bytes)
# because flash-attention kernels for bf16 caches are not on every backend.
KV_CACHE_TYPES: dict[str, dict[str, str]] = {
    "vllm": {"bf16": "auto", "bfloat16": "auto", "fp16": "auto", "float16": "auto", "auto": "auto",
             "fp8": "fp8", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"},
    "sglang": {"bf16": "auto", "bfloat16": "auto", "fp16": "auto", "float16": "auto", "auto": "auto",
               "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"},
    "llama.cpp": {"bf16": "f16", "bfloat16": "f16", "fp16": "f16", "float16": "f16", "auto": "f16",
                  "fp32": "f32", "q8_0": "q8_0", "q4": "q4_0", "q4_0": "q4_0"},
}  # fmt: skip
# Values each engine documents for its KV flag (a test checks every emitted value is one of them).
KV_CACHE_CHOICES: dict[str, frozenset[str]] = {
    "vllm": frozenset({"auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"}),  # V11 cache.py:25 (subset of V33)
    "sglang": frozenset({"auto", "fp8_e5m2", "fp8_e4m3"}),  # S52 server_args.py:1028
    "llama.cpp": frozenset({"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"}),  # L :304
}
# --quantization values the engine applies to 16-bit weights as it loads them. Other methods (GPTQ,
# AWQ, NVFP4, MXFP4) need a checkpoint already quantized that way, whose config the engine reads.
ONLINE_QUANT = frozenset({"fp8"})  # vLLM "dynamic fp8"; SGLang --quantization fp8 on a bf16 checkpoint
# The engines' prefill chunk, which the plan's activation memory assumed (Scenario.chunk_tokens).
CHUNK_TOKENS: int = Scenario.chunk_tokens  # the field default (a Record class attribute)
# The program each engine's command starts with (its tokens are not the engine's flags).
ENGINE_PROGRAM: dict[str, tuple[str, ...]] = {
    "vllm": ("vllm", "serve"), "sglang": ("python", "-m", "sglang.launch_server"), "llama.cpp": ("llama-server",),
}  # fmt: skip
# llama.cpp -ngl: an integer above any model's layer count + output layer (older builds take no 'all').
ALL_LAYERS = 999
_QUANT_ENGINE = {"vllm": "vllm", "sglang": "sglang", "llama.cpp": "llamacpp"}  # quant.Engine spelling
ENGINES: tuple[str, ...] = get_args(Engine)
MAX_BATCH = 65536  # memory.check_context's bound on --batch


# ---------------------------------------------------------------------------------------------
# Launch commands
# ---------------------------------------------------------------------------------------------


class Launch(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)
    engine: str
    env: dict[str, str]
    argv: list[str]
    notes: list[str]

    @property
    def command(self) -> str:
        for token in (*self.env.values(), *self.argv):
            if printable(token) != token:  # a GGUF path or a name with a newline: one line, never two
                raise MoeplanError(f"{printable(token)!r} holds control characters; it cannot go into a launch "
                                   "command (rename the file or folder)")
        env = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*env, *(_quote(t) for t in self.argv)])


# Tokens moeplan itself writes for the shell to expand; every other token, whatever a card, a spec or
# the Hub put in it (a hub_id of `${PWD:+$(touch x)}`), is quoted.
SHELL_PLACEHOLDERS = frozenset({"${HEAD_IP}:50000"})


def _quote(token: str) -> str:
    return token if token in SHELL_PLACEHOLDERS else shlex.quote(token)


def _model_name(spec: DeploySpec, model: ModelSpec) -> str:
    """The Hub id the spec names (a card alias such as an Instruct variant stays as written), else the card's."""
    if HUB_ID.match(spec.model) and not looks_like_path(spec.model):
        return spec.model
    return model.hub_id or spec.model


def _limits(plan: Plan, serving: Serving) -> tuple[int, int]:
    """Never ask the engine for more than the plan fits: context and sequences capped by the plan."""
    context = min(serving.context, plan.max_context or serving.context)
    return context, min(serving.batch, plan.max_batch or serving.batch)


def _mem(fraction: float) -> str:
    return f"{fraction:g}"


def _quant_flags(engine: str, model: ModelSpec, plan: Plan, name: str) -> tuple[list[str], list[str]]:
    """--quantization only when the engine must quantize the checkpoint itself: the method the
    checkpoint already ships in is read from its quantization_config (both engines)."""
    scheme, native = get_scheme(plan.quant), native_scheme(model)
    same = scheme.name == native.name or (scheme.bits >= 16 and native.bits >= 16) or (
        scheme.vllm_quantization is not None and scheme.vllm_quantization == native.vllm_quantization)
    if same:
        return [], []
    method = scheme.vllm_quantization
    if method in ONLINE_QUANT:
        return ["--quantization", method], [f"{engine} quantizes the {native.name} weights to {method} as it "
                                            "loads them"]
    return [], [f"{plan.quant} needs a checkpoint already quantized that way ({scheme.description}): serve one "
                f"in place of {name}; {engine} reads the method from its config"]


def _pp_env(engine: str, plan: Plan) -> dict[str, str]:
    """Layers per stage, always explicit: engines' default splits differ between versions and from
    moeplan's (vLLM/SGLang get_pp_indices give the remainder to the last stages)."""
    if plan.pp == 1:
        return {}
    var = next(iter(ENGINE_ENV[engine]))
    return {var: ",".join(str(n) for n in plan.stage_layers)}


def _vllm(model: ModelSpec, plan: Plan, serving: Serving, nodes: int, name: str) -> Launch:
    ctx, seqs = _limits(plan, serving)
    # DP attention: attention replicated on `ep` data-parallel ranks, experts over all of them
    # (EP size = TP x DP). --max-num-seqs and the token budget are per DP rank, as the plan split them.
    dp = plan.ep if plan.dp_attention else 1
    tp = 1 if plan.dp_attention else plan.tp
    per_rank = math.ceil(seqs / dp)
    argv = [*ENGINE_PROGRAM["vllm"], name, "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(plan.pp)]
    if dp > 1:
        argv += ["--data-parallel-size", str(dp)]
    if plan.ep > 1:
        argv += ["--enable-expert-parallel"]
    argv += [
        "--max-model-len", str(ctx), "--max-num-seqs", str(per_rank),
        "--max-num-batched-tokens", str(max(math.ceil(CHUNK_TOKENS / dp), per_rank)),
        "--kv-cache-dtype", KV_CACHE_TYPES["vllm"][serving.kv_dtype],
        "--gpu-memory-utilization", _mem(serving.mem_fraction),
    ]  # fmt: skip
    flags, notes = _quant_flags("vllm", model, plan, name)
    if serving.redundant_experts and plan.ep > 1:
        # vLLM EPLBConfig.num_redundant_experts (vllm/config/parallel.py), EPLB on.
        flags += ["--enable-eplb", "--eplb-config", f'{{"num_redundant_experts": {serving.redundant_experts}}}']
    if nodes > 1:
        notes.append(f"{nodes} nodes: start a Ray cluster over them and run this on its head node (vLLM spreads "
                     "ranks over Ray); vLLM 0.33 can instead take per-node rank flags")
    return Launch(engine="vllm", env=_pp_env("vllm", plan), argv=argv + flags, notes=notes)


def _sglang(model: ModelSpec, plan: Plan, serving: Serving, nodes: int, name: str) -> Launch:
    ctx, seqs = _limits(plan, serving)
    # SGLang's --tp-size counts the GPUs of one pipeline stage, DP-attention ranks included.
    argv = [*ENGINE_PROGRAM["sglang"], "--model-path", name, "--tp-size", str(max(plan.tp, plan.ep))]
    if plan.pp > 1:
        argv += ["--pp-size", str(plan.pp)]
    if plan.ep > 1:
        argv += ["--ep-size", str(plan.ep)]
    if plan.dp_attention:
        argv += ["--enable-dp-attention", "--dp-size", str(plan.ep)]
    argv += [
        "--context-length", str(ctx), "--mem-fraction-static", _mem(serving.mem_fraction),
        "--kv-cache-dtype", KV_CACHE_TYPES["sglang"][serving.kv_dtype],
        # Both are totals over DP-attention ranks, as the plan counted them (SGLang splits its chunk by
        # dp_size under DP attention; that it splits the request cap the same way is our assumption).
        "--max-running-requests", str(seqs), "--chunked-prefill-size", str(CHUNK_TOKENS),
    ]  # fmt: skip
    flags, notes = _quant_flags("sglang", model, plan, name)
    argv += flags
    if serving.redundant_experts and plan.ep > 1:
        argv += ["--enable-eplb", "--ep-num-redundant-experts", str(serving.redundant_experts)]
    if nodes > 1:
        argv += ["--nnodes", str(nodes), "--node-rank", "0", "--dist-init-addr", next(iter(SHELL_PLACEHOLDERS))]
        notes.append(f"run the same command on each of the {nodes} nodes with --node-rank 0..{nodes - 1}; "
                     "HEAD_IP is the address of node 0")
    if plan.dp_attention:
        notes.append("SGLang 0.5.23 deprecates --enable-dp-attention --dp-size N for --attn-dp-size N "
                     "(still accepted until 2026-12-31)")
    return Launch(engine="sglang", env=_pp_env("sglang", plan), argv=argv, notes=notes)


def gguf_file(model: ModelSpec, name: str, quant: str) -> str:
    """The -m file: the GGUF the user gave when planning its own types, else the usual file name of
    the model at that type."""
    local = _local_gguf(model)
    if local is not None and quant == "gguf-file":
        return local
    base = name.removesuffix(".gguf") if local is None else Path(local).name.removesuffix(".gguf")
    stem = base.rstrip("/").split("/")[-1] if "/" in base else (model.hub_id or base).split("/")[-1]
    return f"{stem}-{quant.upper()}.gguf"


def _local_gguf(model: ModelSpec) -> str | None:
    """The GGUF file a spec was read from (moeplan.gguf_file names it in `source`), else None."""
    source = (model.source or "").removeprefix("GGUF header of ")
    return source if source.lower().endswith(".gguf") else None


def _llamacpp(model: ModelSpec, plan: Plan, serving: Serving, name: str) -> Launch:
    ctx, seqs = _limits(plan, serving)
    kv = KV_CACHE_TYPES["llama.cpp"][serving.kv_dtype]
    path = gguf_file(model, name, plan.quant)
    argv = [*ENGINE_PROGRAM["llama.cpp"], "-m", path, "-ngl", str(ALL_LAYERS)]
    if plan.offload is not None:
        # --n-cpu-moe N keeps the experts of blocks 0..N-1 in RAM; leading dense blocks have none, so N is
        # one past the last offloaded MoE block.
        argv += ["--n-cpu-moe", str(max(plan.offload.offloaded_layer_ids) + 1)]
    # -c is the KV of all slots together (shared by the -np slots), so each slot gets `ctx`;
    # -np is explicit because llama-server's default (-1) picks its own slot count.
    argv += ["-c", str(ctx * seqs), "-np", str(seqs), "-ctk", kv, "-ctv", kv, "-fa", "on"]
    if len(plan.stage_layers) > 1:
        argv += ["--tensor-split", ",".join(str(n) for n in plan.stage_layers)]  # layers per GPU as proportions
    notes = [] if path == _local_gguf(model) else [
        f"-m takes a local GGUF file: download or convert {name} at {plan.quant.upper()} "
        "(for split files give the first part)"]
    if plan.offload is not None:
        blocks = "|".join(str(i) for i in plan.offload.offloaded_layer_ids)
        notes.append(f"the same placement with -ot: -ot 'blk\\.({blocks})\\.ffn_.*_exps\\.=CPU' in place of --n-cpu-moe")
        if plan.offload.tier == "disk":
            notes.append("host RAM holds only part of the offloaded experts: keep llama.cpp's default mmap so the "
                         "rest is read from disk (do not pass --no-mmap or --mlock)")
    return Launch(engine="llama.cpp", env={}, argv=argv, notes=notes)


def launch(
    engine: str, model: ModelSpec, plan: Plan, serving: Serving, *, nodes: int = 1, model_name: str | None = None
) -> Launch:
    """The engine command that realises `plan` for `serving`, flags from ENGINE_FLAGS only."""
    engine = engine_name(engine)
    if serving.kv_dtype not in KV_CACHE_TYPES[engine]:
        raise QuantError(f"{engine} has no '{serving.kv_dtype}' KV cache; use one of "
                         f"{', '.join(KV_CACHE_TYPES[engine])}")
    if not engine_runs(engine, plan):
        raise MoeplanError(f"{engine} cannot run layout '{plan.layout}' (llama.cpp splits whole layers: tp1 ep1)")
    if not engine_accepts(engine, get_scheme(plan.quant)):
        raise QuantError(f"{engine} does not load '{plan.quant}' weights")
    name = model_name or model.hub_id or model.name
    if printable(name) != name:
        # Quoting keeps the shell safe, but a newline inside quotes would still start a line of its own
        # in a CI log (a GitHub `::error` workflow command): refuse rather than print it.
        raise MoeplanError(f"the model name {printable(name)!r} holds control characters; it cannot go into a "
                           "launch command")
    if name.startswith("-"):  # quoting does not help: the engine itself would read it as an option
        raise MoeplanError(f"the model name {name!r} starts with '-', which {engine} would read as an option; name "
                           "the model by its Hub id, or a path such as ./NAME")
    if engine == "vllm":
        return _vllm(model, plan, serving, nodes, name)
    if engine == "sglang":
        return _sglang(model, plan, serving, nodes, name)
    return _llamacpp(model, plan, serving, name)


def emit(engine: str, model: ModelSpec, plan: Plan, serving: Serving, *, nodes: int = 1,
         model_name: str | None = None) -> str:  # fmt: skip
    """The launch command as one shell line."""
    return launch(engine, model, plan, serving, nodes=nodes, model_name=model_name).command


def engine_name(text: str) -> str:
    key = text.strip().lower().replace("-", "").replace("_", "")
    names = {"vllm": "vllm", "sglang": "sglang", "llama.cpp": "llama.cpp", "llamacpp": "llama.cpp",
             "llamaserver": "llama.cpp"}  # fmt: skip
    if key not in names:
        raise MoeplanError(f"unknown engine '{text}'; choose vllm, sglang or llama.cpp")
    return names[key]


def engine_runs(engine: str, plan: Plan) -> bool:
    """Can the engine realise this layout? llama.cpp splits whole layers over GPUs (its default
    --split-mode layer), so only pipeline-style plans, and it alone offloads experts to CPU RAM;
    vLLM and SGLang run every GPU layout moeplan plans."""
    if plan.offload is not None:
        return engine == "llama.cpp"  # --n-cpu-moe is llama.cpp's
    if engine == "llama.cpp":
        return plan.tp == 1 and plan.ep == 1 and not plan.dp_attention
    return True


def engine_accepts(engine: str, scheme: QuantScheme) -> bool:
    """Does this engine load weights in this format? (quant.py's engines; GGUF is llama.cpp's.)"""
    return _QUANT_ENGINE[engine] in scheme.engines
