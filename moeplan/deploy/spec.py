"""The deployment spec: its schema, and reading it with a line number for every problem."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, PrivateAttr, ValidationError, field_validator, model_validator

from moeplan.errors import MoeplanError
from moeplan.hardware import parse_gpus
from moeplan.memory import MAX_CONTEXT
from moeplan.cost import parse_price
from moeplan.quant import get_scheme, kv_dtype_bytes
from moeplan.safeio import ReadError, compose_yaml, construct_yaml, read_text
from moeplan.deploy.engines import KV_CACHE_TYPES, MAX_BATCH, engine_accepts

GiB = 2**30
Engine = Literal["vllm", "sglang", "llama.cpp"]
Loc = tuple[str | int, ...]

# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored default. No .inf or .nan: a
    # target of "at most infinity" would pass whatever the plan. strict: "8192" is not 8192 and "yes"
    # is not true (YAML's own 8192 and true are).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


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

    @model_validator(mode="before")
    @classmethod
    def _llamacpp_names(cls, data: Any) -> Any:
        """`llamacpp` as --emit spells it; MXFP4 experts as llama.cpp loads them (GGUF MXFP4_MOE)."""
        if isinstance(data, dict) and data.get("engine") in ("llamacpp", "llama.cpp"):
            data = {**data, "engine": "llama.cpp"}
            if isinstance(data.get("quant"), str) and data["quant"].strip().lower() == "mxfp4":
                data["quant"] = "mxfp4_moe"
        return data

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
    model_config = ConfigDict(frozen=True, defer_build=True)
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
        text = read_text(path, what="spec")  # regular file, size cap, UTF-8
        node = compose_yaml(text, str(path))  # aliases and depth bounded before anything is built
        data = construct_yaml(node, str(path))
    except ReadError as exc:
        message = str(exc).removeprefix(f"{path}: ")
        raise SpecError(str(path), [SpecProblem(field="", line=None, message=message)]) from None
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
    got = repr(err["input"])
    if len(got) > 200:  # a value megabytes long is named by its start, not echoed whole
        got = got[:200] + f"... ({len(got):,} characters)"
    return f"{err['msg']} (got {got})"


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
    lay = spec.layout
    if spec.engine == "llama.cpp" and lay is not None and ((lay.tp or 1) > 1 or (lay.ep or 1) > 1 or lay.dp_attention):
        out.append((("layout",), "llama.cpp splits whole layers, one GPU per stage: use layout {pp: N}, or engine "
                                 "vllm / sglang for tensor or expert parallelism"))
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


def _price_text(value: float | dict[str, float]) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)
