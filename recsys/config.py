"""Typed pipeline configuration.

Every stage reads its settings from one YAML file in ``conf/`` (``conf/<section>.yaml``); the files
are validated into the pydantic models below so that a typo or a wrong type fails at start-up with the
offending key named, instead of surfacing hours later. Any key can be overridden with
``section.key=value`` strings (CLI ``--set``, Prefect flow parameters).
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONF_DIR_ENV = "RECSYS_CONF_DIR"
DATA_ROOT_ENV = "RECSYS_DATA_ROOT"
PROFILE_ENV = "RECSYS_PROFILE"
UI_URL_ENV = "RECSYS_UI_URL"
PROFILES_DIR = "profiles"
# A path segment a config value may name under the data root: no separators, no "..", no hidden names.
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# ``scheme://user:password@host`` or ``scheme://token@host`` (URLs and DSNs): the userinfo is a secret.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@")
REDACTED = "***"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(Section):
    # Root of everything the pipeline writes; relative paths are resolved against the working directory.
    data_root: Path = Path("data")

    def _under(self, name: str) -> Path:
        return self.data_root / name

    @property
    def raw_dir(self) -> Path:
        return self._under("raw")

    @property
    def events_dir(self) -> Path:
        return self._under("events")

    @property
    def quarantine_dir(self) -> Path:
        return self._under("quarantine")

    @property
    def sessions_dir(self) -> Path:
        return self._under("sessions")

    @property
    def split_dir(self) -> Path:
        return self._under("split")

    @property
    def checkpoints_dir(self) -> Path:
        return self._under("checkpoints")

    @property
    def mlflow_dir(self) -> Path:
        return self._under("mlflow")

    @property
    def prefect_home(self) -> Path:
        return self._under("prefect")

    @property
    def exports_dir(self) -> Path:
        return self._under("exports")

    @property
    def catalogue_file(self) -> Path:
        """The ingested item table (recsys.data.catalogue); optional everywhere."""
        return self._under("catalogue") / "catalogue.parquet"


class GenerateConfig(Section):
    n_events: int = Field(300_000, ge=1_000)
    n_users: int | None = Field(None, ge=10)  # None: derived from n_events (about 60 events per user)
    n_series: int | None = Field(None, ge=1)  # None: derived from n_events
    n_films: int | None = Field(None, ge=1)  # None: derived from n_events
    start_date: datetime = datetime(2026, 1, 1)
    days: int = Field(90, ge=1)
    seed: int = 7
    chunk_events: int = Field(2_000_000, ge=10_000)  # events held in memory at once while writing
    format: Literal["parquet", "csv", "ndjson"] = "parquet"
    noise_fraction: float = Field(0.002, ge=0, le=0.5)  # rows deliberately malformed, to exercise quarantine
    events_per_user: float = Field(60.0, ge=2)  # mean events per user when n_users is derived
    activity_sigma: float = Field(1.0, ge=0, le=3)  # log-normal spread of user activity (heavy tail)
    popularity_exponent: float = Field(1.0, ge=0, le=3)  # Zipf exponent of title popularity
    series_share: float = Field(0.75, ge=0, le=1)  # fraction of events that are series episodes
    binge_mean_episodes: float = Field(3.5, ge=1)  # mean consecutive episodes per sitting
    partial_fraction: float = Field(0.12, ge=0, le=1)  # watches abandoned before the end
    rewatch_fraction: float = Field(0.03, ge=0, le=1)  # film watches that repeat one already seen
    new_release_fraction: float = Field(0.1, ge=0, le=1)  # titles released during the period


class ColumnMapping(Section):
    # Names of the input columns that hold each field of the events contract.
    user_id: str = "user_id"
    item_id: str = "item_id"
    ts: str = "ts"
    watch_seconds: str | None = "watch_seconds"  # optional column; missing in the input is fine
    event_type: str | None = "event_type"  # optional column; missing in the input is fine
    ts_offset_ms: str | None = None  # optional column of milliseconds added to ts (DIGINETICA timeframe)


class IngestConfig(Section):
    format: Literal["auto", "csv", "tsv", "parquet", "ndjson"] = "auto"
    preset: (
        Literal["movielens-100k", "movielens-dat", "movielens-csv", "yoochoose", "diginetica"] | None
    ) = None
    columns: ColumnMapping = ColumnMapping()
    separator: str | None = Field(None, min_length=1)  # None: from the format (',' for csv, '\t' for tsv)
    has_header: bool = True
    ts_unit: Literal["auto", "s", "ms", "iso"] = "auto"
    min_ts: datetime = datetime(1990, 1, 1)  # earlier timestamps are quarantined as out of range
    max_future_days: float = Field(2.0, ge=0)  # timestamps later than now + this are out of range
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    timezone: str = "UTC"  # zone of timestamps written without one (IANA name); output is always UTC
    user_id_type: Literal["auto", "int", "str"] = "auto"  # auto: int when ~all ids are integers
    item_id_type: Literal["auto", "int", "str"] = "auto"
    # merge: add only events not stored yet (late events never delete anything); replace: the run's rows
    # become the whole content of every partition they touch (asked for explicitly: `ingest --replace`)
    partition_mode: Literal["merge", "replace"] = "merge"
    # partition granularity of a new events table; auto: month when the first run spans over a year
    # with few events per day (a backfill), else day. An existing table keeps its own.
    partition_by: Literal["auto", "day", "month"] = "auto"
    staging_buckets: int = Field(64, ge=1)  # date buckets staged on disk: bounds memory per step


class SessionsConfig(Section):
    mode: Literal["gap", "user"] = "gap"
    gap_minutes: float = Field(30.0, gt=0)
    # gap = next start - end of the previous play (ts + watch_seconds) when events have watch_seconds;
    # False (or no watch_seconds): gap = time between event timestamps
    gap_from_end: bool = True
    drop_consecutive_repeats: bool = True
    min_item_support: int = Field(5, ge=1)
    min_length: int = Field(2, ge=2)
    max_length: int | None = Field(200, ge=2)  # keep only the last N events of longer sequences
    n_buckets: int = Field(16, ge=1)  # user-hash partitions sorted independently (no global sort)


class SplitConfig(Section):
    protocol: Literal["temporal", "leave_one_out"] = "temporal"
    # Temporal protocol: the test cutoff is the first of these that is set.
    test_cutoff: datetime | None = None
    test_days: float | None = Field(None, gt=0)
    test_fraction: float | None = Field(0.1, gt=0, lt=1)  # of the time range
    # The validation cutoff lies the same way before the test cutoff.
    valid_days: float | None = Field(None, gt=0)
    valid_fraction: float | None = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_cutoff_rule(self) -> SplitConfig:
        if self.protocol == "temporal":
            if self.test_cutoff is None and self.test_days is None and self.test_fraction is None:
                raise ValueError("temporal split needs one of test_cutoff, test_days, test_fraction")
            if self.valid_days is None and self.valid_fraction is None:
                raise ValueError("temporal split needs one of valid_days, valid_fraction")
        return self


class ModelConfig(Section):
    cell: Literal["gru", "lstm", "rnn"] = "gru"
    hidden_size: int = Field(100, ge=1)
    n_layers: int = Field(1, ge=1)
    embedding: Literal["shared", "separate", "none"] = "shared"
    embedding_dim: int = Field(0, ge=0)  # separate embedding only; 0 means hidden_size
    dropout_embed: float = Field(0.0, ge=0, lt=1)
    dropout_hidden: float = Field(0.0, ge=0, lt=1)
    # hidden dropout also on the state carried to the next step (the published code's behaviour)
    dropout_state: bool = False
    # learned score offset for items already in the sequence (repeat consumption; 0 init, trained)
    history_bias: bool = False


class TrainConfig(Section):
    loss: Literal["cross_entropy", "bpr_max"] = "cross_entropy"
    batch_size: int = Field(64, ge=1)
    n_sample: int = Field(2048, ge=0)
    sample_alpha: float = Field(0.5, ge=0, le=1)
    sample_store_batches: int = Field(10, ge=1)  # negatives drawn in bulk for this many steps at once
    bpreg: float = Field(1.0, ge=0)
    elu_param: float = Field(0.5, ge=0)  # BPR-max: ELU on the scores (0 = none), as in the published code
    logq: float = Field(0.0, ge=0)
    # logQ of the in-batch target columns: sampling = popularity^alpha like the extra samples; count = the
    # item's training count (the published code; extra samples keep count^alpha)
    logq_targets: Literal["sampling", "count"] = "sampling"
    # a column holding the row's own target item (a repeated target, a sample equal to it) is no negative;
    # false keeps it, as the published code does
    mask_duplicate_targets: bool = True
    # shuffle: a new seeded order every epoch | start_time: by first event time, every epoch (published)
    epoch_order: Literal["shuffle", "start_time"] = "shuffle"
    # never use an item of the row's own history as a negative; None: from the policy (on when it excludes
    # every history item and the model learns no history bias)
    mask_seen_negatives: bool | None = None
    optimizer: Literal["adagrad_momentum", "adam"] = "adagrad_momentum"
    learning_rate: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    epochs: int = Field(10, ge=1)
    patience: int = Field(3, ge=1)  # early stopping on validation MRR@20
    # after early stopping: train a fresh model on train + valid for the chosen number of epochs
    refit: bool = False
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bf16 autocast on CUDA only
    # torch.compile the fast step (CPU ~2x per step; 5-60 s to compile, cached on disk). auto: on for a CPU
    # run whose epochs x steps reach AUTO_COMPILE_MIN_STEPS (recsys.model.step), off for short runs and CUDA
    compile: bool | Literal["auto"] = "auto"
    # the hand-written step (forward, backward, update in few static-shape ops); false: autograd (reference)
    fast_step: bool = True
    # CUDA only: capture the fast step once as a CUDA graph and replay it (needs fast_step, adagrad_momentum)
    cuda_graphs: bool = False
    # torch CPU threads for the training step; None = 1 (fastest measured on a shared 2-core box)
    threads: int | None = Field(None, ge=1)
    # checkpoints go to paths.checkpoints_dir / run_name: a plain name (no "/" or ".."), so never outside
    run_name: str = "gru4rec"

    @field_validator("run_name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(SAFE_NAME, value):
            raise ValueError("must be a plain name (letters, digits, '.', '_', '-'; no '/' or '..'): "
                             "checkpoints stay under the data root")
        return value


class SlicesConfig(Section):
    # history-length bucket starts (events before the target): [2, 5, 10, 20] -> 1, 2-4, 5-9, 10-19, 20+
    history_edges: list[int] = [2, 5, 10, 20]
    head_share: float = Field(0.5, gt=0, lt=1)  # head items: the most popular, making up this share of events
    torso_share: float = Field(0.8, gt=0, lt=1)  # torso: the next items up to this share; tail: the rest
    catalogue: Path | None = None  # catalogue.parquet with a `kind` column; None: found under raw/
    confidence: float = Field(0.95, gt=0, lt=1)  # level of the bootstrap intervals
    n_resamples: int = Field(1000, ge=100)  # bootstrap resamples
    seed: int = 0

    @model_validator(mode="after")
    def _shares_ordered(self) -> SlicesConfig:
        if self.torso_share <= self.head_share:
            raise ValueError("torso_share must be larger than head_share")
        return self


class EvaluateConfig(Section):
    slices: SlicesConfig = SlicesConfig()
    cutoffs: list[int] = [1, 5, 10, 20]
    chunk_size: int = Field(2048, ge=1)  # queries scored against the full catalogue at once
    knn_neighbours: int = Field(200, ge=1)
    knn_lambda: float = Field(20.0, ge=0)  # shrinkage of the cosine similarity


class PolicyConfig(Section):
    """What may be recommended given the history: stored in the model, applied by every stage alike."""

    # auto: from the split's record: all for whole-user sequences (rating logs), completed for sessions
    exclude: Literal["auto", "none", "completed", "all"] = "auto"
    # the episode after the latest one watched of each followed series stays eligible; None: on when a
    # catalogue with series is found
    continue_series: bool | None = None
    # with continuation on: the next episodes of this many most recently watched series lead the list;
    # None: recsys.model.policy.DEFAULT_CONTINUATION_SLOTS at training, the stored value when ranking
    continuation_slots: int | None = Field(None, ge=0)
    catalogue: Path | None = None  # item_id, series_id, season, episode; None: raw/*/catalogue.parquet
    partial_event_types: list[str] = ["partial"]  # event_type of unfinished watches (resumable)
    override: bool = False  # rank a model under rules other than its stored ones (recorded)


class TrackingConfig(Section):
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else SQLite under paths.mlflow_dir
    experiment: str = "recsys"
    registered_model: str = "recsys-gru4rec"
    system_metrics: bool = True
    # Calls to the store retry transient failures for this long in all (an MLflow server restart takes
    # 40-60 s to answer again), then fail with a clear error; training itself never waits for it.
    retry_window_seconds: float = Field(180.0, ge=0)
    retry_backoff_seconds: float = Field(2.0, ge=0)  # first retry delay; doubles up to retry_max_backoff
    retry_max_backoff_seconds: float = Field(15.0, gt=0)
    # Base URL of the MLflow UI a person's browser can open (links in Prefect artifacts and the demo).
    # None: the tracking URI for a server, http://127.0.0.1:5000 (`recsys ui`) for the embedded store.
    # $RECSYS_UI_URL sets it too (docker/compose.yaml: the published port).
    ui_url: str | None = None


class PromoteConfig(Section):
    metric: str = "mrr@20"
    min_improvement: float = Field(0.0, ge=0)  # relative: challenger must beat champion by this fraction
    # Paired bootstrap over test targets: the lower bound of this interval of (challenger - champion) must
    # clear the margin. None: compare point estimates only (the old rule).
    confidence: float | None = Field(0.95, gt=0, lt=1)
    n_resamples: int = Field(1000, ge=100)
    min_slice_targets: int = Field(200, ge=1)  # slices with fewer targets never block a promotion
    slice_tolerance: float = Field(0.05, ge=0)  # relative drop of a slice's metric that blocks promotion
    slice_tolerances: dict[str, float] = {}  # per-slice overrides, e.g. {"user:cold": 0.10}


class TuneConfig(Section):
    study_name: str = "recsys-tune"  # Optuna study and MLflow parent run; same name = resume
    metric: str = "mrr@20"  # validation metric maximised (best epoch of each trial)
    n_trials: int = Field(20, ge=1)  # finished trials in total, resumed runs included
    timeout_minutes: float | None = Field(60.0, gt=0)
    epochs: int | None = Field(None, ge=1)  # per-trial epochs; None keeps train.epochs
    seed: int = 42  # TPE sampler seed
    prune: bool = True  # stop trials below the median of earlier trials at the same epoch
    prune_after_trials: int = Field(5, ge=0)  # never prune during the first trials
    # Search space: dotted config key -> {type: float|int|categorical, low, high, log, step, choices}
    space: dict[str, dict[str, Any]] = {}


class Limit(Section):
    """Bounds of one monitored number: crossing a warn bound warns, crossing a fail bound fails."""

    warn_below: float | None = None
    fail_below: float | None = None
    warn_above: float | None = None
    fail_above: float | None = None


class MonitoringConfig(Section):
    enabled: bool = True
    block_on_fail: bool = True  # a failing export is not published (the previous run date stays latest)
    report_runs: int = Field(30, ge=1)  # run dates shown in the export report
    min_users: int = Field(50, ge=1)  # fewer users scored: the shares say nothing, limits are not applied
    # monitored number (see recsys.serving.monitoring.MONITORED) -> its bounds
    limits: dict[str, Limit] = {
        "coverage": Limit(warn_below=0.05),
        "gini": Limit(warn_above=0.95, fail_above=0.995),
        "identical_list_share": Limit(warn_above=0.2, fail_above=0.5),
        "top_item_user_share": Limit(warn_above=0.9, fail_above=0.99),
        "popular_share": Limit(warn_above=0.5, fail_above=0.95),
        "unknown_user_share": Limit(warn_above=0.5),
        "jaccard_mean": Limit(warn_below=0.05),
    }


class ScoreConfig(Section):
    monitoring: MonitoringConfig = MonitoringConfig()
    top_k: int = Field(20, ge=1, le=1000)
    history_days: float | None = Field(None, gt=0)  # None: the whole history
    max_history: int = Field(50, ge=1)
    exclude_items_file: Path | None = None  # one item id per line: withdrawn from the catalogue
    # Histories encoded at once (length-sorted, padded). None: 1024 on CPU (fastest measured), 16384 on CUDA.
    user_batch_size: int | None = Field(None, ge=1)
    # Scores held at once (users x catalogue). None: 128 users' worth on CPU (fastest measured, at most 64M),
    # 256M on CUDA. Bounds scoring memory whatever the catalogue size.
    chunk_elements: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bfloat16: encode and score under autocast (~2x faster on CPUs with AVX512-BF16 / on GPUs); ranks
    # may differ slightly from float32 among near-tied items.
    precision: Literal["float32", "bfloat16"] = "float32"
    threads: int | None = Field(None, ge=1)  # torch CPU threads while scoring; None: the idle cores (>= 1)
    write_csv: bool = False
    write_wide: bool = False


class UpdateConfig(Section):
    parent: str = "champion"  # alias (or version number) of the registered model that is updated
    new_days: float = Field(7.0, gt=0)  # sequences ending in the last N days before the cutoff are new data
    replay_fraction: float = Field(0.3, ge=0, lt=1)  # share of the pass drawn from older training sequences
    context_events: int = Field(20, ge=0)  # earlier events kept before the new window (whole-user sequences)
    epochs: int = Field(1, ge=1)  # warm-started passes over new + replay data
    lr_scale: float = Field(1.0, gt=0)  # learning rate = train.learning_rate * lr_scale (fresh optimiser)
    # weight of the parent in the final shared weights (old rows, recurrent layers): against forgetting
    parent_weight: float = Field(0.7, ge=0, lt=1)
    neighbours: int = Field(20, ge=1)  # known items of nearest recent popularity used to initialise a new one
    use_catalogue: bool = True  # add released catalogue items even before their first event
    rate_init: bool = True  # compare a new title with known ones by plays per day since release, not by count
    refresh_young: bool = True  # after the pass: titles released in new_days get rows of known ones as hot
    rate_line: bool = True  # then their bias puts their mean score on known titles' score-vs-log-rate line
    run_name: str = "update"  # checkpoints go to paths.checkpoints_dir / run_name / <parent>-<cutoff>


class OrchestrateConfig(Section):
    ingest_cron: str = "0 2 * * *"
    score_cron: str = "0 4 * * *"
    train_cron: str = "0 3 * * 0"
    update_cron: str = "0 3 * * 1-6"  # daily incremental update + promotion (not on the weekly training day)
    timezone: str = "UTC"
    train_concurrency: int = Field(1, ge=1)
    server_port: int = Field(4200, ge=1, le=65535)  # `recsys serve`'s local Prefect server (127.0.0.1)
    io_retries: int = Field(3, ge=0)
    io_retry_delay_seconds: float = Field(5.0, ge=0)


class Config(Section):
    paths: PathsConfig = PathsConfig()
    generate: GenerateConfig = GenerateConfig()
    ingest: IngestConfig = IngestConfig()
    sessions: SessionsConfig = SessionsConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    policy: PolicyConfig = PolicyConfig()
    tracking: TrackingConfig = TrackingConfig()
    promote: PromoteConfig = PromoteConfig()
    tune: TuneConfig = TuneConfig()
    score: ScoreConfig = ScoreConfig()
    update: UpdateConfig = UpdateConfig()
    orchestrate: OrchestrateConfig = OrchestrateConfig()


SECTIONS: tuple[str, ...] = tuple(Config.model_fields)


def default_conf_dir() -> Path:
    """``$RECSYS_CONF_DIR`` if set, else ``./conf`` if present, else the repository's ``conf/``."""
    if env := os.environ.get(CONF_DIR_ENV):
        return Path(env)
    local = Path.cwd() / "conf"
    if local.is_dir():
        return local
    return Path(__file__).resolve().parent.parent / "conf"


def _format_validation_error(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {msg} (got {e.get('input')!r})" if e["type"] != "extra_forbidden" else
                     f"{key}: {msg}")
    if len(lines) == 1:  # the usual case: one line that names the key
        return f"invalid configuration ({where}): {lines[0]}"
    return f"invalid configuration ({where}):\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'ingest.columns.user_id=uid'`` -> (['ingest', 'columns', 'user_id'], 'uid'); value parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"override {text!r}: key must name a section and a field, e.g. train.epochs=5")
    if path[0] not in SECTIONS:
        raise ConfigError(f"{key.strip()}: unknown section {path[0]!r} (known: {', '.join(SECTIONS)})")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or "not valid YAML")
        raise ConfigError(f"override {text!r}: {problem} (quote the value, e.g. key='* * * * *')") from None
    return path, value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _read_mapping(file: Path, what: str) -> dict[str, Any]:
    try:
        content = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(content, dict):
        raise ConfigError(f"{file}: must hold a mapping of keys for {what}")
    return content


def available_profiles(conf_dir: Path | None = None) -> list[str]:
    """Names of the profiles in ``<conf_dir>/profiles/*.yaml``."""
    conf_dir = Path(conf_dir) if conf_dir is not None else default_conf_dir()
    return sorted(f.stem for f in (conf_dir / PROFILES_DIR).glob("*.yaml"))


def _overlay(tree: dict[str, Any], sections: dict[str, Any], where: str) -> None:
    """Set every ``{section: {key: value}}`` of ``sections`` in ``tree``; errors name ``where``."""
    for section, content in sections.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
        if not isinstance(content, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys")
        for key, value in _flatten(content).items():
            _set_path(tree, [section, *key.split(".")], value)


def _apply_profile(tree: dict[str, Any], conf_dir: Path, name: str) -> None:
    """Overlay ``<conf_dir>/profiles/<name>.yaml`` (``section: {key: value}``) on the section files."""
    file = conf_dir / PROFILES_DIR / f"{name}.yaml"
    if not file.is_file():
        known = ", ".join(available_profiles(conf_dir)) or "none"
        raise ConfigError(f"profile {name!r}: no file {file} (known profiles: {known})")
    _overlay(tree, _read_mapping(file, "sections"), str(file))


def load_config(
    conf_dir: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
    profile: str | None = None,
) -> Config:
    """Load ``conf/<section>.yaml`` files, then a profile, nested ``values`` and ``overrides``; validate.

    A missing section file means that section's defaults. A profile (``profile`` or
    ``$RECSYS_PROFILE``) is a file ``conf/profiles/<name>.yaml`` of tuned settings for one kind of data
    (e.g. ``movielens``), applied over the section files so explicit overrides still win.
    ``RECSYS_DATA_ROOT`` overrides ``paths.data_root`` (useful for tests and containers) before
    explicit overrides apply.
    """
    conf_dir = Path(conf_dir) if conf_dir is not None else default_conf_dir()
    tree: dict[str, Any] = {}
    if conf_dir.is_dir():
        for file in sorted(conf_dir.glob("*.yaml")):
            section = file.stem
            if section not in SECTIONS:
                raise ConfigError(f"{file}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
            tree[section] = _read_mapping(file, f"section {section!r}")
    elif conf_dir is not None and str(conf_dir) and not conf_dir.exists():
        raise ConfigError(f"config directory {conf_dir} does not exist")
    if profile := profile or os.environ.get(PROFILE_ENV):
        _apply_profile(tree, conf_dir, profile)
    if env_root := os.environ.get(DATA_ROOT_ENV):
        _set_path(tree, ["paths", "data_root"], env_root)
    if env_ui := os.environ.get(UI_URL_ENV):
        _set_path(tree, ["tracking", "ui_url"], env_ui)
    _overlay(tree, values or {}, "values")
    for text in overrides:
        path, value = parse_override(text)
        _set_path(tree, path, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(conf_dir))) from None


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def redact(text: str) -> str:
    """``text`` with the credentials of every URL/DSN in it replaced: ``http://***@host``.

    Applied to everything that records configuration or a store URI (params, artifacts, checkpoints,
    log lines, error messages), so a password in ``tracking.tracking_uri`` is never written down.
    """
    return _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)


def _redact_tree(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_tree(v) for v in value]
    return value


def recorded_config(config: Config) -> dict[str, Any]:
    """The configuration as JSON-ready data with credentials redacted: the only form that is stored."""
    return _redact_tree(config.model_dump(mode="json"))


def flatten_config(config: Config) -> dict[str, str]:
    """``{'train.batch_size': '64', ...}``: the form MLflow params and Prefect artifacts take (redacted)."""
    return {k: str(v) for k, v in _flatten(recorded_config(config)).items()}


def config_to_yaml(config: Config) -> str:
    """The resolved configuration as YAML, every section, for artifacts and manifests (redacted)."""
    return yaml.safe_dump(recorded_config(config), sort_keys=False)


def confined(path: Path, root: Path, what: str) -> Path:
    """``path`` resolved, refused with a one-line :class:`ConfigError` when it lies outside ``root``."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise ConfigError(f"{what}={path} lies outside the data root {base}: refused")
    return resolved
