"""The shared Debian base image: built once with debootstrap, cached, keyed on its recipe.

Nodes are offline, so every OS package a role installs must already be in the base (a role's
`apt` task then finds it present, as behind a local mirror). The cache key covers the release,
the package list and RECIPE_VERSION, so changing any of them builds a new base. A build goes
into a temporary directory that is renamed into place only when complete: an interrupted build
never leaves a half base that looks valid.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .config import TestbedConfig
from .mirror import find_mirror
from .system import TestbedError, remove_tree, run

# What roles need and cannot fetch on an offline node. Keep it lean: CI builds it cold.
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-venv",
    "python3-apt",  # Ansible's apt module needs it on the target
    "iproute2",
    "iputils-ping",
    "ca-certificates",
    "procps",
    "sudo",
    "etcd-server",
    "nats-server",
    "rdma-core",
    "perftest",
)

# Bump when the post-debootstrap steps in _customize change, to force a rebuild.
RECIPE_VERSION = 1

COMPLETE_MARKER = ".servegrid-testbed-complete"
BUILD_LOG = "builds.jsonl"

# Services a package enables on install but a role should start, on the node it chooses.
DISABLE_UNITS = ("etcd.service", "nats-server.service", "e2scrub_reap.service")
# Timers that would race a role's apt tasks for the dpkg lock.
MASK_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer")

Progress = Callable[[str], None]


def packages(cfg: TestbedConfig) -> list[str]:
    return sorted(set(BASE_PACKAGES) | set(cfg.extra_packages))


def cache_key(cfg: TestbedConfig) -> str:
    recipe = {"release": cfg.release, "packages": packages(cfg), "recipe": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def base_path(cfg: TestbedConfig) -> Path:
    return cfg.cache_dir / f"base-{cfg.release}-{cache_key(cfg)}"


def build_count(cfg: TestbedConfig) -> int:
    """How many base builds this cache has seen (one line each in builds.jsonl)."""
    log = cfg.cache_dir / BUILD_LOG
    return len(log.read_text().splitlines()) if log.exists() else 0


def ensure_base(cfg: TestbedConfig, progress: Progress) -> tuple[Path, bool]:
    """Return (path of a complete base, whether this call built it)."""
    target = base_path(cfg)
    if (target / COMPLETE_MARKER).exists():
        return target, False
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.cache_dir / ".lock", "w") as lock:
        # Another `up` may be building the same base; wait for it rather than race it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).exists():
            return target, False
        # Under the lock, any leftover build dir is from an interrupted run.
        for stale in cfg.cache_dir.glob(".build-*"):
            progress(f"removing interrupted build {stale}")
            remove_tree(stale)
        if target.exists():
            remove_tree(target)  # no marker: not a complete base
        started = time.monotonic()
        tmp = cfg.cache_dir / f".build-{target.name}-{os.getpid()}"
        try:
            _debootstrap(cfg, tmp, progress)
            progress("configuring base image")
            _customize(tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"packages": packages(cfg)}) + "\n")
            os.rename(tmp, target)
        except BaseException:
            remove_tree(tmp)
            raise
        seconds = round(time.monotonic() - started, 1)
        with open(cfg.cache_dir / BUILD_LOG, "a") as f:
            f.write(json.dumps({"base": target.name, "seconds": seconds, "at": time.time()}) + "\n")
        progress(f"base image built in {seconds}s: {target}")
        return target, True


def _debootstrap(cfg: TestbedConfig, tmp: Path, progress: Progress) -> None:
    mirror = find_mirror(cfg.release)
    debs = cfg.cache_dir / "debs"  # downloaded .debs survive a package-list change
    debs.mkdir(parents=True, exist_ok=True)
    cmd = [
        "debootstrap",
        "--variant=minbase",
        f"--cache-dir={debs}",
        "--include=" + ",".join(packages(cfg)),
    ]
    if mirror.keyring:
        cmd.append(f"--keyring={mirror.keyring}")
    cmd += [cfg.release, str(tmp), mirror.url]
    progress(f"building base image: debootstrap {cfg.release} from {mirror.url}")
    env = {**os.environ, **mirror.proxy_env, "DEBIAN_FRONTEND": "noninteractive"}
    tail: list[str] = []
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail = [*tail, line][-20:]
            progress(line)
    if proc.returncode != 0:
        raise TestbedError(
            f"debootstrap of {cfg.release} from {mirror.url} failed (exit {proc.returncode}); "
            "last output:\n" + "\n".join(tail) + "\nCheck that apt on this host can reach "
            "that mirror (`apt-get update`), then run `up` again."
        )


def _customize(root: Path) -> None:
    """Make the debootstrapped tree a bootable, offline, SSH-reachable node image."""
    run(["chroot", str(root), "ssh-keygen", "-A"])
    sshd = root / "etc/ssh/sshd_config.d/servegrid-testbed.conf"
    sshd.write_text(
        "# servegrid testbed: root logs in with the generated key only\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
    )
    run(["systemctl", f"--root={root}", "disable", *DISABLE_UNITS], check=False)
    run(["systemctl", f"--root={root}", "mask", *MASK_UNITS], check=False)
    # Nodes have no route to any mirror: without sources `apt-get update` succeeds empty, and
    # packages already installed satisfy `state: present`.
    sources = root / "etc/apt/sources.list"
    if sources.exists():
        sources.rename(root / "etc/apt/sources.list.testbed-offline")
    sources.write_text("# servegrid testbed node: offline; OS packages are baked into the base\n")
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    # Empty machine-id: each node gets its own on first boot.
    (root / "etc/machine-id").write_text("")
    (root / "opt/wheelhouse").mkdir(parents=True, exist_ok=True)
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
