"""The former micro-benchmarks, now rows 1 and 2 of the suite (``benchmarks/run.py``).

``python benchmarks/micro.py [--runs N] [--seconds S]`` runs ``python -m benchmarks --rows
seal,open`` with those settings: seal/s and open/s next to the raw cryptography they rest on
(and the seed's client and server), same run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.run import main as run

    return run(["--rows", "seal,open", "--repeats", str(args.runs),
                "--seconds", str(args.seconds)])


if __name__ == "__main__":
    raise SystemExit(main())
