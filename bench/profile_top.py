"""Summarise a py-spy raw (collapsed stacks) file: the functions that hold the most samples.

Usage: python bench/profile_top.py FILE [N]. "self" counts samples where the function is on
top of the stack; "total" counts samples where it is anywhere on it (once per sample).
"""

from __future__ import annotations

import sys
from collections import Counter


def main(path: str, top: int) -> None:
    self_count: Counter[str] = Counter()
    total_count: Counter[str] = Counter()
    samples = 0
    for line in open(path, encoding="utf-8"):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                  for f in stack.split(";")]
        self_count[frames[-1]] += n
        for frame in set(frames):
            total_count[frame] += n
    print(f"{samples} samples")
    print("total%  self%  function (file)")
    for frame, n in total_count.most_common(top):
        print(f"{100 * n / samples:5.1f}  {100 * self_count[frame] / samples:5.1f}  {frame}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
