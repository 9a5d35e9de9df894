"""sdpg.py: train a causal LM with Self-Distilled Policy Gradient on one GPU (or a laptop).

One model plays three roles:
  student    pi_theta(.|x)          LoRA on: samples G responses per prompt, gets gradients
  teacher    pi_theta(.|c, x)       LoRA on, privileged context c in the prompt, no gradient
  reference  pi_ref(.|x)            the same weights with the LoRA adapter disabled

Each step: sample B prompts -> G responses each -> rule-based rewards -> group
advantages -> reference log-probs (adapter off, no grad) -> for each micro-batch:
teacher hidden states (no grad), student hidden states (grad), sdpg_loss, backward,
with the loss normalised over the whole batch's tokens -> clip -> optimizer step.
No second copy of the model exists, except with --full-finetune, where the frozen
reference has to be one.

Simplified on purpose, compared with the authors' verl recipe: one process, HF
`generate` instead of vLLM, one mini-batch per step (--ppo-epochs passes over it),
the teacher is the current model at the moment each micro-batch is scored, and the
whole loss is computed from final hidden states so no [B, T, V] logits tensor exists.

    python sdpg.py                                   # tiny offline model, arithmetic task
    python sdpg.py --model Qwen2.5-0.5B              # GSM8K on one GPU (LoRA, 4-bit)
    python sdpg.py --algo grpo --print-verl-overrides
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import random
import resource
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint import (
    CheckpointError,
    check_compatible,
    is_peft,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from data import DataError, Example, load_task
from losses import AGG_MODES, DEFAULT_CHUNK, KL_MODES, beta_schedule, group_advantages, sdpg_loss
from rollout import RolloutBatch, prompt_texts, response_hidden, rollout, score_tokens, view_logprobs
from tiny_model import WARM_START_STEPS, ensure_tiny_model
from verifier import make_reward_fn

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # optional-kernel notice
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

ALGOS = ("sdpg", "grpo", "opd")
# Defaults that depend on the model: the tiny demo learns fast with a large lr and short
# answers; a real model follows the paper's recipe scaled to one GPU with LoRA.
PRESETS = {
    "tiny": dict(
        data="arithmetic",
        lr=1e-3,
        steps=250,
        batch_prompts=16,
        micro_batch=64,
        num_generations=8,
        max_new_tokens=8,
        max_prompt_length=256,
        eval_every=50,
        eval_size=200,
        eval_samples=4,
        lora_r=16,
        lora_alpha=32,
        beta=0.1,
        alpha=1e-3,
    ),
    "hub": dict(
        data="gsm8k",
        lr=1e-5,
        steps=200,
        batch_prompts=8,
        micro_batch=4,
        num_generations=8,
        max_new_tokens=512,
        max_prompt_length=512,
        eval_every=50,
        eval_size=200,
        eval_samples=4,
        lora_r=32,
        lora_alpha=64,
        beta=1e-3,
        alpha=1e-3,
    ),
}
FULL_FINETUNE_LR = 1e-6  # the paper's lr; LoRA wants a larger one (the hub preset's 1e-5)


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


# ---------------------------------------------------------------- arguments


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit code 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help; a model-dependent one shows both presets."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.dest in PRESETS["tiny"]:
            tiny, hub = PRESETS["tiny"][action.dest], PRESETS["hub"][action.dest]
            return f"{action.help} (default: {tiny} with --model tiny, else {hub})".lstrip()
        if action.default is None:
            return action.help or ""  # says its own default
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    a(
        "--model",
        default="tiny",
        help="'tiny' (built offline), a local folder, a hub id, or a Qwen2.5 short name like Qwen2.5-0.5B",
    )
    a("--data", default=None, help="'arithmetic', 'gsm8k', or a .jsonl/.parquet/.csv file")
    a("--gsm8k-solution-context", action="store_true", help="GSM8K: the teacher sees the worked solution")
    a("--eval-data", default=None, help="held-out file (default: the task's test split)")
    a("--algo", choices=ALGOS, default="sdpg", help="sdpg; grpo (beta = 0); opd (no outcome term)")
    a("--beta", type=float, default=None, help="distillation weight beta")
    a("--alpha", type=float, default=None, help="reference anchor weight alpha (grpo: 0)")
    a("--kl-mode", choices=KL_MODES, default="urkl", help="anchor f(log w)")
    a("--beta-warmup-steps", type=int, default=0, help="linear beta warm-up length (0: off)")
    a("--beta-decay-steps", type=int, default=0, help="linear beta decay to 0 over the last steps (0: off)")
    a("--positive-adv-only", action="store_true", help="distil only responses with A > 0")
    a(
        "--teacher",
        choices=("live", "initial"),
        default="live",
        help="who reads the context: live = current policy (the paper), initial = reference (ablation)",
    )
    a("--eps-low", type=float, default=0.2, help="PPO clip below 1")
    a("--eps-high", type=float, default=0.28, help="PPO clip above 1 (DAPO clip-higher)")
    a("--clip-c", type=float, default=10.0, help="dual-clip bound for A < 0")
    a("--loss-agg", choices=AGG_MODES, default="token-mean", help="how per-token losses are averaged")
    a("--num-generations", type=int, default=None, help="G, responses per prompt")
    a("--max-new-tokens", type=int, default=None, help="response length cap, in tokens")
    a("--min-new-tokens", type=int, default=0, help="force at least this many tokens (benchmarks)")
    a("--max-prompt-length", type=int, default=None, help="longer prompts are dropped, with a count")
    a("--temperature", type=float, default=1.0, help="sampling temperature, also applied to log-probs")
    a("--top-p", type=float, default=1.0, help="nucleus sampling")
    a("--lr", type=float, default=None, help=f"AdamW lr; --full-finetune: {FULL_FINETUNE_LR}")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm")
    a("--steps", type=int, default=None, help="optimizer steps")
    a("--batch-prompts", type=int, default=None, help="B, prompts per step")
    a("--micro-batch", type=int, default=None, help="rows per forward/backward")
    a("--ppo-epochs", type=int, default=1, help="passes over each batch (>1 uses old log-probs)")
    a("--kl-chunk-size", type=int, default=DEFAULT_CHUNK, help="tokens per chunk of the full-vocab KL")
    a("--seed", type=int, default=0, help="seeds sampling, data order and init")
    a(
        "--output-dir",
        default=None,
        help="metrics, samples, curves, checkpoints and the adapter go here "
        "(default: runs/<algo>-<date>-<time>)",
    )
    a("--eval-every", type=int, default=None, help="steps between held-out evals (0: only before and after)")
    a("--eval-size", type=int, default=None, help="held-out prompts per eval")
    a("--eval-samples", type=int, default=None, help="k of mean@k at the training temperature")
    a("--verifier", choices=("rule", "math-verify"), default="rule", help="reward backend")
    a(
        "--last-number-fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rule verifier: without \\boxed, '####' or 'answer is', use the last number (off for MATH)",
    )
    a("--lora-r", type=int, default=None, help="LoRA rank")
    a("--lora-alpha", type=int, default=None, help="LoRA scaling alpha")
    a("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    a("--lora-target-modules", default="all-linear", help="comma-separated names, or all-linear")
    a("--full-finetune", action="store_true", help="no LoRA; the reference is then a second, frozen copy")
    a(
        "--load-in-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NF4 base (default: on with CUDA)",
    )
    a(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in backward (default: on with CUDA)",
    )
    a(
        "--cache-dir",
        default=None,
        help="where the tiny model is built (default: $SDPG_CACHE or ~/.cache/sdpg)",
    )
    a(
        "--tiny-warm-start-steps",
        type=int,
        default=WARM_START_STEPS,
        help="supervised steps that warm-start --model tiny",
    )
    a("--print-verl-overrides", action="store_true", help="print the equivalent verl overrides and exit")
    a("--save-every", type=int, default=50, help="checkpoint every N steps (0: only at the end)")
    a("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    a(
        "--resume",
        nargs="?",
        const="yes",
        choices=("no", "auto", "yes"),
        default="no",
        help="continue from the output folder's newest checkpoint; auto: if there is one",
    )
    a("--overwrite-output-dir", action="store_true", help="replace a run already in --output-dir")
    a("--max-bad-steps", type=int, default=3, help="stop after this many non-finite steps in a row")
    a("--debug", action="store_true", help="show tracebacks")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill model-dependent defaults and check the arguments; UsageError on bad input."""
    if args.output_dir is None:
        args.output_dir = f"runs/{args.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    preset = PRESETS["tiny" if args.model == "tiny" else "hub"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.full_finetune and args.lr == PRESETS["hub"]["lr"]:
        args.lr = FULL_FINETUNE_LR
    if args.algo == "grpo":
        if args.beta not in (None, 0.0, preset["beta"]):
            raise UsageError("--algo grpo has no distillation term: drop --beta or use --algo sdpg")
        args.beta = 0.0
        args.alpha = 0.0 if args.alpha == preset["alpha"] else args.alpha
    for name in (
        "steps",
        "batch_prompts",
        "micro_batch",
        "max_new_tokens",
        "max_prompt_length",
        "ppo_epochs",
        "eval_size",
        "eval_samples",
        "kl_chunk_size",
        "lora_r",
        "keep_checkpoints",
        "max_bad_steps",
    ):
        if getattr(args, name) < 1:
            raise UsageError(
                f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}"
            )
    if args.teacher == "initial" and args.full_finetune:
        raise UsageError(
            "--teacher initial reads the reference through the policy's LM head, which a full fine-tune "
            "changes: use LoRA (drop --full-finetune) or --teacher live"
        )
    if args.num_generations < 2:
        raise UsageError(
            f"--num-generations must be >= 2 to form a group advantage, got {args.num_generations}"
        )
    if (
        args.eval_every < 0
        or args.save_every < 0
        or args.tiny_warm_start_steps < 0
        or args.temperature <= 0
        or not 0 < args.top_p <= 1
        or args.lr <= 0
    ):
        raise UsageError(
            "need --eval-every >= 0, --save-every >= 0, --tiny-warm-start-steps >= 0, --temperature > 0, "
            "0 < --top-p <= 1 and --lr > 0"
        )
    return args


# ---------------------------------------------------------------- model


def resolve_model_path(name: str, cache_dir: str | None, warm_start_steps: int = WARM_START_STEPS) -> str:
    """'tiny' -> the cached tiny model; 'Qwen2.5-…' -> 'Qwen/Qwen2.5-…'; else unchanged."""
    if name == "tiny":
        return str(ensure_tiny_model(cache_dir, warm_start_steps=warm_start_steps))
    if name.startswith("Qwen2.5") and "/" not in name and not Path(name).exists():
        return f"Qwen/{name}"
    return name


def load_tokenizer(args: argparse.Namespace):
    """(model path, tokenizer); a model that cannot be found is a UsageError, not a traceback."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path(args.model, args.cache_dir, args.tiny_warm_start_steps)
    try:
        AutoConfig.from_pretrained(path)
        return path, AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"could not load model {args.model!r} ({path}) locally or from the hub: {str(e).splitlines()[0]} "
            "Point --model at a folder that holds config.json and the weights, or use --model tiny."
        ) from e


def load_model(args: argparse.Namespace, path: str):
    """(model, reference or None): LoRA (the reference is the adapter switched off) or a
    full fine-tune with a frozen second copy as the reference."""
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    four_bit = cuda if args.load_in_4bit is None else args.load_in_4bit
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs(four_bit, cuda))
    if four_bit:
        cpu_safe_4bit(model)
    if args.gradient_checkpointing if args.gradient_checkpointing is not None else cuda:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.full_finetune:
        reference = AutoModelForCausalLM.from_pretrained(path, **model_kwargs(four_bit, cuda)).eval()
        reference.requires_grad_(False)
        return model, reference
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets if targets == "all-linear" else targets.split(","),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), None


def load_policy(args: argparse.Namespace):
    """(model, tokenizer, reference or None) in one call."""
    path, tokenizer = load_tokenizer(args)
    model, reference = load_model(args, path)
    return model, tokenizer, reference


def model_kwargs(four_bit: bool, cuda: bool) -> dict:
    """from_pretrained arguments: bf16 on CUDA, float32 on CPU, optional NF4 base."""
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    kwargs: dict = {"dtype": dtype, "device_map": {"": 0} if cuda else None}
    if four_bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise UsageError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from e
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return kwargs


def cpu_safe_4bit(model: torch.nn.Module) -> None:
    """bitsandbytes on CPU repacks 4-bit weights for inference after an eval-mode forward,
    and the next training step then fails; this flag keeps the training layout."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


@contextmanager
def reference_model(model, reference):
    """The model that gives reference log-probs: the frozen copy, or the adapter switched off."""
    if reference is not None:
        yield reference
    else:
        with model.disable_adapter():
            yield model


def teacher_model(model, reference, teacher: str):
    """The teacher's weights: the policy itself ('live'), or the reference ('initial')."""
    return reference_model(model, reference) if teacher == "initial" else nullcontext(model)


# ---------------------------------------------------------------- data


def load_examples(args: argparse.Namespace, tokenizer) -> tuple[list[Example], list[Example]]:
    """Train and eval examples, prompts longer than --max-prompt-length dropped (counted)."""
    train = load_task(args.data, "train", seed=args.seed, solution_as_context=args.gsm8k_solution_context)
    if args.eval_data:
        evals = load_task(args.eval_data, "test")
    elif args.data in ("arithmetic", "gsm8k"):
        evals = load_task(args.data, "test", n=args.eval_size)
    else:  # one file: hold out its last tenth
        k = max(1, len(train) // 10)
        train, evals = (train[:-k], train[-k:]) if len(train) > 1 else (train, train)
    evals = evals[: args.eval_size]
    out = []
    for name, examples in (("train", train), ("eval", evals)):
        kept = [
            e
            for e in examples
            if max(len(tokenizer(t)["input_ids"]) for t in prompt_texts(tokenizer, e))
            <= args.max_prompt_length
        ]
        if len(kept) < len(examples):
            print(
                f"{name}: dropped {len(examples) - len(kept)} of {len(examples)} examples whose prompt is "
                f"longer than --max-prompt-length {args.max_prompt_length}",
                file=sys.stderr,
            )
        if not kept:
            raise UsageError(f"no {name} example fits --max-prompt-length {args.max_prompt_length}: raise it")
        out.append(kept)
    return out[0], out[1]


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A fixed shuffle of range(n) per (seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order


def batch_examples(train: list[Example], step: int, batch_prompts: int, seed: int) -> list[Example]:
    """The step's prompts: a fixed shuffle per epoch, so step k always sees the same batch
    (which is what makes a resumed run continue at the right data position)."""
    positions = range(step * batch_prompts, (step + 1) * batch_prompts)
    return [train[epoch_order(len(train), seed, p // len(train))[p % len(train)]] for p in positions]


# ---------------------------------------------------------------- one step


def update(
    model, reference, optimizer, batch: RolloutBatch, advantages: torch.Tensor, args, beta: float
) -> dict:
    """Reference/old log-probs, then --ppo-epochs passes over the batch, each ending in one
    optimizer step. Returns float metrics."""
    timings = {"reference_s": 0.0, "teacher_s": 0.0, "student_s": 0.0}
    t0 = time.perf_counter()
    ref_logp = old_logp = None
    if args.alpha > 0:
        with reference_model(model, reference) as ref_model:
            ref_logp = micro_batched_logprobs(ref_model, batch, args)
    if args.ppo_epochs > 1:
        old_logp = micro_batched_logprobs(model, batch, args)
    timings["reference_s"] = time.perf_counter() - t0
    totals: dict[str, float] = {}
    for _ in range(args.ppo_epochs):
        optimizer.zero_grad()
        metrics = accumulate_gradients(
            model, batch, advantages, ref_logp, old_logp, args, beta, timings, reference
        )
        metrics.update(optimizer.finish(args.grad_clip))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v / args.ppo_epochs
    return {**totals, **timings}


def accumulate_gradients(
    model, batch, advantages, ref_logp, old_logp, args, beta, timings=None, reference=None
) -> dict:
    """Backward of the whole batch's loss, one micro-batch at a time.

    Each micro-batch's loss is divided by the whole batch's token count (row count for
    seq-mean-token-mean), so the summed gradients are those of the batch mean whatever
    --micro-batch is. Returns the loss and token-weighted means of the other metrics.
    """
    timings = {"teacher_s": 0.0, "student_s": 0.0} if timings is None else timings
    mask = batch.response_mask
    normalizer = float(mask.sum()) if args.loss_agg == "token-mean" else float(mask.shape[0])
    totals: dict[str, float] = {}
    for start in range(0, mask.shape[0], args.micro_batch):
        rows = slice(start, start + args.micro_batch)
        metrics = micro_step(
            model,
            batch.rows(rows),
            advantages[rows],
            None if ref_logp is None else ref_logp[rows],
            None if old_logp is None else old_logp[rows],
            args,
            beta,
            normalizer,
            timings,
            reference,
        )
        share = float(mask[rows].sum()) / max(1.0, float(mask.sum()))
        for k, v in metrics.items():  # the loss is already this micro-batch's share
            totals[k] = totals.get(k, 0.0) + v * (1.0 if k == "loss" else share)
    return totals


def micro_batched_logprobs(model, batch: RolloutBatch, args) -> torch.Tensor:
    """Student-view log-probs [B*G, T] of `model` (no grad), one micro-batch at a time."""
    size = args.micro_batch
    parts = [
        view_logprobs(model, batch.rows(slice(s, s + size)), args.temperature, args.kl_chunk_size).cpu()
        for s in range(0, batch.response_ids.shape[0], size)
    ]
    return torch.cat(parts)  # [B*G, T]


def micro_step(
    model, mb: RolloutBatch, adv, ref_logp, old_logp, args, beta, normalizer, timings, reference=None
) -> dict:
    """Teacher (no grad) and student (grad) on one micro-batch, then loss.backward()."""
    t0 = time.perf_counter()
    teacher_h = None
    if beta > 0 or args.algo == "opd":
        with torch.no_grad(), teacher_model(model, reference, args.teacher) as teacher:
            teacher_h = response_hidden(
                teacher, mb.teacher_ids, mb.teacher_mask, mb.response_ids, mb.response_mask
            )
    t1 = time.perf_counter()
    student_h = response_hidden(model, mb.student_ids, mb.student_mask, mb.response_ids, mb.response_mask)
    head = model.get_output_embeddings()
    logp, kl, entropy = score_tokens(
        head, student_h, mb.response_ids, mb.response_mask, teacher_h, args.temperature, args.kl_chunk_size
    )  # [b, T] each
    device = logp.device
    mask = mb.response_mask.to(device)
    loss, metrics = sdpg_loss(
        logp,
        logp.detach() if old_logp is None else old_logp.to(device),
        adv.to(device),
        mask,
        kl if teacher_h is not None else None,
        None if ref_logp is None else ref_logp.to(device),
        beta=beta,
        alpha=args.alpha,
        kl_mode=args.kl_mode,
        outcome_weight=0.0 if args.algo == "opd" else 1.0,
        positive_adv_only=args.positive_adv_only,
        eps_low=args.eps_low,
        eps_high=args.eps_high,
        clip_c=args.clip_c,
        agg=args.loss_agg,
        normalizer=normalizer,
    )
    loss.backward()
    timings["teacher_s"] += t1 - t0
    timings["student_s"] += time.perf_counter() - t1
    metrics["entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1))
    return metrics


class Optimizer:
    """AdamW over the trainable parameters. `finish` clips the gradient and steps, or
    skips the step (and counts it) when the loss or gradient is not finite."""

    def __init__(self, params, lr: float, weight_decay: float):
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.bad_in_a_row = 0
        self.bad_total = 0

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def finish(self, max_norm: float) -> dict:
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if not torch.isfinite(norm):
            self.bad_in_a_row += 1
            self.bad_total += 1
            self.zero_grad()
            return {"grad_norm": float("nan"), "skipped_step": 1.0, "skipped_total": self.bad_total}
        self.opt.step()
        self.bad_in_a_row = 0
        return {"grad_norm": float(norm), "skipped_step": 0.0, "skipped_total": self.bad_total}

    def state_dict(self) -> dict:
        return {
            "adamw": self.opt.state_dict(),
            "bad_in_a_row": self.bad_in_a_row,
            "bad_total": self.bad_total,
        }

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["adamw"])
        self.bad_in_a_row, self.bad_total = state["bad_in_a_row"], state["bad_total"]


def train_step(model, reference, optimizer, tokenizer, examples: list[Example], step: int, args, reward_fn):
    """One SDPG step on B prompts: (metrics, the rollout batch, its rewards)."""
    t0 = time.perf_counter()
    batch = rollout(
        model,
        tokenizer,
        examples,
        args.num_generations,
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        seed=args.seed * 1_000_003 + step,
        min_new_tokens=args.min_new_tokens,
    )
    t_gen = time.perf_counter() - t0
    rewards = torch.tensor([reward_fn(c, a) for c, a in zip(batch.completions, batch.answers, strict=True)])
    advantages = group_advantages(rewards.double(), args.num_generations).float()  # [B*G]
    beta = beta_schedule(step, args.steps, args.beta, args.beta_warmup_steps, args.beta_decay_steps)
    metrics = update(model, reference, optimizer, batch, advantages, args, beta)
    seconds = time.perf_counter() - t0
    n_tokens = float(batch.response_mask.sum())
    groups = rewards.view(-1, args.num_generations)
    return (
        {
            "step": step,
            "reward": float(rewards.mean()),
            "accuracy": float((rewards == 1).float().mean()),
            "adv_std": float(advantages.std()),
            "flat_groups": float((groups.amax(1) == groups.amin(1)).float().mean()),
            **metrics,
            "response_len": n_tokens / batch.response_ids.shape[0],
            "truncated": float(batch.truncated.float().mean()),
            "beta": beta,
            "generate_s": t_gen,
            "step_s": seconds,
            "tokens_per_s": n_tokens / max(t_gen, 1e-9),
            "peak_mem_gb": peak_memory_gb(),
        },
        batch,
        rewards,
    )


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------- eval and logs


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[Example], args, reward_fn) -> dict:
    """Held-out accuracy: mean@k at the training temperature and greedy; and the teacher
    view's greedy accuracy, to see whether the teacher still knows more than the student."""
    scores: dict[str, list[float]] = {
        f"eval_mean@{args.eval_samples}": [],
        "eval_greedy": [],
        "eval_teacher_greedy": [],
    }
    settings = [
        (f"eval_mean@{args.eval_samples}", args.temperature, args.eval_samples, "student"),
        ("eval_greedy", 0.0, 1, "student"),
        ("eval_teacher_greedy", 0.0, 1, "teacher"),
    ]
    for s in range(0, len(examples), 32):
        chunk = examples[s : s + 32]
        for key, temp, k, view in settings:
            b = rollout(
                model, tokenizer, chunk, k, args.max_new_tokens, temp, args.top_p, args.seed + s, view=view
            )
            scores[key] += [reward_fn(c, a) for c, a in zip(b.completions, b.answers, strict=True)]
    return {key: sum(v) / len(v) for key, v in scores.items()}


def write_samples(path: Path, step: int, batch: RolloutBatch, rewards: torch.Tensor, n: int = 4) -> None:
    with path.open("a") as f:
        for i in range(min(n, len(batch.completions))):
            row = {
                "step": step,
                "answer": batch.answers[i],
                "completion": batch.completions[i],
                "reward": float(rewards[i]),
            }
            f.write(json.dumps(row) + "\n")


def plot_curves(out_dir: Path) -> None:
    """curves.png: training reward, held-out accuracy and KLs against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    train = [r for r in rows if "reward" in r]
    axes[0].plot([r["step"] for r in train], [r["reward"] for r in train], label="train reward")
    for key in [k for k in rows[-1] if k.startswith("eval_")] if rows else []:
        ev = [r for r in rows if key in r]
        axes[0].plot([r["step"] for r in ev], [r[key] for r in ev], marker="o", label=key)
    axes[0].set_ylim(0, 1)
    for ax, key in ((axes[1], "kl_distill"), (axes[2], "ref_kl")):
        pts = [r for r in train if key in r]
        ax.plot([r["step"] for r in pts], [r[key] for r in pts])
        ax.set_title(key)
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=90)
    plt.close(fig)


def log(out_dir: Path, row: dict) -> None:
    with (out_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------- the loop


class TrainingError(Exception):
    """The run cannot go on (e.g. repeated non-finite steps); exit code 1."""


class StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop after the current step; a second one
    interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        print("\nstopping after this step (Ctrl-C again to abort now)", file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def train(args: argparse.Namespace) -> int:
    """The whole run; returns the exit code (0, or 130 when stopped by Ctrl-C)."""
    out_dir, resume_from = open_run(args)
    try:
        reward_fn = make_reward_fn(args.verifier, args.last_number_fallback)
    except RuntimeError as e:  # the optional math-verify backend is not installed
        raise UsageError(str(e)) from e
    path, tokenizer = load_tokenizer(args)
    train_set, eval_set = load_examples(args, tokenizer)  # bad data fails before the model loads
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    model, reference = load_model(args, path)
    optimizer = Optimizer(model.parameters(), args.lr, args.weight_decay)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, model, optimizer)
        truncate_logs(out_dir, start)
        print(f"resumed from {resume_from} at step {start}")
    else:
        first = evaluate(model, tokenizer, eval_set, args, reward_fn)
        log(out_dir, {"step": 0, **first})
        print(f"step 0 held-out accuracy: {fmt(first)}")
    bar = tqdm(range(start, args.steps), desc=args.algo, dynamic_ncols=True, initial=start, total=args.steps)
    with StopOnCtrlC() as ctrl_c:
        for step in bar:
            examples = batch_examples(train_set, step, args.batch_prompts, args.seed)
            metrics, batch, rewards = train_step(
                model, reference, optimizer, tokenizer, examples, step, args, reward_fn
            )
            done = step + 1
            write_samples(out_dir / "samples.jsonl", done, batch, rewards)
            metrics["step"] = done
            evaluated = (args.eval_every and done % args.eval_every == 0) or done == args.steps
            if evaluated:
                metrics.update(evaluate(model, tokenizer, eval_set, args, reward_fn))
            log(out_dir, metrics)
            if evaluated:
                plot_curves(out_dir)
            bar.set_postfix(
                reward=f"{metrics['reward']:.2f}",
                acc=f"{metrics['accuracy']:.2f}",
                kl=f"{metrics.get('kl_distill', 0):.3g}",
            )
            if optimizer.bad_in_a_row >= args.max_bad_steps:
                raise TrainingError(bad_steps_message(args, out_dir))
            if ctrl_c.requested or done == args.steps or (args.save_every and done % args.save_every == 0):
                path = save_checkpoint(out_dir, done, model, optimizer, args, args.keep_checkpoints)
            if ctrl_c.requested:
                print(
                    f"stopped at step {done}; checkpoint saved in {path}. Resume with --resume.",
                    file=sys.stderr,
                )
                return 130
    finish_run(model, tokenizer, out_dir)
    return 0


def finish_run(model, tokenizer, out_dir: Path) -> None:
    save_policy(model, tokenizer, out_dir)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    first, last = ({k: v for k, v in r.items() if k.startswith("eval_")} for r in (evals[0], evals[-1]))
    print(f"held-out accuracy before: {fmt(first)}")
    print(f"held-out accuracy after:  {fmt(last)}")
    print(f"metrics.jsonl, samples.jsonl, curves.png and the adapter are in {out_dir}")


def bad_steps_message(args, out_dir: Path) -> str:
    last = latest_checkpoint(out_dir)
    return (
        f"{args.max_bad_steps} steps in a row had a non-finite loss or gradient and were skipped. "
        f"Likely causes: --lr too high ({args.lr}), --beta too large ({args.beta}), or fp16 overflow "
        f"(use bf16 or float32). Last good checkpoint: {last or 'none yet'}"
    )


def fmt(ev: dict) -> str:
    return ", ".join(f"{k.removeprefix('eval_')} {100 * v:.1f}%" for k, v in ev.items())


def open_run(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """Check the output folder before any work: (folder, checkpoint to resume or None).

    A folder holding another run needs --overwrite-output-dir; --resume needs a
    checkpoint from a run of the same kind. Nothing is deleted or overwritten on error.
    """
    out = Path(args.output_dir)
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    holds_run = ckpt is not None or (out / "metrics.jsonl").exists()
    if args.resume == "yes" and ckpt is None:
        raise UsageError(f"--resume: no checkpoint in {out}/checkpoints. Run without --resume to start.")
    resume = ckpt if args.resume in ("yes", "auto") else None
    if resume is not None:
        check_compatible(resume, args)
    elif holds_run and not args.overwrite_output_dir:
        raise UsageError(
            f"{out} holds another run: pass --resume to continue it, --overwrite-output-dir to "
            "replace it, or choose another --output-dir"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to --output-dir {out}: {e.strerror}") from e
    if resume is None:
        for name in ("metrics.jsonl", "samples.jsonl", "curves.png"):
            (out / name).unlink(missing_ok=True)
        if (out / "checkpoints").is_dir():
            shutil.rmtree(out / "checkpoints")
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))
    return out, resume


def truncate_logs(out_dir: Path, step: int) -> None:
    """Drop log lines written after the checkpoint's step (a killed run may have some)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = out_dir / name
        if path.exists():
            keep = [
                line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
            ]
            path.write_text("".join(line + "\n" for line in keep))


def save_policy(model, tokenizer, out_dir: Path) -> None:
    """The LoRA adapter in PEFT format (or the full model), safetensors."""
    target = out_dir / ("adapter" if is_peft(model) else "model")
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


# ---------------------------------------------------------------- verl


def verl_overrides(args: argparse.Namespace) -> list[str]:
    """The authors' verl recipe keys for the same run (see README); UsageError for a run
    that recipe cannot express."""
    if args.algo == "opd" or args.teacher != "live":
        raise UsageError(
            "the verl recipe has no key for --algo opd or --teacher initial: "
            "print overrides for --algo sdpg or grpo with the live teacher"
        )
    pl = "actor_rollout_ref.actor.policy_loss"
    actor = "actor_rollout_ref.actor"
    return [
        "algorithm.adv_estimator=grpo",
        f"{pl}.loss_mode={'vanilla' if args.algo == 'grpo' else 'sdpg'}",
        f"{pl}.beta={args.beta}",
        f"{pl}.alpha={args.alpha}",
        f"{pl}.kl_mode={args.kl_mode}",
        f"{pl}.beta_warmup_steps={args.beta_warmup_steps}",
        f"{pl}.beta_decay_steps={args.beta_decay_steps}",
        f"{pl}.beta_distill_positive_advantage_only={str(args.positive_adv_only).lower()}",
        f"{actor}.clip_ratio_low={args.eps_low}",
        f"{actor}.clip_ratio_high={args.eps_high}",
        f"{actor}.clip_ratio_c={args.clip_c}",
        f"{actor}.loss_agg_mode={args.loss_agg}",
        f"{actor}.optim.lr={args.lr}",
        f"{actor}.ppo_mini_batch_size={args.batch_prompts}",
        f"actor_rollout_ref.rollout.n={args.num_generations}",
        f"actor_rollout_ref.rollout.temperature={args.temperature}",
        f"actor_rollout_ref.rollout.top_p={args.top_p}",
        f"data.max_prompt_length={args.max_prompt_length}",
        f"data.max_response_length={args.max_new_tokens}",
        f"data.train_batch_size={args.batch_prompts}",
        f"trainer.total_training_steps={args.steps}",
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        resolve_defaults(args)
        if args.print_verl_overrides:
            print("python3 -m verl.trainer.main_ppo \\\n  " + " \\\n  ".join(verl_overrides(args)))
            return 0
        return train(args)
    except (UsageError, DataError, CheckpointError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
