"""Walk folders for image files: recursive, hidden files and folders (and database folders) skipped, in a
deterministic order.

Each directory is listed and sorted on its own, so memory follows the largest single directory, not the
tree, and every run visits files in the same order (what makes "the earliest image" well defined and a
resumed run identical to an uninterrupted one). Symlinked files are followed; symlinked directories are
not (they can loop)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from imsrc.errors import InvalidInputError
from imsrc.formats import image_extensions
from imsrc.ingest.decode import WorkItem


def display_path(path: str) -> str:
    """The path as text the database can hold: undecodable bytes become \\xNN escapes."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def check_roots(paths: Sequence[str | Path]) -> list[str]:
    """Absolute roots, or a clear error naming the first one that does not exist."""
    if not paths:
        raise InvalidInputError("give at least one folder or file to index")
    roots: list[str] = []
    for raw in paths:
        path = os.path.abspath(os.fspath(raw))
        if not os.path.exists(path):
            raise InvalidInputError(f"path does not exist: {display_path(os.fspath(raw))}")
        if not (os.path.isdir(path) or os.path.isfile(path)):
            raise InvalidInputError(f"not a folder or a regular file: {display_path(path)}")
        roots.append(path)
    return _without_overlaps(roots)


def _without_overlaps(roots: list[str]) -> list[str]:
    """Drop repeated roots and roots inside another folder root, so no file is visited twice in a job."""
    folders = [r for r in roots if os.path.isdir(r)]
    kept: list[str] = []
    for root in roots:
        inside = any(root != f and (root + os.sep).startswith(f.rstrip(os.sep) + os.sep) for f in folders)
        if root not in kept and not inside:
            kept.append(root)
    return kept


def _item(path: str, category_mode: str | None, category: str | None, reason: str | None = None) -> WorkItem:
    key = display_path(path)
    if reason is None and key != path:
        reason = "file name is not valid UTF-8; rename the file to index it"
    if category_mode == "folder":
        folder = os.path.basename(os.path.dirname(path))
        category = display_path(folder) or None
    return WorkItem(key=key, path=path, category=category, fail_reason=reason)


def scan(
    roots: Sequence[str],
    *,
    category: str | None = None,
    category_from_folder: bool = False,
    counter: list[int] | None = None,
) -> Iterator[WorkItem]:
    """Yield one WorkItem per image file under roots. `counter[0]` counts files ignored as not images."""
    exts = image_extensions()
    mode = "folder" if category_from_folder else None
    for root in roots:
        if os.path.isfile(root):
            yield _item(root, mode, category)
            continue
        yield from _walk(root, exts, mode, category, counter)


def _walk(
    folder: str, exts: frozenset[str], mode: str | None, category: str | None, counter: list[int] | None
) -> Iterator[WorkItem]:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield _item(folder, mode, category, f"cannot list folder: {exc.strerror or exc}")
        return
    sidecars = _sidecar_names(entries, exts)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                if _is_database_folder(entry.path):
                    continue
                yield from _walk(entry.path, exts, mode, category, counter)
                continue
        except OSError:
            pass
        if os.path.splitext(entry.name)[1].lower() not in exts:
            if counter is not None and entry.name not in sidecars:  # caption sidecars are read, not ignored
                counter[0] += 1
            continue
        yield _item(entry.path, mode, category, _not_readable_reason(entry))


def _sidecar_names(entries: list[os.DirEntry[str]], exts: frozenset[str]) -> set[str]:
    """Names a caption sidecar of an image in this folder may have (ingest/captions.sidecar_for)."""
    names: set[str] = set()
    for entry in entries:
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() in exts:
            names.update((entry.name + ".txt", entry.name + ".json", stem + ".txt", stem + ".json"))
    return names


def _is_database_folder(path: str) -> bool:
    """A PostgreSQL cluster, or an imsrc data folder holding one (`imsrc index .` run where ./data lives).

    Its files are never a user's images, and walking a live cluster only fills the job with noise."""
    return os.path.exists(os.path.join(path, "PG_VERSION")) or os.path.exists(os.path.join(path, "pg", "PG_VERSION"))


def _not_readable_reason(entry: os.DirEntry[str]) -> str | None:
    try:
        if entry.is_symlink() and not os.path.exists(entry.path):
            return "broken symbolic link (its target does not exist)"
        mode = entry.stat().st_mode
    except OSError as exc:
        return f"cannot stat file: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    kind = (
        "a folder"
        if stat.S_ISDIR(mode)
        else "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    return f"not a regular file ({kind})"


def count_files(roots: Sequence[str]) -> int:
    return sum(1 for _ in scan(roots))
