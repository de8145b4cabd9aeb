"""The file discovery directory is this user's alone: what is found there receives prompts."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from servegrid.distributed import env
from servegrid.distributed.discovery.base import InstanceInfo
from servegrid.distributed.discovery.file import FileDiscovery
from servegrid.distributed.errors import UnsafePathError

NOBODY = 65534


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _info() -> InstanceInfo:
    return InstanceInfo(
        namespace="ns", component="Worker", endpoint="generate", instance_id=5, host="h", port=1
    )


async def test_a_new_directory_is_created_0700_and_its_entries_0600(tmp_path):
    directory = tmp_path / "made" / "discovery"
    discovery = FileDiscovery(directory)
    await discovery.start()
    try:
        await discovery.register(_info())
        assert _mode(directory) == 0o700
        assert _mode(directory.parent) == 0o700  # parents it made, too
        files = [p for p in directory.rglob("*") if p.is_file()]
        assert len(files) == 2  # the lease and the entry
        assert all(_mode(p) == 0o600 for p in files)
        assert [i.instance_id for i in await discovery.list("servegrid/ns/")] == [5]
    finally:
        await discovery.close()


async def test_a_directory_others_may_write_is_refused(tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)  # as another user would pre-create it under /tmp
    with pytest.raises(UnsafePathError) as refused:
        await FileDiscovery(directory).start()
    assert "writable by other users" in str(refused.value)
    assert env.SERVEGRID_DISCOVERY_DIR in str(refused.value)
    assert list(directory.iterdir()) == []  # nothing was written there


async def test_a_directory_of_another_user_is_refused(tmp_path):
    if os.getuid() == 0:
        directory = tmp_path / "theirs"
        directory.mkdir(mode=0o700)
        os.chown(directory, NOBODY, NOBODY)
    else:
        directory = Path("/usr/share")  # root's: another user's for us
    with pytest.raises(UnsafePathError, match="belongs to another user"):
        await FileDiscovery(directory).start()


async def test_a_directory_inside_one_others_may_write_is_refused(tmp_path):
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)  # no sticky bit: others could rename what we create in it
    with pytest.raises(UnsafePathError, match="another user could change"):
        await FileDiscovery(parent / "discovery").start()
    assert not (parent / "discovery").exists()


async def test_an_own_directory_readable_by_others_is_tightened_not_refused(tmp_path):
    directory = tmp_path / "older"
    directory.mkdir()
    directory.chmod(0o755)  # as earlier versions left it
    discovery = FileDiscovery(directory)
    await discovery.start()
    await discovery.close()
    assert _mode(directory) == 0o700


def _status(directory: Path) -> subprocess.CompletedProcess:
    """The real CLI, ``servegrid status --json``, reading ``directory``."""
    environment = {k: v for k, v in os.environ.items() if k != env.ETCD_ENDPOINTS}
    environment[env.SERVEGRID_DISCOVERY_DIR] = str(directory)
    return subprocess.run(
        [sys.executable, "-m", "servegrid.cli", "status", "--json"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_status_reads_only_a_directory_the_runtime_would_trust(tmp_path):
    """``servegrid status`` shows what clients would route to: it applies the runtime's
    check, so a directory others may write to is refused, not listed."""
    directory = tmp_path / "discovery"
    discovery = FileDiscovery(directory)  # a live entry (its lease is held by this process)
    await discovery.register(_info())
    try:
        trusted = _status(directory)
        assert trusted.returncode == 0, trusted.stderr
        assert [e["instance_id"] for e in json.loads(trusted.stdout)] == ["5"]

        directory.chmod(0o777)  # as another user's pre-created /tmp directory would be
        refused = _status(directory)
        assert refused.returncode == 2
        assert refused.stdout == ""  # nothing listed
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in refused.stderr
        assert "writable by other users" in lines[0] and env.SERVEGRID_DISCOVERY_DIR in lines[0]
        assert _mode(directory) == 0o777  # a reader changes nothing
    finally:
        directory.chmod(0o700)
        await discovery.close()


def test_status_of_a_directory_not_made_yet_lists_nothing_and_creates_nothing(tmp_path):
    result = _status(tmp_path / "not-yet")
    assert (result.returncode, json.loads(result.stdout)) == (0, [])
    assert not (tmp_path / "not-yet").exists()
