"""Summarise a py-spy raw (collapsed stacks) file: the functions that hold the most samples.

Usage: python bench/profile_top.py FILE [N] [--loop]. "self" counts samples where the
function is on top of the stack; "total" counts samples where it is anywhere on it (once
per sample). --loop keeps only the event loop's thread (the stacks that start at the
`deskgate` entry point, and SQLAlchemy's greenlets, which run on it) without its waits in
select(): one process's throughput is bounded by that thread, while the thread-pool workers
mostly wait for work.
"""

from __future__ import annotations

import sys
from collections import Counter


def _on_loop(frames: list[str]) -> bool:
    """The loop thread's stacks start at the entry point; SQLAlchemy's greenlets run on that
    thread too, but py-spy shows a greenlet's stack from its own first frame. Pool threads
    start at Thread._bootstrap."""
    if frames[-1].startswith(("select (", "EpollSelector.select")):
        return False
    return not frames[0].startswith(("Thread._bootstrap", "_bootstrap ("))


def main(path: str, top: int, loop_only: bool = False) -> None:
    self_count: Counter[str] = Counter()
    total_count: Counter[str] = Counter()
    samples = 0
    for line in open(path, encoding="utf-8"):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                  for f in stack.split(";")]
        if loop_only and not _on_loop(frames):
            continue
        n = int(count)
        samples += n
        self_count[frames[-1]] += n
        for frame in set(frames):
            total_count[frame] += n
    print(f"{samples} samples" + (" on the event loop's thread, busy" if loop_only else ""))
    print("total%  self%  function (file)")
    for frame, n in total_count.most_common(top):
        print(f"{100 * n / samples:5.1f}  {100 * self_count[frame] / samples:5.1f}  {frame}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--loop"]
    main(args[0], int(args[1]) if len(args) > 1 else 40, "--loop" in sys.argv)
