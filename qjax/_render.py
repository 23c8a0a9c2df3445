"""Tables for reports: rich when it is installed, plain text otherwise, and markdown.

One table shape everywhere: a title, a header row and rows of cells (any objects,
formatted by :func:`fmt`). Nothing here computes numbers.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Sequence

__all__ = ["Rendered", "fmt", "markdown_table", "print_table", "text_table"]


def fmt(v: object) -> str:
    """A cell as text: floats to 6 significant digits, rates as 3, ``None`` as ``-``.

    >>> fmt(0.1234567), fmt(None), fmt(3)
    ('0.123457', '-', '3')
    """
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def text_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with aligned columns.

    >>> print(text_table("t", ["a", "b"], [[1, "xy"]]))
    t
    -  --
    a  b
    -  --
    1  xy
    -  --
    """
    cells = [list(header)] + [[fmt(c) for c in r] for r in rows]
    widths = [
        max(len(line) for r in cells for line in r[i].split("\n")) for i in range(len(header))
    ]
    rule = "  ".join("-" * w for w in widths)

    def line(r):
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([title, rule, line(cells[0]), rule] + [line(r) for r in cells[1:]] + [rule])


def markdown_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table under a bold title (``|`` in cells escaped).

    >>> print(markdown_table("t", ["a", "b"], [[1, "x|y"]]))
    **t**
    <BLANKLINE>
    | a | b |
    |---|---|
    | 1 | x\\|y |
    """

    def cell(v):
        return fmt(v).replace("|", "\\|").replace("\n", "<br>")

    out = [f"**{title}**", "", "| " + " | ".join(header) + " |"]
    out.append("|" + "|".join("---" for _ in header) + "|")
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def print_table(
    title: str, header: Sequence[str], rows: Sequence[Sequence[object]], *, file=None
) -> None:
    """Print a table with ``rich`` when it is installed (plain text otherwise)."""
    file = file if file is not None else sys.stdout
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(text_table(title, header, rows), file=file)
        return
    table = Table(title=title, title_justify="left", show_lines=False)
    for h in header:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*(fmt(c) for c in r))
    width = 160 if not file.isatty() else None
    Console(file=file, width=width, highlight=False).print(table)


class Rendered:
    """Mixin: text / markdown / JSON / rich output from ``_title``, ``_HEADER``,
    ``_rows``, ``_explanations`` and ``to_dict`` (one table plus explanation lines)."""

    _HEADER: tuple[str, ...] = ()

    def _title(self) -> str:
        raise NotImplementedError

    def _rows(self) -> list[list[object]]:
        raise NotImplementedError

    def _explanations(self) -> list[str]:
        return []

    def to_dict(self) -> dict:
        raise NotImplementedError

    def to_text(self) -> str:
        """Plain-text table plus one line per explanation (what ``str()`` gives)."""
        table = text_table(self._title(), self._HEADER, self._rows())
        return "\n".join([table] + self._explanations())

    def __str__(self) -> str:
        return self.to_text()

    def to_markdown(self) -> str:
        """A markdown table plus a bullet per explanation."""
        md = markdown_table(self._title(), self._HEADER, self._rows())
        bullets = [f"- {e}" for e in self._explanations()]
        return "\n".join([md, ""] + bullets) if bullets else md

    def to_json(self, **kwargs) -> str:
        """``to_dict()`` as JSON (``json.dumps`` keyword arguments pass through)."""
        return json.dumps(self.to_dict(), **kwargs)

    def print(self, file=None) -> None:
        """Print as a rich table (plain text without ``rich``), then the explanations."""
        print_table(self._title(), self._HEADER, self._rows(), file=file)
        for e in self._explanations():
            print(e, file=file)

    def render(self, fmt: str = "text") -> str:
        """As a string; ``fmt``: ``"text"``, ``"rich"``, ``"markdown"`` or ``"json"``."""
        if fmt == "text":
            return self.to_text()
        if fmt == "markdown":
            return self.to_markdown()
        if fmt == "json":
            return self.to_json(indent=2)
        if fmt == "rich":
            buf = io.StringIO()
            self.print(file=buf)
            return buf.getvalue()
        raise ValueError(f"format must be 'text', 'rich', 'markdown' or 'json', got {fmt!r}")
