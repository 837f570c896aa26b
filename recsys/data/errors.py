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
