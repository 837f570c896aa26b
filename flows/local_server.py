"""A real local Prefect server for `recsys serve` on one box.

Prefect's temporary (ephemeral) API server, which a process without ``PREFECT_API_URL`` starts, does not
run the scheduler service: deployments served against it register their cron schedules, but no scheduled
run is ever created, and other shells cannot reach it to trigger runs. So ``recsys serve`` without
``PREFECT_API_URL`` starts ``prefect server start`` on 127.0.0.1 (state under the data root), waits for
it to answer, points itself at it, and stops it on exit. A server already answering on that port is used
as it is. Nothing here imports Prefect: the URL must be set before Prefect reads its settings.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

API_URL_ENV = "PREFECT_API_URL"


class ServerStartError(RuntimeError):
    """The local Prefect server could not be started; the message says why and where its log is."""


def _answers(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _port_taken(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def stop_process_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group we started (server workers included), SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def prefect_api(home: Path, port: int, timeout: float = 180.0) -> Iterator[tuple[str, bool]]:
    """Yield ``(api_url, started)``: ``$PREFECT_API_URL`` if set, else a local server on ``port``
    (reused if one already answers there, else started now and stopped on exit)."""
    if url := os.environ.get(API_URL_ENV):
        yield url, False
        return
    url = f"http://127.0.0.1:{port}/api"
    if _answers(url):
        os.environ[API_URL_ENV] = url
        yield url, False
        return
    if _port_taken(port):
        raise ServerStartError(f"port {port} on 127.0.0.1 is in use by something that is not a Prefect "
                               "server: set orchestrate.server_port or PREFECT_API_URL")
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "server.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PREFECT_HOME": str(home)},
        )
    try:
        deadline = time.monotonic() + timeout
        while not _answers(url):
            if proc.poll() is not None:
                raise ServerStartError(f"prefect server exited with code {proc.returncode}; see {log_path}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"prefect server not answering after {timeout:.0f} s; see {log_path}")
            time.sleep(1)
        os.environ[API_URL_ENV] = url
        yield url, True
    finally:
        os.environ.pop(API_URL_ENV, None)
        stop_process_group(proc)
