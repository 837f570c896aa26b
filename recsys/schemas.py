"""Column names and polars schemas of every file contract (see DESIGN.md, "File contracts").

Ids keep their original values and type end to end (int or string); contiguous item indices exist only
inside a model and its vocabulary.
"""

from __future__ import annotations

import polars as pl

# events: data/events/event_date=YYYY-MM-DD/*.parquet
USER_ID = "user_id"
ITEM_ID = "item_id"
TS = "ts"
WATCH_SECONDS = "watch_seconds"
EVENT_TYPE = "event_type"
EVENT_DATE = "event_date"  # hive partition key, not stored in the files
TS_DTYPE = pl.Datetime("us", "UTC")
EVENT_OPTIONAL = {WATCH_SECONDS: pl.Float64, EVENT_TYPE: pl.String}

# quarantine: data/quarantine/*.parquet
QUARANTINE_SCHEMA = {"source": pl.String, "row": pl.Int64, "reason": pl.String, "raw": pl.String}

# sessions: data/sessions/*.parquet, and split/{train,valid,test}.parquet (+ n_context)
SESSION_ID = "session_id"
START_TS = "start_ts"
END_TS = "end_ts"
ITEMS = "items"
ITEM_TS = "ts"
# Number of leading items of a sequence that are history only (fed to the model, never targets).
# Every later position p >= max(n_context, 1) is a next-item target predicted from items[:p].
N_CONTEXT = "n_context"

# vocab: split/vocab.parquet
IDX = "idx"
COUNT = "count"
VOCAB_IDX_DTYPE = pl.Int32

# recs export (long format): exports/recs/run_date=YYYY-MM-DD/*.parquet
RANK = "rank"
SCORE = "score"
SOURCE = "source"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
RUN_DATE = "run_date"
RECS_SCHEMA = {
    RANK: pl.Int16,
    SCORE: pl.Float32,
    SOURCE: pl.String,
    MODEL_NAME: pl.String,
    MODEL_VERSION: pl.String,
    RUN_DATE: pl.Date,
}

# split directory file names
TRAIN_FILE = "train.parquet"
VALID_FILE = "valid.parquet"
TEST_FILE = "test.parquet"
VOCAB_FILE = "vocab.parquet"
STATS_FILE = "stats.json"
MANIFEST_FILE = "_manifest.json"
