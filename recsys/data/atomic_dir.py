"""Atomic directory publication: build in a hidden sibling, then swap it in with renames."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fresh_tmp_dir(out_dir: Path) -> Path:
    """A new empty hidden sibling of ``out_dir`` (same file system, so the final rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``tmp``: readers see the old or the new directory, never a half-written one.

    A crash between the two renames leaves the previous output in ``.<name>.old-<pid>`` (complete).
    """
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
