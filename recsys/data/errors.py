"""Errors raised by the data stages."""

from __future__ import annotations

from typing import Any


class IngestError(ValueError):
    """Ingest cannot go on: the message names the file (and column) at fault.

    ``report`` carries the partial :class:`~recsys.data.ingest.IngestReport` when the failure came
    after the input was read (e.g. too many bad rows), so callers can still show the counts.
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


def clip(text: object, limit: int = 200) -> str:
    """At most ``limit`` characters of ``text`` for an error message (a 10 MB header is not echoed)."""
    s = str(text)
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s):,} characters)"
