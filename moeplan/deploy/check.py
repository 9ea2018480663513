"""Checking a spec: plan it with `fit` and the speed model, compare each target with its prediction.

Exit codes follow the CLI's: 0 passes, 1 does not fit or misses a target, 2 the spec is invalid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, computed_field

from moeplan.errors import (
    ConfigError, GpuSpecError, HubError, MoeplanError, QuantError, RedundantExpertsError, UnknownModelError,
)
from moeplan.hardware import Gpu, parse_gpus
from moeplan.layout import Scenario
from moeplan.cost import parse_price
from moeplan.plan import (
    FitResult, LayoutRequest, OffloadOptions, Plan, check_expert_options, check_request, fit, plan_offload,
    plans_for_quant, quant_candidates, scorer,
)
from moeplan.plan import engine_runs as core_engine_runs
from moeplan.quant import QuantScheme, get_scheme, kv_dtype_usable
from moeplan.routing import Routing
from moeplan.sources import resolve
from moeplan.spec import ModelSpec
from moeplan.escape import printable
from moeplan.deploy.engines import _model_name, engine_accepts, engine_name, engine_runs, launch
from moeplan.deploy.spec import (
    DeploySpec, Serving, SpecError, SpecProblem, _line, _price_text, dotted, engine_problems, load_spec,
)  # fmt: skip

GiB = 2**30
Ranker = Callable[[ModelSpec, QuantScheme, Plan, tuple[Gpu, ...], Scenario], Plan]

# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------


class Finding(BaseModel):
    model_config = ConfigDict(frozen=True, defer_build=True)
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

    model_config = ConfigDict(frozen=True, defer_build=True)
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
    # With a price and targets: the cheapest quantization and layout the engine runs on these GPUs that
    # meets every target (None: none does, or nothing to search).
    cheapest_meeting_targets: Cheapest | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def exit_code(self) -> int:
        return 2 if self.errors else 0 if self.passed else 1


class _Choice(BaseModel):
    plan: Plan | None
    closest: Plan | None
    notes: list[str]


class Cheapest(BaseModel):
    """The cheapest configuration of the spec's GPUs and engine that meets every target (priced specs)."""

    model_config = ConfigDict(frozen=True, defer_build=True)
    quant: str
    layout: str
    usd_per_million_output_tokens: float
    usd_per_million_input_tokens: float | None = None


def default_ranker(spec: DeploySpec, routing: Routing | None = None) -> Ranker:
    """moeplan.perf's speed at the spec's prompt length, node count and routing, with cost when priced."""
    from moeplan.perf import ranker

    price = parse_price(_price_text(spec.price)) if spec.price is not None else None
    return ranker(nodes=spec.nodes, prompt=spec.targets.prompt_tokens, price=price, routing=routing)


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


def _expert_options(spec: DeploySpec, model: ModelSpec, gpus: tuple[Gpu, ...]) -> None:
    try:
        check_expert_options(model, spec.serving.redundant_experts, spec.serving.capacity_factor, gpus, spec.quant)
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


_Fits = dict[str, "FitResult | RedundantExpertsError"]


def _layout_request(spec: DeploySpec) -> LayoutRequest | None:
    return LayoutRequest(**spec.layout.model_dump()) if spec.layout is not None else None


def _fit_at(spec: DeploySpec, model: ModelSpec, gpus: tuple[Gpu, ...], nodes: int, scheme: QuantScheme,
            rank: Ranker | None, memo: _Fits) -> FitResult:
    """fit at one quantization with the spec's serving, layout and expert options. Memoised per check:
    choose_plan and the cheapest-configuration search ask for the same ones. RedundantExpertsError:
    the replicas do not fit beside the model at this precision."""
    if scheme.name not in memo:
        sc = _scenario(spec)
        try:
            memo[scheme.name] = fit(
                model, gpus, nodes=nodes, context=sc.context, batch=sc.batch, quant=scheme.name, kv_dtype=sc.kv_dtype,
                mem_fraction=sc.mem_fraction, rank=rank, gpus_label=spec.gpus, layout=_layout_request(spec),
                redundant_experts=sc.redundant_experts, capacity_factor=sc.capacity_factor)  # fmt: skip
        except RedundantExpertsError as exc:
            memo[scheme.name] = exc
    got = memo[scheme.name]
    if isinstance(got, RedundantExpertsError):
        raise got
    return got


def choose_plan(spec: DeploySpec, model: ModelSpec, gpus: tuple[Gpu, ...], nodes: int, rank: Ranker | None,
                memo: _Fits | None = None) -> _Choice:
    """The highest-precision quantization the engine runs that fits, in its best layout the engine runs."""
    sc = _scenario(spec)
    schemes = engine_candidates(spec.engine, model, spec.quant, spec.serving.kv_dtype)
    if not schemes:
        raise SpecError(spec.path, [SpecProblem(field="quant", line=spec.line_of("quant"),
                                                message=f"no quantization of {model.name} runs on {spec.engine} "
                                                        f"with a {spec.serving.kv_dtype} KV cache")])
    notes: list[str] = []
    misses: list[Plan] = []
    memo = {} if memo is None else memo
    request = _layout_request(spec)
    if request is not None:
        try:
            check_request(model, gpus, nodes, request)
        except MoeplanError as exc:
            raise SpecError(spec.path, [SpecProblem(field="layout", line=spec.line_of("layout"), message=str(exc))])
        schemes = [s for s in schemes if core_engine_runs(s, check_request(model, gpus, nodes, request))]
        if not schemes:
            raise SpecError(spec.path, [SpecProblem(field="layout", line=spec.line_of("layout"), message=(
                f"{spec.engine} runs no quantization of {model.name} in {request.label}"))])
    too_many: RedundantExpertsError | None = None
    for scheme in schemes:
        try:
            fr = _fit_at(spec, model, gpus, nodes, scheme, rank, memo)
        except RedundantExpertsError as exc:  # at this precision; a smaller one may hold the replicas
            too_many = too_many or exc
            continue
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
    if too_many is not None:  # no precision holds the replicas beside the model
        raise too_many
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


def cheapest_meeting_targets(spec: DeploySpec, model: ModelSpec, gpus: tuple[Gpu, ...], nodes: int,
                             rank: Ranker, memo: _Fits | None = None) -> Plan | None:
    """Among every quantization the engine runs and the layouts fit shortlists for it (the forced
    layout only, when the spec sets one), the plan with the lowest USD per million output tokens at
    the serving batch whose findings all pass."""
    memo = {} if memo is None else memo
    best: Plan | None = None
    for scheme in engine_candidates(spec.engine, model, spec.quant, spec.serving.kv_dtype):
        try:
            fr = _fit_at(spec, model, gpus, nodes, scheme, rank, memo)
        except RedundantExpertsError:  # the replicas do not fit at this precision
            continue
        for plan in fr.plans:
            usd = plan.speed.usd_per_million_output_tokens if plan.speed else None
            if not plan.fits or usd is None or not engine_runs(spec.engine, plan):
                continue
            if all(f.passed for f in findings(spec, _Choice(plan=plan, closest=None, notes=[]))) and (
                    best is None or usd < (best.speed.usd_per_million_output_tokens or 0.0)):  # type: ignore[union-attr]
                best = plan
    return best


def _cheapest(spec: DeploySpec, model: ModelSpec, gpus: tuple[Gpu, ...], nodes: int, rank: Ranker,
              chosen: Plan | None, passed: bool, memo: _Fits) -> tuple[Cheapest | None, list[str]]:
    targets = {k: v for k, v in spec.targets.model_dump(exclude={"prompt_tokens"}).items() if v is not None}
    if spec.price is None or not targets:
        return None, []
    plan = cheapest_meeting_targets(spec, model, gpus, nodes, rank, memo)
    # The plan checked counts too: an offload plan, or one fit found only over every layout.
    mine = chosen.speed.usd_per_million_output_tokens if passed and chosen and chosen.speed else None
    if mine is not None and (plan is None or plan.speed is None or plan.speed.usd_per_million_output_tokens is None
                             or mine <= plan.speed.usd_per_million_output_tokens):
        plan = chosen
    if plan is None or plan.speed is None or plan.speed.usd_per_million_output_tokens is None:
        return None, [f"no quantization and layout {spec.engine} runs on {spec.gpus} meets every target"]
    sp = plan.speed
    found = Cheapest(quant=plan.quant, layout=plan.layout, usd_per_million_output_tokens=sp.usd_per_million_output_tokens,
                     usd_per_million_input_tokens=sp.usd_per_million_input_tokens)
    same = chosen is not None and passed and (chosen.quant, chosen.layout) == (plan.quant, plan.layout)
    note = (f"cheapest configuration that meets every target: {plan.quant} {plan.layout} at "
            f"{sp.usd_per_million_output_tokens:,.3f} USD per million output tokens at batch {spec.serving.batch:,}"
            + (" (the one checked)" if same else ""))
    return found, [note]


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
    _expert_options(spec, model, gpus)
    ranker = rank if rank is not None else default_ranker(spec, routing)
    memo: _Fits = {}  # the fits choose_plan makes, for the cheapest-configuration search to reuse
    choice = choose_plan(spec, model, gpus, nodes, ranker, memo)
    found = findings(spec, choice)
    cheapest, cheap_notes = _cheapest(spec, model, gpus, nodes, ranker, choice.plan, all(f.passed for f in found),
                                      memo)
    run = None
    if choice.plan is not None:
        run = launch(spec.engine, model, choice.plan, spec.serving, nodes=nodes, model_name=_model_name(spec, model))
    return CheckResult(
        path=spec.path, name=spec.name or (Path(spec.path).stem if spec.path else model.name), model=spec.model,
        engine=spec.engine, gpus=spec.gpus, nodes=nodes, fits=_verdict(choice.plan), plan=choice.plan,
        findings=found, passed=all(f.passed for f in found), command=run.command if run else None,
        command_notes=run.notes if run else [], notes=[*choice.notes, *cheap_notes],
        cheapest_meeting_targets=cheapest,
    )  # fmt: skip


# Which field to blame when the core raises on a spec that validated.
_BLAME: dict[type[MoeplanError], str] = {
    UnknownModelError: "model", ConfigError: "model", HubError: "model", GpuSpecError: "gpus", QuantError: "quant",
    RedundantExpertsError: "serving.redundant_experts",
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


def emit_for_fit(
    engine: str, model: ModelSpec, res: FitResult, gpus: tuple[Gpu, ...] | None = None, rank: Ranker | None = None
) -> str | None:
    """`moeplan fit --emit ENGINE`: the command for the best plan the engine can run, notes as
    trailing shell comments; None when nothing fits. Given the GPUs, a fitting quantization whose
    shortlisted layouts the engine cannot run (llama.cpp beside a tensor-parallel winner) is
    re-planned over every layout."""
    eng = engine_name(engine)
    # What `check` refuses in a spec, --emit refuses too: an engine on hardware or hosts it cannot run.
    if eng != "llama.cpp" and gpus is not None and any(g.unified_memory for g in gpus):
        raise MoeplanError(f"{eng} does not run on Apple GPUs; use --emit llamacpp")
    if eng == "llama.cpp" and res.nodes > 1:
        raise MoeplanError(f"llama-server serves from one host; --nodes {res.nodes} needs vllm or sglang")
    if eng == "llama.cpp" and res.best is not None and res.best.offload is None and (
            res.best.tp > 1 or res.best.ep > 1) and all(p.tp > 1 or p.ep > 1 for p in res.plans if p.fits):
        raise MoeplanError("llama.cpp splits whole layers (one GPU per stage): the forced layout "
                           f"{res.best.layout} is not one it runs; drop --tp/--ep or use --pp")
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
    if serving.batch == 1:
        notes.insert(0, "warning: this server takes one request at a time (planned for --batch 1); plan with "
                        "--batch N for N concurrent users")
    # Notes quote user text (model names): printable, so none can end the comment and start a command.
    return "\n".join([run.command, *(f"# {printable(n)}" for n in notes)])
