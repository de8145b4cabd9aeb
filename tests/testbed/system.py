"""Thin wrappers over the host: running commands, reading /proc, mounts, prerequisites.

Kept apart so the rest of the testbed reads as what it does to nodes, not how it shells out.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

REQUIRED_TOOLS = {
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "ip": "iproute2",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "mount": "mount",
}


class TestbedError(Exception):
    """A failure a person must act on; the message says what, where, and what to do."""

    __test__ = False


def run(
    cmd: Sequence[str], *, check: bool = True, timeout: float | None = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; on failure raise TestbedError quoting its stderr."""
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except FileNotFoundError as exc:
        raise TestbedError(f"command not found: {cmd[0]} (see tests/testbed/README.md)") from exc
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"`{' '.join(cmd)}` did not finish within {timeout}s") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise TestbedError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {detail}")
    return proc


def preflight_problems() -> list[str]:
    """What stops the testbed from running on this host; empty when it can run."""
    problems = []
    if os.geteuid() != 0:
        problems.append("the testbed needs root (network namespaces, mounts, systemd-nspawn)")
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        problems.append("missing Debian packages: " + " ".join(missing) + " (run scripts/setup.sh)")
    return problems


def pid_alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat[stat.rindex(")") + 2] not in "ZX"


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def nspawn_pids_under(directory: Path) -> list[int]:
    """PIDs of systemd-nspawn processes whose container root lies under `directory`."""
    prefix = str(directory).rstrip("/") + "/"
    found = []
    for pid in all_pids():
        args = cmdline(pid)
        if not args or os.path.basename(args[0]) != "systemd-nspawn":
            continue
        if any(a.startswith(prefix) or a.startswith("--directory=" + prefix) for a in args):
            found.append(pid)
    return found


def pids_in_netns(name: str) -> list[int]:
    """PIDs of processes inside the named network namespace (/run/netns/NAME).

    A container's processes live in another mount namespace, so their root paths say nothing
    from the host; the network namespace we made for the node identifies them instead.
    """
    try:
        inode = os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return []
    want = f"net:[{inode}]"
    found = []
    for pid in all_pids():
        try:
            if os.readlink(f"/proc/{pid}/ns/net") == want and pid_alive(pid):
                found.append(pid)
        except OSError:
            continue
    return found


def descendants(root_pid: int) -> list[int]:
    """All live descendants of `root_pid` (read from /proc, one snapshot)."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root_pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def reap(pid: int) -> None:
    """Collect `pid` if it is our child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until every pid is gone; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in pids:
            reap(pid)
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def signal_pid(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory` in our mount namespace, deepest first."""
    base = str(directory).rstrip("/")
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # mountinfo escapes space, tab, newline and backslash as octal.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == base or point.startswith(base + "/"):
                points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def unmount_all_under(directory: Path) -> None:
    for point in mounts_under(directory):
        if run(["umount", point], check=False).returncode != 0:
            # Busy (a process still holds it): detach it so teardown can finish.
            run(["umount", "--lazy", point], check=False)


def remove_tree(directory: Path) -> None:
    """Delete a directory tree, refusing while anything is mounted below it.

    A debootstrap or overlay tree may hold bind mounts of /dev or /proc; removing through
    one would delete host files, so unmount first and check.
    """
    if not directory.exists():
        return
    unmount_all_under(directory)
    left = mounts_under(directory)
    if left:
        raise TestbedError(f"cannot remove {directory}: still mounted: {', '.join(left)}")
    shutil.rmtree(directory)
