"""One node: an overlay root over the base, a systemd-nspawn process booting systemd in it.

The nspawn process is started in its own session so it outlives the command that made it; its
PID is recorded in the node's directory. Readiness is SSH answering, polled with a deadline.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .config import TestbedConfig
from .system import (
    TestbedError,
    cmdline,
    mounts_under,
    pid_alive,
    pids_in_netns,
    run,
    signal_pid,
    wait_gone,
)

_BOOT_MARK = "=== servegrid testbed: boot"


@dataclass(frozen=True)
class Node:
    """Paths and addresses of one node; holds no process handles (state lives on disk)."""

    cfg: TestbedConfig
    index: int

    @property
    def name(self) -> str:
        return self.cfg.node_name(self.index)

    @property
    def ip(self) -> str:
        return self.cfg.node_ip(self.index)

    @property
    def dir(self) -> Path:
        return self.cfg.state_dir / "nodes" / self.name

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def log_path(self) -> Path:
        return self.dir / "console.log"

    @property
    def pid_path(self) -> Path:
        return self.dir / "nspawn.pid"

    # -- filesystem ------------------------------------------------------------------------

    def mount_root(self, base: Path) -> None:
        if str(self.root) in mounts_under(self.root):
            return
        for sub in ("upper", "work", "root"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={base},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}"
        run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.root)])

    def install_key(self, public_key: str) -> None:
        ssh = self.root / "root/.ssh"
        ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys = ssh / "authorized_keys"
        keys.write_text(public_key)
        keys.chmod(0o600)

    def write_hosts(self, peers: list[Node]) -> None:
        lines = ["127.0.0.1 localhost", f"127.0.1.1 {self.name}"]
        lines += [f"{p.ip} {p.name}" for p in peers]
        (self.root / "etc/hosts").write_text("\n".join(lines) + "\n")
        (self.root / "etc/hostname").write_text(self.name + "\n")

    # -- process ---------------------------------------------------------------------------

    def pid(self) -> int | None:
        """PID of this node's running nspawn, or None."""
        try:
            pid = int(self.pid_path.read_text())
        except (OSError, ValueError):
            return None
        args = cmdline(pid)
        # Guard against PID reuse: the process must be our nspawn for this root.
        if pid_alive(pid) and any(a == f"--directory={self.root}" for a in args):
            return pid
        return None

    def process_exists(self) -> bool:
        """Whether the recorded nspawn PID is alive, without the cmdline check of pid().

        Right after start, /proc/PID/cmdline has been seen not yet to match for an instant.
        """
        try:
            return pid_alive(int(self.pid_path.read_text()))
        except (OSError, ValueError):
            return False

    def start(self, netns: str) -> int:
        if (pid := self.pid()) is not None:
            return pid
        cmd = [
            "systemd-nspawn",
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--boot",
            f"--directory={self.root}",
            f"--machine={self.name}",
            f"--network-namespace-path=/run/netns/{netns}",
            "--link-journal=no",
            "--resolv-conf=off",
            "--timezone=off",
        ]
        if self.cfg.wheelhouse:
            cmd.append(f"--bind-ro={self.cfg.wheelhouse}:/opt/wheelhouse")
        log = open(self.log_path, "ab")
        log.write(f"{_BOOT_MARK} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives `up`, and a Ctrl-C of it
                close_fds=True,
            )
        finally:
            log.close()
        self.pid_path.write_text(f"{proc.pid}\n")
        return proc.pid

    def container_pids(self) -> list[int]:
        """Every process inside the node (they all share its network namespace)."""
        return pids_in_netns(self.cfg.netns(self.name))

    def stop(self, *, hard: bool) -> None:
        """Power the node off (SIGTERM, then SIGKILL after the timeout) or crash it (hard)."""
        pid = self.pid()
        inside = self.container_pids()
        if pid is None and not inside:
            return
        if pid is not None and not hard:
            # nspawn turns SIGTERM into a clean poweroff of the container's systemd.
            signal_pid(pid, signal.SIGTERM)
            wait_gone([pid], self.cfg.stop_timeout_s)
        # nspawn dying does not take the container with it: kill the container's processes
        # (its PID 1 first, which ends its PID namespace), then nspawn.
        inside = self.container_pids()
        for p in inside:
            signal_pid(p, signal.SIGKILL)
        if pid is not None:
            signal_pid(pid, signal.SIGKILL)
        left = wait_gone([*([pid] if pid else []), *inside], 15)
        left += [p for p in self.container_pids() if p not in left]
        if left:
            raise TestbedError(f"{self.name}: processes {left} survived SIGKILL")
        self.pid_path.unlink(missing_ok=True)

    def console_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        # Only this boot's output: earlier boots are above the last mark.
        text = text.rsplit(_BOOT_MARK, 1)[-1]
        return "\n".join(line for line in text.splitlines() if line.strip())[-3000:]

    # -- reachability ----------------------------------------------------------------------

    def port_open(self, port: int = 22, timeout: float = 1.0) -> bool:
        try:
            with socket.create_connection((self.ip, port), timeout=timeout):
                return True
        except OSError:
            return False

    def ssh_args(self) -> list[str]:
        return [
            "ssh",
            "-i",
            str(self.cfg.key_path),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=5",
            f"root@{self.ip}",
        ]

    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run([*self.ssh_args(), command], check=False, timeout=timeout)


def wait_ready(nodes: list[Node], timeout: float) -> None:
    """Poll until every node answers SSH with a command; fail with its console if not."""
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending:
        for node in list(pending):
            if not node.process_exists():
                raise TestbedError(
                    f"{node.name}: systemd-nspawn exited during boot; console "
                    f"({node.log_path}):\n{node.console_tail()}"
                )
            if node.port_open(timeout=0.5) and node.ssh("true", timeout=15).returncode == 0:
                pending.remove(node)
        if pending and time.monotonic() >= deadline:
            names = ", ".join(n.name for n in pending)
            raise TestbedError(
                f"{names}: no SSH on port 22 within {timeout:.0f}s; console of "
                f"{pending[0].name} ({pending[0].log_path}):\n{pending[0].console_tail()}"
            )
        if pending:
            time.sleep(0.2)
