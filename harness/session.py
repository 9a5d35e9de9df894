"""A run from the command line to its folder: check every input, load the data and the
model, settle the teacher's context, resume, and hand the loop (sdpg.train) a `Run`.

Bad input fails before any model work, except what only loading can reveal; only once
the data and the model have loaded is an old run replaced and the folder locked.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from config import Config
from harness import cli, data, run_folder, teacher_context
from harness.errors import TrainingError, UsageError
from harness.evaluation import evaluate, format_accuracy
from harness.loading import load_policy, load_tokenizer, merge_run, resolve_dtype
from harness.optim import Optimizer
from harness.trackers import Trackers
from rollout import EmaWeights, Policy
from verifier import answer_format, make_verifier


@dataclass
class Run:
    """What the training loop reads and writes: the settled configuration, the policy and
    its optimizer, (train, eval) examples, the verifier, the log, the step to start from,
    and the teacher check's figures (logged with step 0)."""

    cfg: Config
    policy: Policy
    optimizer: Optimizer
    splits: tuple[list, list]
    verifier: Callable
    log: run_folder.RunLog
    start: int
    check: dict[str, float]

    def data_for_step(self, step: int) -> list:
        """The step's B prompts: a fixed shuffle per epoch (a resumed run continues at the
        right data position)."""
        return data.step_examples(self.splits[0], step, self.cfg.batch_prompts, self.cfg.seed)

    def stop_if_diverged(self) -> None:
        if self.optimizer.bad_in_a_row >= self.cfg.max_bad_steps:
            c = self.cfg
            raise TrainingError(run_folder.bad_steps_message(c.max_bad_steps, c.lr, c.beta, self.log.out_dir))

    def save_checkpoint(self, step: int) -> Path:
        p = self.policy
        settings = dataclasses.asdict(self.cfg)
        return run_folder.save_checkpoint(
            self.log.out_dir, step, p.model, self.optimizer, settings, self.cfg.keep_checkpoints, p.ema
        )

    def finish(self) -> None:
        """The trained adapter (or model), and the held-out accuracy before and after."""
        out_dir = self.log.out_dir
        run_folder.save_policy(self.policy.model, self.policy.tokenizer, out_dir)
        evals = [r for r in run_folder.read_metrics(out_dir) if any(k.startswith("eval_") for k in r)]
        first, last = ({k: v for k, v in r.items() if k.startswith("eval_")} for r in (evals[0], evals[-1]))
        print(f"held-out accuracy before: {format_accuracy(first)}")
        print(f"held-out accuracy after:  {format_accuracy(last)}")
        print(f"metrics.jsonl, samples.jsonl, curves.png and the adapter are in {out_dir}")


def main(argv: list[str] | None, train: Callable[[Run], int], description: str = "") -> int:
    """Parse and check the flags, then print the verl overrides, merge a run, evaluate, or
    train with `train`; UsageError -> one line, exit 2; TrainingError -> exit 1."""
    given = cli.given_flags(argv, description)
    debug = given.get("debug", False)
    quiet_libraries()
    try:
        cfg = cli.parse(given)
        if cfg.print_verl_overrides:
            print("python3 -m verl.trainer.main_ppo \\\n  " + " \\\n  ".join(cli.verl_overrides(cfg)))
            return 0
        if cfg.merge_run:
            print(f"merged model in {merge_run(Path(cfg.merge_run))}")
            return 0
        return run(cfg, train, template_given="context_template" in given)
    except (UsageError, TrainingError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:  # outside a training step (loading, the first eval): nothing to save
        if debug:
            raise
        print("\nerror: stopped by Ctrl-C; checkpoints already written are intact", file=sys.stderr)
        return 130


def run(cfg: Config, train: Callable[[Run], int], template_given: bool = False) -> int:
    """Check the folder, load, settle the context, resume; then train (or only evaluate).
    `template_given`: the user gave --context-template (a resumed run refuses a new one)."""
    dtype, why = resolve_dtype(cfg.dtype, torch.cuda.is_available(), cfg.full_finetune)
    cfg = dataclasses.replace(cfg, dtype=dtype)  # args.json records the dtype auto chose
    trained = "they train, with the optimizer," if cfg.full_finetune else "LoRA and the optimizer"
    autocast = "; the adapter's products in bf16 (autocast)" if dtype == "bfloat16" else ""
    print(f"base weights in {dtype} ({why}); {trained} and the loss math in float32{autocast}")
    if cfg.eval_only:
        out_dir, resume_from = run_folder.open_for_eval(dataclasses.asdict(cfg))
    else:
        out_dir, resume_from = run_folder.check_run(dataclasses.asdict(cfg))
    if resume_from is not None:
        cfg = resumed_context(cfg, resume_from, template_given)
    cfg, policy, splits, verifier, check = load(cfg, resume_from)
    settings = dataclasses.asdict(cfg)  # args.json records the text `auto` chose
    # only now, with data and model loaded, is an old run replaced (and the folder locked)
    lock = None if cfg.eval_only else run_folder.start_run(out_dir, resume_from, settings)
    optimizer = Optimizer(policy.model.parameters(), cfg.lr, cfg.weight_decay, cfg.lr_warmup_steps)
    start = 0
    if resume_from is not None:
        start = run_folder.load_checkpoint(resume_from, policy.model, optimizer, policy.ema)
        print(f"{'loaded' if cfg.eval_only else 'resumed from'} {resume_from} at step {start}")
    if cfg.eval_only:
        return evaluate_only(policy, splits[1], cfg, verifier, out_dir, start)
    if resume_from is not None:
        run_folder.truncate_logs(out_dir, start)
    trackers = Trackers(cfg.report_to, out_dir, out_dir.name, settings) if cfg.report_to else None
    log = run_folder.RunLog(out_dir, trackers, lock)
    try:
        code = train(Run(cfg, policy, optimizer, splits, verifier, log, start, check))
        if code == 0 and cfg.save_merged:
            print(f"merged model in {merge_run(out_dir)}")
    finally:
        log.close()  # the folder's lock is held until merging is done
    return code


def resumed_context(cfg: Config, checkpoint: Path, given: bool) -> Config:
    """cfg with the teacher's context the checkpoint's run trained with: the phrasing is
    part of a run, so a resumed run keeps it (the text `auto` chose, not the preset) and
    refuses a different --context-template; UsageError, before any model work, for a
    checkpoint that does not record it when it cannot be known (`auto`)."""
    saved = run_folder.saved_args(checkpoint)
    recorded = saved.get("context_template")
    if recorded is None and cfg.context_template != "auto":  # an older version: nothing to compare
        print(
            f"note: {checkpoint} does not record --context-template; using {cfg.context_template[:60]!r}",
            file=sys.stderr,
        )
        return cfg
    if not isinstance(recorded, str) or recorded == "auto":
        raise UsageError(
            f"{checkpoint} does not record the teacher context its run trained with (an older or damaged "
            "checkpoint): resume with --context-template and the text it used, or start a new run (another "
            "--output-dir, or --overwrite-output-dir without --resume)"
        )
    cli.check_template(f"{checkpoint}'s context_template", recorded)
    if given and cfg.context_template not in ("auto", recorded):
        raise UsageError(
            f"{checkpoint} trained with the teacher context {recorded[:60]!r}, and --context-template "
            f"{cfg.context_template[:60]!r} would change the run: drop the flag to continue it, or start a "
            "new run (another --output-dir, or --overwrite-output-dir without --resume)"
        )
    return dataclasses.replace(cfg, context_template=recorded)


def load(cfg: Config, resume_from: Path | None):
    """(cfg with the settled context, policy, (train, eval) examples, verifier, the teacher
    check's metrics): data first (bad data fails before any model work), then the model,
    then the privileged context (`teacher_context.settle`: chosen and checked on training
    questions; a resumed run comes with its recorded text, `resumed_context`)."""
    verifier = make_verifier(cfg.verifier, cfg.last_number_fallback, answer_format(cfg.instruction))
    auto = cfg.context_template == "auto"
    provisional = data.CONTEXT_TEMPLATE if auto else cfg.context_template
    splits = data.load_splits(
        cfg.data,
        cfg.eval_data,
        cfg.eval_size,
        cfg.seed,
        cfg.gsm8k_solution_context,
        provisional,
        cfg.instruction,
    )
    if auto:
        teacher_context.check_candidates(cfg.context_candidates, splits)
    if cfg.teacher_contrast:  # each training question's wrong answer, for the contrastive teacher
        splits = (data.with_wrong_answers(splits[0]), splits[1])
    path, tokenizer = load_tokenizer(cfg)
    if not auto:  # the prompts are final: drop long ones before any model work
        splits = teacher_context.rewrite(splits, provisional, tokenizer, cfg.max_prompt_length)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    policy = load_policy(cfg, path, tokenizer, adapter=cfg.adapter)
    if cfg.teacher == "ema":
        policy.ema = EmaWeights(policy.model.parameters(), cfg.teacher_ema_decay)
    fresh = resume_from is None and not cfg.eval_only  # the check belongs to a run's step 0
    template, splits, check = teacher_context.settle(policy, splits, cfg, verifier, check=fresh)
    return dataclasses.replace(cfg, context_template=template), policy, splits, verifier, check


def evaluate_only(policy, eval_set, cfg: Config, verifier, out_dir: Path, step: int) -> int:
    """--eval-only: the held-out evaluation of the loaded weights, printed and appended to
    <output-dir>/eval.jsonl."""
    result = evaluate(policy, eval_set, cfg, verifier)
    run_folder.append_jsonl(
        out_dir / "eval.jsonl", {"step": step, "adapter": cfg.adapter, "examples": len(eval_set), **result}
    )
    print(f"held-out accuracy at step {step}: {format_accuracy(result)} ({len(eval_set)} prompts)")
    print(f"appended to {out_dir / 'eval.jsonl'}")
    return 0


def quiet_libraries() -> None:
    """Notices that say nothing to a user of this script."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # optional-kernel notice
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
