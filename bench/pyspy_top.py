"""Top functions of a py-spy collapsed-stack profile (`py-spy record --format raw`).

    .venv/bin/python bench/pyspy_top.py /tmp/serve.txt [--top 25] [--filter idle]

Prints the share of samples in which each function is on top of the stack (self) and
anywhere on the stack (inclusive). Samples whose top frame is the event loop waiting
(select/epoll/uv run) are counted as idle and reported separately.
"""

from __future__ import annotations

import argparse
import collections
import re

IDLE = re.compile(r"\b(select|poll|epoll_wait|run_forever|_run_once)\b")


def frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)"
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    func, path = m.groups()
    short = "/".join(path.split("/")[-2:])
    return f"{func} ({short})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--grep", help="only stacks containing this text")
    args = parser.parse_args()
    self_c, incl_c = collections.Counter(), collections.Counter()
    total = idle = 0
    with open(args.file) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            if args.grep and args.grep not in stack:
                continue
            n = int(count)
            frames = [frame_name(f) for f in stack.split(";")]
            total += n
            if frames and IDLE.search(frames[-1]) and len(frames) <= 6:
                idle += n
            self_c[frames[-1]] += n
            for f in set(frames):
                incl_c[f] += n
    busy = total - idle
    print(f"{total} samples, {idle} ({100 * idle / max(total, 1):.1f}%) idle in the event loop")
    print(f"\n{'self %':>7} {'incl %':>7}  function (top {args.top} by self)")
    for f, n in self_c.most_common(args.top):
        print(f"{100 * n / total:7.1f} {100 * incl_c[f] / total:7.1f}  {f}")
    print(f"\n{'incl %':>7} {'self %':>7}  function (top {args.top} by inclusive)")
    for f, n in incl_c.most_common(args.top):
        print(f"{100 * n / total:7.1f} {100 * self_c[f] / total:7.1f}  {f}")
    print(f"\n(busy samples: {busy})")


if __name__ == "__main__":
    main()
