"""A throwaway PostgreSQL cluster for tests: Debian's server binaries (`make install` brings the
`postgresql` package when root), a fresh data folder, a free local port, trust auth."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def server_bin() -> Path | None:
    """The folder with initdb and pg_ctl (Debian keeps them out of PATH), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def cluster(database: str = "winnow") -> Iterator[str]:
    """Start a cluster in a fresh folder and yield a SQLAlchemy URL of a fresh database; stop it
    and remove the folder after."""
    bindir = server_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found (make install brings Debian's "
                           "postgresql package)")
    # Directly under /tmp: the server user must reach it (pytest's tmp folders are root-only).
    folder = Path(tempfile.mkdtemp(prefix="winnow-pg-"))
    data, port = folder / "pgdata", _free_port()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    run = lambda *cmd: subprocess.run(_as_server_user(list(cmd)), check=True,  # noqa: E731
                                      capture_output=True, text=True, timeout=120)
    run(str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(folder / "server.log"), "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
            database)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)
