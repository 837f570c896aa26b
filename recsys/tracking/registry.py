"""Model registry: every trained model becomes a version with alias ``challenger``; the promotion gate
(recsys.tracking.promotion) moves ``champion``.

Aliases, never stages (DESIGN.md). Consumers (scoring, serving) ask :func:`resolve_model` for a checkpoint
path given ``models:/NAME@alias``, ``models:/NAME/VERSION``, ``runs:/RUN/PATH`` or a local path, so the
champion can be moved without touching them.

Registration is idempotent per run (a retried or resumed registration finds the version its run already
has, so a kill at any moment leaves at most one version per run), refuses checkpoints with non-finite
weights, and records the checkpoint's SHA-256 on the version: every download, cached or fresh, is checked
against it, so a truncated or stale cache entry is fetched again instead of being served.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.config import Config

if TYPE_CHECKING:
    from recsys.tracking.store import TrackingStore

# recsys.tracking.store (and so mlflow, ~4 s to import) is imported inside the functions that talk to the
# store: resolving a local checkpoint path must stay cheap for scoring.

logger = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
CHECKPOINT_IN_MODEL = Path("artifacts") / "checkpoint.pt"  # inside a downloaded pyfunc model directory
TAG_VALUE_LIMIT = 4500  # model version tags hold at most 5000 characters
SHA_TAG = "checkpoint_sha256"


@dataclass(frozen=True)
class ResolvedModel:
    checkpoint_path: Path
    name: str
    version: str
    run_id: str
    uri: str


class RegistryError(RuntimeError):
    """A model URI that names nothing, or a registry without the version asked for."""


# --- registering -----------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_registrable(checkpoint: Path) -> Any:
    """The loaded checkpoint, or a one-line error: unreadable, or weights that are NaN/infinite."""
    from recsys.model.checkpoint import CheckpointError, load_checkpoint, non_finite_weights

    ckpt = load_checkpoint(checkpoint)
    bad = non_finite_weights(ckpt)
    if bad:
        raise CheckpointError(f"{checkpoint}: refused: non-finite weights in {', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''} (a diverged model is never registered)")
    return ckpt


def version_of_run(client: Any, name: str, run_id: str) -> Any | None:
    """The version a run already registered under ``name`` (the oldest if a race made two), else None."""
    found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _crash_point(name: str) -> None:
    """No-op in production; tests raise here to stop registration exactly where a kill -9 would."""


def log_and_register(config: Config, checkpoint: Path, run_id: str) -> Any:
    """Log ``checkpoint`` as the pyfunc model of the active run ``run_id``, register it, alias ``challenger``.

    Returns the MLflow ``ModelVersion``. Idempotent per run: when ``run_id`` already has a version (a
    retry, or a resume after a kill), that version is completed and returned instead of a new one.
    """
    from mlflow import MlflowClient

    from recsys.model.pyfunc import log_pyfunc_model
    from recsys.tracking.store import resolve_tracking_uri

    check_registrable(checkpoint)
    sha = file_sha256(checkpoint)
    uri = resolve_tracking_uri(config)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = config.tracking.registered_model
    existing = version_of_run(client, name, run_id)
    if existing is not None:
        version = str(existing.version)
        logger.info("run %s already registered %s version %s: completing it", run_id, name, version)
    else:
        info = log_pyfunc_model(checkpoint, registered_model_name=name)
        version = str(info.registered_model_version)
    _crash_point("registered")
    client.set_model_version_tag(name, version, "run_id", run_id)
    client.set_model_version_tag(name, version, "checkpoint", str(checkpoint))
    client.set_model_version_tag(name, version, SHA_TAG, sha)
    client.set_registered_model_alias(name, CHALLENGER, version)
    logger.info("registered %s version %s as @%s (run %s)", name, version, CHALLENGER, run_id)
    return client.get_model_version(name, version)


# --- resolving a model URI -------------------------------------------------------------------------


def _cached(target: Path, expected_sha: str | None) -> bool:
    """A complete cache entry whose checkpoint matches the registry's checksum (when one is recorded)."""
    checkpoint = target / CHECKPOINT_IN_MODEL
    if not checkpoint.is_file():
        return False
    if expected_sha is None or file_sha256(checkpoint) == expected_sha:
        return True
    logger.warning("cached %s does not match its registered checksum: downloading it again", checkpoint)
    return False


def _download(config: Config, artifact_uri: str, cache_key: str, expected_sha: str | None = None) -> Path:
    """Download a model directory once into ``mlflow_dir/downloads/<cache_key>`` (atomic rename).

    With ``expected_sha`` (recorded at registration) a cached copy is used only if its checkpoint has that
    SHA-256, and a fresh download that does not is an error (the stored artifact is damaged).
    """
    import mlflow

    from recsys.tracking.store import resolve_tracking_uri, with_retries

    store_key = hashlib.sha256(resolve_tracking_uri(config).encode()).hexdigest()[:12]  # one cache per store
    target = config.paths.mlflow_dir / "downloads" / store_key / cache_key
    if _cached(target, expected_sha):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        local = with_retries(
            lambda: mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(staging)),
            config, f"downloading {artifact_uri}",
        )
        local = Path(local)
        if not (local / CHECKPOINT_IN_MODEL).is_file():
            raise RegistryError(f"{artifact_uri} holds no {CHECKPOINT_IN_MODEL}: not a recsys model")
        if expected_sha is not None and file_sha256(local / CHECKPOINT_IN_MODEL) != expected_sha:
            raise RegistryError(f"{artifact_uri}: the downloaded {CHECKPOINT_IN_MODEL} does not match "
                                f"the SHA-256 recorded at registration ({expected_sha[:12]}...): damaged")
        if target.exists():  # a stale or damaged entry: out of the way in one rename, then deleted
            os.replace(target, staging / "stale")
        try:
            os.replace(local, target)
        except OSError:  # another process published it first
            if not _cached(target, expected_sha):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _local(uri: str) -> ResolvedModel | None:
    path = Path(uri).expanduser()
    if path.is_file():
        return ResolvedModel(path.resolve(), name="", version="", run_id="", uri=str(path))
    if (path / CHECKPOINT_IN_MODEL).is_file():
        checkpoint = (path / CHECKPOINT_IN_MODEL).resolve()
        return ResolvedModel(checkpoint, name="", version="", run_id="", uri=str(path))
    return None


def get_version(store: TrackingStore, config: Config, name: str, ref: str) -> Any:
    """A ``ModelVersion`` by alias (``@champion``) or number; :class:`RegistryError` when there is none."""
    from mlflow.exceptions import MlflowException

    from recsys.tracking.store import with_retries

    client = store.client
    try:
        if ref.startswith("@"):
            return with_retries(lambda: client.get_model_version_by_alias(name, ref[1:]), config,
                                f"looking up {name}{ref}", store.uri)
        return with_retries(lambda: client.get_model_version(name, ref), config,
                            f"looking up {name}/{ref}", store.uri)
    except MlflowException as exc:
        raise RegistryError(f"registered model {name!r} has no version {ref!r} in {store.uri}: "
                            f"{str(exc).splitlines()[0]}") from exc


def resolve_model(config: Config, model_uri: str) -> ResolvedModel:
    """The local checkpoint file behind a model URI (downloading the model once when needed)."""
    if not model_uri.startswith(("models:/", "runs:/")):
        local = _local(model_uri)
        if local is None:
            raise RegistryError(f"{model_uri!r} is neither a model URI (models:/NAME@alias, models:/NAME/3, "
                                "runs:/RUN_ID/model) nor an existing checkpoint file or model directory")
        return local
    from recsys.tracking.store import connect

    store = connect(config)
    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri.removeprefix("runs:/").partition("/")
        local = _download(config, model_uri, f"runs/{run_id}/{path.strip('/') or 'root'}")
        return ResolvedModel(local / CHECKPOINT_IN_MODEL, name="", version="", run_id=run_id, uri=model_uri)
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = get_version(store, config, name, "@" + alias)
    else:
        name, _, number = rest.partition("/")
        if not number:
            raise RegistryError(f"{model_uri!r}: give a version or alias, e.g. models:/{name}@{CHAMPION}")
        mv = get_version(store, config, name, number)
    local = _download(config, f"models:/{name}/{mv.version}", f"models/{name}/{mv.version}",
                       expected_sha=(mv.tags or {}).get(SHA_TAG))
    return ResolvedModel(local / CHECKPOINT_IN_MODEL, name=name, version=str(mv.version),
                         run_id=mv.run_id or "", uri=model_uri)
