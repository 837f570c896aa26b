"""Hyperparameter search (``recsys tune``): Optuna trials as nested MLflow runs under one parent run.

The study lives in an Optuna SQLite database under ``paths.mlflow_dir`` and the parent run is found again
by its study tag, so an interrupted search resumes where it stopped (a trial cut off mid-way is marked
failed and its parameters are tried again). Each trial trains on the split's train set and is judged by
its best validation metric (default MRR@20); the test split is never looked at while tuning. Unpromising
trials are pruned after each epoch (median rule).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recsys.config import Config, ConfigError, flatten_config
from recsys.tracking.run_report import metric_key

logger = logging.getLogger(__name__)

OPTUNA_DB = "optuna.db"
KINDS = ("float", "int", "categorical")


def _apply(config: Config, values: dict[str, Any]) -> Config:
    """A copy of ``config`` with dotted keys (``train.learning_rate``) replaced, validated."""
    tree = config.model_dump(mode="json")
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    try:
        return Config.model_validate(tree)
    except Exception as exc:
        raise ConfigError(f"tune.space gives invalid values {values}: {exc}") from None


def check_space(config: Config) -> dict[str, dict[str, Any]]:
    """Validate ``tune.space``: known keys, a known type, and bounds/choices the config accepts."""
    space = config.tune.space
    if not space:
        raise ConfigError("tune.space is empty: list the keys to search in conf/tune.yaml")
    known = flatten_config(config)
    for key, spec in space.items():
        if key not in known:
            raise ConfigError(f"tune.space.{key}: not a config key (e.g. train.learning_rate)")
        kind = spec.get("type")
        if kind not in KINDS:
            raise ConfigError(f"tune.space.{key}.type must be one of {KINDS}, got {kind!r}")
        if kind == "categorical":
            if not spec.get("choices"):
                raise ConfigError(f"tune.space.{key}: categorical needs a non-empty 'choices' list")
            samples = list(spec["choices"])
        else:
            if "low" not in spec or "high" not in spec or not spec["low"] <= spec["high"]:
                raise ConfigError(f"tune.space.{key}: {kind} needs low <= high")
            if spec.get("log") and spec["low"] <= 0:
                raise ConfigError(f"tune.space.{key}: log scale needs low > 0")
            samples = [spec["low"], spec["high"]]
        for value in samples:
            _apply(config, {key: value})
    return space


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]),
                                              log=bool(spec.get("log", False)), step=spec.get("step"))
        elif spec["type"] == "int":
            values[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]),
                                            log=bool(spec.get("log", False)), step=int(spec.get("step", 1)))
        else:
            values[key] = trial.suggest_categorical(key, list(spec["choices"]))
    return values


@contextlib.contextmanager
def _study_lock(path: Path) -> Iterator[None]:
    """One process per study, so trials left RUNNING can only be leftovers of a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another `recsys tune` is running this study ({path})") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _requeue_interrupted(study: Any, client: Any) -> None:
    """Trials cut off by a crash: mark failed (and their MLflow runs killed), enqueue their params again."""
    import optuna

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, skip_if_exists=True)
        if run_id := trial.user_attrs.get("mlflow_run_id"):
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, "KILLED")
        logger.warning("trial %d was interrupted: marked failed, its parameters queued again", trial.number)


def _parent_run(client: Any, experiment_id: str, study_name: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`recsys.kind` = 'tune' and tags.`recsys.study` = '{study_name}'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def tune(config: Config) -> dict[str, Any]:
    """Run (or resume) the search; returns the best trial, its params and the parent/child run ids."""
    import mlflow
    import optuna

    from recsys.tracking.runs import EpochLogger
    from recsys.tracking.store import connect

    space = check_space(config)
    tcfg = config.tune
    metric = tcfg.metric
    store = connect(config)
    client = store.client
    db = config.paths.mlflow_dir / OPTUNA_DB
    with _study_lock(db.with_name(f".tune-{tcfg.study_name}.lock")):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name=tcfg.study_name, storage=f"sqlite:///{db.resolve()}", direction="maximize",
            load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=tcfg.seed),
            pruner=(optuna.pruners.MedianPruner(n_startup_trials=tcfg.prune_after_trials, n_warmup_steps=1)
                    if tcfg.prune else optuna.pruners.NopPruner()),
        )
        _requeue_interrupted(study, client)
        done = [t for t in study.trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
        remaining = max(tcfg.n_trials - len(done), 0)
        parent_id = _parent_run(client, store.experiment_id, tcfg.study_name)
        parent = mlflow.start_run(
            run_id=parent_id, experiment_id=None if parent_id else store.experiment_id,
            run_name=None if parent_id else f"tune-{tcfg.study_name}",
            tags=None if parent_id else {"recsys.kind": "tune", "recsys.study": tcfg.study_name,
                                         "tune.metric": f"valid {metric}"},
        )
        if parent_id is None:
            mlflow.log_params({f"space.{k}": str(v) for k, v in space.items()})
            mlflow.log_params({"n_trials": tcfg.n_trials, "timeout_minutes": tcfg.timeout_minutes,
                               "optuna_storage": str(db.resolve())})
        logger.info("tuning %d more trial(s) of study %r (parent run %s)", remaining, tcfg.study_name,
                    parent.info.run_id)
        try:
            if remaining:
                study.optimize(
                    lambda trial: _objective(trial, config, space, parent.info.run_id, EpochLogger),
                    n_trials=remaining,
                    timeout=tcfg.timeout_minutes * 60 if tcfg.timeout_minutes else None,
                    catch=(RuntimeError,),  # a diverging or out-of-memory trial fails alone
                )
            summary = _record_best(study, metric, parent.info.run_id)
        except BaseException:
            mlflow.end_run(status="KILLED")
            raise
        mlflow.end_run(status="FINISHED")
    return summary


def _objective(trial: Any, config: Config, space: dict, parent_run_id: str, epoch_logger: type) -> float:
    """Train one configuration in a nested run; the value is its best validation metric over epochs."""
    import mlflow
    import optuna

    from recsys.training.train import train_model

    tcfg = config.tune
    values = suggest(trial, space)
    if tcfg.epochs is not None:
        values = {**values, "train.epochs": tcfg.epochs}
    trial_config = _apply(config, values)
    checkpoint_dir = config.paths.checkpoints_dir / "tune" / tcfg.study_name / f"trial-{trial.number}"
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # a re-run trial starts fresh
    run = mlflow.start_run(nested=True, run_name=f"trial-{trial.number}", parent_run_id=parent_run_id,
                           tags={"recsys.kind": "tune-trial", "optuna.trial": str(trial.number)})
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    key = metric_key(tcfg.metric)
    best = -math.inf
    status = "FAILED"
    try:
        mlflow.log_params({k: str(v) for k, v in values.items()})
        log_epoch = epoch_logger(config, run.info.run_id, mlflow.get_tracking_uri())

        def on_epoch(info: dict[str, Any]) -> None:
            nonlocal best
            log_epoch(info)
            value = float(info["valid"][tcfg.metric])
            best = max(best, value)
            trial.report(value, int(info["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"valid {tcfg.metric}={value:.4f} after epoch {info['epoch']}")

        train_model(trial_config, split_dir=config.paths.split_dir, checkpoint_dir=checkpoint_dir,
                    on_epoch=on_epoch, evaluate_test=False)
        mlflow.log_metric(f"best_valid_{key}", best, run_id=run.info.run_id)
        status = "FINISHED"
        return best
    except optuna.TrialPruned:
        mlflow.set_tag("optuna.pruned", "true")
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status=status)
        mlflow.log_metric(f"trial_valid_{key}", best if best > -math.inf else float("nan"),
                          step=trial.number, run_id=parent_run_id)
        (checkpoint_dir / "last.pt").unlink(missing_ok=True)  # only best.pt of a trial is kept


def _record_best(study: Any, metric: str, parent_run_id: str) -> dict[str, Any]:
    """Best trial's value, params and child run id as tags and a metric on the parent run."""
    import mlflow
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    summary: dict[str, Any] = {"parent_run_id": parent_run_id, "n_trials": len(study.trials),
                               "n_complete": len(complete), "study": study.study_name}
    if not complete:
        logger.warning("no trial completed: nothing to record as best")
        return summary
    best = study.best_trial
    run_id = best.user_attrs.get("mlflow_run_id", "")
    summary.update(best_trial=best.number, best_value=best.value, best_params=best.params, best_run_id=run_id)
    mlflow.log_metric(f"best_valid_{metric_key(metric)}", float(best.value), run_id=parent_run_id)
    mlflow.set_tags({"best_trial": str(best.number), "best_run_id": run_id,
                     **{f"best.{k}": str(v) for k, v in best.params.items()}})
    mlflow.log_dict({"best_trial": best.number, f"valid_{metric}": best.value, "params": best.params,
                     "overrides": [f"--set {k}={v}" for k, v in best.params.items()]}, "best_params.json")
    return summary
