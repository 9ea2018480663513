"""Tables that stay readable in a narrow terminal: numbers are never cut.

rich shrinks a table that is wider than the terminal by wrapping and then ellipsizing cells, so
"32,768" can print as "32,7…". A Responsive table instead keeps every number whole (right-aligned
columns do not wrap) and, while the table is still too wide, leaves out its least important
columns in a stated order, saying which; only when nothing more can go do numbers fold onto a
second line (still whole). `--json` always has every column.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

from rich.console import Console, ConsoleOptions, RenderResult
from rich.cells import cell_len
from rich.segment import Segment
from rich.table import Column, Row, Table
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
        parse = _parser(console, options)
        need = {id(col): _least_column_width(table, col, parse) for col in table.columns}
        dropped: list[str] = []
        lines = _render_whole(console, options, table, need, parse)
        for name in self.drop:
            if lines is not None:
                break
            headers = [str(c.header) for c in table.columns]
            if name in headers:
                table.columns.pop(headers.index(name))
                dropped.append(name)
                lines = _render_whole(console, options, table, need, parse)
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


def _render_whole(console: Console, options: ConsoleOptions, table: Table, need: dict[int, int],
                  parse: Callable[[str], Text]) -> list[list[Segment]] | None:
    """The table's lines if rich can render it at this width without cutting a cell, else None. It
    cuts when the table's least width (every number whole, every word of text on a line of its own)
    is more than there is, or when rich, rendering it, still writes "…" (its shrinking can squeeze a
    column below what it holds)."""
    least = (1 if table.show_edge else 0) + sum(need[id(c)] for c in table.columns)
    if least > options.max_width:
        return None
    layout = _layout(console, options, table, parse) if ONE_ROW else None
    lines = None
    if layout is not None and console.color_system is None and not console.record:
        lines = _plain_lines(console, options, table, layout)
    if lines is None:
        lines = console.render_lines(_one_row_of(table, layout) if layout is not None else table, options,
                                     pad=False, new_lines=False)
    if any("…" in segment.text for line in lines for segment in line):
        return None
    return lines


# Render plain tables through _layout (tests/test_tables.py renders every table both ways and compares).
ONE_ROW = True


class _Layout:
    """Where rich puts a plain table's cells: the cells as Texts (per column: header, then each row),
    each column's width (padding included), and how many lines each body cell and row wraps to. (A
    plain class: a NamedTuple costs ~0.15 ms to define, on every start-up.)"""

    __slots__ = ("cells", "widths", "heights", "lines", "wrapped")

    def __init__(self, cells: list[list[Text]], widths: list[int], heights: list[int], lines: list[list[int]],
                 wrapped: dict[tuple[int, int], list[str]]) -> None:
        self.cells = cells
        self.widths = widths
        self.heights = heights  # per body row
        self.lines = lines  # per column, per body row
        self.wrapped = wrapped  # (column, row): the lines of a body cell that wraps


def _layout(console: Console, options: ConsoleOptions, table: Table, parse: Callable[[str], Text]) -> _Layout | None:
    """The layout rich gives `table`, worked out from each cell's text once. rich lays out every cell
    on its own (a Padding, a measure, a wrap, ~70 us a cell: most of `fit`'s printing, which issue 17's
    start-up bound counts); the two fast paths below draw from this instead.

    Only for the plain tables moeplan draws; None (render `table` itself) for anything with a
    feature this does not reproduce: row styles or separators, footers, captions, vertical or collapsed
    padding or none at the edges, fixed or ratio widths, column styles, cells that are not plain
    strings or unstyled Texts, a newline or tab in a cell."""
    columns = table.columns
    if (not table.rows or table.show_lines or table.leading or table.show_footer or table.row_styles
            or table.expand or table.width is not None or table.min_width is not None
            or table.collapse_padding or not table.pad_edge or table.padding[0] or table.padding[2]
            or table.caption
            or table.style not in (None, "", "none")
            or any(row.style or row.end_section for row in table.rows)
            or any(col.width is not None or col.min_width is not None or col.max_width is not None or col.ratio
                   or col.vertical != "top" or col.style or col.highlight for col in columns)):
        return None
    cells: list[list[Text]] = []
    for col in columns:
        texts = []
        for cell in [col.header, *col._cells]:
            if isinstance(cell, str):  # what Console.render makes of a string cell
                cell = _text(cell, parse)
            if (not isinstance(cell, Text) or cell.style or cell.justify or cell.overflow or cell.no_wrap is not None
                    or "\n" in cell.plain or "\t" in cell.plain):
                return None
            texts.append(cell)
        cells.append(texts)
    pads = [table._get_padding_width(i) for i in range(len(columns))]
    room = options.max_width - table._extra_width
    shown = 0 if table.show_header else 1  # rich measures a header only when it is drawn
    natural = [max(cell_len(t.plain) for t in texts[shown:]) + pad for texts, pad in zip(cells, pads)]
    widths = natural if sum(natural) <= room else _shrunk(table, natural, pads, room)
    rows = len(table.rows)
    heights = [1] * rows
    lines = [[1] * rows for _ in columns]
    wrapped: dict[tuple[int, int], list[str]] = {}
    for j, (col, texts) in enumerate(zip(columns, cells)):
        inner = widths[j] - pads[j]
        if col.no_wrap or natural[j] - pads[j] <= inner:
            continue
        for i, text in enumerate(texts[1:]):
            if cell_len(text.plain) > inner:
                wrapped[j, i] = [line.plain for line in text.wrap(console, inner, justify=col.justify,
                                                                  overflow=col.overflow)]
                lines[j][i] = len(wrapped[j, i])
                heights[i] = max(heights[i], lines[j][i])
    return _Layout(cells, widths, heights, lines, wrapped)


def _one_row_of(table: Table, layout: _Layout) -> Table:
    """`table` as one body row of multi-line cells, each column fixed at the width rich gives it in
    `table`: the same lines, segment styles and borders at a fraction of the cost. Each column is one
    Text, its rows joined by newlines, a row that another cell wraps onto more lines padded with blank
    lines as rich pads it (cells align at the top)."""
    one = copy.copy(table)
    one.rows = [Row()]
    one.columns = []
    for j, (col, texts) in enumerate(zip(table.columns, layout.cells)):
        parts: list[Text] = []
        for i, text in enumerate(texts[1:]):
            parts.append(text)
            parts.extend(Text() for _ in range(layout.heights[i] - layout.lines[j][i]))
        merged = copy.copy(col)
        merged.width = layout.widths[j] - table._get_padding_width(j)
        merged._cells = [Text("\n").join(parts)]
        one.columns.append(merged)
    return one


def _plain_lines(console: Console, options: ConsoleOptions, table: Table,
                 layout: _Layout) -> list[list[Segment]] | None:
    """The lines rich draws for `table` when no style will be written (no colour, not recording), as
    plain strings: the title through rich itself, then the box and each cell's lines justified and
    padded to its column as rich pads them (header cells align at the bottom, body cells at the top).
    None for a justification this does not reproduce ("full")."""
    from rich.cells import set_cell_size
    from rich.style import Style

    columns = table.columns
    if any(col.justify not in ("left", "right", "center", "default") for col in columns):
        return None
    box = table.box and table.box.substitute(options, safe=table.safe_box if table.safe_box is not None
                                             else console.safe_box)
    if box and not table.show_header:
        box = box.get_plain_headed_box()
    widths = layout.widths
    table_width = sum(widths) + table._extra_width
    out: list[list[Segment]] = []
    if table.title:
        title = table.title
        text = console.render_str(title, style=Style.pick_first(table.title_style, "table.title"),
                                  highlight=False) if isinstance(title, str) else title
        title_options = options.update(width=table_width, highlight=table.highlight, height=None,
                                       justify=table.title_justify)
        out += console.render_lines(text, title_options, pad=False, new_lines=False)

    pad_left, pad_right = table.padding[3], table.padding[1]  # every column's (_layout: pad_edge, no collapsing)

    def cell_lines(j: int, text: Text, row: int) -> list[str]:
        col = columns[j]
        inner = widths[j] - pad_left - pad_right
        plain = text.plain
        if cell_len(plain) > inner:
            wrapped = layout.wrapped.get((j, row)) or [
                line.plain for line in text.wrap(console, inner, justify=col.justify, overflow=col.overflow,
                                                 no_wrap=col.no_wrap)]
            lines = [set_cell_size(line, inner) for line in wrapped]
        elif col.justify == "right":
            plain = plain.rstrip()
            lines = [" " * (inner - cell_len(plain)) + plain]
        elif col.justify == "center":
            plain = plain.rstrip()
            gap = inner - cell_len(plain)
            lines = [" " * (gap // 2) + plain + " " * (gap - gap // 2)]
        else:
            lines = [plain + " " * (inner - cell_len(plain))]
        return [" " * pad_left + line + " " * pad_right for line in lines]

    edge = table.show_edge and bool(box)
    if box and edge:
        out.append([Segment(box.get_top(widths))])
    rows = [[cell_lines(j, texts[0], -1) for j, texts in enumerate(layout.cells)]] if table.show_header else []
    rows += [[cell_lines(j, texts[i + 1], i) for j, texts in enumerate(layout.cells)] for i in range(len(table.rows))]
    blank = [" " * w for w in widths]  # a line of a cell that has fewer lines than its row
    for index, row in enumerate(rows):
        header = index == 0 and table.show_header
        height = max(len(c) for c in row)
        if header:  # header cells sit at the bottom of their row
            row = [[blank[j]] * (height - len(c)) + c for j, c in enumerate(row)]
        else:
            row = [c + [blank[j]] * (height - len(c)) for j, c in enumerate(row)]
        if not box:  # no borders at all: the cells side by side
            left = right = divider = ""
        elif index == 0:
            left, right, divider = box.head_left, box.head_right, box.head_vertical
        elif index == len(rows) - 1:
            left, right, divider = box.foot_left, box.foot_right, box.foot_vertical
        else:
            left, right, divider = box.mid_left, box.mid_right, box.mid_vertical
        for n in range(height):
            body = divider.join(c[n] for c in row)
            out.append([Segment(left + body + right if edge else body)])
        if header and box:
            out.append([Segment(box.get_row(widths, "head", edge=edge))])
    if box and edge:
        out.append([Segment(box.get_bottom(widths))])
    return out


def _shrunk(table: Table, natural: list[int], pads: list[int], room: int) -> list[int]:
    """The column widths rich's Table._calculate_column_widths gives a table too wide for `room`, from
    the widths its cells need (`natural`, padding included) instead of measuring every cell again:
    rich collapses the wrappable columns (_collapse_widths), reduces all evenly if that is not
    enough, then re-measures each column at its width, which gives min(its need, the width) (a
    column narrower than its padding keeps the width)."""
    from rich._ratio import ratio_reduce

    widths = [min(n, room) for n in natural]
    widths = table._collapse_widths(widths, [col.width is None and not col.no_wrap for col in table.columns], room)
    if sum(widths) > room:
        widths = ratio_reduce(sum(widths) - room, [1] * len(widths), widths, widths)
    return [w if w - pad < 1 else min(n, w) for w, n, pad in zip(widths, natural, pads)]


def _parser(console: Console, options: ConsoleOptions) -> Callable[[str], Text]:
    """What the console makes of a string cell (Console.render's render_str, with the table's markup
    setting and the console's emoji setting: moeplan's consoles leave ":smile:" in a model name alone)."""
    return lambda cell: console.render_str(cell, highlight=False, markup=options.markup)


def _parsed(cell: str) -> bool:
    """Whether rich's parsers could change a string cell: with no "[" (markup) and no ":" (:emoji: code)
    they return it as it is, at ~20 us a cell, so only these are parsed."""
    return "[" in cell or ":" in cell


def _text(cell: str, parse: Callable[[str], Text]) -> Text:
    """The Text `parse` (the console's) makes of a string cell."""
    return parse(cell) if _parsed(cell) else Text(cell)


def _plain(cell: object, parse: Callable[[str], Text]) -> str:
    if isinstance(cell, Text):
        return cell.plain
    text = str(cell)
    return _text(text, parse).plain if _parsed(text) else text


def _least_column_width(table: Table, col: Column, parse: Callable[[str], Text]) -> int:
    """The narrowest `col` can be with its cells whole, its right border included."""
    cells = [_plain(c, parse) for c in col._cells] + [_plain(col.header, parse)]
    if col.no_wrap:
        need = max((len(line) for c in cells for line in c.splitlines() or [""]), default=0)
    else:
        need = max((len(word) for c in cells for word in c.split()), default=0)
    return need + 2 * table.padding[1] + 1


def responsive(table: Table, drop: Iterable[str] = ()) -> Responsive:
    """`table`, with `drop` (column headers, least important first) left out as the width requires."""
    return Responsive(table, tuple(drop))
