"""Data stages: ingest -> sessions -> split, plus the synthetic log generator."""

from recsys import lazy_exports

__all__ = ["IngestError", "IngestReport", "Vocab", "build_sessions", "generate", "ingest_files",
           "load_sequences", "split_sessions"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "IngestError": "errors", "IngestReport": "ingest", "ingest_files": "ingest",
    "build_sessions": "sessions", "split_sessions": "split", "Vocab": "vocab",
    "load_sequences": "sequences", "generate": "synthetic",
})
