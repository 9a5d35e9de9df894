"""Where does SDPG's dense signal pay? A map from dense to sparse reward on the tiny model.

In a flat group (all G rewards equal) the advantage is 0 and only the teacher gives a
gradient. The tiny model's difficulty (`--tiny-right-share`: how often its warm-started
student answers right) sets how many groups are flat at step 1. At each difficulty, the
contenders run with everything else as in bench/compare_algos.py (the tiny preset, 200
steps, held-out mean@4 and greedy every 25 steps, one thread a run, two runs side by side):

  grpo                 beta = alpha = 0
  sdpg                 the preset's beta (0.1), live teacher
  sdpg-beta1           beta = 1, live teacher
  sdpg-beta1-initial   beta = 1, the initial weights as teacher (they do not erode)
  opd                  pure self-distillation (no outcome term)

Runs are recorded in --out's regime_map.json as each one ends, so a stopped study resumes
where it was (a recorded run is never redone). Every run is made here, the default
difficulty's too: docs/compare_algos.json has runs with the same settings, but the tiny
model's warm start is rebuilt on each machine and rounds differently from one processor
to another (its step-0 greedy accuracy was 4.0% there, 1.5% on the machine of this
study), so runs from another machine are another initial model. Writes
regime_map.{json,md,png} into --out.

    python bench/regime_map.py                      # 3 difficulties x 5 contenders x 3 seeds
    python bench/regime_map.py --report-only        # the md and png from the JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import compare_algos  # noqa: E402

from config import TINY_RIGHT_SHARE  # noqa: E402
from harness.run_folder import read_metrics  # noqa: E402

DIFFICULTIES = (TINY_RIGHT_SHARE, 0.06, 0.02)  # --tiny-right-share: dense to sparse
CONTENDERS = {
    "grpo": ["--algo", "grpo"],
    "sdpg": ["--algo", "sdpg"],
    "sdpg-beta1": ["--algo", "sdpg", "--beta", "1.0"],
    "sdpg-beta1-initial": ["--algo", "sdpg", "--teacher", "initial", "--beta", "1.0"],
    "opd": ["--algo", "opd"],
}
STEPS, EVAL_EVERY, AT_STEPS, TARGET = 200, 25, (50, 100), 0.5


def key(r: dict) -> tuple[float, str, int]:
    return (r["right_share"], r["contender"], r["seed"])


def run_record(right_share: float, contender: str, seed: int, out: Path) -> dict:
    """One run in its own process, summarised with its training-time signal per step."""
    folder = out / "runs" / f"right{right_share:g}-{contender}-seed{seed}"
    flags = [*CONTENDERS[contender], "--tiny-right-share", str(right_share)]
    cmd = compare_algos.command(flags, seed, STEPS, EVAL_EVERY, folder, [])
    seconds = compare_algos.run_in_process(cmd, f"{contender} at right share {right_share:g}, seed {seed}")
    rows = read_metrics(folder)
    train = [r for r in rows if "reward" in r]
    return {
        "right_share": right_share,
        "contender": contender,
        "seed": seed,
        "seconds": seconds,
        **compare_algos.summary(rows),
        "flat_groups": [r["flat_groups"] for r in train],  # per training step
        "kl_distill_flat": [r.get("kl_distill_flat") for r in train],  # None: no flat group
        "kl_distill_mixed": [r.get("kl_distill_mixed") for r in train],
    }


def save(records: list[dict], path: Path) -> None:
    records = sorted(
        records, key=lambda r: (-r["right_share"], list(CONTENDERS).index(r["contender"]), r["seed"])
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)  # a kill never leaves half a file


def study(a, path: Path) -> list[dict]:
    """Every (difficulty, contender, seed) not yet in the JSON, two at a time, saved as each ends."""
    records = json.loads(path.read_text()) if path.exists() else []
    done = {key(r) for r in records}
    todo = [
        (d, c, s)
        for c in a.contenders
        for d in a.difficulties
        for s in range(a.seeds)
        if (d, c, s) not in done
    ]  # contender by contender: a cut study has whole contenders, every seed
    print(f"{len(records)} runs recorded, {len(todo)} to run", flush=True)
    for d in dict.fromkeys(d for d, _, _ in todo):  # each difficulty's model, built once before the runs
        build = f"from harness import tiny_model; tiny_model.ensure_tiny_model(right_share={d})"
        subprocess.run([sys.executable, "-c", build], cwd=ROOT, check=True)
    lock = threading.Lock()

    def one(job):
        record = run_record(*job, a.out)
        with lock:
            records.append(record)
            save(records, path)
            print(f"{job}: {record['seconds']:.0f} s, final mean@4 {record['curve'][-1][1]:.3f}", flush=True)

    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(one, todo))
    save(records, path)
    return records


# ---------------------------------------------------------------- the report


def runs_of(records: list[dict], d: float, c: str) -> list[dict]:
    return [r for r in records if r["right_share"] == d and r["contender"] == c]


def at(run: dict, step: int, col: int) -> float:
    """A run's eval value at `step` (col 1: mean@4, 2: greedy, 3: teacher greedy)."""
    return next(row[col] for row in run["curve"] if row[0] == step)


def pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """mean ± sd (sample sd; one value: the value alone)."""
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def step1_flat(records: list[dict], d: float) -> list[float]:
    """The step-1 flat-group share per seed: the same first rollout for every contender."""
    per_seed = {
        r["seed"]: r["flat_groups"][0] for r in records if r["right_share"] == d and r.get("flat_groups")
    }
    return [per_seed[s] for s in sorted(per_seed)]


def mean_of(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def signal(runs: list[dict], field: str, scale: float = 1.0, digits: int = 3) -> str:
    """mean ± sd over seeds of a per-step training field's mean over the run; '—' if unrecorded."""
    values = [mean_of(r[field]) for r in runs if r.get(field)]
    values = [v for v in values if v is not None]
    return pm(values, scale, digits) if values else "—"


def reached(runs: list[dict]) -> str:
    steps = [compare_algos.steps_to(r["curve"], TARGET) for r in runs]
    hit = sorted(s for s in steps if s is not None)
    median = f"{statistics.median(hit):.0f}" if len(hit) > len(steps) / 2 else "not reached"
    return f"{median} ({len(hit)}/{len(steps)})"


def contenders_at(records: list[dict], d: float) -> list[str]:
    return [c for c in CONTENDERS if runs_of(records, d, c)]


def difficulties(records: list[dict]) -> list[float]:
    return sorted({r["right_share"] for r in records}, reverse=True)


def accuracy_table(records: list[dict]) -> list[str]:
    cols = [f"mean@4 @ {s}" for s in AT_STEPS] + [f"mean@4 @ {STEPS}"]
    cols += [f"greedy @ {s}" for s in AT_STEPS] + [f"greedy @ {STEPS}"]
    lines = [
        "| right share | step-1 flat groups | contender | seeds | "
        + " | ".join(cols)
        + f" | steps to {100 * TARGET:.0f}% (seeds) | teacher greedy @ {STEPS} |",
        "|---" * (6 + len(cols)) + "|",
    ]
    for d in difficulties(records):
        flat = step1_flat(records, d)
        for c in contenders_at(records, d):
            runs = runs_of(records, d, c)
            vals = [pm([at(r, s, col) for r in runs]) for col in (1, 2) for s in (*AT_STEPS, STEPS)]
            lines.append(
                f"| {d:g} | {pm(flat) if flat else '—'} | {c} | {len(runs)} | "
                + " | ".join(vals)
                + f" | {reached(runs)} | {pm([at(r, STEPS, 3) for r in runs])} |"
            )
    return lines


def signal_table(records: list[dict]) -> list[str]:
    lines = [
        "| right share | contender | flat groups, steps 1–25 (%) | flat groups, all steps (%) | "
        "KL flat (nats/token) | KL mixed (nats/token) |",
        "|---|---|---|---|---|---|",
    ]
    for d in difficulties(records):
        for c in contenders_at(records, d):
            runs = runs_of(records, d, c)
            first = [statistics.mean(r["flat_groups"][:25]) for r in runs if r.get("flat_groups")]
            lines.append(
                f"| {d:g} | {c} | {pm(first) if first else '—'} | {signal(runs, 'flat_groups', 100.0, 1)} | "
                f"{signal(runs, 'kl_distill_flat')} | {signal(runs, 'kl_distill_mixed')} |"
            )
    return lines


def paired(records: list[dict], d: float, c: str, col: int, step: int = STEPS) -> list[float]:
    """contender minus GRPO on the same seed, at `step` (seeds both have)."""
    grpo = {r["seed"]: at(r, step, col) for r in runs_of(records, d, "grpo")}
    return [at(r, step, col) - grpo[r["seed"]] for r in runs_of(records, d, c) if r["seed"] in grpo]


def verdict(diffs: list[float]) -> str:
    """'not distinguishable' when the mean gap is within one sd of the same-seed differences."""
    if len(diffs) < 2:
        return "one seed"
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    return "not distinguishable" if abs(mean) <= sd else f"{'above' if mean > 0 else 'below'}, beyond 1 sd"


def paired_table(records: list[dict]) -> list[str]:
    lines = [
        f"| right share | contender | seeds | mean@4 − GRPO @ {STEPS} (points) | verdict "
        f"| greedy − GRPO @ {STEPS} (points) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in difficulties(records):
        for c in contenders_at(records, d):
            if c == "grpo":
                continue
            m, g = paired(records, d, c, 1), paired(records, d, c, 2)
            if not m:
                continue
            lines.append(f"| {d:g} | {c} | {len(m)} | {pm(m)} | {verdict(m)} | {pm(g)} | {verdict(g)} |")
    return lines


def report(records: list[dict]) -> str:
    """regime_map.md: every table from the JSON alone."""
    seeds = sorted({r["seed"] for r in records})
    return "\n".join(
        [
            "# The regime map: SDPG against GRPO from dense to sparse reward",
            "",
            f"Generated by `python bench/regime_map.py` from `docs/regime_map.json` ({len(records)} runs, "
            f"seeds {', '.join(map(str, seeds))}): the tiny preset, {STEPS} steps, held-out mean@4 and "
            f"greedy on 200 questions every {EVAL_EVERY} steps, at each difficulty (`--tiny-right-share`). "
            "All runs on one machine (2 CPU cores); figures from another machine "
            "differ (docs/tiny_model_study.md). Back to the [README](../README.md).",
            "",
            "Held-out accuracy (mean ± sd over seeds, %); step-1 flat groups: the share of the first "
            "rollout's groups whose G rewards are equal (the same rollout for every contender of a seed).",
            "",
            *accuracy_table(records),
            "",
            "Contender minus GRPO on the same seed (mean ± sd over seeds, points); 'not distinguishable': "
            "the mean is within one sd.",
            "",
            *paired_table(records),
            "",
            "The training signal: flat-group share and the distillation KL per token in flat and mixed "
            "groups, each run's mean over steps, then mean ± sd over seeds ('—': no teacher).",
            "",
            *signal_table(records),
            "",
        ]
    )


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ds = [d for d in difficulties(records) if step1_flat(records, d)]
    xs = [100 * statistics.mean(step1_flat(records, d)) for d in ds]
    for c in CONTENDERS:
        if c == "grpo":
            continue
        points = [(x, paired(records, d, c, 1)) for x, d in zip(xs, ds, strict=True)]
        points = [(x, diffs) for x, diffs in points if len(diffs) > 1]
        if points:
            left.errorbar(
                [x for x, _ in points],
                [100 * statistics.mean(diffs) for _, diffs in points],
                yerr=[100 * statistics.stdev(diffs) for _, diffs in points],
                marker="o",
                capsize=3,
                label=c,
            )
    left.axhline(0, color="gray", linewidth=1)
    left.set_xlabel("step-1 flat groups (%, mean over seeds)")
    left.set_ylabel(f"mean@4 − GRPO, same seed, step {STEPS} (points)")
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    for i, d in enumerate(difficulties(records)):
        for c, style in (("sdpg-beta1", "-"), ("sdpg-beta1-initial", "--")):
            runs = runs_of(records, d, c)
            if runs:
                steps = [row[0] for row in runs[0]["curve"]]
                teacher = [100 * statistics.mean(at(r, s, 3) for r in runs) for s in steps]
                right.plot(steps, teacher, style, color=f"C{i}", label=f"{c}, right share {d:g}")
    right.set_xlabel("step")
    right.set_ylabel("teacher view, held-out greedy (%)")
    right.set_ylim(0, 105)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--difficulties", nargs="+", type=float, default=list(DIFFICULTIES))
    ap.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (one thread each)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--report-only", action="store_true", help="the md and png from the JSON, no runs")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "regime_map.json"
    if a.report_only:
        if not path.exists():
            sys.exit(f"{path} does not exist: run the study first")
        records = json.loads(path.read_text())
    else:
        records = study(a, path)
    text = report(records)
    print(text)
    (a.out / "regime_map.md").write_text(text)
    plot(records, a.out / "regime_map.png")


if __name__ == "__main__":
    main()
