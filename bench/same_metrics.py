"""Do two runs log the same values? Compares two metrics.jsonl files row by row, every
key except wall-clock timings and memory, which no two runs share.

    python bench/same_metrics.py runs/a/metrics.jsonl runs/b/metrics.jsonl

Prints the number of rows and values compared, and every difference; exits 1 if any.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.run_folder import read_jsonl  # noqa: E402

MACHINE_DEPENDENT = ("_s", "tokens_per_s", "peak_mem_gb")  # key suffixes: seconds, speed, memory


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.endswith(MACHINE_DEPENDENT)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    a = ap.parse_args()
    rows = [read_jsonl(p) for p in (a.before, a.after)]
    if len(rows[0]) != len(rows[1]):
        print(f"different row counts: {len(rows[0])} vs {len(rows[1])}")
        return 1
    values, diffs = 0, []
    for r0, r1 in zip(*rows, strict=True):
        c0, c1 = comparable(r0), comparable(r1)
        values += len(c0)
        for k in sorted(set(c0) | set(c1)):
            if c0.get(k) != c1.get(k):
                diffs.append(f"step {r0.get('step')}: {k}: {c0.get(k)!r} vs {c1.get(k)!r}")
    print(f"{len(rows[0])} rows, {values} values compared, {len(diffs)} differ")
    print("\n".join(diffs[:50]))
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
