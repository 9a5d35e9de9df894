"""SDPG's loss, term by term. Pure PyTorch: no model, no I/O.

Self-Distilled Policy Gradient (arXiv 2606.04036) trains one policy pi_theta with
three signals, summed per response token t of response i and averaged over tokens:

    L = w_pg * L_pg(i, t)                                  outcome: DAPO dual-clip PPO
      + beta(k) * g_i * KL(p_t || SG[q_t])                 distillation from the teacher
      + alpha * f(log w_t)                                 anchor to the reference

- A_i = (R_i - mean_G R) / (std_G R + eps) is the group-normalised advantage.
- p_t = pi_theta(. | x, y<t) is the student, q_t = pi_theta(. | x, c, y<t) is the same
  model shown the privileged context c after the question (the teacher); SG =
  stop-gradient. The KL is clamped at 20 nats a token (KL_CLAMP): above it, no gradient.
- g_i = 1[A_i > 0] when the positive-advantage gate is on, else 1 (the default).
- beta(k) = beta, constant by default (as the authors' script); `beta_schedule` adds an
  optional linear warm-up and decay.
- log w_t = log pi_theta(y_t) - log pi_ref(y_t) on the sampled token only; f is one of
  `reference_kl`'s modes (urkl by default).

With beta = alpha = 0 this is exactly GRPO/DAPO; with w_pg = 0 it is pure
self-distillation. The KL is exact over the whole vocabulary. `chunked_kl` computes it
from final hidden states chunk by chunk, so no [N, V] logits tensor ever exists: at
Qwen's V = 151,936 one such float32 tensor is 1.2 GB for 2,048 tokens. The same kernel
offers two other divergences in the KL's place (`--distill-divergence`): the forward
KL(SG[q_t] || p_t) and the generalized Jensen-Shannon divergence.

`sdpg_loss` reads one micro-batch's `Tokens` and the run's configuration (config.Config:
alpha, kl_mode, the clip ranges, ...); the paper's baselines have their own losses, in
baselines.py.

Reading order: the objective first, top to bottom (its terms, the divergences' readable
references, `Tokens`, `sdpg_loss`); the chunked LM head, memory engineering, comes last
under its own heading and can be skipped on a first reading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KL_MODES = ("fkl", "rkl", "ufkl", "urkl")
# The authors clamp log(pi_theta / pi_old) to +-20 before exp (so a ratio is at most e^20,
# never inf) and the per-token distillation KL at 20 nats (a token whose KL is larger
# gets no distillation gradient).
LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 20.0
# Tokens per chunk of the LM head pass. At Qwen's V = 151,936 a chunk holds at most three
# [256, V] float32 tensors (~470 MB); bench/kl_bench.json: 11.0% of the naive path's peak.
DEFAULT_CHUNK = 256
AGG_MODES = ("token-mean", "seq-mean-token-mean")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x * mask) / max(1, sum(mask)): the mean over valid tokens, 0 when there are none."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def group_advantages(
    rewards: Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> Tensor:
    """A_i = (R_i - mean_G) / (std_G + eps), rewards in group-contiguous order.

    rewards: [B*G], rows i*G .. i*G+G-1 are the G responses to prompt i.
    std_G is the unbiased sample std (Bessel's correction, as torch.std), so G >= 2.
    scale_by_std=False gives R_i - mean_G (Dr. GRPO). A group whose rewards are all
    equal carries no signal and gets exactly 0.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to compare responses, got {group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
            f"got shape {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)  # [B, G]
    adv = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    if scale_by_std:
        adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    flat = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # [B, 1]
    return adv.masked_fill(flat, 0.0).reshape(-1)  # [B*G]


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    clip_c: float = 10.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO's dual-clip PPO surrogate per token.

        r_t = exp(clamp(logp - old_logp, -20, 20))
        L_t = max(-A r_t, -A clip(r_t, 1 - eps_low, 1 + eps_high))   (PPO, asymmetric)
        L_t = min(L_t, c |A|)                                       only where A < 0

    The second clip bounds the loss of a negative-advantage token whose ratio has run
    far above 1 (dual-clip PPO, Ye et al. 2020). logp, old_logp, mask: [B, T];
    advantages: [B] or [B, T]. Returns the per-token loss [B, T] (masked tokens are 0)
    and masked-mean stats: clipfrac (the PPO clip is active) and clipfrac_lower (the
    dual clip is active).
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [B, 1|T]
    valid = mask.bool()
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio.masked_fill(~valid, 0.0))  # [B, T], padding -> 1
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    ppo = torch.maximum(loss_unclipped, loss_clipped)
    dual = torch.minimum(ppo, -adv * clip_c)  # -A c = c |A| where A < 0
    loss = torch.where(adv < 0, dual, ppo).masked_fill(~valid, 0.0)
    stats = {
        "clipfrac": masked_mean((loss_clipped > loss_unclipped).to(loss.dtype), mask),
        "clipfrac_lower": masked_mean(((ppo > -adv * clip_c) & (adv < 0)).to(loss.dtype), mask),
        "ratio": masked_mean(ratio.detach(), mask),
    }
    return loss, stats


def reference_kl(logp: Tensor, ref_logp: Tensor, mode: str) -> Tensor:
    """The alpha anchor f(log w) per sampled token, log w = logp - ref_logp, y ~ pi_theta.

    The gradient flows through logp only, so the loss's gradient is f'(log w) grad log
    pi_theta(y), whose expectation over y ~ pi_theta is (tests/test_losses.py):

        mode   f(log w)            f'(log w)     E[gradient]                E[f]
        fkl    1/w                 -1/w          grad KL(pi_ref || pi_theta)  1
        ufkl   1/w + log w         1 - 1/w       grad KL(pi_ref || pi_theta)  1 + KL(pi_theta || pi_ref)
        rkl    1/2 (log w + 1)^2   log w + 1     grad KL(pi_theta || pi_ref)  -
        urkl   1/2 (log w)^2       log w         grad KL(pi_theta || pi_ref)  ~ KL(pi_theta || pi_ref)
                                                                             near w = 1 (k2; the default)

    So fkl and ufkl pull toward the reference as a forward KL would, rkl and urkl as the
    reverse KL; the values are not KLs (fkl reads 1, rkl 1/2 when pi_theta = pi_ref).
    What is logged as ref_kl is `k3` below, an unbiased estimate of KL(pi_theta || pi_ref).
    """
    if mode not in KL_MODES:
        raise ValueError(f"unknown kl mode {mode!r}: choose one of {', '.join(KL_MODES)}")
    log_w = logp - ref_logp
    if mode == "fkl":
        return torch.exp(-log_w)
    if mode == "rkl":
        return 0.5 * (log_w + 1.0) ** 2
    if mode == "ufkl":
        return torch.exp(-log_w) + log_w
    return 0.5 * log_w**2


def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """1/w - 1 + log w per sampled token (Schulman's k3 = ufkl - 1): >= 0, 0 where
    pi_theta = pi_ref, and E over y ~ pi_theta is exactly KL(pi_theta || pi_ref)."""
    log_w = logp - ref_logp
    return torch.exp(-log_w) - 1.0 + log_w


def beta_schedule(
    step: int, total_steps: int, beta: float, warmup_steps: int = 0, decay_steps: int = 0
) -> float:
    """beta(k) = beta * min(1, k / T_warm) * min(1, (T - k) / T_decay).

    Optional (both lengths 0 by default: beta(k) = beta). Linear warm-up over the first
    T_warm steps and linear decay to 0 over the last T_decay steps; a factor whose length
    is 0 is left out. Never negative.
    """
    factor = 1.0
    if warmup_steps > 0:
        factor *= min(1.0, step / warmup_steps)
    if decay_steps > 0:
        factor *= min(1.0, max(0.0, (total_steps - step) / decay_steps))
    return beta * factor


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half/bf16 inputs, float64 stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


DIVERGENCES = ("reverse", "forward", "jsd")


def kl_from_logits(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Reverse KL (the paper's): KL(p || SG[q]) = sum_v p(v) (log p(v) - log q(v)) per
    position, [..., V] -> [...].

    p = softmax(student / T), q = softmax(teacher / T), teacher detached. The readable
    reference: it materialises every logit, so use it for small vocabularies and tests.
    Mode-seeking: p is pushed off tokens q rules out, and free to ignore some q covers.
    """
    log_p, log_q = _log_softmaxes(student_logits, teacher_logits, temperature)  # [..., V] each
    return (log_p.exp() * (log_p - log_q)).sum(-1)  # [...]


def forward_kl_from_logits(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> Tensor:
    """Forward KL: KL(SG[q] || p) = sum_v q(v) (log q(v) - log p(v)) per position, [..., V] -> [...].

    Mass-covering: p is pushed up wherever q has mass (the cross-entropy to the
    teacher's whole distribution, less q's entropy). The readable reference, as above.
    """
    log_p, log_q = _log_softmaxes(student_logits, teacher_logits, temperature)  # [..., V] each
    return (log_q.exp() * (log_q - log_p)).sum(-1)  # [...]


def jsd_from_logits(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, lam: float = 0.5
) -> Tensor:
    """Generalized Jensen-Shannon divergence, TRL's convention (GKD's `beta` is our lam):

        m     = (1 - lam) p + lam SG[q]           the mixture, as logsumexp in log space
        JSD   = lam KL(SG[q] || m) + (1 - lam) KL(p || m)

    0 < lam < 1. As lam -> 0, JSD / lam -> KL(q || p) (forward); as lam -> 1,
    JSD / (1 - lam) -> KL(p || q) (reverse); lam = 1/2 is the symmetric JSD, bounded by
    log 2. [..., V] -> [...]; the readable reference, as above.
    """
    log_p, log_q = _log_softmaxes(student_logits, teacher_logits, temperature)  # [..., V] each
    log_m = _log_mixture(log_p, log_q, lam)  # [..., V]
    kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
    kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
    return lam * kl_q + (1.0 - lam) * kl_p  # [...]


def divergence_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    divergence: str = "reverse",
    jsd_lambda: float = 0.5,
) -> Tensor:
    """The distillation divergence `divergence` between student and teacher logits (naive)."""
    check_divergence(divergence, jsd_lambda)
    if divergence == "jsd":
        return jsd_from_logits(student_logits, teacher_logits, temperature, jsd_lambda)
    reference = kl_from_logits if divergence == "reverse" else forward_kl_from_logits
    return reference(student_logits, teacher_logits, temperature)


def check_divergence(divergence: str, jsd_lambda: float) -> None:
    """ValueError for an unknown divergence, or a JSD lambda outside (0, 1)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}: choose one of {', '.join(DIVERGENCES)}")
    if divergence == "jsd" and not 0.0 < jsd_lambda < 1.0:
        raise ValueError(f"jsd needs 0 < jsd_lambda < 1 (its ends are forward and reverse), got {jsd_lambda}")


def _log_softmaxes(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    dtype = _compute_dtype(student_logits)
    log_p = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_q = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    return log_p, log_q


def _log_mixture(log_p: Tensor, log_q: Tensor, lam: float) -> Tensor:
    """log((1 - lam) p + lam q), stable: logsumexp of the two shifted log-probabilities."""
    return torch.logaddexp(log_p + math.log1p(-lam), log_q + math.log(lam))


def aggregate(per_token: Tensor, mask: Tensor, agg: str, normalizer: float | None) -> Tensor:
    """Masked mean of a [B, T] loss: over all tokens, or per sequence then over rows.

    normalizer replaces this call's own count (tokens, or rows for seq-mean) so that
    micro-batches summed under gradient accumulation give the whole batch's mean.
    """
    m = mask.to(per_token.dtype)
    per_token = per_token.masked_fill(~mask.bool(), 0.0)
    if agg == "token-mean":
        return (per_token * m).sum() / (normalizer or m.sum().clamp(min=1.0))
    if agg == "seq-mean-token-mean":
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # [B]
        return per_seq.sum() / (normalizer or per_token.shape[0])
    raise ValueError(f"unknown loss aggregation {agg!r}: choose one of {', '.join(AGG_MODES)}")


@dataclass
class Tokens:
    """What the loss reads about one (micro-)batch of B responses of T tokens: [B, T]
    unless noted; None where the run has no such term."""

    logp: Tensor  # log pi_theta(y_t | x, y<t), with gradient
    old_logp: Tensor  # log pi_old(y_t): the PPO ratio's base, no gradient
    advantages: Tensor  # [B]: A_i, one per response
    mask: Tensor  # 1 on response tokens, 0 on padding
    kl: Tensor | None = None  # D(p_t, SG[q_t]) per token: SDPG's distillation term
    ref_logp: Tensor | None = None  # log pi_ref(y_t): the anchor


def loss_normalizer(mask: Tensor, agg: str) -> float:
    """What a (mini-)batch's summed loss is divided by: its tokens (token-mean) or its rows
    (seq-mean-token-mean). Passing the whole mini-batch's count to each micro-batch makes
    gradient accumulation exact."""
    return float(mask.sum()) if agg == "token-mean" else float(mask.shape[0])


def sdpg_loss(
    tokens: Tokens, cfg, *, beta: float = 0.0, normalizer: float | None = None
) -> tuple[Tensor, dict[str, float]]:
    """The SDPG objective on one (micro-)batch; see the module docstring.

    cfg: the run's config.Config (read: outcome_weight w_pg, alpha, kl_mode,
    positive_adv_only, kl_clamp, eps_low, eps_high, clip_c, loss_agg); beta: this step's
    beta(k). tokens.kl is the per-token distillation divergence (from chunked_head),
    clamped at cfg.kl_clamp nats; it may be None when beta == 0, and tokens.ref_logp may
    be None when alpha == 0. Returns the scalar loss and float metrics (masked means over
    this call's tokens; kl_distill is the clamped divergence that enters the loss).
    """
    t, s = tokens, cfg
    kl, mask, advantages = t.kl, t.mask, t.advantages
    if beta != 0.0 and kl is None:
        raise ValueError("beta != 0 needs the per-token distillation kl")
    if s.alpha != 0.0 and t.ref_logp is None:
        raise ValueError("alpha != 0 needs the reference log-probs ref_logp")
    pg, stats = clipped_policy_loss(t.logp, t.old_logp, advantages, mask, s.eps_low, s.eps_high, s.clip_c)
    per_token = s.outcome_weight * pg  # [B, T]
    pad = ~mask.bool()  # padding may hold anything: keep it out of exp() and out of grads
    metrics = {"pg_loss": float(masked_mean(pg.detach(), mask))}
    if kl is not None:
        kl = kl.masked_fill(pad, 0.0)
        if s.kl_clamp is not None:
            kl = kl.clamp(max=s.kl_clamp)
        adv = advantages if advantages.dim() == 1 else advantages[:, 0]  # [B]
        gate = (adv > 0).to(kl.dtype)[:, None] if s.positive_adv_only else 1.0  # [B, 1]
        per_token = per_token + beta * gate * kl
        metrics["kl_distill"] = float(masked_mean(kl.detach(), mask))
    if t.ref_logp is not None:
        lp, rlp = t.logp.masked_fill(pad, 0.0), t.ref_logp.masked_fill(pad, 0.0)  # [B, T]
        anchor = reference_kl(lp, rlp, s.kl_mode).masked_fill(pad, 0.0)
        per_token = per_token + s.alpha * anchor
        metrics["anchor"] = float(masked_mean(anchor.detach(), mask))  # f(log w): not a KL
        metrics["ref_kl"] = float(masked_mean(k3(lp.detach(), rlp), mask))  # KL(pi_theta || pi_ref)
    loss = aggregate(per_token, mask, s.loss_agg, normalizer)
    metrics.update({k: float(v) for k, v in stats.items()})
    metrics["loss"] = float(loss.detach())
    return loss, metrics


# ---------------------------------------------------------------- the chunked LM head
# Memory engineering, to skip on a first reading: the same divergences, log-probs and
# entropy as above, computed from final hidden states chunk by chunk so that no [N, V]
# logits tensor exists. tests/test_losses.py proves them equal to the naive references.


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a[n, v] b[n, v] without an [n, V] product temporary."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).view(-1)  # [n]


def _chunk_log_softmax(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    """log softmax((h W^T + b) / T) for one chunk in weight's dtype; the logits die here."""
    z = hidden.to(weight.dtype) @ weight.T  # [n, V]
    if bias is not None:
        z += bias
    if temperature != 1.0:
        z /= temperature
    return torch.log_softmax(z, dim=-1)  # [n, V]


# Rows per block of the JSD's elementwise work, so that its mixture log m is never a
# whole chunk wide: the JSD then holds the reverse KL's three [chunk, V] tensors.
JSD_ROWS = 32


def _divergence_chunk(
    log_q: Tensor, log_p: Tensor, p: Tensor, divergence: str, lam: float, value: Tensor | None, grad: bool
) -> tuple[Tensor, Tensor | None]:
    """One chunk of the distillation divergence D [n] and its gradient w.r.t. the
    student's tempered logits z = (h W^T + b) / T, [n, V]:

        reverse  D = sum p (log p - log q)                dD/dz = p (log p - log q - D)
        forward  D = sum q (log q - log p)                dD/dz = p - q
        jsd      D = lam KL(q||m) + (1 - lam) KL(p||m)    dD/dz = (1 - lam) p (log p - log m - KL(p||m))

    with m = (1 - lam) p + lam q (for the JSD's gradient: d/dp_v of D is
    (1 - lam)(log p_v - log m_v), the q_v / m_v terms cancel). The gradient is written
    into log_q's buffer (the teacher's log-probs die here); `value` given (backward
    knows D) skips computing it. Forward's value uses log_p's buffer as scratch.
    """
    if divergence == "reverse":
        diff = torch.sub(log_p, log_q, out=log_q)  # log p - log q
        value = _rowdot(p, diff) if value is None else value
        if grad:
            diff -= value[:, None]
            diff *= p
        return value, diff if grad else None
    if divergence == "forward":
        if value is None:
            torch.sub(log_q, log_p, out=log_p)  # log q - log p, in log p's buffer
            value = _rowdot(log_q.exp_(), log_p)  # log_q now holds q
        else:
            log_q.exp_()
        return value, torch.sub(p, log_q, out=log_q) if grad else None
    out = torch.empty(p.shape[0], dtype=p.dtype, device=p.device) if value is None else value
    for s in range(0, p.shape[0], JSD_ROWS):  # [r, V] blocks: the temporaries stay small
        lq, lp, pb = log_q[s : s + JSD_ROWS], log_p[s : s + JSD_ROWS], p[s : s + JSD_ROWS]
        log_m = torch.add(lq, math.log(lam))  # [r, V]
        torch.logaddexp(log_m, lp + math.log1p(-lam), out=log_m)  # log((1 - lam) p + lam q)
        diff = torch.sub(lp, log_m)  # [r, V] log p - log m
        kl_p = _rowdot(pb, diff)  # [r] KL(p || m)
        if value is None:
            torch.sub(lq, log_m, out=log_m)  # log q - log m
            out[s : s + JSD_ROWS] = lam * _rowdot(lq.exp(), log_m) + (1.0 - lam) * kl_p
        if grad:
            diff -= kl_p[:, None]
            diff *= pb
            lq.copy_(diff).mul_(1.0 - lam)
    return out, log_q if grad else None


def _teacher_head(
    w: Tensor, b: Tensor | None, teacher_weight: Tensor | None, teacher_bias: Tensor | None, dtype
) -> tuple[Tensor, Tensor | None]:
    """The teacher's head in the compute dtype: its own (weight, bias), or the student's."""
    if teacher_weight is None:
        return w, b
    return teacher_weight.to(dtype), None if teacher_bias is None else teacher_bias.to(dtype)


class _ChunkedHead(torch.autograd.Function):
    """Student log-probs, the distillation divergence D(p, SG[q]) and entropy from hidden
    states, chunk by chunk.

    Per token, with z = (h W^T + b) / T, p = softmax(z_student), q = softmax(z_teacher):

        D       (reverse KL, forward KL or JSD)   dD/dz: see _divergence_chunk
        logp[y] = log p(y)                        dlogp[y]/dz = onehot(y) - p
        H       = -sum_v p log p                  dH/dz       = -p * (log p + H)

    and dz/dh = W / T, dz/dW = h / T. The teacher's logits are its own head's, W_q and
    b_q (a full fine-tune's initial or EMA teacher), or the student's W, b when none is
    given (LoRA leaves the head alone). Only [N]- and [N, H]-sized tensors outlive a
    chunk, so memory is O(chunk * V), never O(N * V). Token n's outputs depend on h_n
    alone, so when only the hidden states need a gradient (LoRA: the head is frozen)
    forward also stores the per-token Jacobians dD_n/dh_n and dlogp_n/dh_n ([N, H]
    each; dH_n/dh_n too when the entropy has a gradient, e.g. for an entropy bonus) and
    backward is a weighted sum: no logits are recomputed. When the head weight or bias
    needs a gradient (full fine-tuning), backward recomputes each chunk. The teacher is
    stop-gradient: its hidden states get no gradient and the shared weight is reached
    only through the student branch.
    """

    @staticmethod
    def forward(
        ctx,
        student,
        teacher,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        jacobians,
        entropy_grad,
        divergence,
        lam,
        teacher_weight,
        teacher_bias,
    ):
        dtype = _compute_dtype(student)
        w = weight.to(dtype)  # [V, H]
        b = None if bias is None else bias.to(dtype)
        wq, bq = _teacher_head(w, b, teacher_weight, teacher_bias, dtype)
        n = student.shape[0]
        kl, logp, entropy = (student.new_zeros(n, dtype=dtype) for _ in range(3))  # [N] each
        jac = {}  # name -> [N, H] per-token Jacobian, on the Jacobian path only
        if jacobians:
            names = ["kl", "logp"] + (["entropy"] if entropy_grad else [])
            jac = {k: student.new_zeros(student.shape, dtype=dtype) for k in names}
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            # teacher first: then at most three [n, V] tensors are alive at any moment
            log_q = None if teacher is None else _chunk_log_softmax(teacher[s:e], wq, bq, temperature)
            log_p = _chunk_log_softmax(student[s:e], w, b, temperature)  # [n, V]
            if targets is not None:
                logp[s:e] = log_p.gather(1, targets[s:e, None]).squeeze(1)
            p = log_p.exp()  # [n, V]
            entropy[s:e] = -_rowdot(p, log_p)
            if "entropy" in jac:
                jac["entropy"][s:e] = -((log_p + entropy[s:e, None]) * p) @ w / temperature  # dH/dz W / T
            if log_q is not None:  # log_p's buffer may be scratch after this
                kl[s:e], grad = _divergence_chunk(log_q, log_p, p, divergence, lam, None, bool(jac))
                if jac:
                    jac["kl"][s:e] = (grad @ w) / temperature
            if jac and targets is not None:
                torch.neg(p, out=log_p).scatter_add_(1, targets[s:e, None], torch.ones_like(log_p[:, :1]))
                jac["logp"][s:e] = (log_p @ w) / temperature  # (onehot - p) W / T
        ctx.save_for_backward(
            student, teacher, weight, bias, targets, kl, entropy, teacher_weight, teacher_bias, *jac.values()
        )
        ctx.temperature, ctx.chunk_size, ctx.jacobian_names = temperature, chunk_size, list(jac)
        ctx.divergence, ctx.lam = divergence, lam
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return kl, logp, entropy

    @staticmethod
    def backward(ctx, grad_kl, grad_logp, grad_entropy):
        student, teacher, weight, bias, targets, kl, entropy, teacher_weight, teacher_bias, *jacobians = (
            ctx.saved_tensors
        )
        if jacobians:  # hidden states only: combine the stored Jacobians
            jac = dict(zip(ctx.jacobian_names, jacobians, strict=True))
            grad_h = jac["kl"] * grad_kl[:, None] + jac["logp"] * grad_logp[:, None]  # [N, H]
            if "entropy" in jac and grad_entropy is not None:
                grad_h += jac["entropy"] * grad_entropy[:, None]
            return grad_h.to(student.dtype), *[None] * 12
        T, chunk = ctx.temperature, ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dtype = kl.dtype
        w = weight.to(dtype)  # [V, H]
        b = None if bias is None else bias.to(dtype)
        wq, bq = _teacher_head(w, b, teacher_weight, teacher_bias, dtype)
        grad_h = torch.zeros_like(student, dtype=dtype) if need_h else None  # [N, H]
        grad_w = torch.zeros_like(w) if need_w else None  # [V, H]
        grad_b = torch.zeros_like(b) if need_b else None  # [V]
        for s in range(0, student.shape[0], chunk):
            e = min(s + chunk, student.shape[0])
            h = student[s:e].to(dtype)  # [n, H]
            log_q = None if teacher is None else _chunk_log_softmax(teacher[s:e], wq, bq, T)  # [n, V]
            log_p = _chunk_log_softmax(h, w, b, T)  # [n, V]
            p = log_p.exp()  # [n, V]
            if log_q is not None:
                _, g = _divergence_chunk(log_q, log_p, p, ctx.divergence, ctx.lam, kl[s:e], True)
                g *= grad_kl[s:e, None].to(dtype)  # dD/dz * dL/dD
            else:
                g = torch.zeros_like(p)
            if grad_entropy is not None:
                log_p += entropy[s:e, None]
                log_p *= p
                g.addcmul_(log_p, grad_entropy[s:e, None].to(dtype), value=-1.0)  # dH/dz * dL/dH
            if targets is not None:
                gl = grad_logp[s:e, None].to(dtype)  # [n, 1]
                g.addcmul_(p, gl, value=-1.0)  # - p dlogp
                g.scatter_add_(1, targets[s:e, None], gl)  # + onehot(y) dlogp
            g /= T
            if need_h:
                grad_h[s:e] = g @ w
            if need_w:
                grad_w.addmm_(g.T, h)
            if need_b:
                grad_b += g.sum(0)
        grad_h = grad_h.to(student.dtype) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, None, grad_w, grad_b, *[None] * 9


def chunked_head(
    student_hidden: Tensor,
    weight: Tensor,
    targets: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    entropy_grad: bool = False,
    *,
    divergence: str = "reverse",
    jsd_lambda: float = 0.5,
    teacher_head: tuple[Tensor, Tensor | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One chunked pass over the LM head: (logp [N], kl [N], entropy [N]).

    student_hidden, teacher_hidden: [N, H] final hidden states of the N response tokens
    (already masked and flattened); weight: [V, H]; targets: [N] sampled token ids.
    logp is log p(targets) (zeros if targets is None); kl is the distillation divergence
    D(p, SG[q]) (`divergence`: reverse KL(p || q), the paper's; forward KL(q || p); or
    the generalized JSD at jsd_lambda; zeros if teacher_hidden is None); entropy is
    -sum p log p (with a gradient only when entropy_grad, for an entropy bonus).
    teacher_head: the teacher's own (weight [V, H_q], bias [V] or None), no gradient, H_q
    being teacher_hidden's width; None: the teacher's logits come from the student's head.
    Everything is computed in float32 (float64 stays float64) whatever the input dtype.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    check_divergence(divergence, jsd_lambda)
    teacher = None if teacher_hidden is None else teacher_hidden.detach()
    teacher_weight, teacher_bias = (None, None) if teacher_head is None else teacher_head
    teacher_weight = None if teacher_weight is None else teacher_weight.detach()
    teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    head_needs_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
    jacobians = torch.is_grad_enabled() and student_hidden.requires_grad and not head_needs_grad
    kl, logp, entropy = _ChunkedHead.apply(
        student_hidden,
        teacher,
        weight,
        bias,
        targets,
        temperature,
        chunk_size,
        jacobians,
        entropy_grad,
        divergence,
        jsd_lambda,
        teacher_weight,
        teacher_bias,
    )
    return logp, kl, entropy


def chunked_kl(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    *,
    divergence: str = "reverse",
    jsd_lambda: float = 0.5,
    teacher_head: tuple[Tensor, Tensor | None] | None = None,
) -> Tensor:
    """The distillation divergence per token [N] from hidden states [N, H] and LM head [V, H].

    Equal to divergence_from_logits(h_s W^T + b, h_t W_q^T + b_q, T, ...), with the
    teacher's head (W_q, b_q) = teacher_head or the student's (W, b), but chunked over
    tokens so no [N, V] tensor exists in forward or backward; see _ChunkedHead.
    """
    return chunked_head(
        student_hidden,
        weight,
        None,
        teacher_hidden,
        bias,
        temperature,
        chunk_size,
        divergence=divergence,
        jsd_lambda=jsd_lambda,
        teacher_head=teacher_head,
    )[1]
