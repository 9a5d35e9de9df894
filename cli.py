"""The command line: flags grouped under headings, per-model presets, checks, the typed
config the training step reads, and the equivalent verl overrides.

Every check that needs no model runs here, so bad flags end in one line (exit 2) within
a second. Defaults that depend on the model (`PRESETS`) are None in argparse and filled
in by `resolve`, which is how a flag the user gave is told apart from a default.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, fields
from pathlib import Path

from data import CONTEXT_TEMPLATES, INSTRUCTIONS
from errors import UsageError
from losses import AGG_MODES, DEFAULT_CHUNK, DIVERGENCES, KL_CLAMP, KL_MODES, LossSettings
from policy import SHORT_NAMES, check_four_bit
from tiny_model import WARM_START_STEPS
from trackers import parse_report_to
from verifier import answer_format

ALGOS = ("sdpg", "grpo", "opd", "opsd", "rlsd")
OPSD_ENTROPY_COEF = 0.02  # their OPSD script for Qwen3-4B, boxed answers (0.01 in the 1.7B one)
TEACHERS = ("live", "initial", "ema")
# Defaults that depend on the model: the tiny demo learns fast with a large lr and short
# answers; a real model follows the paper's recipe scaled to one GPU with LoRA.
PRESETS = {
    "tiny": dict(
        data="arithmetic",
        lr=2.5e-4,
        steps=250,
        batch_prompts=16,
        mini_batch_prompts=4,
        micro_batch=64,
        num_generations=8,
        max_new_tokens=8,
        max_prompt_length=256,
        temperature=1.0,
        eval_every=50,
        eval_size=200,
        eval_samples=4,
        lora_r=16,
        lora_alpha=32,
        beta=0.1,
        alpha=1e-3,
        weight_decay=0.0,
        lr_warmup_steps=0,
        context_template="authors",  # the text its warm start was trained on (auto picks it too)
        instruction="boxed",  # the sentence its warm start was trained on
    ),
    # Small real chat models on a CPU (smollm2-135m, .gguf files): short answers, a sampling
    # temperature at which they still answer (SmolLM2-135M-Instruct, sampled answers right
    # on two-digit word problems: 2% at T = 1, 10% at T = 0.5; one-digit: 34% at T = 0.5,
    # 46% at 0.3), small groups; see README, "Real model on a laptop".
    "small": dict(
        data="word-problems",
        lr=1e-4,  # SDPG held-out mean@2 at steps 10/20/30: 5e-5 33/49/64%, 1e-4 52/78/78%
        steps=30,
        batch_prompts=4,
        mini_batch_prompts=4,
        micro_batch=16,
        num_generations=4,
        max_new_tokens=64,
        max_prompt_length=256,
        temperature=0.5,
        eval_every=10,
        eval_size=60,
        eval_samples=2,
        lora_r=16,
        lora_alpha=32,
        beta=0.05,
        alpha=1e-3,
        weight_decay=0.0,
        lr_warmup_steps=0,
        context_template="auto",  # SmolLM2-135M: the authors' text makes its teacher worse (README)
        instruction="answer-is",  # SmolLM2-135M writes "The answer is N"; it never fills \boxed{}
    ),
    "hub": dict(
        data="gsm8k",
        lr=1e-5,
        steps=200,
        batch_prompts=8,
        mini_batch_prompts=8,
        micro_batch=4,
        num_generations=8,
        max_new_tokens=512,
        max_prompt_length=512,
        temperature=1.0,
        eval_every=50,
        eval_size=200,
        eval_samples=4,
        lora_r=32,
        lora_alpha=64,
        beta=1e-3,
        alpha=1e-3,
        weight_decay=0.0,
        lr_warmup_steps=0,
        context_template="auto",  # chosen on training questions; `authors` for the paper's exact text
        instruction="boxed",
    ),
}
# The authors' optimizer recipe (full fine-tuning): lr 1e-6, AdamW weight decay 0.1, and a
# 10-step linear lr warm-up, then constant. It fills what --full-finetune leaves unset.
FULL_FINETUNE = dict(lr=1e-6, weight_decay=0.1, lr_warmup_steps=10)
POSITIVE_INTS = (
    "steps",
    "batch_prompts",
    "micro_batch",
    "max_new_tokens",
    "max_prompt_length",
    "ppo_epochs",
    "mini_batch_prompts",
    "eval_size",
    "eval_samples",
    "kl_chunk_size",
    "lora_r",
    "keep_checkpoints",
    "max_bad_steps",
)


@dataclass(frozen=True)
class Config:
    """What the training step, the evaluation and the loop read (built by `config`)."""

    # the objective
    algo: str
    beta: float
    alpha: float
    kl_mode: str
    beta_warmup_steps: int
    beta_decay_steps: int
    positive_adv_only: bool
    teacher: str
    teacher_ema_decay: float
    teacher_contrast: bool
    kl_clamp: float | None
    distill_divergence: str
    jsd_lambda: float
    entropy_coef: float
    rlsd_lambda: float
    rlsd_lambda_decay_steps: int
    rlsd_eps_w: float
    opsd_teacher_temperature: float
    eps_low: float
    eps_high: float
    clip_c: float
    loss_agg: str
    # sampling
    num_generations: int
    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_p: float
    # optimisation
    steps: int
    batch_prompts: int
    mini_batch_prompts: int
    ppo_epochs: int
    micro_batch: int
    kl_chunk_size: int
    lr: float
    weight_decay: float
    lr_warmup_steps: int
    grad_clip: float
    seed: int
    # evaluation and saving
    eval_every: int
    eval_samples: int
    save_every: int
    keep_checkpoints: int
    max_bad_steps: int

    @property
    def loss(self) -> LossSettings:
        """The objective's fixed knobs, as every algorithm's loss reads them."""
        return LossSettings(
            alpha=self.alpha,
            kl_mode=self.kl_mode,
            positive_adv_only=self.positive_adv_only,
            kl_clamp=self.kl_clamp,
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            clip_c=self.clip_c,
            agg=self.loss_agg,
            rlsd_eps_w=self.rlsd_eps_w,
        )


def config(args: argparse.Namespace) -> Config:
    """The typed config from resolved flags."""
    return Config(**{f.name: getattr(args, f.name) for f in fields(Config)})


@dataclass(frozen=True)
class ContextSettings:
    """What settling the privileged context reads (`context_settings` builds it)."""

    template: str  # text with {answer}, or "auto"
    candidates: tuple[str, ...]  # --context-candidates, for auto
    check_size: int  # training questions checked (0: none)
    seed: int  # fixes which training questions
    max_prompt_length: int  # prompts that no longer fit after the rewrite are dropped


def context_settings(args: argparse.Namespace) -> ContextSettings:
    """What teacher_context.settle reads, from resolved flags."""
    return ContextSettings(
        template=args.context_template,
        candidates=tuple(args.context_candidates),
        check_size=args.check_size,
        seed=args.seed,
        max_prompt_length=args.max_prompt_length,
    )


# ---------------------------------------------------------------- parsing


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit code 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help; a model-dependent one shows both presets."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.dest in PRESETS["tiny"]:
            tiny, small, hub = (PRESETS[p][action.dest] for p in ("tiny", "small", "hub"))
            return f"{action.help} (default: {tiny} for tiny, {small} for smollm2-135m/.gguf, else {hub})"
        if action.default is None:
            return action.help or ""  # says its own default
        return super()._get_help_string(action)


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = Parser(description=description, formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data").add_argument
    g(
        "--model",
        default="tiny",
        help="'tiny' (built offline), a local folder, a .gguf file, a hub id, or a short name: "
        "Qwen2.5-0.5B (any Qwen2.5 size), smollm2-135m",
    )
    g(
        "--data",
        default=None,
        help="'arithmetic', 'word-problems', 'gsm8k', or a .jsonl/.parquet/.csv file",
    )
    g("--gsm8k-solution-context", action="store_true", help="GSM8K: the teacher sees the worked solution")
    g("--eval-data", default=None, help="held-out file (default: the task's test split)")
    g(
        "--context-template",
        default=None,
        help="the teacher's privileged context c for built-in tasks and rows without one: text with "
        "{answer} for the gold answer, a name (" + ", ".join(CONTEXT_TEMPLATES) + "; authors: the paper's), "
        "or auto: the name whose teacher view answers training questions best",
    )
    g(
        "--context-candidates",
        nargs="+",
        default=[],
        metavar="TEMPLATE",
        help="more phrasings for --context-template auto to choose from",
    )
    g(
        "--instruction",
        default=None,
        help="the sentence after each plain question: text, or a name (" + ", ".join(INSTRUCTIONS) + "); "
        "the verifier reads the format it asks for first",
    )
    g(
        "--check-size",
        type=int,
        default=32,
        help="training questions the teacher check (and auto) answer greedily before step 1 (0: no check)",
    )
    g("--max-prompt-length", type=int, default=None, help="longer prompts are dropped, with a count")
    g("--verifier", choices=("rule", "math-verify"), default="rule", help="reward backend")
    g(
        "--last-number-fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rule verifier: without \\boxed, '####' or 'answer is', use the last number (off for MATH)",
    )
    g(
        "--cache-dir",
        default=None,
        help="where the tiny model is built and .gguf files are converted "
        "(default: $SDPG_CACHE or ~/.cache/sdpg)",
    )
    g(
        "--tiny-warm-start-steps",
        type=int,
        default=WARM_START_STEPS,
        help="supervised steps that warm-start --model tiny",
    )

    o = p.add_argument_group("the objective").add_argument
    o(
        "--algo",
        choices=ALGOS,
        default="sdpg",
        help="sdpg; grpo (beta = alpha = 0); opd (no outcome term); opsd and rlsd: the paper's "
        "self-distillation baselines as the authors compute them",
    )
    o("--beta", type=float, default=None, help="distillation weight beta")
    o("--alpha", type=float, default=None, help="reference anchor weight alpha (grpo: 0)")
    o("--kl-mode", choices=KL_MODES, default="urkl", help="anchor f(log w)")
    o("--beta-warmup-steps", type=int, default=0, help="linear beta warm-up length (0: off)")
    o("--beta-decay-steps", type=int, default=0, help="linear beta decay to 0 over the last steps (0: off)")
    o("--positive-adv-only", action="store_true", help="distil only responses with A > 0")
    o(
        "--teacher",
        choices=TEACHERS,
        default=None,
        help="who reads the context: live = the current policy (the paper); initial = the reference "
        "(adapter off); ema = an exponential moving average of the trained weights (default: initial "
        "for opsd, else live)",
    )
    o("--teacher-ema-decay", type=float, default=0.99, help="--teacher ema: decay per optimizer step")
    o(
        "--teacher-contrast",
        action="store_true",
        help="distil toward q' ∝ p q_right / q_wrong: the teacher given the gold answer against the "
        "same teacher given a wrong one, so the context's style cancels (README, 'The style leak'; not "
        "the paper's)",
    )
    o(
        "--kl-clamp",
        type=float,
        default=KL_CLAMP,
        help="per-token distillation KL clamped at this many nats, as the authors do (0: off)",
    )
    o(
        "--distill-divergence",
        choices=DIVERGENCES,
        default=None,
        help="the distillation term D(p, SG[q]): reverse KL(p || q), forward KL(q || p), or the generalized "
        "JSD (see --jsd-lambda) (default: reverse, the paper's)",
    )
    o(
        "--jsd-lambda",
        type=float,
        default=None,
        help="jsd: lam KL(q || m) + (1 - lam) KL(p || m), m = (1 - lam) p + lam q (TRL's GKD beta): "
        "toward forward KL as lam -> 0, reverse as lam -> 1 (default: 0.5)",
    )
    o(
        "--entropy-coef",
        type=float,
        default=None,
        help=f"entropy bonus: minus this times the mean token entropy (default: {OPSD_ENTROPY_COEF} "
        "for opsd, as the authors' script, else 0)",
    )
    o("--rlsd-lambda", type=float, default=0.5, help="rlsd: initial mix of the teacher-reweighted advantage")
    o(
        "--rlsd-lambda-decay-steps",
        type=int,
        default=50,
        help="rlsd: lambda decays linearly to 0 (0: constant)",
    )
    o("--rlsd-eps-w", type=float, default=0.2, help="rlsd: the teacher weight is clipped to 1 +- this")
    o(
        "--opsd-teacher-temperature",
        type=float,
        default=None,
        help="opsd: the temperature of the teacher's log-probs (default: 1.0; their key of the same name; "
        "their boxed script 1.0, another 0.5). RLSD's teacher reads at --temperature, as their worker "
        "overwrites it",
    )
    o("--eps-low", type=float, default=0.2, help="PPO clip below 1")
    o("--eps-high", type=float, default=0.28, help="PPO clip above 1 (DAPO clip-higher)")
    o("--clip-c", type=float, default=10.0, help="dual-clip bound for A < 0")
    o("--loss-agg", choices=AGG_MODES, default="token-mean", help="how per-token losses are averaged")

    s = p.add_argument_group("sampling").add_argument
    s("--num-generations", type=int, default=None, help="G, responses per prompt")
    s("--max-new-tokens", type=int, default=None, help="response length cap, in tokens")
    s("--min-new-tokens", type=int, default=0, help="force at least this many tokens (benchmarks)")
    s("--temperature", type=float, default=None, help="sampling temperature, also applied to log-probs")
    s("--top-p", type=float, default=1.0, help="nucleus sampling")

    t = p.add_argument_group("optimisation").add_argument
    t("--steps", type=int, default=None, help="training steps, one rollout each")
    t("--batch-prompts", type=int, default=None, help="B, prompts per step")
    t(
        "--mini-batch-prompts",
        type=int,
        default=None,
        help="prompts per optimizer step (verl's ppo_mini_batch_size): one rollout of B prompts feeds "
        "B / this many optimizer steps over disjoint whole groups; a preset's that does not divide "
        "--batch-prompts becomes B",
    )
    t("--ppo-epochs", type=int, default=1, help="passes over the rollout's mini-batches")
    t("--micro-batch", type=int, default=None, help="rows per forward/backward")
    t("--kl-chunk-size", type=int, default=DEFAULT_CHUNK, help="tokens per chunk of the full-vocab KL")
    t("--lr", type=float, default=None, help=f"AdamW lr; --full-finetune: {FULL_FINETUNE['lr']}")
    t(
        "--weight-decay",
        type=float,
        default=None,
        help=f"AdamW weight decay; --full-finetune: {FULL_FINETUNE['weight_decay']}",
    )
    t(
        "--lr-warmup-steps",
        type=int,
        default=None,
        help="linear lr warm-up over this many training steps, then constant (lr x k / W at step k = 0, "
        f"1, ..., as verl); --full-finetune: {FULL_FINETUNE['lr_warmup_steps']}",
    )
    t("--grad-clip", type=float, default=1.0, help="max gradient norm")
    t("--seed", type=int, default=0, help="seeds sampling, data order and init")
    t("--lora-r", type=int, default=None, help="LoRA rank")
    t("--lora-alpha", type=int, default=None, help="LoRA scaling alpha")
    t("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    t("--lora-target-modules", default="all-linear", help="comma-separated names, or all-linear")
    t("--full-finetune", action="store_true", help="no LoRA; the reference is then a second, frozen copy")
    t(
        "--load-in-4bit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NF4 base (default: on with CUDA, off with --full-finetune or on a CPU)",
    )
    t(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations in backward (default: on with CUDA)",
    )

    e = p.add_argument_group("evaluation, output and resuming").add_argument
    e("--eval-every", type=int, default=None, help="steps between held-out evals (0: only before and after)")
    e("--eval-size", type=int, default=None, help="held-out prompts per eval")
    e(
        "--eval-samples",
        type=int,
        default=None,
        help="k of mean@k and pass@k at the training temperature (the authors: 32 at T = 1)",
    )
    e(
        "--output-dir",
        default=None,
        help="metrics, samples, curves, checkpoints and the adapter go here "
        "(default: runs/<algo>-<date>-<time>)",
    )
    e("--save-every", type=int, default=50, help="checkpoint every N steps (0: only at the end)")
    e("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    e(
        "--resume",
        nargs="?",
        const="yes",
        choices=("no", "auto", "yes"),
        default="no",
        help="continue from the output folder's newest checkpoint; auto: if there is one",
    )
    e("--overwrite-output-dir", action="store_true", help="replace a run already in --output-dir")
    e("--max-bad-steps", type=int, default=3, help="stop after this many non-finite steps in a row")
    e(
        "--report-to",
        default="none",
        help="experiment trackers for every metric: none, or any of tensorboard, wandb, trackio, "
        "comma-separated (offline; see trackers.py)",
    )
    e("--save-merged", action="store_true", help="at the end, also write <output-dir>/merged: base + adapter")
    e(
        "--merge-run",
        default=None,
        metavar="RUN_DIR",
        help="write RUN_DIR/merged from a finished run's adapter (full precision, loads without peft), "
        "and exit (default: none)",
    )
    e(
        "--eval-only",
        action="store_true",
        help="only evaluate: the newest checkpoint of --output-dir with --resume, or --adapter, or "
        "the untrained model; appends to <output-dir>/eval.jsonl",
    )
    e(
        "--adapter",
        default=None,
        help="a PEFT LoRA adapter folder to start from, or to evaluate (default: a new adapter)",
    )
    e("--print-verl-overrides", action="store_true", help="print the equivalent verl overrides and exit")
    e("--debug", action="store_true", help="show tracebacks")
    return p


# ---------------------------------------------------------------- defaults and checks


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults the user left unset (None) and check every flag; UsageError on bad
    input. A flag the user gave is never changed."""
    if args.output_dir is None and args.resume == "yes":
        raise UsageError("--resume continues the run in --output-dir: name that folder")
    if args.output_dir is not None and not args.output_dir.strip():
        raise UsageError("--output-dir is empty: name a folder for the run, or leave the flag out")
    if args.output_dir is None:
        args.output_dir = f"runs/{args.algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.algo in ("grpo", "opsd", "rlsd"):
        if args.beta not in (None, 0.0):
            raise UsageError(f"--algo {args.algo} has no distillation term: drop --beta or use --algo sdpg")
        if args.algo != "grpo" and args.alpha not in (None, 0.0):
            raise UsageError(f"--algo {args.algo} has no reference anchor: drop --alpha or use --algo sdpg")
        args.beta = 0.0
        args.alpha = 0.0 if args.alpha is None else args.alpha
    if args.teacher is None:
        args.teacher = "initial" if args.algo == "opsd" else "live"
    refuse_unused(args)  # before the defaults below fill in what was not given
    args.distill_divergence = args.distill_divergence or "reverse"
    args.jsd_lambda = 0.5 if args.jsd_lambda is None else args.jsd_lambda
    args.opsd_teacher_temperature = (
        1.0 if args.opsd_teacher_temperature is None else args.opsd_teacher_temperature
    )
    if args.entropy_coef is None:
        args.entropy_coef = OPSD_ENTROPY_COEF if args.algo == "opsd" else 0.0
    preset = PRESETS[preset_name(args.model)]
    mini_given = args.mini_batch_prompts is not None
    for key, value in {**preset, **(FULL_FINETUNE if args.full_finetune else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not mini_given and args.batch_prompts % args.mini_batch_prompts:  # the preset's does not fit
        args.mini_batch_prompts = args.batch_prompts
    args.kl_clamp = args.kl_clamp or None  # 0: off
    args.context_template = CONTEXT_TEMPLATES.get(args.context_template, args.context_template)
    args.instruction = INSTRUCTIONS.get(args.instruction, args.instruction)
    check(args)
    return args


def refuse_unused(args: argparse.Namespace) -> None:
    """A flag given for something this run does not do is bad input, not silently ignored
    (None: not given)."""
    if args.distill_divergence is not None and args.algo in ("grpo", "opsd", "rlsd"):
        raise UsageError(
            f"--algo {args.algo} has no full-vocabulary distillation term: drop --distill-divergence"
        )
    if args.jsd_lambda is not None and args.distill_divergence != "jsd":
        raise UsageError("--jsd-lambda weighs the JSD: add --distill-divergence jsd, or drop it")
    if args.opsd_teacher_temperature is not None and args.algo != "opsd":
        raise UsageError("--opsd-teacher-temperature is for --algo opsd: drop it")


def preset_name(model: str) -> str:
    """'tiny'; 'small' for small real models (a short name like smollm2-135m, a .gguf file);
    else 'hub' (a GPU-sized run of a hub model or folder)."""
    if model == "tiny":
        return "tiny"
    return "small" if model.lower() in SHORT_NAMES or model.endswith(".gguf") else "hub"


def check(args: argparse.Namespace) -> None:
    """Every check that needs no model; UsageError with one line that says what to change."""
    for name in POSITIVE_INTS:
        if getattr(args, name) < 1:
            raise UsageError(
                f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}"
            )
    if args.teacher == "initial" and args.full_finetune and args.algo in ("sdpg", "opd"):
        raise UsageError(
            "--teacher initial reads the reference through the policy's LM head, which a full fine-tune "
            "changes: use LoRA (drop --full-finetune) or --teacher live"
        )
    if args.batch_prompts % args.mini_batch_prompts:
        raise UsageError(
            f"--mini-batch-prompts {args.mini_batch_prompts} must divide --batch-prompts "
            f"{args.batch_prompts}: every optimizer step takes the same number of whole groups"
        )
    if args.teacher_contrast and args.algo not in ("sdpg", "opd"):
        raise UsageError(
            f"--teacher-contrast changes the distillation teacher, and --algo {args.algo} has none"
        )
    if not 0 < args.jsd_lambda < 1:
        raise UsageError(
            f"--jsd-lambda must be in (0, 1), got {args.jsd_lambda}: its ends are --distill-divergence "
            "forward (0) and reverse (1)"
        )
    if not 0 <= args.teacher_ema_decay < 1:
        raise UsageError(f"--teacher-ema-decay must be in [0, 1), got {args.teacher_ema_decay}")
    for flag, template in [("--context-template", args.context_template)] + [
        ("--context-candidates", t) for t in args.context_candidates
    ]:
        try:
            template.format(answer="42")
        except (KeyError, IndexError, ValueError) as e:
            raise UsageError(
                f"{flag} may only hold the field {{answer}} (write other braces twice): {e!r}"
            ) from e
    if args.context_template == "auto" and args.check_size < 1:
        raise UsageError("--context-template auto chooses on training questions: give --check-size >= 1")
    if args.context_candidates and args.context_template != "auto":
        raise UsageError(
            "--context-candidates are for --context-template auto: add it, or drop the candidates"
        )
    if args.verifier == "rule" and not args.last_number_fallback and answer_format(args.instruction) is None:
        raise UsageError(
            "--instruction asks for no format the rule verifier reads (\\boxed{}, '#### N', "
            "'The answer is N') and --no-last-number-fallback leaves it nothing: ask for one of them"
        )
    if args.num_generations < 2:
        raise UsageError(
            f"--num-generations must be >= 2 to form a group advantage, got {args.num_generations}"
        )
    if (
        args.eval_every < 0
        or args.save_every < 0
        or args.tiny_warm_start_steps < 0
        or args.check_size < 0
        or args.temperature <= 0
        or not 0 < args.top_p <= 1
        or args.lr <= 0
        or args.weight_decay < 0
        or args.lr_warmup_steps < 0
        or (args.kl_clamp or 0) < 0
        or args.entropy_coef < 0
        or args.rlsd_lambda_decay_steps < 0
        or not 0 <= args.rlsd_eps_w < 1
        or args.opsd_teacher_temperature <= 0
    ):
        raise UsageError(
            "need --eval-every >= 0, --save-every >= 0, --tiny-warm-start-steps >= 0, --check-size >= 0, "
            "--temperature > 0, "
            "0 < --top-p <= 1, --lr > 0, --weight-decay >= 0, --lr-warmup-steps >= 0, --kl-clamp >= 0, "
            "--entropy-coef >= 0, --rlsd-lambda-decay-steps >= 0, 0 <= --rlsd-eps-w < 1 and "
            "--opsd-teacher-temperature > 0"
        )
    check_four_bit(args.load_in_4bit)
    check_model_name(args.model)
    if isinstance(args.report_to, str):
        args.report_to = parse_report_to(args.report_to)
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise UsageError(
            f"--adapter {args.adapter}: no adapter_config.json there; point it at a PEFT adapter folder"
        )
    if args.adapter is not None and args.full_finetune:
        raise UsageError("--adapter is a LoRA adapter: drop --full-finetune")
    if args.full_finetune and args.load_in_4bit:
        raise UsageError(
            "--full-finetune trains every weight, and 4-bit weights cannot be trained: drop --load-in-4bit"
        )
    if args.merge_run is not None and not (Path(args.merge_run) / "args.json").is_file():
        raise UsageError(
            f"--merge-run {args.merge_run}: no args.json there; point it at a run's --output-dir"
        )


def check_model_name(name: str) -> None:
    """A local path that does not exist is bad input; a hub id is only checked on loading."""
    local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith(".gguf")
    if local and not Path(name).expanduser().exists():
        raise UsageError(
            f"--model {name}: no such file or folder. Point --model at a folder that holds config.json "
            "and the weights, or use --model tiny."
        )


# ---------------------------------------------------------------- verl


def verl_overrides(args: argparse.Namespace) -> list[str]:
    """The authors' verl recipe keys for the same run (see README); UsageError for a run
    that recipe cannot express."""
    their_teacher = "initial" if args.algo == "opsd" else "live"
    if args.algo == "opd" or args.teacher != their_teacher or args.kl_clamp != KL_CLAMP:
        raise UsageError(
            "the verl recipe has no key for --algo opd, another --teacher than the algorithm's own "
            "(live; opsd: initial) or another --kl-clamp (theirs is fixed at 20): drop those flags"
        )
    if args.distill_divergence != "reverse" or args.teacher_contrast:
        raise UsageError(
            "the verl recipe distils with the reverse KL from the plain teacher only: drop "
            "--distill-divergence and --teacher-contrast"
        )
    pl = "actor_rollout_ref.actor.policy_loss"
    actor = "actor_rollout_ref.actor"
    mode = {"grpo": "vanilla"}.get(args.algo, args.algo)
    keys = {
        "sdpg": [
            f"{pl}.beta={args.beta}",
            f"{pl}.alpha={args.alpha}",
            f"{pl}.kl_mode={args.kl_mode}",
            f"{pl}.beta_warmup_steps={args.beta_warmup_steps}",
            f"{pl}.beta_decay_steps={args.beta_decay_steps}",
            f"{pl}.beta_distill_positive_advantage_only={str(args.positive_adv_only).lower()}",
        ],
        "opsd": [f"{pl}.opsd_teacher_temperature={args.opsd_teacher_temperature}"],
        "rlsd": [
            f"{pl}.rlsd_lambda={args.rlsd_lambda}",
            f"{pl}.rlsd_lambda_decay_steps={args.rlsd_lambda_decay_steps}",
            f"{pl}.rlsd_epsilon_w={args.rlsd_eps_w}",
        ],
    }.get(args.algo, [])
    if args.algo == "grpo" and args.alpha:  # verl's own KL loss; its "mse" is our urkl anchor
        if args.kl_mode != "urkl":
            raise UsageError(
                "the verl recipe has GRPO's anchor only as --kl-mode urkl (verl: kl_loss_type=mse)"
            )
        keys = [
            f"{actor}.use_kl_loss=true",
            f"{actor}.kl_loss_coef={args.alpha}",
            f"{actor}.kl_loss_type=mse",
        ]
    return [
        "algorithm.adv_estimator=grpo",
        f"{pl}.loss_mode={mode}",
        *keys,
        f"{actor}.entropy_coeff={args.entropy_coef}",
        f"{actor}.clip_ratio_low={args.eps_low}",
        f"{actor}.clip_ratio_high={args.eps_high}",
        f"{actor}.clip_ratio_c={args.clip_c}",
        f"{actor}.loss_agg_mode={args.loss_agg}",
        f"{actor}.optim.lr={args.lr}",
        f"{actor}.optim.weight_decay={args.weight_decay}",
        f"{actor}.optim.lr_warmup_steps={args.lr_warmup_steps}",
        f"{actor}.grad_clip={args.grad_clip}",
        f"{actor}.ppo_mini_batch_size={args.mini_batch_prompts}",
        f"{actor}.ppo_epochs={args.ppo_epochs}",
        f"actor_rollout_ref.rollout.n={args.num_generations}",
        f"actor_rollout_ref.rollout.temperature={args.temperature}",
        f"actor_rollout_ref.rollout.top_p={args.top_p}",
        f"actor_rollout_ref.rollout.val_kwargs.n={args.eval_samples}",
        f"actor_rollout_ref.rollout.val_kwargs.temperature={args.temperature}",
        f"data.max_prompt_length={args.max_prompt_length}",
        f"data.max_response_length={args.max_new_tokens}",
        f"data.train_batch_size={args.batch_prompts}",
        f"trainer.total_training_steps={args.steps}",
        f"trainer.test_freq={args.eval_every}",
    ]
