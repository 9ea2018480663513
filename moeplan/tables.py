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
from rich.segment import Segment
from rich.table import Column, Table
from rich.text import Text


class Responsive:
    def __init__(self, table: Table, drop: Sequence[str] = ()) -> None:
        self.table = table
        self.drop = tuple(drop)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # A copy to change (columns dropped, wrapping set), not the caller's: the table and its columns
        # are copied, the cells shared (nothing here changes a cell). deepcopy cost ~5 ms a table.
        table = copy.copy(self.table)
        table.columns = [copy.copy(col) for col in self.table.columns]
        width = options.max_width
        for col in table.columns:
            if col.justify == "right":
                col.no_wrap = True  # numbers stay whole
        need = {id(col): _least_column_width(table, col) for col in table.columns}
        dropped: list[str] = []
        lines = _render_whole(console, options, table, need)
        for name in self.drop:
            if lines is not None:
                break
            headers = [str(c.header) for c in table.columns]
            if name in headers:
                table.columns.pop(headers.index(name))
                dropped.append(name)
                lines = _render_whole(console, options, table, need)
        if lines is None:
            for col in table.columns:  # last resort: whole numbers folded onto two lines, never "…"
                col.no_wrap = False
                col.overflow = "fold"
            yield table
        else:  # the lines just checked are the table: rendering it again would double the cost
            for line in lines:
                yield from line
                yield Segment.line()
        if dropped:
            yield Text(f"(at {width} columns: {', '.join(dropped)} left out; widen the terminal or use --json)",
                       style="dim")


def _render_whole(console: Console, options: ConsoleOptions, table: Table,
                  need: dict[int, int]) -> list[list[Segment]] | None:
    """The table's lines if rich can render it at this width without cutting a cell, else None. It
    cuts when the table's least width (every number whole, every word of text on a line of its own)
    is more than there is, or when rich, rendering it, still writes "…" (its shrinking can squeeze a
    column below what it holds)."""
    least = (1 if table.show_edge else 0) + sum(need[id(c)] for c in table.columns)
    if least > options.max_width:
        return None
    lines = console.render_lines(table, options, pad=False, new_lines=False)
    if any("…" in segment.text for line in lines for segment in line):
        return None
    return lines


def _plain(cell: object) -> str:
    if isinstance(cell, Text):
        return cell.plain
    text = str(cell)
    # No markup and no :emoji: code: parsing it would return the text as it is, at ~20 us a cell.
    return Text.from_markup(text).plain if "[" in text or ":" in text else text


def _least_column_width(table: Table, col: Column) -> int:
    """The narrowest `col` can be with its cells whole, its right border included."""
    cells = [_plain(c) for c in col._cells] + [_plain(col.header)]
    if col.no_wrap:
        need = max((len(line) for c in cells for line in c.splitlines() or [""]), default=0)
    else:
        need = max((len(word) for c in cells for word in c.split()), default=0)
    return need + 2 * table.padding[1] + 1


def responsive(table: Table, drop: Iterable[str] = ()) -> Responsive:
    """`table`, with `drop` (column headers, least important first) left out as the width requires."""
    return Responsive(table, tuple(drop))
