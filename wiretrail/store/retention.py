"""Retention: whole hours go, oldest first, packets and metadata together.

An hour is removed when it ended more than `max_age_days` ago, then further hours, oldest
first, until the whole store (capture files, tables and index under one quota, as
users of other tools ask for) fits in `quota_bytes`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from wiretrail.batch import HOUR_NS
from wiretrail.errors import WiretrailError
from wiretrail.store.metadata import INDEX_DIR, TABLES_DIR, hour_of_partition
from wiretrail.store.packets import hour_dirs


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def store_hours(root: Path) -> dict[int, list[Path]]:
    """Every hour directory of the store, by hour since the epoch."""
    hours: dict[int, list[Path]] = {}
    for hour, _, hh in hour_dirs(root):
        hours.setdefault(hour, []).append(hh)
    for base in [root / INDEX_DIR, *(root / TABLES_DIR).glob("*")]:
        for hh in base.glob("day=*/hour=*"):
            hour = hour_of_partition(hh)
            if hour is not None:
                hours.setdefault(hour, []).append(hh)
    return hours


def _remove(dirs: list[Path]) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        parent = d.parent
        try:
            parent.rmdir()  # the day directory, once its last hour is gone
        except OSError:
            pass


def enforce(root: Path, max_age_days: float | None = 180, quota_bytes: int | None = None,
            now_ns: int | None = None) -> str:
    """Apply retention now; returns a one-line summary."""
    root = Path(root)
    if not root.is_dir():
        raise WiretrailError(f"no store at {root}")
    now_ns = time.time_ns() if now_ns is None else now_ns
    hours = store_hours(root)
    sizes = {h: sum(_dir_bytes(d) for d in dirs) for h, dirs in hours.items()}
    total = sum(sizes.values())
    removed, freed = 0, 0
    for hour in sorted(hours):
        too_old = max_age_days is not None and (hour + 1) * HOUR_NS < now_ns - max_age_days * 86400 * 1e9
        over_quota = quota_bytes is not None and total - freed > quota_bytes
        if not (too_old or over_quota):
            break
        _remove(hours[hour])
        removed += 1
        freed += sizes[hour]
    return (f"removed {removed} hour(s), {freed / 1e6:.1f} MB; store now {(total - freed) / 1e6:.1f} MB "
            f"in {len(hours) - removed} hour(s)")
