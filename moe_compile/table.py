"""Plain-text tables for the reports: columns padded to their widest cell, a rule under the header, and the last
column (details, reasons) wrapped so that no line runs past WIDTH characters."""

from __future__ import annotations

import textwrap
from typing import Optional, Sequence

WIDTH = 120
_MIN_LAST = 40  # the last column keeps at least this width, however wide the columns before it


def format_table(rows: Sequence[Sequence[str]], title: Optional[str] = None) -> str:
    """rows[0] is the header; every row has the same number of cells."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    indent = sum(widths[:-1]) + 2 * (len(widths) - 1)
    last = max(_MIN_LAST, WIDTH - indent)
    widths[-1] = min(widths[-1], last)
    lines = []
    for row in rows:
        head = "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths[:-1]))
        wrapped = textwrap.wrap(row[-1], last, break_on_hyphens=False) or [""]
        lines.append(f"{head}  {wrapped[0]}".rstrip() if head else wrapped[0])
        lines += [" " * indent + more for more in wrapped[1:]]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(([title] if title else []) + lines)
