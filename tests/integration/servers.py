"""Real servers for the integration tests, started from the machine's binaries on loopback: PostgreSQL
(``initdb``/``pg_ctl``, as a non-root user when run as root), and the Prefect and MLflow servers with
the exact commands of docker/compose.yaml (hosts, ports and paths mapped to this machine)."""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from flows.local_server import stop_process_group

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "docker" / "compose.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("ab") as handle:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


stop = stop_process_group  # the one used by `recsys serve` for the server it starts


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> float:
    """Seconds until ``url`` answers 200; fails with the server's log tail if it dies or times out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - t0
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def compose_service(name: str) -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"][name]


def compose_value(text: str, values: dict[str, str]) -> str:
    """``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` of compose, from ``values``."""
    def sub(match: re.Match) -> str:
        name, default = match["name"], match["default"]
        if name in values:
            return values[name]
        if default is not None and default.startswith(":-"):
            return default[2:]
        raise KeyError(f"{name} is not set")

    return re.sub(r"\$\{(?P<name>[A-Z_]+)(?P<default>:[-?][^}]*)?\}", sub, text)


# --- PostgreSQL -----------------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """Directory of initdb/pg_ctl/postgres: Debian's /usr/lib/postgresql/NN/bin, else the PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


class Postgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1:<free port> (socket and data in one temp dir)."""

    def __init__(self, user: str, password: str) -> None:
        self.bin = postgres_bin()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL binaries missing: apt-get install postgresql")
        self.user, self.password, self.port = user, password, free_port()
        # initdb refuses root: the cluster belongs to the "postgres" system user then
        self.os_user = "postgres" if os.geteuid() == 0 else None
        self.dir = Path(tempfile.mkdtemp(prefix="recsys-pg-"))
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.data = self.dir / "data"

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", self.os_user, "--", *cmd] if self.os_user else cmd

    def start(self) -> float:
        t0 = time.monotonic()
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        subprocess.run(self._as_owner([str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user,
                                       f"--pwfile={pwfile}", "--auth-local=trust",
                                       "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        pwfile.unlink()
        options = f"-p {self.port} -k {self.dir} -h 127.0.0.1 -c fsync=off"
        subprocess.run(self._as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
                                       "-l", str(self.dir / "postgres.log"), "-w", "start"]),
                       check=True, capture_output=True, timeout=120)
        return time.monotonic() - t0

    def stop(self) -> None:
        subprocess.run(self._as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)

    def env(self, **extra: str) -> dict[str, str]:
        """Client environment: TCP on loopback with the password (what the compose services use)."""
        return {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "PGHOST": "127.0.0.1",
                "PGPORT": str(self.port), "PGUSER": self.user, "PGPASSWORD": self.password,
                "POSTGRES_USER": self.user, "POSTGRES_PASSWORD": self.password, "POSTGRES_DB": "postgres",
                **extra}

    def url(self, driver: str, db: str) -> str:
        return f"{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"

    def dump(self, db: str) -> str:
        return subprocess.run([str(self.bin / "pg_dump"), "-d", db], env=self.env(), check=True,
                              capture_output=True, text=True, timeout=300).stdout
