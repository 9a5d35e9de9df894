"""sdpg.py: train a causal LM with Self-Distilled Policy Gradient (arXiv 2606.04036).

One model plays three roles:
  student    pi_theta(.|x)      LoRA on: samples G responses per prompt, gets the gradient
  teacher    pi_theta(.|c, x)   LoRA on, the privileged context c in its prompt, no gradient
  reference  pi_ref(.|x)        the same weights with the LoRA adapter switched off

One step (`sdpg_step`) in five stages:
  1. sample G responses per prompt from the student view
  2. verifier rewards -> group advantages A_i = (R_i - mean_G) / (std_G + eps)
  3. log-probs that stay fixed during the step, no grad: pi_ref (adapter off) for the
     anchor, pi_old (the policy before the first update) for the PPO ratio
  4. per mini-batch of whole groups, per micro-batch: teacher hidden states (no grad),
     student hidden states, one chunked pass over the LM head for log p(y_t) and
     KL(p_t || SG[q_t]), `losses.policy_loss` (SDPG's `sdpg_loss`, or a baseline's),
     backward, with the loss normalised over the mini-batch's tokens
  5. clip the gradient norm and take an optimizer step, once per mini-batch; as in the
     authors' verl recipe, one rollout feeds B / --mini-batch-prompts updates

What is simplified compared with the authors' verl recipe, and why:
  - HF `generate` in the training process instead of vLLM: no second engine and no
    weight sync, at the cost of slower sampling.
  - The loss is computed from final hidden states through a chunked LM head, so no
    [B, T, V] logits tensor exists; the values are the same (tests/test_trainer.py).
  - The teacher is the current model at the moment each micro-batch is scored.
  - Before step 1 the teacher view is checked on training questions, and on real models
    the privileged context's phrasing is chosen there (`teacher_context.py`): the paper
    takes a context that helps for granted, a small model does not give it.

    python sdpg.py                                   # tiny offline model, arithmetic task
    python sdpg.py --model Qwen2.5-0.5B              # GSM8K on one GPU (LoRA, 4-bit)
    python sdpg.py --algo grpo --print-verl-overrides
"""

from __future__ import annotations

import os
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

import cli
import data
import run_folder
import teacher_context
from cli import Config
from errors import TrainingError, UsageError
from losses import (
    Tokens,
    beta_schedule,
    group_advantages,
    loss_normalizer,
    masked_mean,
    policy_loss,
    rlsd_lambda,
)
from policy import (
    EmaWeights,
    Optimizer,
    Policy,
    clock,
    load_policy,
    load_tokenizer,
    merge_run,
    peak_memory_gb,
    reference_role,
    teacher_role,
)
from rollout import RolloutBatch, contrast_hidden, response_hidden, response_logprobs, rollout, score_tokens
from trackers import Trackers
from verifier import answer_format, make_verifier


def sdpg_step(
    policy: Policy, optimizer: Optimizer, examples: list[data.Example], step: int, cfg: Config, reward_fn
) -> tuple[dict, RolloutBatch, Tensor]:
    """One SDPG step on B prompts: (metrics, the rollout, its rewards [B*G])."""
    t0 = clock()
    # 1. Sample G responses per prompt from the student view; the seed follows the step,
    #    so a resumed run samples what the uninterrupted one did.
    batch = rollout(
        policy.model,
        policy.tokenizer,
        examples,
        cfg.num_generations,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_p,
        seed=cfg.seed * 1_000_003 + step,
        min_new_tokens=cfg.min_new_tokens,
        contrast=cfg.teacher_contrast,
    )
    t_sampled = clock()
    # 2. Rewards, then advantages normalised within each group of G (float64: exact zeros
    #    for flat groups). The authors' schedules read the 1-based global step: a beta
    #    warm-up starts at step 1 and a decay reaches 0 at the last step.
    rewards = torch.tensor([reward_fn(c, a) for c, a in zip(batch.completions, batch.answers, strict=True)])
    scores = Scores(
        advantages=group_advantages(rewards.double(), cfg.num_generations).float(),  # [B*G]
        beta=beta_schedule(step + 1, cfg.steps, cfg.beta, cfg.beta_warmup_steps, cfg.beta_decay_steps),
        lam=rlsd_lambda(step + 1, cfg.rlsd_lambda, cfg.rlsd_lambda_decay_steps),
    )
    # 3. Log-probs fixed for the step, no grad: the reference's for the anchor, pi_old (the
    #    policy before the first update) as the PPO ratio's base, and for OPSD and RLSD the
    #    sampled token's under the teacher view. With one update per rollout pi_old is the
    #    current log-prob, detached (ratio 1, as verl does on-policy).
    n_updates = cfg.ppo_epochs * cfg.batch_prompts // cfg.mini_batch_prompts
    if cfg.alpha > 0:
        with reference_role(policy) as reference:
            scores.ref_logp = batched_logprobs(reference, batch, cfg)  # [B*G, T]
    if n_updates > 1:
        scores.old_logp = batched_logprobs(policy.model, batch, cfg)  # [B*G, T]
    t_fixed = clock()
    if cfg.algo in ("opsd", "rlsd"):  # the temperatures the authors' code ends up using (README)
        t = cfg.opsd_teacher_temperature if cfg.algo == "opsd" else cfg.temperature
        with teacher_role(policy, cfg.teacher) as teacher:
            scores.teacher_logp = batched_logprobs(teacher, batch, cfg, view="teacher", temperature=t)
    timings = {"reference_s": t_fixed - t_sampled, "teacher_s": clock() - t_fixed, "student_s": 0.0}
    # 4-5. One optimizer step per mini-batch of whole groups (the teacher and the student
    #    are the current weights at each), --ppo-epochs passes over the rollout.
    lr, updates = optimizer.lr, []
    rows_per_update = cfg.mini_batch_prompts * cfg.num_generations
    for _ in range(cfg.ppo_epochs):
        for start in range(0, len(batch.completions), rows_per_update):
            rows = slice(start, start + rows_per_update)
            optimizer.zero_grad()
            update = backward_batch(policy, batch.rows(rows), scores.rows(rows), cfg, timings)
            update.update(optimizer.clip_and_step(cfg.grad_clip))
            if policy.ema is not None and not update["skipped_step"]:
                policy.ema.update()
            updates.append(update)
    optimizer.end_training_step()
    metrics = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}  # mean over updates
    n_tokens = float(batch.response_mask.sum())
    groups = rewards.view(-1, cfg.num_generations)  # [B, G]
    metrics = {
        "step": step,
        "reward": float(rewards.mean()),
        "accuracy": float((rewards == 1).float().mean()),
        "adv_std": float(scores.advantages.std()),
        "flat_groups": float((groups.amax(1) == groups.amin(1)).float().mean()),
        **metrics,
        **timings,
        "response_len": n_tokens / batch.response_ids.shape[0],
        "truncated": float(batch.truncated.float().mean()),
        **algorithm_metrics(cfg, scores),
        "lr": lr,
        "generate_s": t_sampled - t0,
        "step_s": clock() - t0,
        "tokens_per_s": n_tokens / max(t_sampled - t0, 1e-9),
        "peak_mem_gb": peak_memory_gb(),
    }
    return metrics, batch, rewards


@dataclass
class Scores:
    """What stays fixed for the whole step, per response: advantages [B*G], the step's
    beta and RLSD lambda, and log-probs of the sampled tokens [B*G, T] (None: not used)."""

    advantages: Tensor
    beta: float = 0.0
    lam: float = 0.0
    ref_logp: Tensor | None = None
    old_logp: Tensor | None = None
    teacher_logp: Tensor | None = None

    def rows(self, idx: slice) -> Scores:
        sliced = {k: v[idx] if isinstance(v, Tensor) else v for k, v in vars(self).items()}
        return Scores(**sliced)


def algorithm_metrics(cfg: Config, scores: Scores) -> dict[str, float]:
    """The step's schedule values, and OPSD's gate: the share of responses it trains on."""
    if cfg.algo == "opsd":
        return {"opsd_gate": float((scores.advantages > 0).float().mean())}
    if cfg.algo == "rlsd":
        return {"rlsd_lambda": scores.lam}
    return {"beta": scores.beta}


def backward_batch(
    policy: Policy, batch: RolloutBatch, scores: Scores, cfg: Config, timings: dict[str, float]
) -> dict[str, float]:
    """Stage 4: the gradient of a (mini-)batch's loss, one micro-batch at a time.

    Each micro-batch's loss is divided by the whole (mini-)batch's count
    (`losses.loss_normalizer`), so the summed gradients are those of the mini-batch mean
    whatever --micro-batch is. Returns the loss and token-weighted means of the other
    metrics.
    """
    mask = batch.response_mask  # [B*G, T]
    tokens = float(mask.sum())
    normalizer = loss_normalizer(cfg.algo, mask, scores.advantages, cfg.loss_agg)
    totals: dict[str, float] = {}
    for start in range(0, mask.shape[0], cfg.micro_batch):
        rows = slice(start, start + cfg.micro_batch)
        metrics = micro_batch_backward(
            policy, batch.rows(rows), scores.rows(rows), cfg, normalizer, max(1.0, tokens), timings
        )
        share = float(mask[rows].sum()) / max(1.0, tokens)
        for k, v in metrics.items():  # the loss is already this micro-batch's share
            totals[k] = totals.get(k, 0.0) + v * (1.0 if k == "loss" else share)
    return totals


def micro_batch_backward(
    policy: Policy,
    mb: RolloutBatch,
    scores: Scores,
    cfg: Config,
    normalizer: float,
    tokens: float,
    timings: dict[str, float],
) -> dict[str, float]:
    """Teacher (no grad) and student (grad) on one micro-batch, the loss, loss.backward()."""
    t0 = clock()
    teacher_h = wrong_h = None  # [b, T, H]
    if scores.beta > 0 or cfg.algo == "opd":
        with torch.no_grad(), teacher_role(policy, cfg.teacher) as teacher:
            teacher_h = response_hidden(
                teacher, mb.teacher_ids, mb.teacher_mask, mb.response_ids, mb.response_mask
            )
            if cfg.teacher_contrast:  # the same teacher told a wrong answer
                wrong_h = response_hidden(
                    teacher, mb.contrast_ids, mb.contrast_mask, mb.response_ids, mb.response_mask
                )
    t1 = clock()
    model = policy.model
    student_h = response_hidden(model, mb.student_ids, mb.student_mask, mb.response_ids, mb.response_mask)
    if wrong_h is not None:  # q' ∝ p q_right / q_wrong: the context's style cancels
        teacher_h = contrast_hidden(student_h, teacher_h, wrong_h)
    logp, kl, entropy = score_tokens(
        model.get_output_embeddings(),
        student_h,
        mb.response_ids,
        mb.response_mask,
        teacher_h,
        cfg.temperature,
        cfg.kl_chunk_size,
        entropy_grad=cfg.entropy_coef > 0,
        divergence=cfg.distill_divergence,
        jsd_lambda=cfg.jsd_lambda,
    )  # [b, T] each
    device, mask = logp.device, mb.response_mask.to(logp.device)
    fixed = {k: None if v is None else v.to(device) for k, v in vars(scores).items() if k.endswith("logp")}
    inputs = Tokens(
        logp=logp,
        old_logp=logp.detach() if fixed["old_logp"] is None else fixed["old_logp"],  # on-policy: ratio 1
        advantages=scores.advantages.to(device),
        mask=mask,
        kl=kl if teacher_h is not None else None,
        ref_logp=fixed["ref_logp"],
        teacher_logp=fixed["teacher_logp"],
    )
    loss, metrics = policy_loss(
        cfg.algo, inputs, cfg.loss, beta=scores.beta, lam=scores.lam, normalizer=normalizer
    )
    if cfg.entropy_coef > 0:  # a bonus: the mean entropy over all response tokens, subtracted
        bonus = cfg.entropy_coef * (entropy * mask).sum() / tokens
        loss, metrics["loss"] = loss - bonus, metrics["loss"] - float(bonus)
    loss.backward()
    timings["teacher_s"] = timings.get("teacher_s", 0.0) + t1 - t0
    timings["student_s"] = timings.get("student_s", 0.0) + clock() - t1
    metrics["entropy"] = float(masked_mean(entropy.detach(), mask))
    return metrics


def batched_logprobs(
    model, batch: RolloutBatch, cfg: Config, view: str = "student", temperature: float | None = None
) -> Tensor:
    """Log-probs [B*G, T] of the sampled tokens under `model` reading `view` (no grad), one
    micro-batch at a time; at the sampling temperature unless one is given."""
    size, temperature = cfg.micro_batch, cfg.temperature if temperature is None else temperature
    parts = [
        response_logprobs(model, batch.rows(slice(s, s + size)), temperature, cfg.kl_chunk_size, view).cpu()
        for s in range(0, batch.response_ids.shape[0], size)
    ]
    return torch.cat(parts)  # [B*G, T]


# ---------------------------------------------------------------- evaluation


EVAL_ROWS = 256  # responses per generate call in evaluation: bounds the KV cache with k = 32
EXPLICIT_ANSWERS = ("boxed", "####", "answer is")  # verifier methods that are a stated answer


@torch.no_grad()
def evaluate(policy: Policy, examples: list[data.Example], cfg: Config, verifier) -> dict[str, float]:
    """Held-out accuracy: mean@k and pass@k (k samples at the training temperature; pass@k
    is the share of prompts with at least one right answer), greedy accuracy, and the
    teacher's greedy accuracy on its view (the --teacher weights), to see whether the
    teacher still knows more than the student, with its mean length and share cut off
    (the style it pulls toward). Of the k samples also: the share that state a final
    answer explicitly (answered: boxed, '####' or 'the answer is', not only a last
    number), their mean length in tokens, and the share cut off before EOS."""
    k = cfg.eval_samples
    settings = [("sampled", cfg.temperature, k, "student"), ("greedy", 0.0, 1, "student")]
    settings.append(("teacher_greedy", 0.0, 1, "teacher"))
    scores: dict[str, list[float]] = {name: [] for name, *_ in settings}
    answered, lengths, truncated, teacher_lengths, teacher_truncated = [], [], [], [], []
    per_call = max(1, EVAL_ROWS // k)
    for s in range(0, len(examples), per_call):
        chunk = examples[s : s + per_call]
        for name, temperature, n, view in settings:
            # the teacher view is read by the weights the run's teacher uses (--teacher)
            role = teacher_role(policy, cfg.teacher) if view == "teacher" else nullcontext(policy.model)
            with role as model:
                b = rollout(
                    model,
                    policy.tokenizer,
                    chunk,
                    n,
                    cfg.max_new_tokens,
                    temperature,
                    cfg.top_p,
                    cfg.seed + s,
                    view=view,
                )
            verdicts = [verifier(c, a) for c, a in zip(b.completions, b.answers, strict=True)]
            scores[name] += [v.reward for v in verdicts]
            if name == "sampled":
                answered += [v.method in EXPLICIT_ANSWERS for v in verdicts]
                lengths += b.response_mask.sum(1).tolist()
                truncated += b.truncated.tolist()
            if name == "teacher_greedy":  # the style the student is pulled toward
                teacher_lengths += b.response_mask.sum(1).tolist()
                teacher_truncated += b.truncated.tolist()
    sampled = torch.tensor(scores.pop("sampled")).view(-1, k)  # [prompts, k]
    return {
        f"eval_mean@{k}": float(sampled.mean()),
        f"eval_pass@{k}": float((sampled.amax(1) == 1).float().mean()),
        **{f"eval_{name}": sum(v) / len(v) for name, v in scores.items()},
        "eval_answered": sum(answered) / len(answered),
        "eval_truncated": sum(truncated) / len(truncated),
        "eval_response_len": sum(lengths) / len(lengths),
        "eval_teacher_truncated": sum(teacher_truncated) / len(teacher_truncated),
        "eval_teacher_len": sum(teacher_lengths) / len(teacher_lengths),
    }


def format_accuracy(evaluation: dict[str, float]) -> str:
    return ", ".join(
        f"{k.removeprefix('eval_')} {v:.1f}"
        if k.endswith("len")
        else f"{k.removeprefix('eval_')} {100 * v:.1f}%"
        for k, v in evaluation.items()
    )


# ---------------------------------------------------------------- the loop


def train(
    policy: Policy,
    optimizer: Optimizer,
    splits: tuple[list[data.Example], list[data.Example]],
    cfg: Config,
    verifier,
    log: run_folder.RunLog,
    settings: dict,
    start: int,
    check: dict[str, float],
) -> int:
    """Steps start+1 .. cfg.steps with evals, logs and checkpoints; returns the exit code
    (0, or 130 / 143 when stopped by Ctrl-C / SIGTERM). `verifier(completion, gold)` gives
    a Verdict; `check` (the teacher check's figures) is logged with step 0."""
    train_set, eval_set = splits
    reward_fn = lambda completion, gold: verifier(completion, gold).reward  # noqa: E731
    out_dir = log.out_dir
    if start == 0:
        first = evaluate(policy, eval_set, cfg, verifier)
        log.metrics({"step": 0, **check, **first})
        print(f"step 0 held-out accuracy: {format_accuracy(first)}")
    bar = tqdm(range(start, cfg.steps), desc=cfg.algo, dynamic_ncols=True, initial=start, total=cfg.steps)
    if start >= cfg.steps:
        print(f"the run is already at step {start} of --steps {cfg.steps}: nothing to train", file=sys.stderr)
    with run_folder.StopOnCtrlC() as ctrl_c:
        for step in bar:
            examples = data.step_examples(train_set, step, cfg.batch_prompts, cfg.seed)
            metrics, batch, rewards = sdpg_step(policy, optimizer, examples, step, cfg, reward_fn)
            done = metrics["step"] = step + 1
            verdicts = [verifier(c, a) for c, a in zip(batch.completions, batch.answers, strict=True)]
            metrics["answered"] = sum(v.method in EXPLICIT_ANSWERS for v in verdicts) / len(verdicts)
            log.samples(done, run_folder.sample_rows(done, batch.completions, batch.answers, verdicts))
            evaluated = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
            if evaluated:
                metrics.update(evaluate(policy, eval_set, cfg, verifier))
            log.metrics(metrics, plot=evaluated)
            bar.set_postfix(
                reward=f"{metrics['reward']:.2f}",
                acc=f"{metrics['accuracy']:.2f}",
                kl=f"{metrics.get('kl_distill', 0):.3g}",
            )
            if optimizer.bad_in_a_row >= cfg.max_bad_steps:
                raise TrainingError(
                    run_folder.bad_steps_message(cfg.max_bad_steps, cfg.lr, cfg.beta, out_dir)
                )
            if ctrl_c.requested or done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
                saved = run_folder.save_checkpoint(
                    out_dir, done, policy.model, optimizer, settings, cfg.keep_checkpoints, policy.ema
                )
            if ctrl_c.requested:
                print(
                    f"stopped at step {done}; checkpoint saved in {saved}. Resume with --resume.",
                    file=sys.stderr,
                )
                return ctrl_c.exit_code
    run_folder.save_policy(policy.model, policy.tokenizer, out_dir)
    evals = [r for r in run_folder.read_metrics(out_dir) if any(k.startswith("eval_") for k in r)]
    first, last = ({k: v for k, v in r.items() if k.startswith("eval_")} for r in (evals[0], evals[-1]))
    print(f"held-out accuracy before: {format_accuracy(first)}")
    print(f"held-out accuracy after:  {format_accuracy(last)}")
    print(f"metrics.jsonl, samples.jsonl, curves.png and the adapter are in {out_dir}")
    return 0


# ---------------------------------------------------------------- the command line


def run(args) -> int:
    """Check every input, load data and the model, settle the teacher's context, then train
    (or only evaluate). Bad input fails before any model work, except what only loading
    can reveal."""
    cfg, settings = cli.config(args), vars(args)
    if args.eval_only:
        out_dir, resume_from = run_folder.open_for_eval(settings)
    else:
        out_dir, resume_from = run_folder.check_run(settings)
    policy, splits, verifier, check = load(args, cfg, resume_from)
    # only now, with data and model loaded, is an old run replaced (and the folder locked)
    lock = None if args.eval_only else run_folder.start_run(out_dir, resume_from, settings)
    optimizer = Optimizer(policy.model.parameters(), cfg.lr, cfg.weight_decay, cfg.lr_warmup_steps)
    start = 0
    if resume_from is not None:
        start = run_folder.load_checkpoint(resume_from, policy.model, optimizer, policy.ema)
        print(f"{'loaded' if args.eval_only else 'resumed from'} {resume_from} at step {start}")
    if args.eval_only:
        return evaluate_only(policy, splits[1], cfg, verifier, out_dir, start, args.adapter)
    if resume_from is not None:
        run_folder.truncate_logs(out_dir, start)
    log = run_folder.RunLog(
        out_dir, Trackers(args.report_to, out_dir, out_dir.name, settings) if args.report_to else None, lock
    )
    try:
        code = train(policy, optimizer, splits, cfg, verifier, log, settings, start, check)
        if code == 0 and args.save_merged:
            print(f"merged model in {merge_run(out_dir)}")
    finally:
        log.close()  # the folder's lock is held until merging is done
    return code


def load(args, cfg: Config, resume_from: Path | None) -> tuple[Policy, tuple, object, dict[str, float]]:
    """(policy, (train, eval) examples, verifier, the teacher check's metrics): data first
    (bad data fails before any model work), then the model, then the privileged context
    (`teacher_context.settle`: chosen and checked on training questions, or, resuming
    `auto`, the text the run started with)."""
    verifier = make_verifier(args.verifier, args.last_number_fallback, answer_format(args.instruction))
    provisional = data.CONTEXT_TEMPLATE if args.context_template == "auto" else args.context_template
    splits = data.load_splits(
        args.data,
        args.eval_data,
        args.eval_size,
        args.seed,
        args.gsm8k_solution_context,
        provisional,
        args.instruction,
    )
    if cfg.teacher_contrast:  # each training question's wrong answer, for the contrastive teacher
        splits = (data.with_wrong_answers(splits[0]), splits[1])
    path, tokenizer = load_tokenizer(args)
    if args.context_template != "auto":  # the prompts are final: drop long ones before any model work
        splits = teacher_context.rewrite(splits, provisional, tokenizer, args.max_prompt_length)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    policy = load_policy(args, path, tokenizer, adapter=args.adapter)
    if cfg.teacher == "ema":
        policy.ema = EmaWeights(policy.model.parameters(), cfg.teacher_ema_decay)
    saved = None
    if args.context_template == "auto" and resume_from is not None:
        saved = run_folder.saved_args(resume_from)["context_template"]
    context = cli.context_settings(args)
    fresh = resume_from is None and not args.eval_only  # the check belongs to a run's step 0
    args.context_template, splits, check = teacher_context.settle(
        policy, splits, context, cfg, verifier, saved, check=fresh
    )
    return policy, splits, verifier, check  # args.json records the text auto chose


def evaluate_only(policy, eval_set, cfg: Config, verifier, out_dir, step: int, adapter: str | None) -> int:
    """--eval-only: the held-out evaluation of the loaded weights, printed and appended to
    <output-dir>/eval.jsonl."""
    result = evaluate(policy, eval_set, cfg, verifier)
    run_folder.append_jsonl(
        out_dir / "eval.jsonl", {"step": step, "adapter": adapter, "examples": len(eval_set), **result}
    )
    print(f"held-out accuracy at step {step}: {format_accuracy(result)} ({len(eval_set)} prompts)")
    print(f"appended to {out_dir / 'eval.jsonl'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = cli.build_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    quiet_libraries()
    try:
        cli.resolve(args)
        if args.print_verl_overrides:
            print("python3 -m verl.trainer.main_ppo \\\n  " + " \\\n  ".join(cli.verl_overrides(args)))
            return 0
        if args.merge_run:
            print(f"merged model in {merge_run(Path(args.merge_run))}")
            return 0
        return run(args)
    except (UsageError, TrainingError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:  # outside a training step (loading, the first eval): nothing to save
        if args.debug:
            raise
        print("\nerror: stopped by Ctrl-C; checkpoints already written are intact", file=sys.stderr)
        return 130


def quiet_libraries() -> None:
    """Notices that say nothing to a user of this script."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # optional-kernel notice
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":
    sys.exit(main())
