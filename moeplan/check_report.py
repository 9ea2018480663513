"""`moeplan check` output for people and machines: table rows, Markdown for a PR comment, GitHub
workflow annotations. Every user string (spec paths, model names, messages) is escaped for the
format it lands in, so a file name cannot start a workflow command or break out of a code span."""

from __future__ import annotations

import re



from moeplan.deploy.check import CheckResult, _num
from moeplan.escape import md_cell, md_code, md_text, printable

GiB = 2**30

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
    """Every problem and missed target in full, one line each, for under the CLI's table; user text
    in them is printable (a newline in a file name cannot start a line of its own)."""
    lines = [f"{r.path or r.name}:{p.line or ''} {p.field + ': ' if p.field else ''}{p.message}" for p in r.errors]
    lines += [f"{r.path or r.name}:{f.line or ''} {f.message}" for f in r.findings if not f.passed]
    return [printable(line) for line in lines]


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
    return [{k: printable(v) for k, v in row.items()} for row in rows]


_MARK = {"pass": "✅ pass", "fail": "❌ fail", "invalid": "⚠️ invalid"}


def render_markdown(results: list[CheckResult]) -> str:
    """A summary table and, per spec, its findings and launch command: fit for a PR comment."""
    words = [_result_word(r) for r in results]
    counts = ", ".join(f"{words.count(w)} {w}" for w in ("pass", "fail", "invalid") if words.count(w))
    cols = [c for c in SUMMARY_COLUMNS if c != "reason"]
    out = [f"## moeplan check: {counts or 'no specs'}", "", "| " + " | ".join(cols) + " |",
           "|" + "---|" * len(cols)]  # fmt: skip
    for row in summary_rows(results):
        cells = {c: md_cell(v) for c, v in row.items()}
        cells.update(result=_MARK[row["result"]], spec=md_code(row["spec"]).replace("|", "\\|"))
        out.append("| " + " | ".join(cells[c] for c in cols) + " |")
    for r in results:
        out += ["", f"### {_MARK[_result_word(r)]}: {md_code(r.path or r.name)}", ""]
        for p in r.errors:
            out.append(f"- {'line ' + str(p.line) + ': ' if p.line else ''}{md_code(p.field or 'file')}: "
                       f"{md_text(p.message)}")
        for f in r.findings:
            out.append(f"- {'✅' if f.passed else '❌'} {md_text(f.message)}")
        out += [f"- note: {md_text(n)}" for n in r.notes]
        if r.command:
            # A fence longer than any backtick run in the command, so the command cannot close it.
            fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", r.command)), default=0))
            out += ["", "<details><summary>launch command</summary>", "", f"{fence}bash", r.command, fence]
            out += [f"- {md_text(n)}" for n in r.command_notes]
            out += ["", "</details>"]
    return "\n".join(out) + "\n"


def _escape_data(text: str) -> str:
    # GitHub workflow commands: %, CR and LF are escaped in the message (actions/toolkit command.ts);
    # other control characters are written as escapes first.
    return printable(text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A"))


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

