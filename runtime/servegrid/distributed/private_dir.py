"""Files and directories that only this user may change: the discovery directory, the secret.

What the runtime reads from them decides where users' prompts go (discovery) and who may make
a worker generate (the cluster secret), so another local user must not be able to write them.
A path is trusted when it, and every directory above it, is owned by this user (or root) and
not writable by group or others; a world-writable directory with the sticky bit (``/tmp``) is
a safe ancestor, because there others cannot rename or delete what this user created.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from servegrid.distributed.errors import UnsafePathError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in (os.getuid(), 0)


def _describe(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


def _check_ancestors(path: Path, what: str) -> None:
    """Every existing directory above ``path`` must be safe against renames by others."""
    for parent in path.parents:
        try:
            st = parent.stat()
        except FileNotFoundError:
            continue
        sticky = bool(st.st_mode & stat.S_ISVTX)
        writable_by_others = bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))
        if not _owner_ok(st) or (writable_by_others and not sticky):
            raise UnsafePathError(
                f"{what} {path} is inside {parent} ({_describe(st)}), which another user could "
                f"change; use a path under a directory only you can write to"
            )


def ensure_private_dir(path: Path, what: str, how_to_choose: str) -> Path:
    """Create ``path`` (and missing parents) mode 0700, or check that the existing one is
    owned by this user and not writable by group or others. ``how_to_choose`` tells the user
    how to pick another path when this one is refused."""
    path = Path(path).absolute()
    _check_ancestors(path, what)
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            pass  # another process of ours made it meanwhile: checked below
    _check_dir(path, what, how_to_choose)
    if stat.S_IMODE(path.lstat().st_mode) != PRIVATE_DIR_MODE:
        os.chmod(path, PRIVATE_DIR_MODE)  # ours and not writable by others: just tighten it
    return path


def check_private_dir(path: Path, what: str, how_to_choose: str) -> bool:
    """The check of ``ensure_private_dir`` for a reader, which creates and changes nothing:
    raises ``UnsafePathError`` for a directory (or an ancestor) that another user owns or may
    write to; returns False when ``path`` does not exist (nothing there to trust or read)."""
    path = Path(path).absolute()
    _check_ancestors(path, what)
    if not os.path.lexists(path):
        return False
    _check_dir(path, what, how_to_choose)
    return True


def _check_dir(path: Path, what: str, how_to_choose: str) -> None:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(
            f"{what} {path} is not a directory (a symlink or a file); {how_to_choose}"
        )
    if st.st_uid != os.getuid():
        raise UnsafePathError(
            f"{what} {path} belongs to another user ({_describe(st)}); "
            f"anything written there could redirect requests. {how_to_choose}"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePathError(
            f"{what} {path} is writable by other users ({_describe(st)}); anything written "
            f"there could redirect requests. Remove it or `chmod 700 {path}`; or {how_to_choose}"
        )


def check_private_file(path: Path, what: str) -> None:
    """Refuse a file that is not ours or that group or others may read or write."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UnsafePathError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise UnsafePathError(f"{what} {path} cannot be read (permission denied)") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{what} {path} is not a regular file")
    if st.st_uid != os.getuid():
        raise UnsafePathError(
            f"{what} {path} belongs to another user ({_describe(st)}); it must belong to the "
            f"user that runs servegrid (uid {os.getuid()})"
        )
    if st.st_mode & 0o077:
        raise UnsafePathError(
            f"{what} {path} is accessible by group or others ({_describe(st)}); "
            f"run `chmod 600 {path}`"
        )


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600 from the start (no window in which
    the umask's mode applies)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)
