"""The few pyarrow compute functions the ingest path uses, called by name.

`import pyarrow.compute` builds a Python wrapper and a docstring (through pydoc and numpydoc's
scraper) for each of pyarrow's ~290 compute functions: 36 ms in every process that touches
it (`python -X importtime`), 1% of a full ingest of mix.pcap. pyarrow's own `Table.take`, `.filter`,
`.cast`, `.sort_by`, `ChunkedArray.fill_null` and the `mask=` of `StructArray.from_arrays` and
`ListArray.from_arrays` (which inverts it) import it on first use. These call the same functions
through `pyarrow._compute.call_function`, the entry point those wrappers end in
(`pyarrow.compute.call_function` is that function), which costs 8 ms to import.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pyarrow._compute import CastOptions, SortOptions, call_function


def take(data, indices):
    """Rows `indices` of an array, chunked array or table (Table.take)."""
    return call_function("take", [data, indices])


def filter(data, mask):  # noqa: A001 (the compute function's name)
    """Rows of `data` where `mask` is true (Table.filter; null drops the row)."""
    return call_function("filter", [data, mask])


def cast(values, target_type: pa.DataType):
    """`values` as `target_type`, failing on overflow or truncation (Array.cast, safe)."""
    return call_function("cast", [values], CastOptions.safe(target_type))


def cast_table(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s types (Table.cast: same column names in the same order)."""
    if table.schema.names != schema.names:
        raise ValueError(f"cannot cast a table with columns {table.schema.names} to {schema.names}")
    columns = [c if c.type == f.type else cast(c, f.type) for c, f in zip(table.columns, schema)]
    return pa.Table.from_arrays(columns, schema=schema)


def coalesce(*values):
    """Per row, the first of `values` that is not null."""
    return call_function("coalesce", list(values))


def fill_null(values, fill):
    """`values` with nulls replaced by the Python value `fill` (ChunkedArray.fill_null)."""
    return coalesce(values, pa.scalar(fill, values.type))


def if_else(condition, if_true, if_false):
    return call_function("if_else", [condition, if_true, if_false])


def dictionary_encode(values):
    return call_function("dictionary_encode", [values])


def ascii_lower(strings):
    return call_function("ascii_lower", [strings])


def binary_join_element_wise(*strings_then_separator):
    """Per row, the strings joined by the last argument (compute's binary_join_element_wise)."""
    return call_function("binary_join_element_wise", list(strings_then_separator))


def sort_by(table: pa.Table, keys: str | list[tuple[str, str]]) -> pa.Table:
    """`table` sorted by a column name (ascending) or (name, "ascending"/"descending") pairs (Table.sort_by)."""
    keys = [(keys, "ascending")] if isinstance(keys, str) else keys
    return take(table, call_function("sort_indices", [table], SortOptions(keys)))


def _validity(null: np.ndarray) -> pa.Buffer:
    """Arrow's validity bitmap (a set bit: a value) of the rows where `null` is false."""
    return pa.py_buffer(np.packbits(~null, bitorder="little"))


def with_nulls(struct: pa.StructArray, null: np.ndarray) -> pa.Array:
    """`struct` null where `null` (StructArray.from_arrays(..., mask=null))."""
    children = [struct.field(i) for i in range(struct.type.num_fields)]
    return pa.Array.from_buffers(struct.type, len(struct), [_validity(null)], children=children)


def list_array(offsets: pa.Array, values: pa.Array, null: np.ndarray, type: pa.DataType | None = None) -> pa.Array:
    """Lists of `values` cut at int32 `offsets`, null where `null` (ListArray.from_arrays with a mask)."""
    if offsets.offset or offsets.null_count:  # its buffer is used as it is
        raise ValueError("list offsets must be a whole int32 array without nulls")
    return pa.Array.from_buffers(type or pa.list_(values.type), len(offsets) - 1,
                                 [_validity(null), offsets.buffers()[1]], children=[values])
