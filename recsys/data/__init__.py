"""Data stages: ingest -> sessions -> split, plus the synthetic log generator."""
