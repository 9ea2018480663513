"""User text (file names, model names, card fields, messages that quote them) made safe for the
format it is printed in. Each renderer calls the function for its format; none prints raw user text.

- terminal and plain text: control characters (newline, carriage return, escape sequences) shown
  as escapes, so a file name with a newline cannot start a line of its own (a `::error` workflow
  command, a forged table row); rich markup in it is escaped by the caller (rich.markup.escape).
- Markdown: the characters GitHub-flavoured Markdown gives meaning to are backslash-escaped (not
  `_`, which GFM does not read inside words, so key names stay readable), and
  code spans get a fence longer than any backtick run inside them (CommonMark 0.31, 6.1).
- shell: moeplan.deploy.engines quotes every launch token with shlex.quote.
"""

from __future__ import annotations

import re

_MD_SPECIAL = r"([\\`*\[\]<>#!|~])"  # compiled on first use (re caches it): fit prints no Markdown


def printable(text: object) -> str:
    """`text` with every control or format character (Unicode category C*) written as an escape."""
    text = str(text)
    if text.isprintable():  # nothing of category C (nor Z but " "): the common case, at C speed
        return text
    import unicodedata

    out = []
    for ch in text:
        if ch != " " and unicodedata.category(ch).startswith("C"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def md_text(text: object) -> str:
    """Plain text inside Markdown: printable, with Markdown's special characters escaped, and "@" as
    its HTML entity so a name in a pull-request comment cannot mention (notify) a user or team."""
    return re.sub(_MD_SPECIAL, r"\\\1", printable(text)).replace("@", "&#64;")


def md_code(text: object) -> str:
    """An inline code span holding `text` literally, whatever backticks it contains."""
    body = printable(text)
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if body.startswith("`") or body.endswith("`") or not body.strip() else ""
    return f"{fence}{pad}{body}{pad}{fence}"


def md_cell(text: object) -> str:
    """A Markdown table cell: md_text (which escapes |)."""
    return md_text(text)
