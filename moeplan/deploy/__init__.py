"""Deployment specs for CI, and the engine command that runs a plan.

A spec (YAML) names a model, GPUs, an engine, how it will be served and what it must achieve.
`check` plans it with `fit` and the speed model and compares each target with its prediction;
`launch` writes the engine command for the chosen plan with only flags the engines document.
Three jobs that change for different reasons, one module each: the spec (`deploy.spec`: schema and
reading with line numbers), the check (`deploy.check`), the engines' flags (`deploy.engines`). The
table, Markdown and GitHub renderings live beside report.py (`moeplan.check_report`).

Exit codes follow the CLI's: 0 passes, 1 does not fit or misses a target, 2 the spec is invalid.
"""

from __future__ import annotations

from moeplan.check_report import (
    SUMMARY_COLUMNS, detail_lines, render_github, render_markdown, summary_rows,
)  # fmt: skip
from moeplan.deploy.check import (
    CheckResult, Finding, check, check_path, check_paths, choose_plan, default_ranker, emit_for_fit, exit_code,
    findings, fit_finding, spec_routing, target_finding,
)  # fmt: skip
from moeplan.deploy.engines import (
    CHUNK_TOKENS, ENGINE_ENV, ENGINE_FLAGS, ENGINE_PROGRAM, ENGINES, KV_CACHE_CHOICES, KV_CACHE_TYPES, Launch,
    emit, engine_accepts, engine_name, engine_runs, gguf_file, launch,
)  # fmt: skip
from moeplan.deploy.spec import (
    DeploySpec, LayoutSpec, Serving, SpecError, SpecProblem, Targets, engine_problems, key_lines, load_spec, schema,
)  # fmt: skip

__all__ = [
    "DeploySpec", "Serving", "Targets", "LayoutSpec", "SpecError", "SpecProblem", "Finding", "CheckResult", "Launch",
    "ENGINE_FLAGS", "ENGINE_ENV", "ENGINE_PROGRAM", "ENGINES", "KV_CACHE_TYPES", "KV_CACHE_CHOICES", "CHUNK_TOKENS",
    "schema", "load_spec", "key_lines", "engine_problems", "check", "check_path", "check_paths", "choose_plan",
    "default_ranker", "findings", "fit_finding", "target_finding", "spec_routing", "exit_code", "launch", "emit",
    "emit_for_fit", "engine_accepts", "engine_name", "engine_runs", "gguf_file", "summary_rows", "detail_lines",
    "render_markdown", "render_github", "SUMMARY_COLUMNS",
]  # fmt: skip
