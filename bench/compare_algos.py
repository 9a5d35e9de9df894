"""Does SDPG lift earlier than GRPO, and than the paper's self-distillation baselines?

Runs `sdpg.py` on the embedded task (tiny model, arithmetic) for each contender and
seed, everything else identical (the tiny preset, its mini-batches included):
  grpo           beta = alpha = 0
  sdpg           the paper's method: live teacher, beta from the preset
  opd            pure full-vocabulary self-distillation (no outcome term), ours
  opsd, rlsd     the paper's baselines, as the authors compute them
  sdpg-ema       SDPG with an EMA teacher (--teacher ema)
  sdpg-initial   SDPG with the initial weights as teacher, beta 1 (an ablation)
and writes into --out:
  compare_algos.md   steps to reach --target held-out accuracy, accuracy at fixed
                     steps, final accuracy, the teacher's final greedy accuracy (the
                     run's --teacher weights reading the teacher view), mean response
                     length, entropy, seconds per step
  compare_algos.png  held-out accuracy vs step: mean over seeds and min-max band
  compare_algos.json the raw eval curves

    python bench/compare_algos.py            # 3 seeds x 7 contenders
    python bench/compare_algos.py --quick    # 1 seed, fewer steps: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.run_folder import read_metrics  # noqa: E402

ACC = "eval_mean@4"
BUILD_TINY = "from harness import tiny_model; tiny_model.ensure_tiny_model()"
VARIANTS = {  # a contender name -> its sdpg.py flags; any other name is an --algo
    "sdpg-ema": ["--algo", "sdpg", "--teacher", "ema"],
    "sdpg-initial": ["--algo", "sdpg", "--teacher", "initial", "--beta", "1.0"],
}
CONTENDERS = ["grpo", "sdpg", "opd", "opsd", "rlsd", "sdpg-ema", "sdpg-initial"]


def command(
    flags: list[str], seed: int, steps: int, eval_every: int, folder: Path, extra: list[str]
) -> list[str]:
    """The sdpg.py command line of one run: a contender's flags, the seed and the shared
    evaluation (mean@4 every `eval_every` steps), no checkpoints."""
    return [
        sys.executable,
        str(ROOT / "sdpg.py"),
        *flags,
        "--seed",
        str(seed),
        "--steps",
        str(steps),
        "--eval-every",
        str(eval_every),
        "--eval-samples",
        "4",
        "--output-dir",
        str(folder),
        "--overwrite-output-dir",
        "--save-every",
        "0",
        *extra,
    ]


def run_in_process(cmd: list[str], what: str) -> float:
    """Run one training command with one thread (runs go side by side); its seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-2000:]}")
    return time.time() - t0


def run_one(algo: str, seed: int, steps: int, eval_every: int, out: Path, extra: list[str]) -> dict:
    """One training run of a contender (an --algo or a VARIANTS name) in its own process;
    returns its eval curve and summary stats."""
    folder = out / "runs" / f"{algo}-seed{seed}"
    flags = VARIANTS.get(algo, ["--algo", algo])
    seconds = run_in_process(command(flags, seed, steps, eval_every, folder, extra), f"{algo} seed {seed}")
    return {"algo": algo, "seed": seed, "seconds": seconds, **summary(read_metrics(folder))}


def summary(rows: list[dict]) -> dict:
    """A run's eval curve [(step, mean@4, greedy, teacher greedy)] and its training means."""
    train = [r for r in rows if "reward" in r]
    return {
        "curve": [(r["step"], r[ACC], r["eval_greedy"], r["eval_teacher_greedy"]) for r in rows if ACC in r],
        "response_len": statistics.mean(r["response_len"] for r in train),
        "entropy": statistics.mean(r["entropy"] for r in train[-10:]),
        "step_s": statistics.median(r["step_s"] for r in train),
    }


def steps_to(curve: list, target: float) -> int | None:
    return next((step for step, acc, *_ in curve if acc >= target), None)


def summarize(results: list[dict], algos: list[str], target: float, at_steps: list[int]) -> str:
    head = f"| algo | steps to {100 * target:.0f}% (median) | " + " | ".join(f"acc @ {s}" for s in at_steps)
    lines = [
        head + " | final acc | final greedy | teacher, final greedy | response len | entropy (last 10) "
        "| s / step (median) |",
        "|---" * (8 + len(at_steps)) + "|",
    ]
    for algo in algos:
        runs = [r for r in results if r["algo"] == algo]
        reach = [steps_to(r["curve"], target) for r in runs]
        reached = sorted(s for s in reach if s is not None)
        median = f"{statistics.median(reached):.0f}" if len(reached) > len(reach) / 2 else "not reached"
        median += f" ({len(reached)}/{len(reach)} seeds)"
        at = [
            statistics.mean(dict((s, a) for s, a, *_ in r["curve"]).get(k, float("nan")) for r in runs)
            for k in at_steps
        ]
        final = statistics.mean(r["curve"][-1][1] for r in runs)
        greedy = statistics.mean(r["curve"][-1][2] for r in runs)
        teacher = statistics.mean(r["curve"][-1][3] for r in runs)
        lines.append(
            f"| {algo} | {median} | "
            + " | ".join(f"{100 * a:.1f}%" for a in at)
            + f" | {100 * final:.1f}% | {100 * greedy:.1f}% | {100 * teacher:.1f}% | "
            f"{statistics.mean(r['response_len'] for r in runs):.1f} | "
            f"{statistics.mean(r['entropy'] for r in runs):.3f} | "
            f"{statistics.median(r['step_s'] for r in runs):.2f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], algos: list[str], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for algo in algos:
        curves = [r["curve"] for r in results if r["algo"] == algo]
        steps = [s for s, *_ in curves[0]]
        accs = [[c[i][1] for c in curves] for i in range(len(steps))]
        ax.plot(steps, [statistics.mean(a) for a in accs], marker="o", label=algo)
        ax.fill_between(steps, [min(a) for a in accs], [max(a) for a in accs], alpha=0.2)
    ax.axhline(target, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (mean@4, T = 1)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--algos", nargs="+", default=CONTENDERS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--target", type=float, default=0.7, help="held-out accuracy to reach")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 40 steps: a smoke run")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--from-json", default=None, help="redo the table and plot of an earlier run's JSON")
    ap.add_argument("extra", nargs="*", help="more sdpg.py flags, after --")
    a = ap.parse_args()
    if a.quick:
        a.seeds, a.steps = 1, 40
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.from_json:
        results = json.loads(Path(a.from_json).read_text())
        a.algos = list(dict.fromkeys(r["algo"] for r in results))
        a.steps = max(s for r in results for s, *_ in r["curve"])
        a.eval_every = results[0]["curve"][1][0] - results[0]["curve"][0][0]
        jobs = []
    else:
        subprocess.run(
            [sys.executable, "-c", BUILD_TINY], cwd=ROOT, check=True
        )  # build the cached tiny model once, before the parallel runs
        jobs = [(algo, seed) for seed in range(a.seeds) for algo in a.algos]
        with ThreadPoolExecutor(a.jobs) as pool:
            results = list(pool.map(lambda j: run_one(*j, a.steps, a.eval_every, out, a.extra), jobs))
    evals = range(a.eval_every, a.steps, a.eval_every)  # eval steps before the last
    at_steps = [s for s in (25, 50, 100) if s in evals] or list(evals)[:3]
    table = summarize(results, a.algos, a.target, at_steps)
    print(table)
    if jobs:
        print(f"\n{len(jobs)} runs in {time.time() - t0:.0f} s")
    (out / "compare_algos.md").write_text(table + "\n")
    (out / "compare_algos.json").write_text(json.dumps(results, indent=1))
    plot(results, a.algos, out / "compare_algos.png", a.target)


if __name__ == "__main__":
    main()
