"""The top costs in a py-spy profile (`py-spy record -f raw`): inclusive share of samples per function.

    .venv/bin/python bench/profile_top.py PROFILE.txt [--top 25] [--self]

Inclusive: the share of samples in which the function is on the stack (once per sample);
--self: the share in which it is the innermost frame.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--self", dest="self_", action="store_true")
    parser.add_argument("--thread", help="only stacks whose thread name contains this")
    args = parser.parse_args()
    total, counts = 0, Counter[str]()
    with open(args.profile) as fh:
        for line in fh:
            stack, _, n = line.rstrip().rpartition(" ")
            if args.thread and args.thread not in stack.split(";")[0]:
                continue
            frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")[1:]]
            total += int(n)
            for f in ([frames[-1]] if args.self_ and frames else set(frames)):
                counts[f] += int(n)
    print(f"{total} samples")
    for frame, n in counts.most_common(args.top):
        print(f"{n / total * 100:6.1f} %  {frame}")


if __name__ == "__main__":
    main()
