"""wiretrail.arrow_compute gives what pyarrow's own methods give (they import pyarrow.compute,
which the ingest path avoids)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from wiretrail import arrow_compute as ac


def test_functions_match_pyarrow_methods():
    t = pa.table({"a": pa.array([3, 1, None, 2], pa.int64()), "b": ["x", None, "Y", "z"]})
    idx = pa.array([2, 0, None], pa.int64())
    assert ac.take(t, idx).equals(t.take(idx))
    assert ac.take(t.column("b"), idx).equals(t.column("b").take(idx))
    mask = np.array([True, False, True, False])
    assert ac.filter(t, mask).equals(t.filter(mask))
    assert ac.cast(t.column("a"), pa.int32()).equals(t.column("a").cast(pa.int32()))
    schema = pa.schema([("a", pa.int16()), ("b", pa.large_string())])
    assert ac.cast_table(t, schema).equals(t.cast(schema))
    with pytest.raises(ValueError):
        ac.cast_table(t, pa.schema([("b", pa.string()), ("a", pa.int64())]))
    with pytest.raises(pa.ArrowInvalid):  # safe: an overflow fails, as Array.cast does
        ac.cast(pa.array([300]), pa.int8())
    assert ac.fill_null(t.column("a"), 0).to_pylist() == t.column("a").fill_null(0).to_pylist()
    assert ac.sort_by(t, "a").equals(t.sort_by("a"))
    keys = [("b", "descending"), ("a", "ascending")]
    assert ac.sort_by(t, keys).equals(t.sort_by(keys))
    b = t.column("b").combine_chunks()
    assert ac.ascii_lower(b).to_pylist() == ["x", None, "y", "z"]
    assert ac.binary_join_element_wise("::ffff:", b, "").to_pylist() == ["::ffff:x", None, "::ffff:Y", "::ffff:z"]
    assert ac.if_else(pa.array(mask), b, pa.array(["0"] * 4)).to_pylist() == ["x", "0", "Y", "0"]
    assert ac.coalesce(b, pa.array(["n"] * 4)).to_pylist() == ["x", "n", "Y", "z"]
    encoded = ac.dictionary_encode(pa.array(["p", "q", "p"]))
    assert encoded.dictionary.to_pylist() == ["p", "q"] and encoded.indices.to_pylist() == [0, 1, 0]


def test_nulls_without_a_mask_array():
    null = np.array([False, True, False, True, False, False, False, False, True])  # past one byte of bits
    n = len(null)
    struct = pa.StructArray.from_arrays([pa.array(range(n)), pa.array([str(i) for i in range(n)])], names=["x", "y"])
    expected = pa.StructArray.from_arrays([struct.field(0), struct.field(1)], names=["x", "y"], mask=pa.array(null))
    assert ac.with_nulls(struct, null).equals(expected)
    counts = np.array([2, 0, 1, 0, 3, 0, 0, 1, 0])
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    values = pa.array(np.arange(counts.sum(), dtype=np.float64))
    got = ac.list_array(offsets, values, null)
    assert got.equals(pa.ListArray.from_arrays(offsets, values, mask=pa.array(null)))
    assert got.null_count == int(null.sum())
    with pytest.raises(ValueError):  # a sliced offsets array: its buffer does not start at its first value
        ac.list_array(offsets.slice(1), values, null[1:])
