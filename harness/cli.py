"""The command line: flags grouped under headings, their checks, the one configuration
they make (config.build), and the equivalent verl overrides.

Every flag's default is argparse.SUPPRESS: the namespace holds only what the user gave,
so a given flag is told apart from a default by its presence, and `config.build` fills
the rest. Every check that needs no model runs here, so bad flags end in one line
(exit 2) within a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

from config import ALGORITHMS, BASELINES, FULL_FINETUNE, PRESETS, Config, build
from harness.data import CONTEXT_TEMPLATES, INSTRUCTIONS, template_fields
from harness.errors import UsageError
from harness.loading import check_four_bit
from harness.trackers import parse_report_to
from losses import AGG_MODES, DIVERGENCES, KL_CLAMP, KL_MODES
from verifier import answer_format

ALGOS = tuple(ALGORITHMS)
# read from the presets, not listed again: the algorithms whose preset sets beta = 0
NO_DISTILLATION = tuple(a for a, preset in ALGORITHMS.items() if preset.get("beta") == 0.0)
NAME = re.compile(r"[\w-]+")  # one word or hyphenated token: a phrasing's name, never its text
TEACHERS = ("live", "initial", "ema")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}
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


# ---------------------------------------------------------------- parsing


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit code 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help (config.Config's); a model-dependent one shows the presets."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.dest in PRESETS["tiny"]:
            tiny, small, hub = (PRESETS[p][action.dest] for p in ("tiny", "small", "hub"))
            return f"{action.help} (default: {tiny} for tiny, {small} for smollm2-135m/.gguf, else {hub})"
        default = DEFAULTS.get(action.dest)
        if default in (None, ()) or "(default: " in action.help:
            return action.help or ""  # says its own default
        return f"{action.help} (default: {default})"


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = Parser(description=description, formatter_class=HelpFormatter, argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("model and data").add_argument
    g(
        "--model",
        help="'tiny' (built offline), a local folder, a .gguf file, a hub id, or a short name: "
        "Qwen2.5-0.5B (any Qwen2.5 size), smollm2-135m",
    )
    g(
        "--data",
        help="'arithmetic', 'word-problems', 'gsm8k', or a .jsonl/.parquet/.csv file",
    )
    g("--gsm8k-solution-context", action="store_true", help="GSM8K: the teacher sees the worked solution")
    g("--eval-data", help="held-out file (default: the task's test split)")
    g(
        "--context-template",
        help="the teacher's privileged context c for built-in tasks and rows without one: text with "
        "{answer} for the gold answer and {solution} for a worked solution (the data's 'solution' "
        "column), a name (" + ", ".join(CONTEXT_TEMPLATES) + "; authors: the authors' code, paper: the "
        "paper's prompt, with {solution}), or auto: the name whose teacher view answers training questions "
        "best. A single word is a name. A resumed run keeps the text it started with",
    )
    g(
        "--context-candidates",
        nargs="+",
        metavar="TEMPLATE",
        help="more phrasings for --context-template auto to choose from",
    )
    g(
        "--instruction",
        help="the sentence after each plain question: text, or a name (" + ", ".join(INSTRUCTIONS) + "); "
        "the verifier reads the format it asks for first",
    )
    g(
        "--check-size",
        type=int,
        help="training questions the teacher check (and auto) answer greedily before step 1 (0: no check)",
    )
    g("--max-prompt-length", type=int, help="longer prompts are dropped, with a count")
    g("--verifier", choices=("rule", "math-verify"), help="reward backend")
    g(
        "--last-number-fallback",
        action=argparse.BooleanOptionalAction,
        help="rule verifier: without \\boxed, '####' or 'answer is', use the last number (off for MATH)",
    )
    g(
        "--cache-dir",
        help="where the tiny model is built and .gguf files are converted "
        "(default: $SDPG_CACHE or ~/.cache/sdpg)",
    )
    g(
        "--tiny-warm-start-steps",
        type=int,
        help="supervised steps that warm-start --model tiny",
    )
    g(
        "--tiny-right-share",
        type=float,
        help="--model tiny's difficulty: the share of its warm start's student answers that are right "
        "(lower: the student samples the right answer less often, more groups are flat; "
        "docs/regime_map.md); each setting is built and cached once",
    )
    o = p.add_argument_group("the objective").add_argument
    o(
        "--algo",
        choices=ALGOS,
        help="sdpg; grpo (beta = alpha = 0); opd (no outcome term); opsd and rlsd: the paper's "
        "self-distillation baselines as the authors compute them",
    )
    o("--beta", type=float, help="distillation weight beta")
    o("--alpha", type=float, help="reference anchor weight alpha (grpo: 0)")
    o("--kl-mode", choices=KL_MODES, help="anchor f(log w)")
    o("--beta-warmup-steps", type=int, help="linear beta warm-up length (0: off)")
    o("--beta-decay-steps", type=int, help="linear beta decay to 0 over the last steps (0: off)")
    o("--positive-adv-only", action="store_true", help="distil only responses with A > 0")
    o(
        "--teacher",
        choices=TEACHERS,
        help="who reads the context: live = the current policy (the paper); initial = the reference "
        "(adapter off); ema = an exponential moving average of the trained weights (default: initial "
        "for opsd, else live)",
    )
    o("--teacher-ema-decay", type=float, help="--teacher ema: decay per optimizer step")
    o(
        "--teacher-contrast",
        action="store_true",
        help="replace the teacher by q' ∝ p q_right / q_wrong (the teacher given the gold answer against "
        "the same teacher given a wrong one, so the context's style cancels; not the paper's). With p "
        "detached inside q', its gradient is exactly the policy gradient of E_p[log q_right - log q_wrong]: "
        "a token-level reward with no entropy term and no fixed target, whose optimum is a point mass, not "
        "distillation toward a distribution; logged as kl_contrast; watch the entropy in long runs",
    )
    o(
        "--kl-clamp",
        type=float,
        help="per-token distillation KL clamped at this many nats, as the authors do (0: off)",
    )
    o(
        "--distill-divergence",
        choices=DIVERGENCES,
        help="the distillation term D(p, SG[q]): reverse KL(p || q), forward KL(q || p), or the generalized "
        "JSD (see --jsd-lambda) (default: reverse, the paper's)",
    )
    o(
        "--jsd-lambda",
        type=float,
        help="jsd: lam KL(q || m) + (1 - lam) KL(p || m), m = (1 - lam) p + lam q (TRL's GKD beta): "
        "toward forward KL as lam -> 0, reverse as lam -> 1 (default: 0.5)",
    )
    o(
        "--entropy-coef",
        type=float,
        help="entropy bonus: minus this times the mean token entropy (default: "
        f"{ALGORITHMS['opsd']['entropy_coef']} for opsd, as the authors' script, else 0)",
    )
    o("--rlsd-lambda", type=float, help="rlsd: initial mix of the teacher-reweighted advantage")
    o(
        "--rlsd-lambda-decay-steps",
        type=int,
        help="rlsd: lambda decays linearly to 0 (0: constant)",
    )
    o("--rlsd-eps-w", type=float, help="rlsd: the teacher weight is clipped to 1 +- this")
    o(
        "--opsd-teacher-temperature",
        type=float,
        help="opsd: the temperature of the teacher's log-probs (default: 1.0; their key of the same name; "
        "their boxed script 1.0, another 0.5). RLSD's teacher reads at --temperature, as their worker "
        "overwrites it",
    )
    o("--eps-low", type=float, help="PPO clip below 1")
    o("--eps-high", type=float, help="PPO clip above 1 (DAPO clip-higher)")
    o("--clip-c", type=float, help="dual-clip bound for A < 0")
    o("--loss-agg", choices=AGG_MODES, help="how per-token losses are averaged")
    s = p.add_argument_group("sampling").add_argument
    s("--num-generations", type=int, help="G, responses per prompt")
    s("--max-new-tokens", type=int, help="response length cap, in tokens")
    s("--min-new-tokens", type=int, help="force at least this many tokens (benchmarks)")
    s("--temperature", type=float, help="sampling temperature, also applied to log-probs")
    s("--top-p", type=float, help="nucleus sampling")
    t = p.add_argument_group("optimisation").add_argument
    t("--steps", type=int, help="training steps, one rollout each")
    t("--batch-prompts", type=int, help="B, prompts per step")
    t(
        "--mini-batch-prompts",
        type=int,
        help="prompts per optimizer step (verl's ppo_mini_batch_size): one rollout of B prompts feeds "
        "B / this many optimizer steps over disjoint whole groups; a preset's that does not divide "
        "--batch-prompts becomes B",
    )
    t("--ppo-epochs", type=int, help="passes over the rollout's mini-batches")
    t("--micro-batch", type=int, help="rows per forward/backward")
    t("--kl-chunk-size", type=int, help="tokens per chunk of the full-vocab KL")
    t("--lr", type=float, help=f"AdamW lr; --full-finetune: {FULL_FINETUNE['lr']}")
    t(
        "--weight-decay",
        type=float,
        help=f"AdamW weight decay; --full-finetune: {FULL_FINETUNE['weight_decay']}",
    )
    t(
        "--lr-warmup-steps",
        type=int,
        help="linear lr warm-up over this many training steps, then constant (lr x k / W at step k = 0, "
        f"1, ..., as verl); --full-finetune: {FULL_FINETUNE['lr_warmup_steps']}",
    )
    t("--grad-clip", type=float, help="max gradient norm")
    t("--seed", type=int, help="seeds sampling, data order and init")
    t("--lora-r", type=int, help="LoRA rank")
    t("--lora-alpha", type=int, help="LoRA scaling alpha")
    t("--lora-dropout", type=float, help="LoRA dropout")
    t("--lora-target-modules", help="comma-separated names, or all-linear")
    t("--full-finetune", action="store_true", help="no LoRA; the reference is then a second, frozen copy")
    t(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        help="the base weights' dtype (LoRA, the optimizer and the loss math stay float32). auto: bfloat16 "
        "on a GPU that supports it and on a CPU with native bf16 matrix units (AMX or AVX512-BF16), "
        "float32 elsewhere and with --full-finetune",
    )
    t(
        "--load-in-4bit",
        action=argparse.BooleanOptionalAction,
        help="NF4 base (default: on with CUDA, off with --full-finetune or on a CPU)",
    )
    t(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="recompute activations in backward (default: on with CUDA)",
    )
    e = p.add_argument_group("evaluation, output and resuming").add_argument
    e("--eval-every", type=int, help="steps between held-out evals (0: only before and after)")
    e("--eval-size", type=int, help="held-out prompts per eval")
    e(
        "--eval-samples",
        type=int,
        help="k of mean@k and pass@k at the training temperature (the authors: 32 at T = 1)",
    )
    e(
        "--output-dir",
        help="metrics, samples, curves, checkpoints and the adapter go here "
        "(default: runs/<algo>-<date>-<time>)",
    )
    e("--save-every", type=int, help="checkpoint every N steps (0: only at the end)")
    e("--keep-checkpoints", type=int, help="how many of the newest checkpoints to keep")
    e(
        "--resume",
        nargs="?",
        const="yes",
        choices=("no", "auto", "yes"),
        help="continue from the output folder's newest checkpoint; auto: if there is one",
    )
    e("--overwrite-output-dir", action="store_true", help="replace a run already in --output-dir")
    e("--max-bad-steps", type=int, help="stop after this many non-finite steps in a row")
    e(
        "--report-to",
        help="experiment trackers for every metric: none, or any of tensorboard, wandb, trackio, "
        "comma-separated (offline; see harness/trackers.py) (default: none)",
    )
    e("--save-merged", action="store_true", help="at the end, also write <output-dir>/merged: base + adapter")
    e(
        "--merge-run",
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
        help="a PEFT LoRA adapter folder to start from, or to evaluate (default: a new adapter)",
    )
    e("--print-verl-overrides", action="store_true", help="print the equivalent verl overrides and exit")
    e("--debug", action="store_true", help="show tracebacks")
    return p


# ---------------------------------------------------------------- defaults and checks


def given_flags(argv: list[str] | None = None, description: str = "") -> dict:
    """The flags the user gave, by field name (argparse exits 2 on a malformed one)."""
    given = vars(build_parser(description).parse_args(argv))
    if "context_candidates" in given:
        given["context_candidates"] = tuple(given["context_candidates"])
    return given


def parse(given: dict) -> Config:
    """The run's configuration from the given flags, every flag checked; UsageError on bad
    input. A flag the user gave is never changed (except names: a --context-template or
    --instruction name becomes its text)."""
    if given.get("resume") == "yes" and "output_dir" not in given:
        raise UsageError("--resume continues the run in --output-dir: name that folder")
    if "output_dir" in given and not given["output_dir"].strip():
        raise UsageError("--output-dir is empty: name a folder for the run, or leave the flag out")
    refuse_unused(given)
    if "report_to" in given:
        given = {**given, "report_to": tuple(parse_report_to(given["report_to"]))}
    cfg = build(given)
    cfg = dataclasses.replace(
        cfg,
        context_template=phrasing(cfg.context_template, "--context-template"),
        context_candidates=tuple(phrasing(t, "--context-candidates") for t in cfg.context_candidates),
        instruction=INSTRUCTIONS.get(cfg.instruction, cfg.instruction),
    )
    check(cfg)
    warn_uninformed(cfg)
    return cfg


def phrasing(value: str, flag: str) -> str:
    """A context template's text: a name becomes its text; a single word that names no
    phrasing (a misspelt name: `verfy`) is refused rather than shown to the teacher."""
    names = [*CONTEXT_TEMPLATES, *(["auto"] if flag == "--context-template" else [])]
    if value in CONTEXT_TEMPLATES:
        return CONTEXT_TEMPLATES[value]
    if value in names or not NAME.fullmatch(value):
        return value
    raise UsageError(
        f"{flag} {value!r} is not a phrasing's name ({', '.join(names)}) and, a single word, is read as "
        "one: use one of those names, or write the teacher's text with {answer} in it"
    )


def warn_uninformed(cfg: Config) -> None:
    """A phrasing with neither {answer} nor {solution} is allowed, with a warning: it tells
    the teacher the same for every question."""
    for flag, text in [("--context-template", cfg.context_template)] + [
        ("--context-candidates", t) for t in cfg.context_candidates
    ]:
        if text != "auto" and not template_fields(text) & {"answer", "solution"}:
            print(
                f"warning: {flag} {text[:60]!r} holds neither {{answer}} nor {{solution}}: the teacher "
                "then knows nothing about a question that the student does not, and SDPG has little to "
                "distil",
                file=sys.stderr,
            )


def refuse_unused(given: dict) -> None:
    """A flag given for something this run does not do is bad input, not silently ignored."""
    algo = given.get("algo", Config.algo)
    if algo in NO_DISTILLATION and given.get("beta", 0.0) != 0.0:
        raise UsageError(f"--algo {algo} has no distillation term: drop --beta or use --algo sdpg")
    if algo in BASELINES and given.get("alpha", 0.0) != 0.0:
        raise UsageError(f"--algo {algo} has no reference anchor: drop --alpha or use --algo sdpg")
    if "distill_divergence" in given and algo in NO_DISTILLATION:
        raise UsageError(f"--algo {algo} has no full-vocabulary distillation term: drop --distill-divergence")
    if "jsd_lambda" in given and given.get("distill_divergence") != "jsd":
        raise UsageError("--jsd-lambda weighs the JSD: add --distill-divergence jsd, or drop it")
    if "opsd_teacher_temperature" in given and algo != "opsd":
        raise UsageError("--opsd-teacher-temperature is for --algo opsd: drop it")


def check_verifier(name: str) -> None:
    """--verifier math-verify without its package is bad input, found before any model work."""
    if name == "math-verify" and importlib.util.find_spec("math_verify") is None:
        raise UsageError("--verifier math-verify needs the math-verify package: pip install math-verify")


def check(args: Config) -> None:
    """Every check that needs no model; UsageError with one line that says what to change."""
    for name in POSITIVE_INTS:
        if getattr(args, name) < 1:
            raise UsageError(
                f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}"
            )
    if args.full_finetune and args.dtype == "bfloat16":
        raise UsageError(
            "--full-finetune trains the base weights, and in bfloat16 updates of lr 1e-6 round away: "
            "use --dtype float32 (auto picks it), or LoRA (drop --full-finetune)"
        )
    if args.batch_prompts % args.mini_batch_prompts:
        raise UsageError(
            f"--mini-batch-prompts {args.mini_batch_prompts} must divide --batch-prompts "
            f"{args.batch_prompts}: every optimizer step takes the same number of whole groups"
        )
    if args.teacher_contrast and args.algo in NO_DISTILLATION:
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
        check_template(flag, template)
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
        or not 0 <= args.tiny_right_share <= 1
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
            "need --eval-every >= 0, --save-every >= 0, --tiny-warm-start-steps >= 0, "
            "0 <= --tiny-right-share <= 1, --check-size >= 0, "
            "--temperature > 0, "
            "0 < --top-p <= 1, --lr > 0, --weight-decay >= 0, --lr-warmup-steps >= 0, --kl-clamp >= 0, "
            "--entropy-coef >= 0, --rlsd-lambda-decay-steps >= 0, 0 <= --rlsd-eps-w < 1 and "
            "--opsd-teacher-temperature > 0"
        )
    check_four_bit(args.load_in_4bit)
    check_verifier(args.verifier)
    check_model_name(args.model)
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


def check_template(flag: str, template: str) -> None:
    """UsageError for a template with fields other than {answer} and {solution}."""
    try:
        template.format(answer="42", solution="40 + 2 = 42")
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise UsageError(
            f"{flag} may only hold the fields {{answer}} and {{solution}} (write other braces twice): {e!r}"
        ) from e


def check_model_name(name: str) -> None:
    """A local path that does not exist is bad input; a hub id is only checked on loading."""
    local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith(".gguf")
    if local and not Path(name).expanduser().exists():
        raise UsageError(
            f"--model {name}: no such file or folder. Point --model at a folder that holds config.json "
            "and the weights, or use --model tiny."
        )


# ---------------------------------------------------------------- verl


def verl_overrides(args: Config) -> list[str]:
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
