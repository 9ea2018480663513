"""moeplan.tables' fast rendering (issue 17's start-up) draws exactly what rich draws.

Every table the commands below print is captured and rendered both ways (tables.ONE_ROW on and off)
at narrow to wide widths, as plain text (the strings path, _plain_lines) and as 24-bit ANSI (the
one-row path, _one_row_of, so segment styles count too); the bytes must be equal. Both are then
checked to have taken the path meant, for most tables."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from moeplan import tables
from moeplan.cli import app

COMMANDS = (
    ["fit", "mixtral-8x7b", "--gpus", "2x24GB"],
    ["fit", "deepseek-v3", "--gpus", "8xH200", "--price", "3.5"],
    ["fit", "qwen3-30b-a3b", "--gpus", "1xRTX4090", "--cpu-mem", "64GB"],
    ["perf", "qwen3-30b-a3b", "--gpus", "1xH100", "--sweep"],
    ["memory", "gpt-oss-120b", "--quant", "mxfp4"],
    ["params", "deepseek-v3"],
    ["compare", "mixtral-8x7b", "qwen3-30b-a3b", "--gpus", "8xH100"],
    ["models"],
    ["gpus"],
)
WIDTHS = (40, 60, 80, 100, 120, 160, 220)


@pytest.fixture(scope="module")
def captured() -> list[tables.Responsive]:
    found: list[tables.Responsive] = []
    real = tables.responsive

    def keep(table, drop=()):  # type: ignore[no-untyped-def]
        out = real(table, drop)
        found.append(out)
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(tables, "responsive", keep)
    import moeplan.cli as cli

    mp.setattr(cli, "responsive", keep, raising=False)
    try:
        for args in COMMANDS:
            result = CliRunner().invoke(app, args)
            assert result.exit_code in (0, 1), (args, result.output)
    finally:
        mp.undo()
    assert len(found) >= 10
    return found


def _render(table: tables.Responsive, width: int, color: bool, one_row: bool, emoji: bool = False) -> str:
    tables.ONE_ROW = one_row
    try:
        buf = io.StringIO()
        console = Console(file=buf, width=width, highlight=False, soft_wrap=False, force_terminal=color,
                          color_system="truecolor" if color else None, emoji=emoji)
        console.print(table)
        return buf.getvalue()
    finally:
        tables.ONE_ROW = True


@pytest.mark.parametrize("color", [False, True], ids=["plain", "ansi"])
def test_one_row_tables_are_rich_tables_byte_for_byte(captured, color):
    for table in captured:
        for width in WIDTHS:
            fast, slow = _render(table, width, color, True), _render(table, width, color, False)
            assert fast == slow, (str(table.table.title), width)


@pytest.mark.parametrize("emoji", [False, True], ids=["emoji-off", "emoji-on"])
def test_cells_are_parsed_as_the_console_parses_them(emoji):
    """moeplan's consoles leave ":smile:" (a model's name, a reason with a colon) as written; a console
    with emoji on replaces it. Both paths, and the widths they measure, follow the console."""
    from rich.table import Table

    table = Table(title="t")
    for name in ("name", "why", "n"):
        table.add_column(name, justify="right" if name == "n" else "left")
    table.add_row(":smile: model", "over by: 5.04 GiB [b]bold[/b] " * 4, "32,768")
    table.add_row("x:thumbs_up:", "fits in 4 layout(s)", "1")
    for width in (40, 80, 120):
        fast = _render(tables.responsive(table), width, False, True, emoji)
        assert fast == _render(tables.responsive(table), width, False, False, emoji), width
        assert (":smile:" in fast) is not emoji and "[b]" not in fast and "32,768" in fast


def test_most_tables_take_the_fast_paths(captured, monkeypatch):
    """Both fast paths are taken (the checks above would pass vacuously if neither were): plain output
    draws most tables as strings (_plain_lines), coloured output as one row (_one_row_of)."""
    laid, plain, merged = [], [], []
    real_layout, real_plain, real_merged = tables._layout, tables._plain_lines, tables._one_row_of

    def spy_layout(*args):  # type: ignore[no-untyped-def]
        out = real_layout(*args)
        laid.append(out is not None)
        return out

    def spy_plain(*args):  # type: ignore[no-untyped-def]
        out = real_plain(*args)
        plain.append(out is not None)
        return out

    def spy_merged(*args):  # type: ignore[no-untyped-def]
        merged.append(True)
        return real_merged(*args)

    monkeypatch.setattr(tables, "_layout", spy_layout)
    monkeypatch.setattr(tables, "_plain_lines", spy_plain)
    monkeypatch.setattr(tables, "_one_row_of", spy_merged)
    for table in captured:
        _render(table, 120, False, True)
    assert sum(laid) >= len(laid) // 2 and sum(plain) == sum(laid) and not merged, (laid, plain)
    laid.clear()
    for table in captured:
        _render(table, 120, True, True)
    assert len(merged) == sum(laid) >= len(laid) // 2, (laid, merged)


def test_cells_the_one_row_path_does_not_reproduce_fall_back_to_rich():
    from rich.table import Table
    from rich.text import Text

    console = Console(file=io.StringIO(), width=80)
    plain = Table()
    plain.add_column("a")
    plain.add_row("x")
    plain.add_row("y")
    parse = tables._parser(console, console.options)
    assert tables._layout(console, console.options, plain, parse) is not None
    for cell in (Text("styled", style="bold"), "two\nlines", Text("right", justify="right")):
        table = Table()
        table.add_column("a")
        table.add_row("x")
        table.add_row(cell)
        assert tables._layout(console, console.options, table, parse) is None, cell
    separated = Table(show_lines=True)
    separated.add_column("a")
    separated.add_row("x")
    separated.add_row("y")
    assert tables._layout(console, console.options, separated, parse) is None


def _variants():  # type: ignore[no-untyped-def]
    """Tables with what moeplan's own do not all have: wrapped headers, centred and right-justified
    columns, wide characters, trailing spaces, no edge, no header, no edge padding, another box."""
    from rich import box
    from rich.table import Table

    for options in ({}, {"show_edge": False}, {"show_header": False}, {"pad_edge": False},
                    {"box": box.ROUNDED}, {"box": box.SIMPLE}, {"title": None}, {"box": None},
                    {"box": None, "show_header": False}, {"one_row": True}, {"one_row": True, "box": None}):
        one_row = options.pop("one_row", False)
        title = "a title long enough to wrap at the narrow widths tested here"
        table = Table(**{"title": title, "title_justify": "left", **options})
        table.add_column("a header that wraps", justify="center")
        table.add_column("n", justify="right")
        table.add_column("why")
        table.add_column("宽字符", justify="center")
        table.add_row("x", "1,024", "over by 5.04 GiB (5.42 GB) because the experts do not fit " * 2, "中文")
        if not one_row:
            table.add_row("centred ", "7 ", "short", "é")
            table.add_row("", "32,768", "fits in 4 layout(s)", "")
        yield table


@pytest.mark.parametrize("color", [False, True], ids=["plain", "ansi"])
def test_table_variants_render_as_rich_renders_them(color):
    for number, table in enumerate(_variants()):
        for width in (30, 44, 60, 90, 140):
            fast = _render(tables.responsive(table), width, color, True)
            assert fast == _render(tables.responsive(table), width, color, False), (number, width)


def test_ascii_only_consoles_get_rich_ascii_boxes():
    table = next(_variants())
    table.columns.pop()  # the wide characters cannot be written in ASCII at all
    outs = []
    for one_row in (True, False):
        tables.ONE_ROW = one_row
        try:
            raw = io.BytesIO()
            stream = io.TextIOWrapper(raw, encoding="ascii")
            console = Console(file=stream, width=80, highlight=False, soft_wrap=False, color_system=None, emoji=False)
            console.print(tables.responsive(table))
            stream.flush()
            outs.append(raw.getvalue().decode("ascii"))
        finally:
            tables.ONE_ROW = True
    assert outs[0] == outs[1] and "+" in outs[0] and "-" in outs[0]
