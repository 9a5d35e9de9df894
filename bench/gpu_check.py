"""GPU check: three SDPG steps at Qwen2.5-0.5B's exact shape, 4-bit NF4 + LoRA.

Builds offline a randomly initialised Qwen2 with Qwen2.5-0.5B's shape (hidden 896, 24
layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151,936, tied embeddings) under the
tiny tokenizer, whose ids fit any vocabulary (the weights are random, so rewards are 0
and only speed and memory mean anything), loads
it the way sdpg.py does (NF4 base, LoRA on all linear layers), runs 3 SDPG steps with
G = 8 and a forced response length, and prints peak memory, seconds per step split
into generate / reference / teacher / student update, and generation tokens/s. Then
runs the KL benchmark at N = 8,192 against the naive path.

    python bench/gpu_check.py            # on one GPU: about 3-5 minutes
    python bench/gpu_check.py --small    # a tiny shape on CPU, under a minute (tested)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sdpg  # noqa: E402
from harness import cli  # noqa: E402
from harness.data import arithmetic_split  # noqa: E402
from harness.loading import load_policy, load_tokenizer  # noqa: E402
from harness.optim import Optimizer  # noqa: E402
from harness.tiny_model import build_tiny_model  # noqa: E402
from verifier import Verdict  # noqa: E402

QWEN25_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    max_position_embeddings=4096,
)
SMALL = dict(vocab_size=4096)  # the tiny model's body under a larger vocabulary


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--small", action="store_true", help="tiny shape, CPU-friendly")
    ap.add_argument("--new-tokens", type=int, default=512, help="forced response length")
    ap.add_argument("--batch-prompts", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default="bench/gpu_check.json")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    new_tokens = 16 if a.small else a.new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_tiny_model(folder, **(SMALL if a.small else QWEN25_05B))
        args = cli.parse(
            cli.given_flags(
                [
                    "--model",
                    str(folder),
                    "--algo",
                    "sdpg",
                    "--load-in-4bit",
                    "--num-generations",
                    "8",
                    "--batch-prompts",
                    str(2 if a.small else a.batch_prompts),
                    "--micro-batch",
                    str(a.micro_batch),
                    "--max-new-tokens",
                    str(new_tokens),
                    "--min-new-tokens",
                    str(new_tokens),
                    "--steps",
                    str(a.steps),
                    "--data",
                    "arithmetic",
                    "--output-dir",
                    str(Path(tmp) / "run"),
                ]
            )
        )
        policy = load_policy(args, *load_tokenizer(args))
    optimizer = Optimizer(policy.model.parameters(), args.lr, args.weight_decay)
    cfg = args
    examples = arithmetic_split(args.steps * args.batch_prompts, "train")
    rows = []
    for step in range(args.steps):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        batch = examples[step * args.batch_prompts : (step + 1) * args.batch_prompts]
        t0 = time.perf_counter()
        metrics = sdpg.sdpg_step(
            policy, optimizer, batch, step, cfg, lambda c, g: Verdict(0.0, None, "none", "")
        )[0]
        metrics["wall_s"] = time.perf_counter() - t0
        metrics["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else metrics["peak_mem_gb"]
        rows.append(metrics)
        print(
            f"step {step}: {metrics['wall_s']:.1f} s (generate {metrics['generate_s']:.1f}, reference "
            f"{metrics['reference_s']:.1f}, teacher {metrics['teacher_s']:.1f}, student update "
            f"{metrics['student_s']:.1f}), {metrics['tokens_per_s']:.0f} generated tokens/s, "
            f"peak {'VRAM' if cuda else 'RSS'} {metrics['peak_gb']:.2f} GB"
        )
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    summary = {
        "device": device,
        "small": a.small,
        "new_tokens": new_tokens,
        "rows_per_step": 8 * args.batch_prompts,
        "steps": rows,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(summary, indent=1))
    if not a.small:
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "kl_bench.py"),
                "--shapes",
                "8192x896x151936",
                "--chunks",
                "256",
                "1024",
                "--json",
                "bench/kl_bench_gpu.json",
            ],
            check=True,
        )


if __name__ == "__main__":
    main()
