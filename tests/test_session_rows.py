"""SessionRows (app.session_rows) against a dict: random maps, finds and releases, the table
growing several times, and rows never shared by two live sessions."""

import numpy as np

from wiretrail.app.session_rows import SessionRows


def test_session_rows_agree_with_a_dict():
    rng = np.random.default_rng(7)
    rows = SessionRows(capacity=16)
    rows.add_column("flag", np.int8, 3)
    model: dict[int, int] = {}
    grown = 0
    for step in range(300):
        # ids from a small range (many repeats, collisions after deletes) and large ones (hash spread)
        sids = np.concatenate([rng.integers(0, 400, 40), rng.integers(0, 1 << 62, 5), [-1]]).astype(np.int64)
        before = rows.capacity
        got = rows.map(sids)
        grown += rows.capacity > before
        assert got[-1] == -1
        for s, r in zip(sids[:-1].tolist(), got[:-1].tolist()):
            if s in model:
                assert model[s] == r
            else:
                assert rows.col["flag"][r] == 3  # a new row starts at the fill value
                model[s] = r
        rows.col["flag"][got[:-1]] = 1
        seen, order = set(), []
        for r in got[:-1].tolist():
            if r not in seen:
                seen.add(r)
                order.append(r)
        assert rows.distinct(got[:-1]).tolist() == order  # distinct rows in first-come order
        assert len(set(model.values())) == len(model) == len(rows)  # one row per live session
        gone = rng.choice(np.array(list(model), dtype=np.int64), size=min(len(model), 25), replace=False)
        rows.release(np.concatenate([gone, [12345678901]]))  # an id never seen: ignored
        for s in gone.tolist():
            del model[s]
        probe = np.concatenate([gone, np.array(list(model), dtype=np.int64)])
        found = rows.find(probe)
        assert (found[:len(gone)] == -1).all()
        assert found[len(gone):].tolist() == [model[s] for s in probe[len(gone):].tolist()]
    print(f"\nsession rows: {len(model)} live after 300 rounds, table grown {grown} times to {rows.capacity} rows")
    assert grown >= 2
