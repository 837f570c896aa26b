"""Refusals a person sees as one line naming the file or key, never a traceback (issue 14 #7-#10): a
malicious pickle, a run name that escapes the data root, a full disk, a taken UI port, and credentials
in the tracking URI that must never be written down."""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow_fixtures import free_port, make_config, make_world, train_checkpoint

from recsys.config import ConfigError, config_to_yaml, flatten_config, load_config, redact
from recsys.model.checkpoint import CheckpointError, load_checkpoint
from recsys.tracking.runs import tracked_training
from recsys.tracking.store import TrackingUnavailableError

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Pa55"


def cli(*args: str, prelude: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m recsys.cli ARGS`` in a fresh process (``prelude`` runs first, e.g. resource limits)."""
    code = f"{prelude}\nimport runpy, sys\nsys.argv = ['recsys', *{list(args)!r}]\n" \
           "runpy.run_module('recsys.cli', run_name='__main__')"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_in_one_line_naming_the_file(tmp_path):
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    evil.write_bytes(pickle.dumps({"format_version": 1, "x": payload}))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    proc = cli("register", "--checkpoint", str(evil), "--set", f"paths.data_root={tmp_path / 'data'}")
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert str(evil) in line and "weights_only" not in proc.stdout + proc.stderr
    assert not marker.exists()


def test_run_name_outside_the_data_root_is_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.run_name=../../.."])
    assert "\n" not in str(info.value) and "train.run_name" in str(info.value)
    proc = cli("train", "--set", "train.run_name=../../..", "--set", f"paths.data_root={tmp_path}")
    assert proc.returncode == 2 and "train.run_name" in one_error_line(proc)
    config = make_config(tmp_path / "data")
    with pytest.raises(ConfigError, match="outside the data root"):
        tracked_training(config, checkpoint_dir=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


def test_full_disk_while_training_is_one_line_naming_the_checkpoint(tmp_path):
    """A file-size limit makes every write past 2 kB fail as a full disk would (EFBIG vs ENOSPC)."""
    config = make_world(tmp_path / "data")
    limit = "import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n" \
            "resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))"
    proc = cli("train", "--no-track", "--set", f"paths.data_root={config.paths.data_root}",
               "--set", "model.hidden_size=8", "--set", "train.epochs=1", "--set", "train.n_sample=16",
               "--set", "train.device=cpu", prelude=limit)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = one_error_line(proc)
    assert str(config.paths.checkpoints_dir / "gru4rec") in line and "could not write" in line


def test_ui_fails_when_its_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli("ui", "--port", str(port), "--set", f"paths.data_root={tmp_path}", timeout=120)
    assert proc.returncode == 1 and f"port {port}" in one_error_line(proc)
    assert "MLflow UI: http" not in proc.stdout


def test_credentials_are_redacted_wherever_config_or_the_uri_is_recorded(tmp_path, caplog):
    url = f"http://recsys:{SECRET}@127.0.0.1:{free_port()}"
    assert redact(url) == f"http://***@127.0.0.1:{url.rsplit(':', 1)[1]}"
    config = make_world(tmp_path / "data", tracking={"tracking_uri": url, "retry_window_seconds": 0.2,
                                                     "retry_backoff_seconds": 0.05})
    assert SECRET not in config_to_yaml(config) and SECRET not in str(flatten_config(config))
    with caplog.at_level(logging.INFO), pytest.raises(TrackingUnavailableError) as info:
        tracked_training(config)  # the store is unreachable: training completes, the checkpoint is kept
    assert SECRET not in str(info.value) and "***@127.0.0.1" in str(info.value)
    assert SECRET not in caplog.text
    written = [p for p in config.paths.data_root.rglob("*") if p.is_file()]
    assert any(p.name == "best.pt" for p in written)
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]
    assert load_checkpoint(next(p for p in written if p.name == "best.pt")).config.tracking.tracking_uri \
        == redact(url)


def test_checkpoint_trained_elsewhere_keeps_no_credential(tmp_path):
    config = make_world(tmp_path / "data", tracking={"tracking_uri": f"postgresql://u:{SECRET}@db/mlflow"})
    checkpoint = train_checkpoint(config, "pg", epochs=1)
    assert SECRET.encode() not in checkpoint.read_bytes()
