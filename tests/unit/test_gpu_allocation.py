"""Each GPU-using process gets its own devices; nothing is set on a node without GPUs."""

from __future__ import annotations

from servegrid.cli.gpus import allocate


def test_devices_are_handed_out_in_sequence():
    devices, warnings = allocate(
        [("Worker:0", 1), ("Worker:1", 1), ("Prefill:0", 2), ("Frontend:0", 0)], 8
    )
    assert devices == {"Worker:0": "0", "Worker:1": "1", "Prefill:0": "2,3"}
    assert warnings == []


def test_no_gpus_means_no_assignment():
    assert allocate([("Worker:0", 1)], 0) == ({}, [])


def test_oversubscription_wraps_around_and_warns():
    devices, warnings = allocate([("Worker:0", 1), ("Worker:1", 1), ("Worker:2", 1)], 2)
    assert devices == {"Worker:0": "0", "Worker:1": "1", "Worker:2": "0"}
    assert len(warnings) == 1 and "asks for 3 GPUs and this node has 2" in warnings[0]
