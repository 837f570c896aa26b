"""Atomic directory publication: build in a hidden sibling, then swap it in with renames.

A run killed with -9 leaves its hidden ``.<name>.tmp-<pid>`` (or ``.old-<pid>``) sibling behind; the next
run of the stage removes every such sibling whose process is gone, whoever left it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` siblings of dead processes; what was removed."""
    removed = []
    for kind in ("tmp", "old"):
        for stale in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue  # a run of this stage still working
            if kind == "old" and not out_dir.exists():
                os.replace(stale, out_dir)  # killed between the two renames: this is the last output
                logger.warning("restored %s from %s", out_dir, stale)
                continue
            shutil.rmtree(stale, ignore_errors=True)
            logger.warning("removed %s, left by an interrupted run", stale)
            removed.append(stale)
    return removed


def fresh_tmp_dir(out_dir: Path) -> Path:
    """A new empty hidden sibling of ``out_dir`` (same file system, so the final rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``tmp``: readers see the old or the new directory, never a half-written one.

    A crash between the two renames leaves the previous output in ``.<name>.old-<pid>`` (complete); the
    next run puts it back if ``out_dir`` is missing.
    """
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
