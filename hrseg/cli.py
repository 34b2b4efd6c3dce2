"""The ``hrseg`` command: phantom, verify, train, evaluate, predict, memory, run, view.

Entry points stay short: each subcommand parses its arguments and calls one public function of
the module that owns the work. Errors a user can fix print one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys


def _phantom(args) -> int:
    from hrseg import phantom
    phantom.write_dataset(args.out, cases=args.cases, seed=args.seed,
                          shape=tuple(args.shape) if args.shape else None, progress=True)
    return 0


def _verify(args) -> int:
    from hrseg import data
    problems = data.verify_dataset(args.dir)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print(f"{args.dir}: OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrseg", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("phantom", help="write a synthetic abdominal CT dataset (LiTS layout)")
    s.add_argument("--cases", type=int, default=24)
    s.add_argument("--out", default="data/phantom")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shape", type=int, nargs=3, default=None, help="voxels x y z")
    s.set_defaults(func=_phantom)

    s = sub.add_parser("verify", help="check a LiTS/MSD dataset before training")
    s.add_argument("dir")
    s.set_defaults(func=_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"hrseg {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
