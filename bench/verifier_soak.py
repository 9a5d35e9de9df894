"""Verifier soak: 10,000 adversarial completions, zero exceptions, the slowest call timed.

Kinds of input, generated from a seed: random unicode (lone surrogates, NUL, control
characters included), deep or unbalanced braces, huge digit strings, 1 MB inputs, and
near misses of every answer format the verifier reads. Each string is verified both as
a completion and as the gold answer, reading a random format first (as --instruction
makes it) or none. Prints a table per kind and writes JSON.

    python bench/verifier_soak.py            # target: slowest call <= 50 ms
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from verifier import EXTRACTORS, verify  # noqa: E402


def random_unicode(rng: random.Random, n: int) -> str:
    return "".join(
        chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0, 0xFFFF), rng.randint(0, 0x10FFFF)]))
        for _ in range(n)
    )


def make_input(kind: str, rng: random.Random) -> str:
    if kind == "unicode":
        return random_unicode(rng, rng.randint(0, 2000))
    if kind == "braces":
        depth = rng.randint(1, 100_000)
        return (
            rng.choice(["\\boxed{", "\\fbox{", "{"]) * rng.randint(1, 3)
            + "{" * depth
            + "7"
            + "}" * rng.randint(0, depth)
        )
    if kind == "digits":
        return rng.choice(["", "\\boxed{", "#### ", "the answer is "]) + "9" * rng.randint(100, 300_000)
    if kind == "megabyte":
        unit = rng.choice(
            ["{", "}", "\\boxed{", "1 ", "1,", "1.", "-", "#", "answer is ", "\\frac{", " ", "\x00"]
        )
        return unit * (1_000_000 // len(unit))
    templates = [
        "\\boxed{{{}}}",
        "\\boxed {{{}",
        "#### {}",
        "The answer is {}.",
        "\\fbox{{{}}}}}",
        "\\boxed{{\\frac{{{}}}{{0}}}}",
        "{}%",
        "$\\boxed{{{}}}$",
        "answer is: -{}",
        "\\boxed{{{}/}}",
    ]
    return rng.choice(templates).format(
        rng.choice([rng.randint(-(10**9), 10**9), "1,23,4", "0.5.5", "--3", "1e9999"])
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench/verifier_soak.json")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    kinds = ["unicode", "braces", "digits", "megabyte", "near-miss"]
    weights = [40, 15, 15, 5, 25]
    stats = {k: {"n": 0, "exceptions": 0, "slowest_ms": 0.0} for k in kinds}
    for _ in range(a.n):
        kind = rng.choices(kinds, weights)[0]
        text = make_input(kind, rng)
        prefer = rng.choice([None, *EXTRACTORS])  # the format an --instruction may ask for first
        for completion, gold in ((text, "42"), ("\\boxed{42}", text)):
            t0 = time.perf_counter()
            try:
                verify(completion, gold, prefer=prefer)
            except Exception:  # the point of the soak: count, never crash
                stats[kind]["exceptions"] += 1
            ms = 1000 * (time.perf_counter() - t0)
            stats[kind]["slowest_ms"] = max(stats[kind]["slowest_ms"], ms)
        stats[kind]["n"] += 1
    print("| kind | inputs | exceptions | slowest call (ms) |\n|---|---|---|---|")
    for k, s in stats.items():
        print(f"| {k} | {s['n']} | {s['exceptions']} | {s['slowest_ms']:.1f} |")
    total = sum(s["exceptions"] for s in stats.values())
    slowest = max(s["slowest_ms"] for s in stats.values())
    print(f"\n{a.n} inputs, {total} exceptions, slowest call {slowest:.1f} ms")
    Path(a.json).write_text(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
