"""Mutation fuzzing of the probe output reader over the whole nvidia-smi corpus, at any size.

The same cases and checks as tests/test_fuzz.py (tests/fuzzing.py), with a chosen number of
cases and seed; prints the counts and the time taken. Exits 1 when any check failed.

    python bench/fuzz.py --cases 200000 --seed 7
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fuzzing import Fuzz, seeds  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    corpus = seeds()
    started = time.monotonic()
    fuzz = Fuzz().run(args.cases, args.seed, corpus)
    elapsed = time.monotonic() - started
    per_case = elapsed / max(fuzz.cases, 1) * 1e6
    print(f"seed {args.seed}, {len(corpus)} corpus inputs, {elapsed:.1f}s ({per_case:.0f} us per case)")
    print(fuzz.summary())
    failed = fuzz.exceptions or fuzz.impossible or fuzz.silent_losses or fuzz.injection_changes
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
