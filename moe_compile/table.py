"""Plain-text tables for the reports: columns padded to their widest cell, a rule under the header."""

from __future__ import annotations

from typing import Optional, Sequence


def format_table(rows: Sequence[Sequence[str]], title: Optional[str] = None) -> str:
    """rows[0] is the header; every row has the same number of cells."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(([title] if title else []) + lines)
