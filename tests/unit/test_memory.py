"""The process-wide memory settings of `deskgate serve` (gateway/memory.py)."""

from __future__ import annotations

import gc
import sys
import weakref

import structlog

from gateway.memory import freeze_startup_objects, return_big_buffers


class Node:
    """A tracked object that can hold a reference cycle and a weak reference."""

    def __init__(self) -> None:
        self.other: Node | None = None


def in_collected_generations(obj: object) -> bool:
    # gc.get_objects() walks the three generations, not the permanent (frozen) one
    return any(o is obj for o in gc.get_objects())


def test_startup_objects_leave_the_generations_and_later_cycles_are_still_collected() -> None:
    before = Node()
    assert in_collected_generations(before)
    try:
        with structlog.testing.capture_logs() as logs:
            frozen = freeze_startup_objects()
        assert frozen > 0  # some are freed by reference counting right after, so no equality
        assert not in_collected_generations(before)
        assert {"event": "memory.frozen", "objects": frozen, "log_level": "info"} in logs

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after start-up, only the collector frees it
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
    assert in_collected_generations(before)


def test_big_buffers_threshold_is_fixed_on_glibc() -> None:
    # mallopt is glibc's: done on Debian (where deskgate runs), refused elsewhere
    assert return_big_buffers() is sys.platform.startswith("linux")
