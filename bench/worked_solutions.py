"""Where SDPG should win: a teacher that knows the way, not only the answer.

SmolLM2-135M-Instruct, the small preset, 16 steps, on the real-model benchmark's questions
(bench/real_model.py: the same training and held-out rows, the same seeds, so every run
pairs with that benchmark's GRPO run on the same seed). Each question file row carries a
short worked solution (the intermediate results, then the answer):

  two-step       "Lily has 28 cards. After giving 8 to Mia: 28 - 8 = 20. After buying 3
                 more: 20 + 3 = 23. The answer is 23."
  word-problems  "Tom has 12 apples and buys 7 more: 12 + 7 = 19. The answer is 19."
                 (one training file per seed: the built-in task draws its training rows
                 from the run's seed)

Contenders (each a `context` column the run uses as given):
  solution        the worked solution as the teacher's context
  paper           the paper's teacher prompt (its Fig. 4) around the same solution: the
                  answer, the solution, and the instruction to derive the answer by an
                  alternative approach without saying a hint was given
  opd-solution    --algo opd (no outcome term) with the worked solution
  grpo            --algo grpo on the same files (the student view is the benchmark's, so
                  this repeats its GRPO runs, with their samples kept)

Runs go one at a time, whole seeds first (--reuse keeps finished ones: those in --work, and
those already summarised in --out's worked_solutions.json, whose folders may be gone). Writes
worked_solutions.md and worked_solutions.json into --out, with the teacher check, mean@2
and greedy at every eval, truncation, response length, and the share of sampled training
answers in the last step that state an intermediate result.

    python bench/worked_solutions.py --reuse                          # the whole study
    python bench/worked_solutions.py --reuse --families two-step --contenders solution
    python bench/worked_solutions.py --report-only
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import real_model  # noqa: E402

# The paper's teacher prompt (its Fig. 4), after [TEACHER_CONTEXT_TOKEN]; {solution} is a
# worked reference solution.
PAPER = (
    "[Hint] The correct answer is {answer}. A common way to solve this is:\n{solution}\n"
    "[Instruction] If possible, derive the answer {answer} using an alternative, equally rigorous "
    "mathematical approach (e.g., algebraic vs geometric, or different substitution). If no "
    "alternative exists, articulate the standard approach with exceptional clarity. Do NOT state "
    "that you were given the answer or reference."
)
TWO_STEP = re.compile(r"^(\w+) has (\d+) (\w+)\. \1 gives (\d+) to (\w+) and then buys (\d+) more\.")
WORD = re.compile(r"^(\w+) has (\d+) (\w+) and buys (\d+) more\.")
CONTENDERS = {
    "solution": ("solution", ["--algo", "sdpg"]),
    "paper": ("paper", ["--algo", "sdpg"]),
    "opd-solution": ("solution", ["--algo", "opd"]),
    "grpo": ("solution", ["--algo", "grpo"]),
}
PLAN = {"two-step": ["solution", "paper", "opd-solution"], "word-problems": ["solution"]}


def two_step_solution(question: str, answer: str) -> str:
    name, a, item, b, friend, c = TWO_STEP.match(question).groups()
    left = int(a) - int(b)
    assert left + int(c) == int(answer), question
    return (
        f"{name} has {a} {item}. After giving {b} to {friend}: {a} - {b} = {left}. "
        f"After buying {c} more: {left} + {c} = {answer}. The answer is {answer}."
    )


def word_solution(question: str, answer: str) -> str:
    name, a, item, b = WORD.match(question).groups()
    assert int(a) + int(b) == int(answer), question
    return f"{name} has {a} {item} and buys {b} more: {a} + {b} = {answer}. The answer is {answer}."


def write_rows(path: Path, pairs: list[tuple[str, str]], solve, context: str) -> None:
    """question, answer, solution, and `context`: the solution itself or the paper's prompt
    around it (the column a run reads as the teacher's context)."""
    rows = []
    for q, a in pairs:
        s = solve(q, a)
        texts = {"solution": s, "paper": PAPER.format(answer=a, solution=s)}
        rows.append({"question": q, "answer": a, "solution": s, "context": texts[context]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def data_flags(work: Path, family: str, seed: int, eval_size: int, context: str) -> list[str]:
    """--data/--eval-data for one run: the family's rows with `context` = the chosen column."""
    from harness import data

    folder = work / f"{family}-data"
    if family == "two-step":
        real_model.write_family(folder / "plain", real_model.two_step_question, eval_size)
        train = [tuple(json.loads(x).values()) for x in (folder / "plain" / "train.jsonl").open()]
        held_out = [tuple(json.loads(x).values()) for x in (folder / "plain" / "eval.jsonl").open()]
        solve, name = two_step_solution, "train"
    else:  # the built-in task's rows: its training rows follow the seed
        train = data.generated_pairs(data.word_question, 2000, "train", seed)
        held_out = data.generated_pairs(data.word_question, eval_size, "test", 0)
        solve, name = word_solution, f"train-seed{seed}"
    flags = []
    for split, pairs in ((name, train), ("eval", held_out)):
        path = folder / context / f"{split}.jsonl"
        write_rows(path, pairs, solve, context)
        flags += ["--data" if split == name else "--eval-data", str(path)]
    return flags


def stated_steps(folder: Path, family: str, steps: range) -> float | None:
    """Share of the logged training samples at `steps` (samples.jsonl keeps each step's
    first group, the step's first prompt) that state the intermediate result of a two-step
    question (the number left after the give-away); None for other families."""
    from harness import data

    if family != "two-step":
        return None
    settings = json.loads((folder / "args.json").read_text())
    train = [json.loads(x)["question"] for x in Path(settings["data"]).open()]
    hits = []
    for r in (json.loads(x) for x in (folder / "samples.jsonl").open()):
        if r["step"] in steps:
            q = data.step_examples(train, r["step"] - 1, settings["batch_prompts"], settings["seed"])[0]
            _, a, _, b, _, _ = TWO_STEP.match(q).groups()
            hits.append(bool(re.search(rf"(?<!\d){int(a) - int(b)}(?!\d)", r["completion"])))
    return sum(hits) / len(hits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs")
    ap.add_argument("--work", default="runs/worked_solutions")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--eval-size", type=int, default=24)
    ap.add_argument("--families", nargs="+", choices=list(PLAN), default=list(PLAN))
    ap.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    work, out = Path(a.work), Path(a.out)
    common = ["--steps", str(a.steps), "--eval-every", str(a.eval_every), "--eval-size", str(a.eval_size)]
    layout: dict[str, dict[str, list[Path]]] = {}
    recorded = recorded_runs(out / "worked_solutions.json")  # finished in an earlier --work
    plan = [(seed, f, n) for seed in range(a.seeds) for f, names in PLAN.items() for n in names]
    plan += [(seed, "two-step", "grpo") for seed in range(a.seeds)]  # repeats finished runs: last
    for seed, family, name in plan:
        folder = work / family / name / f"seed{seed}"
        finished = (folder / "adapter").exists()  # written at the end of a run
        skip = finished or (family, name, seed) in recorded
        if name in a.contenders and family in a.families and not a.report_only and not (skip and a.reuse):
            context, flags = CONTENDERS[name]
            run = [
                *data_flags(work, family, seed, a.eval_size, context),
                *flags,
                *common,
                "--seed",
                str(seed),
            ]
            real_model.run_all([(folder, run)], 1)
            finished = True
        if finished:
            layout.setdefault(family, {}).setdefault(name, []).append(folder)
    report(layout, a, out, recorded)


def recorded_runs(path: Path) -> dict[tuple[str, str, int], dict]:
    """(family, contender, seed) -> the run's summary, from a report written earlier (its
    run folders may be gone: --reuse then keeps them instead of running them again)."""
    if not path.exists():
        return {}
    return {
        (family, name, r["seed"]): r
        for family, runs in json.loads(path.read_text()).items()
        for name, seeds in runs.items()
        for r in seeds
        if "stated_steps_first" in r  # this study's runs, not docs/real_model.json's
    }


def report(layout: dict[str, dict[str, list[Path]]], a, out: Path, recorded: dict) -> None:
    """Tables (mean ± sd over seeds at every eval, minus GRPO on the same seed, the teacher
    check, stated intermediate results) into worked_solutions.md, the runs into
    worked_solutions.json, mean@2 and greedy curves into worked_solutions.png. GRPO and
    SDPG-auto come from docs/real_model.json (the same questions and seeds) where this
    study did not run them."""
    eval_steps = {*range(0, a.steps + 1, a.eval_every), a.steps}
    results = {
        f: {
            n: [
                {
                    **real_model.summary(p, eval_steps),
                    "context_template": f"the data's {CONTENDERS[n][0]} column",
                    "stated_steps_first": stated_steps(p, f, range(1, 2)),
                    "stated_steps_last_half": stated_steps(p, f, range(a.steps // 2 + 1, a.steps + 1)),
                }
                for p in folders
            ]
            for n, folders in c.items()
        }
        for f, c in layout.items()
    }
    for (family, name, seed), summary in recorded.items():  # runs of an earlier --work
        runs = results.setdefault(family, {}).setdefault(name, [])
        if seed not in {r["seed"] for r in runs}:
            runs.append(summary)
            runs.sort(key=lambda r: r["seed"])
    if not results:
        sys.exit(f"no finished runs in {a.work}: run without --report-only first")
    finished = json.loads((ROOT / "docs" / "real_model.json").read_text())
    for family, runs in results.items():
        earlier = {"grpo": finished[family]["grpo"], "sdpg-auto": finished[family]["sdpg"]}
        results[family] = {**{n: r for n, r in earlier.items() if n not in runs}, **runs}
    text = []
    for family, runs in results.items():
        for key in ("eval_mean@2", "eval_greedy"):
            text += [f"### {family}: held-out {key[5:]}, mean ± sd over seeds", ""]
            text += real_model.family_table(runs, key) + [""] + real_model.paired_table(runs, key) + [""]
        text += real_model.check_table(runs) + [""] + steps_table(runs) + [""]
    print("\n".join(text))
    out.mkdir(parents=True, exist_ok=True)
    (out / "worked_solutions.md").write_text("\n".join(text) + "\n")
    (out / "worked_solutions.json").write_text(json.dumps(results, indent=1))
    real_model.plot(results, "eval_mean@2", out / "worked_solutions.png", list(results))


def steps_table(runs: dict[str, list[dict]]) -> list[str]:
    """The share of logged training answers that state the intermediate result: at step 1
    (the untrained model's samples, the same in every run of a seed) and over the last half."""
    lines = ["| contender (seeds) | states the intermediate result: step 1 | last half of training |",
             "|---|---|---|"]  # fmt: skip
    for name, seeds in runs.items():
        if seeds[0].get("stated_steps_first") is not None:
            first = real_model.mean_sd([r["stated_steps_first"] for r in seeds], digits=0)
            last = real_model.mean_sd([r["stated_steps_last_half"] for r in seeds], digits=0)
            lines.append(f"| {name} ({len(seeds)}) | {first} | {last} |")
    return lines if len(lines) > 2 else []


if __name__ == "__main__":
    main()
