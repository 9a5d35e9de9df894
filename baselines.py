"""baselines.py: the paper's self-distillation baselines, OPSD and RLSD, as the authors
compute them (their verl code, core_algos.py, line for line).

Both read only the sampled token's log-prob under the teacher view, never the full
vocabulary: no distillation divergence and no anchor, so their step differs from SDPG's
in stages 3 and 4. `baseline_step` repeats sdpg.sdpg_step's loop skeleton with those
differences, so that the SDPG step reads without them:

  3. the teacher's log-probs of the sampled tokens, fixed for the step: OPSD's teacher
     is the frozen reference reading the context, at --opsd-teacher-temperature; RLSD's
     the policy at the start of the step reading it, at the sampling temperature (where
     the authors' code ends up: their worker overwrites the trainer's 1.0 for RLSD)
  4. the student's log-probs and entropy, and `opsd_loss` or `rlsd_loss`

sdpg.train picks this step for --algo opsd and rlsd; nothing on the SDPG path imports it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from config import Config
from harness.optim import Optimizer, clock, peak_memory_gb
from losses import (
    LOG_RATIO_CLAMP,
    aggregate,
    clipped_policy_loss,
    group_advantages,
    loss_normalizer,
    masked_mean,
)
from rollout import Policy, batched_logprobs, response_hidden, rollout, score_tokens, teacher_role


def baseline_step(policy: Policy, optimizer: Optimizer, examples: list, step: int, cfg: Config, verifier):
    """One OPSD or RLSD step on B prompts: (metrics, the rollout with its verdicts)."""
    t0 = clock()
    # 1. Sample G responses per prompt from the student view (as sdpg_step).
    batch = rollout(
        policy.model, policy.tokenizer, examples, cfg.num_generations, cfg.max_new_tokens, cfg.temperature,
        cfg.top_p, seed=cfg.seed * 1_000_003 + step, min_new_tokens=cfg.min_new_tokens,
    )  # fmt: skip
    t_sampled = clock()
    # 2. Each response verified once; group advantages; RLSD's lambda(k) at the 1-based step.
    batch.verdicts = [verifier(c, a) for c, a in zip(batch.completions, batch.answers, strict=True)]
    rewards = torch.tensor([v.reward for v in batch.verdicts])  # [B*G]
    batch.advantages = group_advantages(rewards.double(), cfg.num_generations).float()  # [B*G]
    lam = rlsd_lambda(step + 1, cfg.rlsd_lambda, cfg.rlsd_lambda_decay_steps)
    # 3. pi_old as in sdpg_step, then the teacher's log-probs of the sampled tokens.
    if cfg.ppo_epochs * cfg.batch_prompts // cfg.mini_batch_prompts > 1:
        batch.old_logp = batched_logprobs(policy.model, batch, cfg)  # [B*G, T]
    t_fixed = clock()
    t = cfg.opsd_teacher_temperature if cfg.algo == "opsd" else cfg.temperature
    with teacher_role(policy, cfg.teacher) as teacher:
        teacher_logp = batched_logprobs(teacher, batch, cfg, view="teacher", temperature=t)  # [B*G, T]
    teacher_s, student_s = clock() - t_fixed, 0.0
    # 4-5. One optimizer step per mini-batch of whole groups, as in sdpg_step.
    lr, updates = optimizer.lr, []
    rows_per_update = cfg.mini_batch_prompts * cfg.num_generations
    for _ in range(cfg.ppo_epochs):
        for start in range(0, len(batch.completions), rows_per_update):
            end = min(start + rows_per_update, len(batch.completions))
            mask = batch.response_mask[start:end]  # [b, T]
            if cfg.algo == "opsd":  # the mean over the gated tokens of the whole mini-batch
                normalizer = max(1.0, float((mask * (batch.advantages[start:end] > 0)[:, None]).sum()))
            else:
                normalizer = loss_normalizer(mask, cfg.loss_agg)
            tokens = max(1.0, float(mask.sum()))
            optimizer.zero_grad()
            update: dict[str, float] = {}
            for s in range(start, end, cfg.micro_batch):
                rows = slice(s, min(s + cfg.micro_batch, end))
                mb, t1 = batch.rows(rows), clock()
                h = response_hidden(
                    policy.model, mb.student_ids, mb.student_mask, mb.response_ids, mb.response_mask
                )
                logp, _, entropy = score_tokens(
                    policy.model.get_output_embeddings(), h, mb.response_ids, mb.response_mask, None,
                    cfg.temperature, cfg.kl_chunk_size, entropy_grad=cfg.entropy_coef > 0,
                )  # [b, T] each  # fmt: skip
                device, m = logp.device, mb.response_mask.to(logp.device)
                old = logp.detach() if mb.old_logp is None else mb.old_logp.to(device)  # on-policy: ratio 1
                args = (logp, old, teacher_logp[rows].to(device), mb.advantages.to(device), m, cfg)
                if cfg.algo == "opsd":
                    loss, metrics = opsd_loss(*args, normalizer=normalizer)
                else:
                    loss, metrics = rlsd_loss(*args, lam=lam, normalizer=normalizer)
                if cfg.entropy_coef > 0:  # a bonus: the mean entropy over all response tokens, subtracted
                    bonus = cfg.entropy_coef * (entropy * m).sum() / tokens
                    loss, metrics["loss"] = loss - bonus, metrics["loss"] - float(bonus)
                loss.backward()
                student_s += clock() - t1
                metrics["entropy"] = float(masked_mean(entropy.detach(), m))
                share = float(mb.response_mask.sum()) / tokens
                for k, v in metrics.items():
                    update[k] = update.get(k, 0.0) + v * (1.0 if k == "loss" else share)
            norm = torch.nn.utils.clip_grad_norm_(optimizer.params, cfg.grad_clip)
            finite = bool(torch.isfinite(norm))
            if finite:
                optimizer.step()
                if policy.ema is not None:
                    policy.ema.update()
            else:
                optimizer.skip()
            update.update(grad_norm=float(norm) if finite else float("nan"), skipped_step=float(not finite))
            updates.append({**update, "skipped_total": optimizer.bad_total})
    optimizer.end_training_step()
    n_tokens = float(batch.response_mask.sum())
    groups = rewards.view(-1, cfg.num_generations)  # [B, G]
    own = (
        {"opsd_gate": float((batch.advantages > 0).float().mean())}
        if cfg.algo == "opsd"
        else {"rlsd_lambda": lam}
    )
    return {
        "reward": float(rewards.mean()),
        "accuracy": float((rewards == 1).float().mean()),
        "adv_std": float(batch.advantages.std()),
        "flat_groups": float((groups.amax(1) == groups.amin(1)).float().mean()),
        **{k: sum(u[k] for u in updates) / len(updates) for k in updates[0]},
        "reference_s": t_fixed - t_sampled,
        "teacher_s": teacher_s,
        "student_s": student_s,
        "response_len": n_tokens / batch.response_ids.shape[0],
        "truncated": float(batch.truncated.float().mean()),
        **own,
        "lr": lr,
        "generate_s": t_sampled - t0,
        "step_s": clock() - t0,
        "tokens_per_s": n_tokens / max(t_sampled - t0, 1e-9),
        "peak_mem_gb": peak_memory_gb(),
    }, batch


# ---------------------------------------------------------------- their losses


def _teacher_gap(teacher_logp: Tensor, old_logp: Tensor) -> Tensor:
    """log pi_T(y_t | x, c) - log pi_old(y_t | x), no gradient, NaN -> 0 (a token both
    give probability 0), clamped to +-LOG_RATIO_CLAMP."""
    gap = (teacher_logp - old_logp).detach().nan_to_num(0.0)
    return gap.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def opsd_loss(
    logp: Tensor,
    old_logp: Tensor,
    teacher_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg,
    *,
    normalizer: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """OPSD (On-Policy Self-Distillation) with the authors' stability fixes:

        w_t = clamp(log pi_ref(y_t | x, c) - log pi_old(y_t | x), 0, 20)     no gradient
        r_t = exp(clamp(log pi_theta - log pi_old, -20, 20))
        L_t = -w_t min(r_t, clip(r_t, 1 - eps_low, 1 + eps_high))         only where A > 0

    logp, old_logp, teacher_logp, mask: [B, T]; advantages: [B]; cfg: the run's
    config.Config (eps_low, eps_high). The teacher is the frozen reference reading the
    context (teacher_logp); the reward gate keeps only responses with a positive group
    advantage; the loss is the mean over the gated tokens (normalizer: their count in
    the whole (mini-)batch under micro-batching). Metrics: opsd_weight, the mean w_t over
    gated tokens.
    """
    s = cfg
    gate = (advantages > 0).to(logp.dtype)[:, None]  # [B, 1]
    gated = mask.to(logp.dtype) * gate  # [B, T]
    weight = _teacher_gap(teacher_logp, old_logp).clamp(min=0.0).masked_fill(~mask.bool(), 0.0)  # [B, T]
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).nan_to_num(1.0)
    per_token = -weight * torch.minimum(ratio, ratio.clamp(1.0 - s.eps_low, 1.0 + s.eps_high))  # [B, T]
    loss = aggregate(per_token, gated, "token-mean", normalizer)
    metrics = {
        "pg_loss": float(masked_mean(per_token.detach(), gated)),
        "opsd_weight": float(masked_mean(weight, gated)),
        "ratio": float(masked_mean(ratio.detach(), gated)),
        "loss": float(loss.detach()),
    }
    return loss, metrics


def rlsd_lambda(step: int, lam: float, decay_steps: int) -> float:
    """lambda(k) = lam * max(0, 1 - k / K) at the 1-based step k; K = 0: constant."""
    return lam * max(0.0, 1.0 - step / decay_steps) if decay_steps > 0 else lam


def rlsd_loss(
    logp: Tensor,
    old_logp: Tensor,
    teacher_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg,
    *,
    lam: float,
    normalizer: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """RLSD (RLVR with Self-Distillation): the teacher only rescales each token's advantage.

        delta_t = clamp(log pi_T(y_t | x, c) - log pi_old(y_t | x), -20, 20)    no gradient
        w_t     = exp(clamp(sign(A) delta_t, -20, 20))
        Ahat_t  = A clip(w_t, 1 - eps_w, 1 + eps_w)
        A_t     = (1 - lambda) A + lambda Ahat_t

    then the DAPO dual-clip surrogate of `clipped_policy_loss` on A_t (cfg: eps_low,
    eps_high, clip_c, loss_agg, rlsd_eps_w). The teacher (teacher_logp) is the policy at
    the start of the step reading the context; the verifier's advantage keeps the
    direction, the teacher changes the magnitude by at most eps_w.
    """
    s = cfg
    adv = advantages[:, None].expand_as(logp)  # [B, T]
    delta = _teacher_gap(teacher_logp, old_logp)  # [B, T]
    weight = torch.exp((torch.sign(adv) * delta).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B, T]
    mixed = (1.0 - lam) * adv + lam * adv * weight.clamp(1.0 - s.rlsd_eps_w, 1.0 + s.rlsd_eps_w)  # [B, T]
    pg, stats = clipped_policy_loss(logp, old_logp, mixed, mask, s.eps_low, s.eps_high, s.clip_c)
    loss = aggregate(pg, mask, s.loss_agg, normalizer)
    outside = (weight < 1.0 - s.rlsd_eps_w) | (weight > 1.0 + s.rlsd_eps_w)
    metrics = {
        "pg_loss": float(masked_mean(pg.detach(), mask)),
        "rlsd_delta": float(masked_mean(delta, mask)),
        "rlsd_weight": float(masked_mean(weight, mask)),
        "rlsd_weight_clipfrac": float(masked_mean(outside.to(logp.dtype), mask)),
        **{k: float(v) for k, v in stats.items()},
        "loss": float(loss.detach()),
    }
    return loss, metrics
