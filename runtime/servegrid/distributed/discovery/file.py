"""File discovery: a directory on one host stands in for etcd, with no server to run.

Layout under the directory:

    leases/{lease_id:x}.lock            held with flock(LOCK_EX) by the owning process
    keys/servegrid/{ns}/instances/...   one JSON file per entry: {"lease": id, "info": {...}}

A lease is alive exactly while its owner holds the lock: the kernel drops the lock when the
process dies, SIGKILL included, so any reader can tell a dead owner at once (the lock can be
taken) and removes that owner's entries. Watches poll the directory; on one host that costs
little and needs no daemon.

Whatever is written here becomes a worker that receives users' prompts, so the directory must
be this user's alone: it is created 0700 (parents too), one that another user owns or may
write to is refused (``private_dir.py``), and entries and leases are written 0600. A reader
that never registers (``servegrid status``, the probe) applies the same check before it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec

from servegrid.distributed import env
from servegrid.distributed.discovery.base import (
    Discovery,
    DiscoveryEvent,
    InstanceInfo,
    now,
)
from servegrid.distributed.private_dir import (
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    check_private_dir,
    ensure_private_dir,
    write_private_file,
)

POLL_INTERVAL = 0.2
WHAT = "the discovery directory"
HOW_TO_CHOOSE = f"set {env.SERVEGRID_DISCOVERY_DIR} to a directory of your own"


def _lease_alive(lease_path: Path) -> bool:
    try:
        fd = os.open(lease_path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        return False
    finally:
        os.close(fd)  # closing drops a lock we may just have taken


class FileDiscovery(Discovery):
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._keys = self.directory / "keys"
        self._leases = self.directory / "leases"
        self.lease_id = secrets.randbits(63)
        self._lease_fd: int | None = None
        self._owned: dict[str, InstanceInfo] = {}
        self._trusted = False  # the directory passed the ownership and mode check

    @property
    def _lease_path(self) -> Path:
        return self._leases / f"{self.lease_id:x}.lock"

    async def start(self) -> None:
        if self._lease_fd is not None:
            return
        ensure_private_dir(self.directory, WHAT, HOW_TO_CHOOSE)
        self._trusted = True
        self._keys.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        self._leases.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        # Lock a temp file, then rename it into place: a reader never sees an unlocked lease.
        tmp = self._leases / f".{self.lease_id:x}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT, PRIVATE_FILE_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        os.rename(tmp, self._lease_path)
        self._lease_fd = fd

    def _path_for(self, key: str) -> Path:
        return self._keys / key

    async def register(self, info: InstanceInfo) -> None:
        await self.start()
        if not info.registered_at:
            info = msgspec.structs.replace(info, registered_at=now())
        path = self._path_for(info.key)
        path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        body = {"lease": self.lease_id, "info": msgspec.to_builtins(info)}
        write_private_file(path, json.dumps(body).encode())
        self._owned[info.key] = info

    async def unregister(self, info: InstanceInfo) -> None:
        self._owned.pop(info.key, None)
        with contextlib.suppress(FileNotFoundError):
            self._path_for(info.key).unlink()

    def _scan(self, prefix: str) -> dict[str, InstanceInfo]:
        """Live entries under prefix; entries of dead leases are deleted on the way."""
        if not self._trusted:
            # A reader that never started: the same check as start(), without creating.
            self._trusted = check_private_dir(self.directory, WHAT, HOW_TO_CHOOSE)
        root = self._path_for(prefix.rstrip("/"))
        found: dict[str, InstanceInfo] = {}
        if not root.exists():
            return found
        alive: dict[int, bool] = {}
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                try:
                    body = json.loads(path.read_text())
                except (FileNotFoundError, json.JSONDecodeError):
                    continue
                lease = body["lease"]
                if lease not in alive:
                    alive[lease] = _lease_alive(self._leases / f"{lease:x}.lock")
                if not alive[lease]:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    continue
                info = msgspec.convert(body["info"], InstanceInfo)
                found[info.key] = info
        for lease, is_alive in alive.items():
            if not is_alive:
                with contextlib.suppress(FileNotFoundError):
                    (self._leases / f"{lease:x}.lock").unlink()
        return found

    async def list(self, prefix: str) -> list[InstanceInfo]:
        return list(self._scan(prefix).values())

    async def watch(self, prefix: str) -> AsyncIterator[DiscoveryEvent]:
        known: dict[str, InstanceInfo] = {}
        while True:
            current = self._scan(prefix)
            for key, info in current.items():
                if known.get(key) != info:
                    yield DiscoveryEvent("put", key, info)
            for key in known.keys() - current.keys():
                yield DiscoveryEvent("delete", key, None)
            known = current
            await asyncio.sleep(POLL_INTERVAL)

    async def close(self) -> None:
        for info in list(self._owned.values()):
            await self.unregister(info)
        if self._lease_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self._lease_path.unlink()
            os.close(self._lease_fd)
            self._lease_fd = None
