"""Reading Zeek's baseline logs (TSV with #fields/#types headers) for the corpus tests."""

from __future__ import annotations

import re
from pathlib import Path


def unescape(v: str) -> str:
    """Zeek's \\xNN escapes back to characters (one per byte)."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), v)


def read_zeek_log(path: Path) -> list[dict]:
    """Rows as dicts: '-' is None, containers are lists ('(empty)' an empty one), an empty
    string is '' ('(empty)'), other values unescaped strings."""
    fields, types, rows = [], [], []
    for line in Path(path).read_text().splitlines():
        if line.startswith("#fields"):
            fields = line.split("\t")[1:]
        elif line.startswith("#types"):
            types = line.split("\t")[1:]
        elif line and not line.startswith("#"):
            row = {}
            for f, t, v in zip(fields, types, line.split("\t")):
                if v == "-":
                    row[f] = None
                elif t.startswith(("vector", "set")):
                    row[f] = [] if v == "(empty)" else [unescape(x) for x in v.split(",")]
                elif v == "(empty)":
                    row[f] = ""
                else:
                    row[f] = unescape(v)
            rows.append(row)
    return rows
