"""sdpg.py: train a causal LM with Self-Distilled Policy Gradient (arXiv 2606.04036).

One model in three roles (rollout.py): the student pi_theta(.|x) samples and learns; the
teacher is the same model reading the privileged context c, pi_theta(.|x, c), with no
gradient; the reference pi_ref is the same weights with the LoRA adapter off. One step
(`sdpg_step`), in five stages:

  1. sample G responses per prompt from the student view
  2. verify each once -> rewards -> group advantages A_i = (R_i - mean_G) / (std_G + eps)
  3. log-probs fixed for the step, no grad: pi_ref for the anchor, pi_old for the ratio
  4. per mini-batch of whole groups, per micro-batch: the teacher's hidden states (no
     grad), the student's, one chunked LM-head pass for log p(y_t) and KL(p_t || SG[q_t]),
     `losses.sdpg_loss`, backward
  5. clip the gradient norm, optimizer step; as in the authors' verl recipe one rollout
     feeds B / --mini-batch-prompts updates (--ppo-epochs passes), so pi_old matters

Where it pays: a flat group (equal rewards) has advantage 0, so only the teacher speaks;
on the tiny model, with a teacher that does not erode, SDPG's lead over GRPO grows from
~3 to ~20 points as flat groups go from a third to most (docs/tiny_model_study.md).

GRPO (beta = alpha = 0) and pure self-distillation (no outcome term) are presets of this
step (config.ALGORITHMS); the paper's OPSD and RLSD have their own step in baselines.py.
Everything around the algorithm (flags, loading, data, the run folder, the teacher
check, evaluation) is in harness/.

What is simplified compared with the authors' verl recipe, and why:
  - HF `generate` in the training process instead of vLLM: no second engine and no
    weight sync, at the cost of slower sampling.
  - The loss is computed from final hidden states through a chunked LM head, so no
    [B, T, V] logits tensor exists; the values are the same (tests/test_trainer.py).
  - The teacher is the current model at the moment each micro-batch is scored.
  - Before step 1 the teacher view is checked on training questions, and on real models
    the privileged context's phrasing is chosen there (harness/teacher_context.py): the
    paper takes a context that helps for granted, a small model does not give it.

    python sdpg.py                                   # tiny offline model, arithmetic task
    python sdpg.py --model Qwen2.5-0.5B              # GSM8K on one GPU (LoRA, 4-bit)
    python sdpg.py --algo grpo --print-verl-overrides
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from config import BASELINES, Config
from harness import run_folder, session
from harness.evaluation import EXPLICIT_ANSWERS, drift_warnings, evaluate, format_accuracy
from harness.optim import Optimizer, clock, peak_memory_gb
from losses import Tokens, beta_schedule, group_advantages, loss_normalizer, masked_mean, sdpg_loss
from rollout import (
    Policy,
    RolloutBatch,
    batched_logprobs,
    contrast_teacher,
    reference_role,
    response_hidden,
    rollout,
    score_tokens,
    teacher_head,
    teacher_role,
)


def sdpg_step(policy: Policy, optimizer: Optimizer, examples: list, step: int, cfg: Config, verifier):
    """One SDPG step on B prompts: (metrics, the rollout with its verdicts)."""
    t0 = clock()
    # 1. Sample G responses per prompt from the student view; the seed follows the step,
    #    so a resumed run samples what the uninterrupted one did.
    batch = rollout(
        policy.model, policy.tokenizer, examples, cfg.num_generations, cfg.max_new_tokens, cfg.temperature,
        cfg.top_p, seed=cfg.seed * 1_000_003 + step, min_new_tokens=cfg.min_new_tokens,
        contrast=cfg.teacher_contrast,
    )  # fmt: skip
    t_sampled = clock()
    # 2. Each response verified once; advantages within each group of G (float64: exact
    #    zeros for flat groups). beta(k) reads the 1-based step, as the authors' schedule.
    batch.verdicts = [verifier(c, a) for c, a in zip(batch.completions, batch.answers, strict=True)]
    rewards = torch.tensor([v.reward for v in batch.verdicts])  # [B*G]
    batch.advantages = group_advantages(rewards.double(), cfg.num_generations).float()  # [B*G]
    beta = beta_schedule(step + 1, cfg.steps, cfg.beta, cfg.beta_warmup_steps, cfg.beta_decay_steps)
    # 3. Log-probs fixed for the step, no grad: the reference's for the anchor, and pi_old
    #    (the policy before the first update) as the PPO ratio's base. With one update per
    #    rollout pi_old is the current log-prob, detached (ratio 1, as verl does on-policy).
    if cfg.alpha > 0:
        with reference_role(policy) as reference:
            batch.ref_logp = batched_logprobs(reference, batch, cfg)  # [B*G, T]
    if cfg.ppo_epochs * cfg.batch_prompts // cfg.mini_batch_prompts > 1:
        batch.old_logp = batched_logprobs(policy.model, batch, cfg)  # [B*G, T]
    t_fixed = clock()
    # 4. Per mini-batch of whole groups (one optimizer step each), per micro-batch: the
    #    teacher reads its view, the student its own, the loss, backward. Each micro-batch's
    #    loss is divided by the whole mini-batch's count, so the summed gradients are those
    #    of the mini-batch mean whatever --micro-batch is.
    lr, updates, teacher_s, student_s = optimizer.lr, [], 0.0, 0.0
    distill = beta > 0 or cfg.outcome_weight == 0  # the step reads the teacher
    kl_sums = torch.zeros(len(batch.completions)) if distill else None  # [B*G]
    rows_per_update = cfg.mini_batch_prompts * cfg.num_generations
    for _ in range(cfg.ppo_epochs):
        for start in range(0, len(batch.completions), rows_per_update):
            end = min(start + rows_per_update, len(batch.completions))
            mask = batch.response_mask[start:end]  # [b, T]
            normalizer, tokens = loss_normalizer(mask, cfg.loss_agg), max(1.0, float(mask.sum()))
            optimizer.zero_grad()
            update: dict[str, float] = {}
            for s in range(start, end, cfg.micro_batch):
                rows = slice(s, min(s + cfg.micro_batch, end))
                mb, t1 = batch.rows(rows), clock()
                teacher = teacher_pass(policy, mb, cfg) if distill else None
                t2 = clock()
                loss, metrics, kl = micro_batch_loss(policy, mb, cfg, beta, teacher, normalizer, tokens)
                loss.backward()
                if kl is not None:  # each response's summed distillation KL, on the last pass
                    kl_sums[rows] = kl.sum(1).cpu()
                teacher_s, student_s = teacher_s + t2 - t1, student_s + clock() - t2
                share = float(mb.response_mask.sum()) / tokens
                for k, v in metrics.items():  # the loss is already this micro-batch's share
                    update[k] = update.get(k, 0.0) + v * (1.0 if k == "loss" else share)
            # 5. Clip the gradient norm and step; a non-finite gradient skips the step.
            norm = torch.nn.utils.clip_grad_norm_(optimizer.params, cfg.grad_clip)
            finite = bool(torch.isfinite(norm))
            if finite:
                optimizer.step()
                if policy.ema is not None:  # --teacher ema follows the weights
                    policy.ema.update()
            else:  # skipped and counted: the loop stops after --max-bad-steps in a row
                optimizer.skip()
            update.update(grad_norm=float(norm) if finite else float("nan"), skipped_step=float(not finite))
            updates.append({**update, "skipped_total": optimizer.bad_total})
    optimizer.end_training_step()
    metrics = step_metrics(batch, rewards, updates, cfg, beta=beta, lr=lr, times=(t0, t_sampled, t_fixed),
                           teacher_s=teacher_s, student_s=student_s)  # fmt: skip
    metrics |= kl_by_group_kind(kl_sums, batch.response_mask, rewards, cfg.num_generations)
    if cfg.teacher_contrast:  # KL(p || q') is no KL to a teacher: logged under its own name
        metrics = {k.replace("kl_distill", "kl_contrast"): v for k, v in metrics.items()}
    return metrics, batch


def teacher_pass(policy: Policy, mb: RolloutBatch, cfg: Config):
    """The teacher's reading of the student's tokens, no grad, by the --teacher weights:
    (its final hidden states [b, T, H], its own LM head or None where it reads the
    student's (rollout.teacher_head), and with --teacher-contrast the hidden states of
    the same teacher told a wrong answer, else None)."""
    with torch.no_grad(), teacher_role(policy, cfg.teacher) as teacher:
        right = response_hidden(teacher, mb.teacher_ids, mb.teacher_mask, mb.response_ids, mb.response_mask)
        head = teacher_head(policy, teacher, cfg.teacher)
        if not cfg.teacher_contrast:
            return right, head, None
        ids, mask = mb.contrast_ids, mb.contrast_mask
        return right, head, response_hidden(teacher, ids, mask, mb.response_ids, mb.response_mask)


def micro_batch_loss(policy, mb: RolloutBatch, cfg: Config, beta: float, teacher, normalizer, tokens):
    """Stage 4 on one micro-batch: the student's hidden states (with grad), one chunked
    pass over the LM head for log p(y_t), the distillation divergence to the teacher
    (`teacher_pass`'s output, or None) and the entropy, then the SDPG loss: (loss,
    metrics, the distillation KL per token as it enters the loss [b, T], detached; None
    without a teacher)."""
    model, head = policy.model, policy.model.get_output_embeddings()
    student_h = response_hidden(model, mb.student_ids, mb.student_mask, mb.response_ids, mb.response_mask)
    teacher_h, own_head, wrong_h = teacher or (None, None, None)  # [b, T, H], (W_q, b_q), [b, T, H]
    if wrong_h is not None:  # q' ∝ p q_right / q_wrong: the context's style cancels
        teacher_h, own_head = contrast_teacher(
            student_h, teacher_h, wrong_h, head, own_head
        )  # [b, T, H or 2H]
    logp, kl, entropy = score_tokens(
        head, student_h, mb.response_ids, mb.response_mask, teacher_h, cfg.temperature,
        cfg.kl_chunk_size, entropy_grad=cfg.entropy_coef > 0, divergence=cfg.distill_divergence,
        jsd_lambda=cfg.jsd_lambda, teacher_head=own_head,
    )  # [b, T] each  # fmt: skip
    device, mask = logp.device, mb.response_mask.to(logp.device)
    inputs = Tokens(
        logp=logp,
        old_logp=logp.detach() if mb.old_logp is None else mb.old_logp.to(device),  # on-policy: ratio 1
        advantages=mb.advantages.to(device),
        mask=mask,
        kl=kl if teacher_h is not None else None,
        ref_logp=None if mb.ref_logp is None else mb.ref_logp.to(device),
    )
    loss, metrics = sdpg_loss(inputs, cfg, beta=beta, normalizer=normalizer)
    if cfg.entropy_coef > 0:  # a bonus: the mean entropy over all response tokens, subtracted
        bonus = cfg.entropy_coef * (entropy * mask).sum() / tokens
        loss, metrics["loss"] = loss - bonus, metrics["loss"] - float(bonus)
    metrics["entropy"] = float(masked_mean(entropy.detach(), mask))
    if teacher_h is None:
        return loss, metrics, None
    kl = kl.detach().masked_fill(~mask.bool(), 0.0)  # [b, T]
    return loss, metrics, kl if cfg.kl_clamp is None else kl.clamp(max=cfg.kl_clamp)


def kl_by_group_kind(kl_sums, mask, rewards, group_size: int) -> dict[str, float]:
    """Where the signal comes from: the mean distillation KL per token over the responses
    of flat groups (equal rewards: zero advantage, no outcome gradient, so only the teacher
    speaks) and over the others; a kind with no tokens is left out."""
    if kl_sums is None:
        return {}
    groups = rewards.view(-1, group_size)  # [B, G]
    flat = (groups.amax(1) == groups.amin(1)).repeat_interleave(group_size)  # [B*G]
    tokens = mask.sum(1).to(kl_sums.dtype)  # [B*G]
    out = {}
    for name, rows in (("kl_distill_flat", flat), ("kl_distill_mixed", ~flat)):
        if tokens[rows].sum() > 0:
            out[name] = float(kl_sums[rows].sum() / tokens[rows].sum())
    return out


def step_metrics(batch, rewards, updates, cfg: Config, *, beta, lr, times, teacher_s, student_s) -> dict:
    """The step's row of metrics.jsonl: the rollout's rewards and lengths, the updates'
    means, and where the time went."""
    t0, t_sampled, t_fixed = times
    n_tokens = float(batch.response_mask.sum())
    groups = rewards.view(-1, cfg.num_generations)  # [B, G]
    return {
        "reward": float(rewards.mean()),
        "accuracy": float((rewards == 1).float().mean()),
        "adv_std": float(batch.advantages.std()),
        "flat_groups": float((groups.amax(1) == groups.amin(1)).float().mean()),
        **{k: sum(u[k] for u in updates) / len(updates) for k in updates[0]},  # mean over updates
        "reference_s": t_fixed - t_sampled,
        "teacher_s": teacher_s,
        "student_s": student_s,
        "response_len": n_tokens / batch.response_ids.shape[0],
        "truncated": float(batch.truncated.float().mean()),
        "beta": beta,
        "lr": lr,
        "generate_s": t_sampled - t0,
        "step_s": clock() - t0,
        "tokens_per_s": n_tokens / max(t_sampled - t0, 1e-9),
        "peak_mem_gb": peak_memory_gb(),
    }


# ---------------------------------------------------------------- the loop


def train(run: session.Run) -> int:
    """Steps start+1 .. cfg.steps with evals, logs and checkpoints; returns the exit code
    (0, or 130 / 143 when stopped by Ctrl-C / SIGTERM)."""
    cfg, policy, optimizer, log = run.cfg, run.policy, run.optimizer, run.log
    train_set, eval_set = run.splits
    if cfg.algo in BASELINES:  # the variant is chosen once; nothing on the SDPG path imports it
        from baselines import baseline_step as step_fn
    else:
        step_fn = sdpg_step
    if run.start == 0:
        first = evaluate(policy, eval_set, cfg, run.verifier)
        log.metrics({"step": 0, **run.check, **first})
        print(f"step 0 held-out accuracy: {format_accuracy(first)}")
    if run.start >= cfg.steps:
        print(
            f"the run is already at step {run.start} of --steps {cfg.steps}: nothing to train",
            file=sys.stderr,
        )
    bar = tqdm(
        range(run.start, cfg.steps), desc=cfg.algo, dynamic_ncols=True, initial=run.start, total=cfg.steps
    )
    # a run that learns from its teacher watches it drift: each kind of warning once per run
    watching = {"accuracy", "style"} if cfg.beta > 0 or cfg.algo in BASELINES else set()
    with run_folder.StopOnCtrlC() as ctrl_c:
        for step in bar:
            examples = run.data_for_step(step)
            metrics, batch = step_fn(policy, optimizer, examples, step, cfg, run.verifier)
            done = step + 1
            metrics = {"step": done, **metrics}
            metrics["answered"] = sum(v.method in EXPLICIT_ANSWERS for v in batch.verdicts) / len(
                batch.verdicts
            )
            log.samples(done, run_folder.sample_rows(done, batch.completions, batch.answers, batch.verdicts))
            evaluated = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
            if evaluated:
                metrics.update(evaluate(policy, eval_set, cfg, run.verifier))
                for kind, warning in drift_warnings(metrics).items():
                    if kind in watching:
                        print(warning, file=sys.stderr)
                        watching.discard(kind)
            log.metrics(metrics, plot=evaluated)
            kl = metrics.get("kl_distill", metrics.get("kl_contrast", 0.0))
            bar.set_postfix(reward=f"{metrics['reward']:.2f}", kl=f"{kl:.3g}")
            run.stop_if_diverged()
            if ctrl_c.requested or done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0):
                saved = run.save_checkpoint(done)
            if ctrl_c.requested:
                print(
                    f"stopped at step {done}; checkpoint saved in {saved}. Resume with --resume.",
                    file=sys.stderr,
                )
                return ctrl_c.exit_code
    run.finish()
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line (harness/cli.py): bad input ends in one line, exit 2."""
    return session.main(argv, train, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
