"""Tables that stay readable in a narrow terminal: numbers are never cut.

rich shrinks a table that is wider than the terminal by wrapping and then ellipsizing cells, so
"32,768" can print as "32,7…". A Responsive table instead keeps every number whole (right-aligned
columns do not wrap) and, while the table is still too wide, leaves out its least important
columns in a stated order, saying which; only when nothing more can go do numbers fold onto a
second line (still whole). `--json` always has every column.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text


class Responsive:
    def __init__(self, table: Table, drop: Sequence[str] = ()) -> None:
        self.table = table
        self.drop = tuple(drop)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = copy.deepcopy(self.table)
        width = options.max_width
        for col in table.columns:
            if col.justify == "right":
                col.no_wrap = True  # numbers stay whole
        dropped: list[str] = []
        for name in self.drop:
            if not _cuts(console, options, table):
                break
            headers = [str(c.header) for c in table.columns]
            if name in headers:
                table.columns.pop(headers.index(name))
                dropped.append(name)
        if _cuts(console, options, table):
            for col in table.columns:  # last resort: whole numbers folded onto two lines, never "…"
                col.no_wrap = False
                col.overflow = "fold"
        yield table
        if dropped:
            yield Text(f"(at {width} columns: {', '.join(dropped)} left out; widen the terminal or use --json)",
                       style="dim")


def _cuts(console: Console, options: ConsoleOptions, table: Table) -> bool:
    """Would rich cut a cell at this width? Either the table's least width (every number whole, every
    word of text on a line of its own) is more than there is, or rich, rendering it, still writes "…"
    (its shrinking can squeeze a column below what it holds)."""
    if _least_width(table) > options.max_width:
        return True
    lines = console.render_lines(table, options, new_lines=False)
    return any("…" in segment.text for line in lines for segment in line)


def _plain(cell: object) -> str:
    return cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain


def _least_width(table: Table) -> int:
    total = 1 if table.show_edge else 0  # the left edge; each column adds its right border
    for col in table.columns:
        cells = [_plain(c) for c in col._cells] + [_plain(col.header)]
        if col.no_wrap:
            need = max((len(line) for c in cells for line in c.splitlines() or [""]), default=0)
        else:
            need = max((len(word) for c in cells for word in c.split()), default=0)
        total += need + 2 * table.padding[1] + 1
    return total


def responsive(table: Table, drop: Iterable[str] = ()) -> Responsive:
    """`table`, with `drop` (column headers, least important first) left out as the width requires."""
    return Responsive(table, tuple(drop))
