"""SessionRows (app.session_rows) against a dict: sessions attached at rows a flow table would
give them (a row held by one live session at a time, reused once it is released), finds and
releases by id, the rows and the id table growing several times."""

import numpy as np

from wiretrail.app.session_rows import SessionRows


def test_session_rows_agree_with_a_dict():
    rng = np.random.default_rng(7)
    rows = SessionRows(capacity=16)
    rows.add_column("flag", np.int8, 3)
    model: dict[int, int] = {}        # live session id -> its row
    free = list(range(2000))[::-1]    # rows no live session holds, as a flow table keeps them
    next_sid = 1 << 40
    grown = 0
    for step in range(300):
        # a few new sessions (taking free rows, lowest first: released rows come back) and
        # packets of live ones, in random order, each session several times
        new = []
        for _ in range(int(rng.integers(0, 30))):
            next_sid += int(rng.integers(1, 1 << 20))
            new.append((next_sid, free.pop()))
        live = list(model.items())
        picked = [live[i] for i in rng.integers(0, len(live), min(len(live), 40))] if live else []
        packets = new + new + picked
        order = rng.permutation(len(packets))
        sids = np.array([packets[i][0] for i in order] + [-1, 5], dtype=np.int64)
        at = np.array([packets[i][1] for i in order] + [7, -1], dtype=np.int64)
        before = rows.capacity
        got = rows.attach(sids, at)
        grown += rows.capacity > before
        assert got[-2:].tolist() == [-1, -1]  # a negative id or row: none
        assert got[:-2].tolist() == at[:-2].tolist()
        fresh = {s for s, _ in new}
        for s, r in zip(sids[:-2].tolist(), got[:-2].tolist()):
            if s in fresh:  # a new session's row starts at the fill value, even a reused one
                assert rows.col["flag"][r] == 3
        rows.col["flag"][got[:-2]] = 1
        model.update(new)
        seen, first = set(), []
        for r in got[:-2].tolist():
            if r not in seen:
                seen.add(r)
                first.append(r)
        assert rows.distinct(got[:-2]).tolist() == first  # distinct rows in first-come order
        assert len(model) == len(rows)
        assert rows.holding(sids[:-2], at[:-2]).tolist() == at[:-2].tolist()
        # sessions close: released by id, their rows free for new sessions
        if model:
            gone = rng.choice(np.array(list(model), dtype=np.int64), size=min(len(model), 10), replace=False)
            gone_rows = np.array([model[s] for s in gone.tolist()], dtype=np.int64)
            rows.release(np.concatenate([gone, [12345678901]]))  # an id never seen: ignored
            assert (rows.holding(gone, gone_rows) == -1).all()
            for s in gone.tolist():
                free.append(model.pop(s))
            free.sort(reverse=True)
            probe = np.concatenate([gone, np.array(list(model), dtype=np.int64)])
            found = rows.find(probe)
            assert (found[:len(gone)] == -1).all()
            assert found[len(gone):].tolist() == [model[s] for s in probe[len(gone):].tolist()]
    assert rows.evicted == 0
    print(f"\nsession rows: {len(model)} live after 300 rounds, rows grown {grown} times to {rows.capacity}")
    assert grown >= 2


def test_a_row_taken_by_another_session_before_release_starts_afresh():
    """The owner forgot to release a closed session: the flow table gives its row to a new one,
    which must not inherit the old state; the old id is gone and the loss counted."""
    rows = SessionRows(capacity=16)
    rows.add_column("flag", np.int8, 0)
    rows.attach(np.array([111], dtype=np.int64), np.array([4], dtype=np.int64))
    rows.col["flag"][4] = 9
    got = rows.attach(np.array([222, 222], dtype=np.int64), np.array([4, 4], dtype=np.int64))
    assert got.tolist() == [4, 4] and rows.col["flag"][4] == 0
    assert rows.find(np.array([111, 222], dtype=np.int64)).tolist() == [-1, 4]
    assert rows.evicted == 1 and len(rows) == 1
