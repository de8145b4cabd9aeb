"""The file discovery directory is this user's alone: what is found there receives prompts."""

from __future__ import annotations

import os
import stat
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
