"""Report tables stay readable: a long detail wraps under its own column instead of widening every line."""

from moe_compile.table import WIDTH, format_table


def test_long_last_cells_wrap_within_the_width():
    reason = "not traceable with torch.fx (TypeError: " + "a very long message " * 30 + ")"
    text = format_table([("site", "action", "detail"), ("transformer.h.0", "searched", reason), ("x", "y", "ok")])
    lines = text.splitlines()
    assert max(map(len, lines)) <= WIDTH and len(lines) > 4
    column = lines[0].index("detail")
    assert all(line.startswith(" " * column) for line in lines[3:-1])  # continuation lines sit under "detail"
    assert " ".join(line.strip() for line in lines[2:-1]).endswith(reason.split()[-1])
    assert lines[-1].split() == ["x", "y", "ok"]
