"""Deployment specs for CI, and the engine command that runs a plan.

A spec (YAML) names a model, GPUs, an engine, how it will be served and what it must achieve.
`check` plans it with `fit` and the speed model and compares each target with its prediction;
`launch` writes the engine command for the chosen plan with only flags the engines document
(ENGINE_FLAGS, each with the file and version it was read from: docs/research/engine_flags.md).

Exit codes follow the CLI's: 0 passes, 1 does not fit or misses a target, 2 the spec is invalid.
"""

from __future__ import annotations

import difflib
import math
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, PositiveInt, PrivateAttr, ValidationError, computed_field, field_validator,
    model_validator,
)  # fmt: skip

from moeplan.errors import ConfigError, GpuSpecError, HubError, MoeplanError, QuantError, UnknownModelError
from moeplan.hardware import Gpu, parse_gpus
from moeplan.layout import Scenario
from moeplan.memory import MAX_CONTEXT
from moeplan.cost import parse_price
from moeplan.plan import (
    FitResult, LayoutRequest, OffloadOptions, Plan, check_expert_options, check_request, fit, plan_offload,
    plans_for_quant, quant_candidates, scorer,
)
from moeplan.plan import engine_runs as core_engine_runs
from moeplan.quant import QuantScheme, get_scheme, kv_dtype_bytes, kv_dtype_usable, native_scheme
from moeplan.routing import Routing
from moeplan.sources import HUB_ID, looks_like_path, resolve
from moeplan.spec import ModelSpec

GiB = 2**30
Engine = Literal["vllm", "sglang", "llama.cpp"]
Ranker = Callable[[ModelSpec, QuantScheme, Plan, tuple[Gpu, ...], Scenario], Plan]
Loc = tuple[str | int, ...]

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
CHUNK_TOKENS: int = Scenario.model_fields["chunk_tokens"].default
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
# The spec
# ---------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored default.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_value_error(func: Callable[[str], Any], value: str) -> None:
    """Run a core parser inside a validator: pydantic reports ValueError with the field's location."""
    try:
        func(value)
    except MoeplanError as exc:
        raise ValueError(str(exc)) from None


class Serving(_Strict):
    # Bounds as memory.check_context enforces them, so a bad value is reported on its line.
    context: int = Field(ge=1, le=MAX_CONTEXT, description="Tokens per sequence, prompt + output (vLLM "
                                                           "--max-model-len).")
    batch: int = Field(ge=1, le=MAX_BATCH, description="Concurrent sequences (vLLM --max-num-seqs, SGLang "
                                                       "--max-running-requests).")
    kv_dtype: str = Field("bf16", description="KV cache dtype: bf16, fp16, fp8, fp8_e4m3, fp8_e5m2 (vLLM/SGLang); "
                                             "bf16, fp16, q8_0, q4_0 (llama.cpp).")
    mem_fraction: float = Field(0.9, ge=0.1, le=1.0, description="Share of each GPU's memory the engine may use.")
    cpu_mem_gb: float | None = Field(None, gt=0, description="llama.cpp only: host RAM (GB = 1e9 bytes) for "
                                                             "an expert-offload plan when nothing fits on the GPUs.")
    cpu_bw: str | None = Field(None, description="llama.cpp offload: host RAM bandwidth, ddr4, ddr5 (default), "
                                                 "ddr5-server, or GB/s.")
    routing: str | None = Field(None, description="Expert routing the speed targets are checked under: uniform "
                                                  "(default), zipf:S, or a file of per-layer expert frequencies "
                                                  "(JSON or CSV; a relative path is read beside the spec).")
    redundant_experts: int = Field(0, ge=0, description="EPLB replicas of the hottest experts per EP group (vLLM "
                                                        "--eplb-config num_redundant_experts, SGLang "
                                                        "--ep-num-redundant-experts).")
    capacity_factor: float | None = Field(None, gt=0, le=64, description="Per-expert token budget C (engines that "
                                                                         "enforce one; vLLM/SGLang drop no tokens).")

    @field_validator("kv_dtype")
    @classmethod
    def _known_kv(cls, value: str) -> str:
        _as_value_error(kv_dtype_bytes, value)  # names the known dtypes
        return value.strip().lower()

    @field_validator("cpu_bw")
    @classmethod
    def _known_bw(cls, value: str | None) -> str | None:
        if value is not None:
            from moeplan.offload import ram_bandwidth

            _as_value_error(ram_bandwidth, value)
        return value


class Targets(_Strict):
    min_decode_tok_per_s: float | None = Field(None, gt=0, description="Decode tokens/s per sequence, at least.")
    min_total_tok_per_s: float | None = Field(None, gt=0, description="Decode tokens/s over the whole batch, "
                                                                      "at least.")
    max_ttft_s: float | None = Field(None, gt=0, description="Time to first token (s) for one prompt, at most.")
    max_tpot_s: float | None = Field(None, gt=0, description="Time per output token (s) at full batch, at most.")
    min_free_gib_per_gpu: float | None = Field(None, ge=0, description="Headroom (GiB = 2^30 bytes) left on the "
                                                                       "fullest GPU, at least.")
    max_usd_per_million_output_tokens: float | None = Field(
        None, gt=0, description="Cost per million output tokens at the serving batch, at most (needs `price`).")
    prompt_tokens: PositiveInt | None = Field(None, description="Prompt length for max_ttft_s; default: the "
                                                                "speed model's, min(context, 1024).")


class LayoutSpec(_Strict):
    """The layout the deployment runs, when it is fixed (else moeplan picks the best)."""

    tp: PositiveInt | None = Field(None, description="Tensor-parallel GPUs per pipeline stage (vLLM "
                                                     "--tensor-parallel-size).")
    ep: PositiveInt | None = Field(None, description="Expert-parallel GPUs: 1, the TP size (vLLM "
                                                     "--enable-expert-parallel), or with dp_attention all of a stage.")
    pp: PositiveInt | None = Field(None, description="Pipeline stages (--pipeline-parallel-size).")
    dp_attention: bool = Field(False, description="Attention data-parallel beside expert parallelism (SGLang "
                                                  "--enable-dp-attention, vLLM --data-parallel-size).")


class DeploySpec(_Strict):
    name: str | None = Field(None, description="A label for reports; default: the file name.")
    model: str = Field(min_length=1, description="Card name, Hub id (org/name) or path to config.json.")
    engine: Engine = Field(description="The serving engine the launch command is written for.")
    quant: str | None = Field(None, description="Quantization (moeplan names: bf16, fp8, int4, awq, q4_k_m, ...); "
                                                "default: the checkpoint as shipped, then smaller ones the engine "
                                                "runs.")
    gpus: str = Field(description="GPUs per node in the --gpus grammar: 2xRTX4090, 8xH100, 1xA100-80GB,1xRTX4090.")
    nodes: PositiveInt = Field(1, description="Nodes, each with the GPUs above.")
    serving: Serving
    layout: LayoutSpec | None = Field(None, description="Force the layout the deployment runs; moeplan checks "
                                                        "that one instead of picking.")
    price: float | dict[str, float] | None = Field(
        None, description="USD per GPU-hour: one figure for every GPU, or a mapping of GPU name to price.")
    targets: Targets = Field(default_factory=Targets)

    _path: str | None = PrivateAttr(default=None)  # where it was loaded from, for annotations
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)  # dotted key -> line in that file

    @field_validator("quant")
    @classmethod
    def _known_quant(cls, value: str | None) -> str | None:
        if value is not None:
            _as_value_error(get_scheme, value)  # names the known schemes
        return value

    @field_validator("gpus")
    @classmethod
    def _gpu_grammar(cls, value: str) -> str:
        _as_value_error(parse_gpus, value)  # quotes the grammar
        return value

    @field_validator("price")
    @classmethod
    def _valid_price(cls, value: float | dict[str, float] | None) -> float | dict[str, float] | None:
        if value is not None:
            _as_value_error(parse_price, _price_text(value))  # positive, known GPUs
        return value

    @model_validator(mode="after")
    def _cost_needs_price(self) -> DeploySpec:
        if self.targets.max_usd_per_million_output_tokens is not None and self.price is None:
            raise ValueError("targets.max_usd_per_million_output_tokens needs a price (USD per GPU-hour)")
        return self

    @field_validator("targets", mode="before")
    @classmethod
    def _empty_targets(cls, value: Any) -> Any:
        return {} if value is None else value  # `targets:` with nothing under it

    @property
    def path(self) -> str | None:
        return self._path

    def line_of(self, field: str) -> int | None:
        return self._lines.get(field)


def schema() -> dict[str, Any]:
    """JSON Schema of a spec file (for editors and `check-jsonschema`); types only, not GPU names."""
    body = DeploySpec.model_json_schema()
    body["title"] = "moeplan deployment spec"
    body["description"] = "A model, GPUs, an engine, how it is served and the targets `moeplan check` verifies."
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **body}


# ---------------------------------------------------------------------------------------------
# Loading, with a line number for every problem
# ---------------------------------------------------------------------------------------------


class SpecProblem(BaseModel):
    model_config = ConfigDict(frozen=True)
    field: str  # dotted path, "" for the whole file
    line: int | None
    message: str


class SpecError(MoeplanError):
    """A spec that cannot be read or is invalid; `problems` holds each bad field with its line."""

    def __init__(self, path: str | None, problems: list[SpecProblem]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(_problems_text(path, problems))


def _problems_text(path: str | None, problems: list[SpecProblem]) -> str:
    parts = []
    for p in problems:
        where = f"line {p.line}: " if p.line else ""
        parts.append(f"{where}{p.field + ': ' if p.field else ''}{p.message}")
    head = f"{path or 'deployment spec'}: "
    if len(problems) > 1:
        head += f"{len(problems)} problems: "
    return head + "; ".join(parts)


def dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc)


def key_lines(node: yaml.Node | None, prefix: Loc = ()) -> tuple[dict[str, int], list[str]]:
    """Dotted key path -> 1-based line of the key, from yaml.compose's node marks; and duplicate keys."""
    lines: dict[str, int] = {}
    dupes: list[str] = []
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, str(key.value))
            if dotted(path) in lines:
                dupes.append(dotted(path))
            lines[dotted(path)] = key.start_mark.line + 1
            sub, sub_dupes = key_lines(value, path)
            lines.update(sub)
            dupes += sub_dupes
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[dotted((*prefix, i))] = item.start_mark.line + 1
            sub, sub_dupes = key_lines(item, (*prefix, i))
            lines.update(sub)
            dupes += sub_dupes
    return lines, dupes


def _line(lines: dict[str, int], loc: Loc) -> int | None:
    """The key's line; for a missing key, its parent's (the mapping it should be in)."""
    for end in range(len(loc), 0, -1):
        if dotted(loc[:end]) in lines:
            return lines[dotted(loc[:end])]
    return None


def _read_yaml(path: Path) -> tuple[Any, dict[str, int], list[str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(path), [SpecProblem(field="", line=None, message=f"cannot read: {exc.strerror}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        message = f"not valid YAML ({problem}); fix the file"
        line = mark.line + 1 if mark else None
        raise SpecError(str(path), [SpecProblem(field="", line=line, message=message)]) from None
    lines, dupes = key_lines(node)
    return data, lines, dupes


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The spec model class that holds the mapping at `loc` (for 'did you mean')."""
    cls: type[BaseModel] = DeploySpec
    for part in loc:
        field = cls.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def _error_message(err: Any) -> str:
    kind, loc = err["type"], err["loc"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown field; {hint}allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error":
        return str(err["msg"]).removeprefix("Value error, ")
    return f"{err['msg']} (got {err['input']!r})"


def load_spec(path: str | Path) -> DeploySpec:
    """Read and validate a spec. SpecError lists every bad field with its line."""
    path = Path(path)
    data, lines, dupes = _read_yaml(path)
    problems = [SpecProblem(field=d, line=lines.get(d), message="key appears twice; YAML keeps only the last")
                for d in dupes]  # fmt: skip
    if not isinstance(data, dict):
        problems.append(SpecProblem(field="", line=1, message="a deployment spec is a YAML mapping with model, "
                                                               "engine, gpus, serving and targets"))
        raise SpecError(str(path), problems)
    try:
        spec = DeploySpec.model_validate(data)
    except ValidationError as exc:
        problems += [SpecProblem(field=dotted(e["loc"]), line=_line(lines, e["loc"]), message=_error_message(e))
                     for e in exc.errors()]  # fmt: skip
        raise SpecError(str(path), problems) from None
    problems += [SpecProblem(field=dotted(loc), line=_line(lines, loc), message=msg)
                 for loc, msg in engine_problems(spec)]  # fmt: skip
    if problems:
        raise SpecError(str(path), problems)
    spec._path = str(path)
    spec._lines = lines
    return spec


def engine_accepts(engine: str, scheme: QuantScheme) -> bool:
    """Does this engine load weights in this format? (quant.py's engines; GGUF is llama.cpp's.)"""
    return _QUANT_ENGINE[engine] in scheme.engines


def engine_problems(spec: DeploySpec) -> list[tuple[Loc, str]]:
    """What the engine cannot do with an otherwise valid spec, each with the field to blame."""
    out: list[tuple[Loc, str]] = []
    kv = spec.serving.kv_dtype
    if kv not in KV_CACHE_TYPES[spec.engine]:
        out.append((("serving", "kv_dtype"),
                    f"{spec.engine} has no '{kv}' KV cache; use one of {', '.join(KV_CACHE_TYPES[spec.engine])}"))
    if spec.quant:
        scheme = get_scheme(spec.quant)
        if not engine_accepts(spec.engine, scheme):
            runs_on = ", ".join("llama.cpp" if e == "llamacpp" else e for e in scheme.engines) or "no engine"
            out.append((("quant",), f"'{spec.quant}' does not run on {spec.engine} (it runs on {runs_on})"))
    if spec.engine == "llama.cpp" and spec.nodes > 1:
        out.append((("nodes",), f"llama-server serves from one host; nodes must be 1 for llama.cpp, got {spec.nodes}"))
    if spec.serving.cpu_mem_gb is not None and spec.engine != "llama.cpp":
        out.append((("serving", "cpu_mem_gb"), "expert offload to CPU RAM is planned for llama.cpp only"))
    if spec.serving.cpu_bw is not None and spec.serving.cpu_mem_gb is None:
        out.append((("serving", "cpu_bw"), "cpu_bw is the offload RAM bandwidth: set serving.cpu_mem_gb with it"))
    if spec.serving.redundant_experts and spec.engine == "llama.cpp":
        out.append((("serving", "redundant_experts"), "llama.cpp has no expert parallelism to balance; "
                                                      "redundant experts are for vllm or sglang"))
    prompt = spec.targets.prompt_tokens
    if prompt is not None and prompt > spec.serving.context:
        out.append((("targets", "prompt_tokens"), f"prompt_tokens ({prompt}) exceeds serving.context "
                                                  f"({spec.serving.context})"))
    gpus, _ = parse_gpus(spec.gpus, spec.nodes)
    if spec.engine != "llama.cpp" and any(g.unified_memory for g in gpus):
        out.append((("gpus",), f"{spec.engine} does not run on Apple GPUs; use engine llama.cpp"))
    return out


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------


class Finding(BaseModel):
    model_config = ConfigDict(frozen=True)
    target: str  # a targets key, or "fits" / "serving.context"
    predicted: float | None
    limit: float | None
    gap: float | None  # predicted - limit, in the target's unit
    unit: str
    passed: bool
    message: str
    line: int | None = None  # the target's line in the spec file


class CheckResult(BaseModel):
    """`model_dump()` is exactly one entry of `moeplan check --format json`."""

    model_config = ConfigDict(frozen=True)
    path: str | None
    name: str
    model: str
    engine: str
    gpus: str
    nodes: int
    fits: bool | Literal["offload"]  # "offload": it runs with experts in host memory (as fit's JSON says)
    plan: Plan | None
    findings: list[Finding]
    passed: bool
    command: str | None
    command_notes: list[str] = []
    notes: list[str] = []
    errors: list[SpecProblem] = []  # the spec is invalid (exit 2)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def exit_code(self) -> int:
        return 2 if self.errors else 0 if self.passed else 1


class _Choice(BaseModel):
    plan: Plan | None
    closest: Plan | None
    notes: list[str]


def _price_text(value: float | dict[str, float]) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def default_ranker(spec: DeploySpec, routing: Routing | None = None) -> Ranker:
    """moeplan.perf's speed at the spec's prompt length, node count and routing, with cost when priced."""
    from moeplan.perf import ranker

    price = parse_price(_price_text(spec.price)) if spec.price is not None else None
    return ranker(nodes=spec.nodes, prompt=spec.targets.prompt_tokens, price=price, routing=routing)


def engine_runs(engine: str, plan: Plan) -> bool:
    """Can the engine realise this layout? llama.cpp splits whole layers over GPUs (its default
    --split-mode layer), so only pipeline-style plans, and it alone offloads experts to CPU RAM;
    vLLM and SGLang run every GPU layout moeplan plans."""
    if plan.offload is not None:
        return engine == "llama.cpp"  # --n-cpu-moe is llama.cpp's
    if engine == "llama.cpp":
        return plan.tp == 1 and plan.ep == 1 and not plan.dp_attention
    return True


def engine_candidates(engine: str, model: ModelSpec, quant: str | None, kv_dtype: str) -> list[QuantScheme]:
    """fit's quantization order, less what the engine cannot load or pair with this KV dtype."""
    return [s for s in quant_candidates(model, quant) if kv_dtype_usable(kv_dtype, s) and engine_accepts(engine, s)]


def _scenario(spec: DeploySpec) -> Scenario:
    s = spec.serving
    return Scenario(context=s.context, batch=s.batch, kv_dtype=s.kv_dtype, mem_fraction=s.mem_fraction,
                    redundant_experts=s.redundant_experts, capacity_factor=s.capacity_factor)


def spec_routing(spec: DeploySpec, model: ModelSpec) -> Routing | None:
    """serving.routing against the model's experts; a relative file is read beside the spec."""
    text = spec.serving.routing
    if text is None:
        return None
    from moeplan.routing import parse_routing

    field, line = "serving.routing", spec.line_of("serving.routing")
    if not model.is_moe:
        raise SpecError(spec.path, [SpecProblem(field=field, line=line, message=f"{model.name} has no experts to "
                                                                                "route to")])
    name = text.strip()
    if spec.path and not name.lower().startswith(("uniform", "zipf:")) and not Path(name).is_absolute():
        name = str(Path(spec.path).parent / name)
    try:
        return parse_routing(name, model.num_experts, model.num_moe_layers)
    except MoeplanError as exc:
        raise SpecError(spec.path, [SpecProblem(field=field, line=line, message=str(exc))]) from None


def _expert_options(spec: DeploySpec, model: ModelSpec) -> None:
    try:
        check_expert_options(model, spec.serving.redundant_experts, spec.serving.capacity_factor)
    except MoeplanError as exc:
        field = "serving.redundant_experts" if "redundant" in str(exc) else "serving.capacity_factor"
        raise SpecError(spec.path, [SpecProblem(field=field, line=spec.line_of(field), message=str(exc))]) from None


def _engine_plan(
    engine: str, fr: FitResult, model: ModelSpec, scheme: QuantScheme, gpus: tuple[Gpu, ...], nodes: int,
    sc: Scenario, rank: Ranker | None, request: LayoutRequest | None = None,
) -> Plan | None:
    """The best fitting plan the engine can run. fit's shortlist is ordered best first; when none of
    it suits the engine (llama.cpp beside a tensor-parallel winner), look at every layout."""
    for plan in fr.plans:
        if plan.fits and plan.quant == scheme.name and engine_runs(engine, plan):
            return plan
    if not fr.fits:
        return None
    every = [p for p in plans_for_quant(model, scheme, gpus, nodes, sc, request) if p.fits and engine_runs(engine, p)]
    if rank is not None:
        every = [rank(model, scheme, p, gpus, sc) for p in every]
    return min(every, key=scorer("latency" if sc.batch == 1 else "throughput"), default=None)  # fit's order


def choose_plan(spec: DeploySpec, model: ModelSpec, gpus: tuple[Gpu, ...], nodes: int, rank: Ranker | None) -> _Choice:
    """The highest-precision quantization the engine runs that fits, in its best layout the engine runs."""
    sc = _scenario(spec)
    schemes = engine_candidates(spec.engine, model, spec.quant, spec.serving.kv_dtype)
    if not schemes:
        raise SpecError(spec.path, [SpecProblem(field="quant", line=spec.line_of("quant"),
                                                message=f"no quantization of {model.name} runs on {spec.engine} "
                                                        f"with a {spec.serving.kv_dtype} KV cache")])
    notes: list[str] = []
    misses: list[Plan] = []
    request = LayoutRequest(**spec.layout.model_dump()) if spec.layout is not None else None
    if request is not None:
        try:
            check_request(model, gpus, nodes, request)
        except MoeplanError as exc:
            raise SpecError(spec.path, [SpecProblem(field="layout", line=spec.line_of("layout"), message=str(exc))])
        schemes = [s for s in schemes if core_engine_runs(s, check_request(model, gpus, nodes, request))]
        if not schemes:
            raise SpecError(spec.path, [SpecProblem(field="layout", line=spec.line_of("layout"), message=(
                f"{spec.engine} runs no quantization of {model.name} in {request.label}"))])
    for scheme in schemes:
        fr = fit(model, gpus, nodes=nodes, context=sc.context, batch=sc.batch, quant=scheme.name, kv_dtype=sc.kv_dtype,
                 mem_fraction=sc.mem_fraction, rank=rank, gpus_label=spec.gpus, layout=request,
                 redundant_experts=sc.redundant_experts, capacity_factor=sc.capacity_factor)  # fmt: skip
        notes = [n for n in fr.notes if "--cpu-mem" not in n]
        plan = _engine_plan(spec.engine, fr, model, scheme, gpus, nodes, sc, rank, request)
        if plan is not None:
            return _Choice(plan=plan, closest=None, notes=notes)
        if fr.fits:
            notes.append(f"{scheme.name} fits only in layouts {spec.engine} does not run "
                         f"({', '.join(p.layout for p in fr.plans if p.fits)})")
        misses += [p for p in fr.plans if not p.fits]
    if spec.engine == "llama.cpp" and spec.serving.cpu_mem_gb:
        options = None
        if spec.serving.cpu_bw is not None:
            from moeplan.offload import ram_bandwidth

            options = OffloadOptions(host_gb_per_s=ram_bandwidth(spec.serving.cpu_bw))
        offload = plan_offload(model, gpus, sc, int(spec.serving.cpu_mem_gb * 1e9), spec.quant, options=options)
        if offload is not None:
            if rank is not None:
                offload = rank(model, get_scheme(offload.quant).for_model(model), offload, gpus, sc)
            return _Choice(plan=offload, closest=None, notes=notes)
    elif spec.engine == "llama.cpp" and model.is_moe:
        notes.append("nothing fits on the GPUs: set serving.cpu_mem_gb (host RAM) for an expert-offload plan")
    closest = min(misses, key=lambda p: p.overflow_bytes, default=None)
    return _Choice(plan=None, closest=closest, notes=notes)


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:,.2f}"
    return f"{x:.3g}"


# target -> (at least / at most, unit, how to read the prediction off a plan)
_TARGETS: dict[str, tuple[Literal["min", "max"], str, Callable[[Plan], float | None]]] = {
    "min_decode_tok_per_s": ("min", "tok/s per sequence", lambda p: p.speed.decode_tok_per_s if p.speed else None),
    "min_total_tok_per_s": ("min", "tok/s total", lambda p: p.speed.decode_tok_per_s_total if p.speed else None),
    "max_ttft_s": ("max", "s", lambda p: p.speed.ttft_s if p.speed else None),
    "max_tpot_s": ("max", "s", lambda p: p.speed.tpot_s if p.speed else None),
    "min_free_gib_per_gpu": ("min", "GiB", lambda p: min(r.free_bytes for r in p.per_gpu) / GiB),
    "max_usd_per_million_output_tokens": ("max", "USD per million output tokens",
                                          lambda p: p.speed.usd_per_million_output_tokens if p.speed else None),
}


def target_finding(target: str, plan: Plan, limit: float, line: int | None) -> Finding:
    kind, unit, read = _TARGETS[target]
    predicted = read(plan)
    if predicted is None:
        return Finding(target=target, predicted=None, limit=limit, gap=None, unit=unit, passed=False, line=line,
                       message=f"{target}: not predicted (no speed model: moeplan.perf is missing)")
    gap = predicted - limit
    passed = gap >= 0 if kind == "min" else gap <= 0
    if passed:
        verdict = "meets it"
    else:
        verdict = f"{'short' if kind == 'min' else 'over'} by {_num(abs(gap))} {unit}"
        verdict += f" ({abs(gap) / limit:.0%})" if limit else ""
    return Finding(target=target, predicted=predicted, limit=limit, gap=gap, unit=unit, passed=passed, line=line,
                   message=f"{target}: predicted {_num(predicted)} {unit}, "
                           f"{'at least' if kind == 'min' else 'at most'} {limit:g}: {verdict}")


def fit_finding(plan: Plan | None, closest: Plan | None, line: int | None) -> Finding:
    """Does it fit: the fullest GPU's use against its budget (GiB)."""
    shown = plan or closest
    if shown is None:
        return Finding(target="fits", predicted=None, limit=None, gap=None, unit="GiB", passed=False, line=line,
                       message="does not fit: no layout of these GPUs holds the model")
    worst = min(shown.per_gpu, key=lambda r: r.free_bytes)
    used, budget = worst.used_bytes / GiB, worst.budget_bytes / GiB
    if plan is not None:
        msg = (f"fits: {plan.quant}, {plan.layout}; fullest GPU uses {_num(used)} of {_num(budget)} GiB"
               + (f", experts of {plan.offload.cpu_moe_layers} layers in CPU RAM" if plan.offload else ""))
    else:
        msg = f"does not fit: best try {shown.quant}, {shown.layout}: {shown.overflow}"
    return Finding(target="fits", predicted=used, limit=budget, gap=used - budget, unit="GiB", passed=plan is not None,
                   line=line, message=msg)


def findings(spec: DeploySpec, choice: _Choice) -> list[Finding]:
    out = [fit_finding(choice.plan, choice.closest, spec.line_of("gpus"))]
    plan = choice.plan
    if plan is None:
        return out
    if plan.max_context < spec.serving.context:
        out.append(Finding(target="serving.context", predicted=plan.max_context, limit=spec.serving.context,
                           gap=plan.max_context - spec.serving.context, unit="tokens", passed=False,
                           line=spec.line_of("serving.context"),
                           message=f"serving.context: at most {plan.max_context:,} tokens per sequence "
                                   f"(the model's limit or memory), {spec.serving.context:,} asked"))
    for target, limit in spec.targets.model_dump(exclude={"prompt_tokens"}).items():
        if limit is not None:
            out.append(target_finding(target, plan, limit, spec.line_of(f"targets.{target}")))
    return out


def _verdict(plan: Plan | None) -> bool | Literal["offload"]:
    if plan is None:
        return False
    return "offload" if plan.offload is not None else True


def check(spec: DeploySpec, *, rank: Ranker | None = None) -> CheckResult:
    """Plan the spec and compare every target with its prediction. `rank` defaults to moeplan.perf."""
    problems = engine_problems(spec)
    if problems:
        raise SpecError(spec.path, [SpecProblem(field=dotted(loc), line=_line(spec._lines, loc), message=m)
                                    for loc, m in problems])  # fmt: skip
    model = resolve(spec.model)
    gpus, nodes = parse_gpus(spec.gpus, spec.nodes)
    routing = spec_routing(spec, model)
    _expert_options(spec, model)
    choice = choose_plan(spec, model, gpus, nodes, rank if rank is not None else default_ranker(spec, routing))
    found = findings(spec, choice)
    run = None
    if choice.plan is not None:
        run = launch(spec.engine, model, choice.plan, spec.serving, nodes=nodes, model_name=_model_name(spec, model))
    return CheckResult(
        path=spec.path, name=spec.name or (Path(spec.path).stem if spec.path else model.name), model=spec.model,
        engine=spec.engine, gpus=spec.gpus, nodes=nodes, fits=_verdict(choice.plan), plan=choice.plan,
        findings=found, passed=all(f.passed for f in found), command=run.command if run else None,
        command_notes=run.notes if run else [], notes=choice.notes,
    )  # fmt: skip


# Which field to blame when the core raises on a spec that validated.
_BLAME: dict[type[MoeplanError], str] = {
    UnknownModelError: "model", ConfigError: "model", HubError: "model", GpuSpecError: "gpus", QuantError: "quant",
}  # fmt: skip


def check_path(path: str | Path, *, rank: Ranker | None = None) -> CheckResult:
    """load_spec + check; an invalid spec becomes a result with `errors` (exit code 2), not a raise."""
    spec: DeploySpec | None = None
    try:
        spec = load_spec(path)
        return check(spec, rank=rank)
    except SpecError as exc:
        errors = exc.problems
    except MoeplanError as exc:
        field = next((f for kind, f in _BLAME.items() if isinstance(exc, kind)), "")
        errors = [SpecProblem(field=field, line=spec.line_of(field) if spec else None, message=str(exc))]
    return CheckResult(
        path=str(path), name=(spec.name if spec and spec.name else Path(path).stem),
        model=spec.model if spec else "", engine=spec.engine if spec else "", gpus=spec.gpus if spec else "",
        nodes=spec.nodes if spec else 1, fits=False, plan=None, findings=[], passed=False, command=None, errors=errors,
    )  # fmt: skip


def check_paths(paths: Iterable[str | Path], *, rank: Ranker | None = None) -> list[CheckResult]:
    return [check_path(p, rank=rank) for p in paths]


def exit_code(results: list[CheckResult]) -> int:
    """The worst of them: 2 if any spec is invalid, else 1 if any misses, else 0."""
    return max((r.exit_code for r in results), default=0)


# ---------------------------------------------------------------------------------------------
# Launch commands
# ---------------------------------------------------------------------------------------------


class Launch(BaseModel):
    model_config = ConfigDict(frozen=True)
    engine: str
    env: dict[str, str]
    argv: list[str]
    notes: list[str]

    @property
    def command(self) -> str:
        return " ".join([*(f"{k}={v}" for k, v in self.env.items()), *(_quote(t) for t in self.argv)])


def _quote(token: str) -> str:
    # ${HEAD_IP} is a placeholder the shell should expand; everything else is quoted as needed.
    return token if token.startswith("${") else shlex.quote(token)


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
        argv += ["--nnodes", str(nodes), "--node-rank", "0", "--dist-init-addr", "${HEAD_IP}:50000"]
        notes.append(f"run the same command on each of the {nodes} nodes with --node-rank 0..{nodes - 1}; "
                     "HEAD_IP is the address of node 0")
    if plan.dp_attention:
        notes.append("SGLang 0.5.23 deprecates --enable-dp-attention --dp-size N for --attn-dp-size N "
                     "(still accepted until 2026-12-31)")
    return Launch(engine="sglang", env=_pp_env("sglang", plan), argv=argv, notes=notes)


def gguf_file(model: ModelSpec, name: str, quant: str) -> str:
    stem = name.rstrip("/").split("/")[-1] if "/" in name else (model.hub_id or name).split("/")[-1]
    return f"{stem}-{quant.upper()}.gguf"


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
    notes = [f"-m takes a local GGUF file: download or convert {name} at {plan.quant.upper()} "
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


def emit_for_fit(
    engine: str, model: ModelSpec, res: FitResult, gpus: tuple[Gpu, ...] | None = None, rank: Ranker | None = None
) -> str | None:
    """`moeplan fit --emit ENGINE`: the command for the best plan the engine can run, notes as
    trailing shell comments; None when nothing fits. Given the GPUs, a fitting quantization whose
    shortlisted layouts the engine cannot run (llama.cpp beside a tensor-parallel winner) is
    re-planned over every layout."""
    eng = engine_name(engine)
    serving = Serving(context=res.context, batch=res.batch, kv_dtype=res.kv_dtype, mem_fraction=res.mem_fraction)
    candidates = [p for p in ([res.best] if res.best else []) + res.plans if p.fits or p.offload]
    if not candidates:
        return None
    plan = next((p for p in candidates if engine_runs(eng, p) and engine_accepts(eng, get_scheme(p.quant))), None)
    loads = [v.quant for v in res.verdicts if v.fits and engine_accepts(eng, get_scheme(v.quant))]
    if plan is None and gpus is not None:
        sc = Scenario(context=res.context, batch=res.batch, kv_dtype=res.kv_dtype, mem_fraction=res.mem_fraction)
        for name in loads:
            plan = _engine_plan(eng, res, model, get_scheme(name).for_model(model), gpus, res.nodes, sc, rank)
            if plan is not None:
                break
    if plan is None:
        shown = ", ".join(dict.fromkeys(f"{p.quant} {p.layout}" for p in candidates[:4]))
        hint = f"rerun with --quant {loads[0]}" if loads else f"give --quant a format {eng} loads"
        raise MoeplanError(f"no plan in the shortlist runs on {eng} (fitting: {shown}); {hint}")
    run = launch(eng, model, plan, serving, nodes=res.nodes)
    notes = list(run.notes)
    if res.best is not None and plan is not res.best:
        notes.insert(0, f"{eng} runs {plan.quant} {plan.layout}, not the best plan overall "
                        f"({res.best.quant} {res.best.layout})")
    return "\n".join([run.command, *(f"# {n}" for n in notes)])


# ---------------------------------------------------------------------------------------------
# Output: rows for the CLI's table, Markdown for a PR comment, GitHub workflow annotations
# ---------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ("result", "spec", "model", "engine", "gpus", "plan", "decode tok/s", "total tok/s", "TTFT s",
                   "TPOT s", "free GiB", "reason")  # fmt: skip


def _result_word(r: CheckResult) -> str:
    return {0: "pass", 1: "fail", 2: "invalid"}[r.exit_code]


def _reason(r: CheckResult) -> str:
    """Short, for a table cell: which fields or targets; detail_lines has the full messages."""
    if r.errors:
        return "invalid: " + ", ".join((p.field or "file") + (f" (line {p.line})" if p.line else "") for p in r.errors)
    missed = ["does not fit" if f.target == "fits" else f.target for f in r.findings if not f.passed]
    return "missed: " + ", ".join(missed) if missed else "all targets met"


def detail_lines(r: CheckResult) -> list[str]:
    """Every problem and missed target in full, one line each, for under the CLI's table."""
    lines = [f"{r.path or r.name}:{p.line or ''} {p.field + ': ' if p.field else ''}{p.message}" for p in r.errors]
    lines += [f"{r.path or r.name}:{f.line or ''} {f.message}" for f in r.findings if not f.passed]
    return lines


def summary_rows(results: list[CheckResult]) -> list[dict[str, str]]:
    """One plain row per spec, keyed by SUMMARY_COLUMNS (the CLI renders them with rich)."""
    rows = []
    for r in results:
        sp = r.plan.speed if r.plan else None
        free = min(g.free_bytes for g in r.plan.per_gpu) / GiB if r.plan else None
        rows.append({
            "result": _result_word(r), "spec": r.path or r.name, "model": r.model, "engine": r.engine,
            "gpus": r.gpus if r.nodes == 1 else f"{r.nodes} x ({r.gpus})",
            "plan": f"{r.plan.quant} {r.plan.layout}" if r.plan else "-",
            "decode tok/s": _num(sp.decode_tok_per_s) if sp else "-",
            "total tok/s": _num(sp.decode_tok_per_s_total) if sp else "-",
            "TTFT s": _num(sp.ttft_s) if sp else "-", "TPOT s": _num(sp.tpot_s) if sp else "-",
            "free GiB": _num(free) if free is not None else "-", "reason": _reason(r),
        })  # fmt: skip
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


_MARK = {"pass": "✅ pass", "fail": "❌ fail", "invalid": "⚠️ invalid"}


def render_markdown(results: list[CheckResult]) -> str:
    """A summary table and, per spec, its findings and launch command: fit for a PR comment."""
    words = [_result_word(r) for r in results]
    counts = ", ".join(f"{words.count(w)} {w}" for w in ("pass", "fail", "invalid") if words.count(w))
    cols = [c for c in SUMMARY_COLUMNS if c != "reason"]
    out = [f"## moeplan check: {counts or 'no specs'}", "", "| " + " | ".join(cols) + " |",
           "|" + "---|" * len(cols)]  # fmt: skip
    for row in summary_rows(results):
        row = {**row, "result": _MARK[row["result"]], "spec": f"`{row['spec']}`"}
        out.append("| " + " | ".join(_cell(row[c]) for c in cols) + " |")
    for r in results:
        out += ["", f"### {_MARK[_result_word(r)]}: `{r.path or r.name}`", ""]
        for p in r.errors:
            out.append(f"- {'line ' + str(p.line) + ': ' if p.line else ''}`{p.field or 'file'}`: {p.message}")
        for f in r.findings:
            out.append(f"- {'✅' if f.passed else '❌'} {f.message}")
        out += [f"- note: {n}" for n in r.notes]
        if r.command:
            out += ["", "<details><summary>launch command</summary>", "", "```bash", r.command, "```"]
            out += [f"- {n}" for n in r.command_notes]
            out += ["", "</details>"]
    return "\n".join(out) + "\n"


def _escape_data(text: str) -> str:
    # GitHub workflow commands: %, CR and LF are escaped in the message (actions/toolkit command.ts).
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _annotation(level: str, path: str | None, line: int | None, title: str, message: str) -> str:
    props = [f"file={_escape_property(path)}"] if path else []
    if path:
        props.append(f"line={line or 1}")
    props.append(f"title={_escape_property(title)}")
    return f"::{level} {','.join(props)}::{_escape_data(message)}"


def render_github(results: list[CheckResult]) -> str:
    """Workflow annotations: ::error on the line of each bad field, missed target or overflow;
    ::notice for each spec that passes."""
    lines = []
    for r in results:
        for p in r.errors:
            lines.append(_annotation("error", r.path, p.line, f"moeplan: invalid {p.field or 'spec'}", p.message))
        for f in r.findings:
            if not f.passed:
                lines.append(_annotation("error", r.path, f.line, f"moeplan: {f.target}", f.message))
        if r.exit_code == 0:
            plan = f"{r.plan.quant} {r.plan.layout}" if r.plan else ""
            lines.append(_annotation("notice", r.path, 1, f"moeplan: {r.name} passes",
                                     f"{r.model} on {r.gpus} ({r.engine}, {plan}): all targets met"))
    return "\n".join(lines) + ("\n" if lines else "")


__all__ = [
    "DeploySpec", "Serving", "Targets", "SpecError", "SpecProblem", "Finding", "CheckResult", "Launch",
    "ENGINE_FLAGS", "ENGINE_ENV", "ENGINE_PROGRAM", "KV_CACHE_TYPES", "KV_CACHE_CHOICES", "schema", "load_spec",
    "check", "check_path", "check_paths", "exit_code", "launch", "emit", "emit_for_fit", "summary_rows", "detail_lines",
    "render_markdown", "render_github", "SUMMARY_COLUMNS",
]  # fmt: skip
