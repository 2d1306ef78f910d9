"""A throwaway PostgreSQL cluster for the tests: ``initdb`` in a temporary folder, started on a free
loopback port, removed afterwards. Needs Debian's PostgreSQL server package (``make setup`` installs it
where it is missing); as root, the server runs as the ``postgres`` user it creates."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import time
from pathlib import Path

import psycopg

from tests.uvicorn_server import free_port


def _bin(name: str) -> str:
    installed = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))  # Debian keeps them off the PATH
    found = shutil.which(name) or (installed[-1] if installed else None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: `make setup` installs Debian's postgresql")
    return found


class PostgresServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.port = free_port()
        self.url = f"postgresql://grerank@127.0.0.1:{self.port}/grerank"
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as_user, *command], check=True, capture_output=True, timeout=120)

    def init(self) -> PostgresServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._as_user:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(_bin("initdb"), "-D", str(self.data), "-U", "grerank", "--auth=trust", "-E", "UTF8")
        return self.start()

    def start(self) -> PostgresServer:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off"
        log = str(self.folder / "log")
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start")
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self._database_url("postgres"), autocommit=True) as conn:
                    if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'grerank'").fetchone():
                        conn.execute("CREATE DATABASE grerank")
                return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def fresh_database(self, name: str) -> str:
        """A new, empty database on this cluster; its URL."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self._database_url(name)

    def _database_url(self, name: str) -> str:
        return self.url.rsplit("/", 1)[0] + "/" + name
