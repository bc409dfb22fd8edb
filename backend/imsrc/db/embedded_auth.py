"""Who may log in to the embedded server: the unix socket (in a 0700 folder) is trusted, TCP needs a password.

Older imsrc versions trusted every login on 127.0.0.1, so any local OS user could connect as the superuser when
IMSRC_EMBEDDED_PORT was set (and always on Windows) and run programs as the server's OS user through
`COPY ... TO PROGRAM`. Now the superuser gets a generated password, kept in a 0600 file in the data directory
(where `imsrc db url` and the app read it), and pg_hba.conf asks for it (scram-sha-256) on every TCP login.
A data directory made by an older version is upgraded in place the next time the server starts.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

# The first line of the pg_hba.conf we write: its presence means "this cluster's password was set by us".
HBA_MARKER = "# imsrc: TCP logins need a password (scram-sha-256); the unix socket folder is private (0700)"
HBA_RULES = """\
local   all          all                     trust
local   replication  all                     trust
host    all          all       127.0.0.1/32  scram-sha-256
host    all          all       ::1/128       scram-sha-256
host    replication  all       127.0.0.1/32  scram-sha-256
host    replication  all       ::1/128       scram-sha-256
"""
SCRAM_ITERATIONS = 4096


def password_file(data_dir: Path, role: str) -> Path:
    return data_dir / f"{role}.password"


def read_password(data_dir: Path, role: str) -> str | None:
    try:
        value = password_file(data_dir, role).read_text().strip()
    except (FileNotFoundError, PermissionError):
        return None
    return value or None


def create_password(data_dir: Path, role: str) -> str:
    """A new random password, written 0600 (created with that mode, never readable by others even briefly)."""
    path = password_file(data_dir, role)
    password = secrets.token_urlsafe(24)  # URL-safe: it goes into connection URLs unquoted
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with open(fd, "w") as fh:
        fh.write(password + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return password


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 secret PostgreSQL stores (RFC 5802/7677): sending this instead of the password means
    the plain password never reaches the server, its logs or its statistics."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def alter_password_sql(role: str, password: str) -> str:
    # The role is one of ours (a fixed identifier); the verifier holds only base64 characters, '$' and ':'.
    return f"ALTER ROLE \"{role}\" PASSWORD '{scram_verifier(password)}'"


def hba_is_current(pgdata: Path) -> bool:
    try:
        with (pgdata / "pg_hba.conf").open() as fh:
            return fh.readline().rstrip("\n") == HBA_MARKER
    except (FileNotFoundError, PermissionError):
        return False


def write_hba(pgdata: Path) -> Path | None:
    """Replace pg_hba.conf with ours. A file that is not ours is kept next to it (returned) rather than lost."""
    path = pgdata / "pg_hba.conf"
    kept = None
    if path.exists() and not hba_is_current(pgdata):
        kept = path.with_name("pg_hba.conf.before-imsrc")
        os.replace(path, kept)
    tmp = path.with_name("pg_hba.conf.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w") as fh:
        fh.write(HBA_MARKER + "\n" + HBA_RULES)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return kept
