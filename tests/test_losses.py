"""losses.py against float64 references written here, term by term."""

import math

import pytest
import torch

from baselines import opsd_loss as opsd_objective
from baselines import rlsd_lambda
from baselines import rlsd_loss as rlsd_objective
from config import Config
from losses import (
    Tokens,
    beta_schedule,
    chunked_head,
    chunked_kl,
    clipped_policy_loss,
    divergence_from_logits,
    forward_kl_from_logits,
    group_advantages,
    jsd_from_logits,
    kl_from_logits,
    reference_kl,
)
from losses import sdpg_loss as sdpg_objective

D = torch.float64


def sdpg_loss(
    lp, olp, adv, mask, kl=None, rlp=None, *, beta=0.0, outcome_weight=1.0, normalizer=None, **knobs
):
    """losses.sdpg_loss with its inputs as plain tensors and its settings as keywords."""
    tokens = Tokens(lp, olp, adv, mask, kl=kl, ref_logp=rlp)
    return sdpg_objective(
        tokens, config(outcome_weight=outcome_weight, **knobs), beta=beta, normalizer=normalizer
    )


def config(agg="token-mean", alpha=0.0, **knobs):
    """A configuration holding the loss's settings (knobs by Config field name; agg: loss_agg)."""
    return Config(loss_agg=agg, alpha=alpha, **knobs)


def opsd_loss(lp, olp, tlp, adv, mask, **knobs):
    return opsd_objective(lp, olp, tlp, adv, mask, config(**knobs))


def rlsd_loss(lp, olp, tlp, adv, mask, *, lam, **knobs):
    return rlsd_objective(lp, olp, tlp, adv, mask, config(**knobs), lam=lam)


def naive_kl(hs, ht, w, b=None, temperature=1.0, divergence="reverse", lam=0.5):
    """The definitions, in float64, one token at a time, with p the student, q the teacher:
    reverse sum_v p (log p - log q); forward sum_v q (log q - log p); jsd
    lam KL(q || m) + (1 - lam) KL(p || m) with m = (1 - lam) p + lam q, summed directly."""
    out = []
    for i in range(hs.shape[0]):
        zs = (w.double() @ hs[i].double() + (0 if b is None else b.double())) / temperature
        zt = (w.double() @ ht[i].double() + (0 if b is None else b.double())) / temperature
        log_p = zs - torch.logsumexp(zs, 0)
        log_q = zt - torch.logsumexp(zt, 0)
        p, q = log_p.exp(), log_q.exp()
        if divergence == "reverse":
            out.append((p * (log_p - log_q)).sum())
        elif divergence == "forward":
            out.append((q * (log_q - log_p)).sum())
        else:
            m = (1 - lam) * p + lam * q
            out.append(lam * (q * (q / m).log()).sum() + (1 - lam) * (p * (p / m).log()).sum())
    return torch.stack(out)


def make_case(n=9, h=6, v=11, seed=0, dtype=D, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hs = (torch.randn(n, h, generator=g, dtype=D) * scale).to(dtype)
    ht = (hs.double() + 0.5 * torch.randn(n, h, generator=g, dtype=D)).to(dtype)
    w = torch.randn(v, h, generator=g, dtype=D).to(dtype)
    b = torch.randn(v, generator=g, dtype=D).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    return hs, ht, w, b, y


# ---------------------------------------------------------------- chunked KL


@pytest.mark.parametrize("chunk", [1, 3, 7, 9, 50])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("head_grad", [False, True], ids=["jacobian-path", "recompute-path"])
@pytest.mark.parametrize("divergence, n", [("reverse", 9), ("forward", 9), ("jsd", 9), ("jsd", 75)])
def test_chunked_kl_matches_logits_path(chunk, use_bias, temperature, head_grad, divergence, n):
    """Every divergence against the materialised logits and the per-token definition:
    values and the gradients of hidden states, head weight and bias; chunks that do not
    divide N; n = 75 spans several of the JSD's 32-row blocks."""
    hs, ht, w, b, y = make_case(n=n)
    b = b if use_bias else None
    lam = 0.3
    ref = naive_kl(hs, ht, w, b, temperature, divergence, lam)
    weights = torch.linspace(0.5, 2.0, hs.shape[0], dtype=D)
    coeff = torch.linspace(-1.0, 1.5, hs.shape[0], dtype=D)
    options = {"divergence": divergence, "jsd_lambda": lam}

    def run(fn):
        h = hs.clone().requires_grad_()
        w1 = w.clone().requires_grad_(head_grad)
        b1 = None if b is None else b.clone().requires_grad_(head_grad)
        logp, kl = fn(h, w1, b1)
        ((kl * weights).sum() + (logp * coeff).sum()).backward()
        return kl, logp, h.grad, w1.grad, None if b1 is None else b1.grad

    def materialised(h, w1, b1):
        zs = h @ w1.T + (0 if b1 is None else b1)
        zt = ht @ w1.T + (0 if b1 is None else b1)
        logp = torch.log_softmax(zs / temperature, -1).gather(1, y[:, None]).squeeze(1)
        return logp, divergence_from_logits(zs, zt, temperature, **options)

    def chunked(h, w1, b1):
        logp, kl, _ = chunked_head(h, w1, y, ht, b1, temperature, chunk_size=chunk, **options)
        return logp, kl

    expected, got = run(materialised), run(chunked)
    torch.testing.assert_close(expected[0], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        chunked_kl(hs, ht, w, b, temperature, chunk_size=chunk, **options), ref, rtol=1e-12, atol=1e-12
    )
    for e, g in zip(expected[1:], got[1:], strict=True):
        if e is None:
            assert g is None
        else:
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_chunked_head_gradcheck_float64():
    hs, ht, w, b, y = make_case(n=5, h=4, v=7)
    coeff = torch.tensor([0.3, -1.2, 0.8, 2.0, -0.5], dtype=D)

    def kl_and_logp(hs, w=w, b=b):
        logp, kl, _ = chunked_head(hs, w, y, ht, b, temperature=0.9, chunk_size=2)
        return kl, logp * coeff

    def logp_only(hs, w, b):
        return chunked_head(hs, w, y, None, b, temperature=0.9, chunk_size=2)[0] * coeff

    hs.requires_grad_()
    assert torch.autograd.gradcheck(kl_and_logp, (hs,), eps=1e-6, atol=1e-8)  # Jacobian path
    # Finite differences move the teacher too when it shares w, so the stop-gradient
    # weight path is checked with no teacher here (and for the KL against the logits
    # path in test_chunked_kl_matches_logits_path).
    w2, b2 = w.clone().requires_grad_(), b.clone().requires_grad_()
    assert torch.autograd.gradcheck(logp_only, (hs, w2, b2), eps=1e-6, atol=1e-8)  # recompute
    assert torch.autograd.gradcheck(
        lambda h: kl_and_logp(h, w2, b2), (hs,), eps=1e-6, atol=1e-8
    )  # recompute path for the KL w.r.t. hidden states


@pytest.mark.parametrize("head_grad", [False, True], ids=["jacobian-path", "recompute-path"])
@pytest.mark.parametrize("with_teacher", [False, True])
def test_entropy_gradient_matches_the_definition(head_grad, with_teacher):
    """d/dh of sum_n c_n H_n + a_n logp_n (+ KL) against autograd through the float64
    definition H = -sum_v p log p, on both backward paths."""
    hs, ht, w, b, y = make_case(n=7, v=10, seed=4)
    a, c = torch.linspace(-1, 1, 7, dtype=D), torch.linspace(0.5, 2.0, 7, dtype=D)

    def objective(fn):
        h, w1, b1 = hs.clone().requires_grad_(), w.clone().requires_grad_(head_grad), b.clone()
        logp, kl, ent = fn(h, w1, b1)
        ((ent * c).sum() + (logp * a).sum() + kl.sum()).backward()
        return ent.detach(), h.grad, w1.grad

    def definition(h, w1, b1):
        log_p = torch.log_softmax((h @ w1.T + b1) / 0.8, -1)
        log_q = torch.log_softmax((ht @ w1.T + b1).detach() / 0.8, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1) if with_teacher else torch.zeros(7, dtype=D)
        return log_p.gather(1, y[:, None]).squeeze(1), kl, -(log_p.exp() * log_p).sum(-1)

    def chunked(h, w1, b1):
        teacher = ht if with_teacher else None
        return chunked_head(h, w1, y, teacher, b1, 0.8, chunk_size=3, entropy_grad=True)

    for expected, got in zip(objective(definition), objective(chunked), strict=True):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    h = hs.clone().requires_grad_()
    entropy_only = lambda x: chunked_head(x, w, y, None, b, 0.8, 3, entropy_grad=True)[2]  # noqa: E731
    assert torch.autograd.gradcheck(entropy_only, (h,), eps=1e-6, atol=1e-8)


def test_entropy_has_no_gradient_unless_asked():
    hs, _, w, b, y = make_case(n=4)
    _, _, ent = chunked_head(hs.clone().requires_grad_(), w, y, None, b)
    assert not ent.requires_grad


def test_chunked_logp_and_entropy_match_log_softmax():
    hs, ht, w, b, y = make_case(n=8, v=13)
    hs1 = hs.clone().requires_grad_()
    logp, kl, ent = chunked_head(hs1, w, y, ht, b, temperature=1.3, chunk_size=3)
    log_p = torch.log_softmax((hs @ w.T + b) / 1.3, -1)
    torch.testing.assert_close(logp, log_p.gather(1, y[:, None]).squeeze(1))
    torch.testing.assert_close(ent, -(log_p.exp() * log_p).sum(-1))
    torch.testing.assert_close(kl, naive_kl(hs, ht, w, b, 1.3))
    # d log p(y) / d h = (onehot(y) - p) W / T
    logp.sum().backward()
    grad = ((torch.nn.functional.one_hot(y, 13) - log_p.exp()) @ w) / 1.3
    torch.testing.assert_close(hs1.grad, grad)


def test_chunked_kl_computes_in_float32_for_bf16_inputs():
    # Student ~ teacher is the normal case in self-distillation, where bf16 logits lose
    # the signal. The chunked path must keep float32 accuracy from bf16 inputs.
    hs, _, w, _, _ = make_case(n=16, h=32, v=64, seed=3, dtype=D)
    ht = hs + 1e-2 * torch.randn_like(hs)
    hs_b, ht_b, w_b = hs.bfloat16(), ht.bfloat16(), w.bfloat16()
    hd = hs_b.double().requires_grad_()
    ref = naive_kl(hd, ht_b.double(), w_b.double())
    ref.sum().backward()
    hs_b.requires_grad_()
    kl = chunked_kl(hs_b, ht_b, w_b, chunk_size=5)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), ref.detach(), rtol=0, atol=2e-6)
    kl.sum().backward()
    assert hs_b.grad.dtype == torch.bfloat16

    def rel_err(g):
        return ((g.double() - hd.grad).norm() / hd.grad.norm()).item()

    assert rel_err(hs_b.grad) < 1e-2  # only the final bf16 rounding of the gradient
    hb = hs_b.detach().clone().requires_grad_()  # what bf16 logits would give instead
    kl_from_logits(hb @ w_b.T, ht_b @ w_b.T).sum().backward()
    assert rel_err(hb.grad) > 5 * rel_err(hs_b.grad)


def test_kl_nonnegative_zero_at_equality_and_teacher_has_no_grad():
    hs, ht, w, b, _ = make_case(n=20, v=17, seed=5, scale=3.0)
    assert (chunked_kl(hs, ht, w, b) >= 0).all()
    assert (kl_from_logits(hs @ w.T, ht @ w.T) >= 0).all()
    torch.testing.assert_close(chunked_kl(hs, hs.clone(), w, b), torch.zeros(20, dtype=D))
    ht_req = ht.clone().requires_grad_()
    hs_req = hs.clone().requires_grad_()
    chunked_kl(hs_req, ht_req, w, b, chunk_size=4).sum().backward()
    assert ht_req.grad is None
    assert hs_req.grad is not None and hs_req.grad.abs().sum() > 0
    ht_req2 = ht.clone().requires_grad_()
    kl_from_logits(hs_req @ w.T, ht_req2 @ w.T).sum().backward()
    assert ht_req2.grad is None


def test_weight_gradient_only_through_student_branch():
    # If the teacher branch leaked gradient into the shared weight, dW would change.
    hs, ht, w, _, _ = make_case(n=6, v=9, seed=7)
    w1 = w.clone().requires_grad_()
    chunked_kl(hs, ht, w1, chunk_size=4).sum().backward()
    w2 = w.clone().requires_grad_()
    log_p = torch.log_softmax(hs @ w2.T, -1)
    log_q = torch.log_softmax(ht @ w.T, -1)  # a separate constant copy: no path to w2
    (log_p.exp() * (log_p - log_q)).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)


def test_gradient_identity_wrt_logits():
    # dKL/dz = p * (log p - log q - KL) / T, at T != 1
    g = torch.Generator().manual_seed(11)
    zs = torch.randn(4, 10, generator=g, dtype=D, requires_grad=True)
    zt = torch.randn(4, 10, generator=g, dtype=D)
    T = 1.7
    kl = kl_from_logits(zs, zt, T)
    kl.sum().backward()
    log_p = torch.log_softmax(zs.detach() / T, -1)
    log_q = torch.log_softmax(zt / T, -1)
    expected = log_p.exp() * (log_p - log_q - kl.detach()[:, None]) / T
    torch.testing.assert_close(zs.grad, expected)


def test_local_policy_gradient_view_by_enumeration():
    # With the teacher detached, grad KL(p||q) = E_{a~p}[grad log p(a) (log p(a) - log q(a))].
    g = torch.Generator().manual_seed(12)
    h, v = 5, 6
    w = torch.randn(v, h, generator=g, dtype=D)
    theta = torch.randn(h, generator=g, dtype=D, requires_grad=True)
    teacher_h = torch.randn(h, generator=g, dtype=D)
    kl = chunked_kl(theta[None], teacher_h[None], w)[0]
    (grad_kl,) = torch.autograd.grad(kl, theta)
    log_q = torch.log_softmax(w @ teacher_h, 0)
    expected = torch.zeros(h, dtype=D)
    for a in range(v):
        log_p = torch.log_softmax(w @ theta, 0)
        (grad_log_pa,) = torch.autograd.grad(log_p[a], theta)
        expected += log_p[a].exp().detach() * grad_log_pa * (log_p[a].detach() - log_q[a])
    torch.testing.assert_close(grad_kl, expected)


@pytest.mark.parametrize("divergence", ["reverse", "forward", "jsd"])
def test_every_divergence_passes_gradcheck_and_keeps_the_teacher_a_stop_gradient(divergence):
    hs, ht, w, b, y = make_case(n=6, h=4, v=7, seed=9)
    options = {"divergence": divergence, "jsd_lambda": 0.35}
    coeff = torch.linspace(-1.0, 2.0, 6, dtype=D)

    def objective(h, w1=w, b1=b):
        logp, kl, _ = chunked_head(h, w1, y, ht, b1, temperature=0.8, chunk_size=4, **options)
        return kl, logp * coeff

    h = hs.clone().requires_grad_()
    assert torch.autograd.gradcheck(objective, (h,), eps=1e-6, atol=1e-8)  # Jacobian path
    w2, b2 = w.clone().requires_grad_(), b.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: objective(x, w2, b2), (h,), eps=1e-6, atol=1e-8)  # recompute
    # the teacher gets no gradient, and the shared head only the student branch's
    t = ht.clone().requires_grad_()
    w3 = w.clone().requires_grad_()
    chunked_kl(hs, t, w3, b, 0.8, 4, **options).sum().backward()
    assert t.grad is None
    w4 = w.clone().requires_grad_()
    divergence_from_logits(hs @ w4.T + b, ht @ w.T + b, 0.8, **options).sum().backward()  # teacher constant
    torch.testing.assert_close(w3.grad, w4.grad, rtol=1e-10, atol=1e-12)


def test_forward_kl_and_jsd_are_zero_only_at_equality_and_jsd_tends_to_each_kl():
    hs, ht, w, b, _ = make_case(n=20, v=17, seed=5, scale=3.0)
    zs, zt = hs @ w.T + b, ht @ w.T + b
    for name in ("forward", "jsd"):
        torch.testing.assert_close(
            chunked_kl(hs, hs.clone(), w, b, divergence=name), torch.zeros(20, dtype=D)
        )
        assert (chunked_kl(hs, ht, w, b, divergence=name) > 1e-6).all()  # every token's p differs from q
    jsd_half = jsd_from_logits(zs, zt, 1.0, 0.5)
    assert (jsd_half <= math.log(2) + 1e-12).all()  # the symmetric JSD is bounded by log 2
    # TRL's ends: JSD / lam -> forward KL(q || p) as lam -> 0, JSD / (1 - lam) -> reverse as lam -> 1
    for lam in (1e-7, 1e-9):  # the limit is O(lam max q/p) away: these peaked tokens need a small lam
        torch.testing.assert_close(
            jsd_from_logits(zs, zt, 1.0, lam) / lam, forward_kl_from_logits(zs, zt), rtol=2e-3, atol=1e-9
        )
        torch.testing.assert_close(
            jsd_from_logits(zs, zt, 1.0, 1 - lam) / lam, kl_from_logits(zs, zt), rtol=2e-3, atol=1e-9
        )
    with pytest.raises(ValueError, match="0 < jsd_lambda < 1"):
        chunked_kl(hs, ht, w, divergence="jsd", jsd_lambda=1.0)
    with pytest.raises(ValueError, match="unknown divergence"):
        chunked_kl(hs, ht, w, divergence="hellinger")


@pytest.mark.parametrize("divergence", ["reverse", "forward", "jsd"])
def test_padded_rows_score_only_their_response_tokens(divergence):
    """score_tokens on [B, T] with padding that holds garbage: valid tokens equal the
    per-token definition, padded ones are 0 and get no gradient."""
    from torch import nn

    from rollout import score_tokens

    hs, ht, w, b, y = make_case(n=12, h=5, v=9, seed=13)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])  # [B, T]: row 0 ended early
    h = hs.view(2, 6, 5).clone()
    h[0, 4:] = 1e4  # garbage where there is no token
    h.requires_grad_()
    head = nn.Linear(5, 9, dtype=D)
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(b)
    head.requires_grad_(False)
    logp, kl, _ = score_tokens(head, h, y.view(2, 6), mask, ht.view(2, 6, 5), 0.9, 5, divergence=divergence)
    valid = mask.bool().view(-1)
    expected = naive_kl(hs[valid], ht[valid], w, b, 0.9, divergence)
    torch.testing.assert_close(kl.view(-1)[valid], expected, rtol=1e-12, atol=1e-12)
    assert (kl[0, 4:] == 0).all() and (logp[0, 4:] == 0).all()
    (kl.sum() + logp.sum()).backward()
    assert (h.grad[0, 4:] == 0).all() and h.grad[0, :4].abs().sum() > 0


def test_chunk_size_must_be_positive():
    hs, ht, w, _, _ = make_case()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_kl(hs, ht, w, chunk_size=0)


# ---------------------------------------------------------------- advantages


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], dtype=D)
    adv = group_advantages(r, 4, eps=0.0)
    # group [1,0,0,1]: mean 0.5, unbiased std sqrt(1/3)
    s = math.sqrt(1 / 3)
    # group [0,0,0,1]: mean .25, unbiased std sqrt((3*.0625+.5625)/3) = 0.5
    expected = torch.tensor([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, -0.5, -0.5, -0.5, 1.5], dtype=D)
    torch.testing.assert_close(adv, expected)
    dr = group_advantages(r, 4, scale_by_std=False)
    torch.testing.assert_close(dr, torch.tensor([0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75], dtype=D))
    adv_eps = group_advantages(r[:4], 4, eps=0.1)
    torch.testing.assert_close(adv_eps, torch.tensor([1, -1, -1, 1], dtype=D) * 0.5 / (s + 0.1))


def test_group_advantages_degenerate_groups_are_zero():
    r = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5])
    adv = group_advantages(r, 3)
    assert torch.equal(adv[:6], torch.zeros(6))
    assert adv[6:].abs().sum() > 0


def test_group_advantages_bad_sizes():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.ones(5), 2)


# ---------------------------------------------------------------- dual clip


def ppo_reference(lp, olp, a, el=0.2, eh=0.28, c=10.0):
    r = math.exp(min(max(lp - olp, -20.0), 20.0))  # the authors clamp the log-ratio to +-20
    loss = max(-a * r, -a * min(max(r, 1 - el), 1 + eh))
    return min(loss, c * abs(a)) if a < 0 else loss


@pytest.mark.parametrize(
    "ratio, adv, region",
    [
        (1.1, 2.0, "unclipped"),
        (1.5, 2.0, "A>0 clipped high"),
        (0.5, 2.0, "A>0 below range: not clipped"),
        (0.5, -1.0, "A<0 clipped low"),
        (1.1, -1.0, "A<0 inside"),
        (3.0, -1.0, "A<0 ratio high, under c"),
        (20.0, -1.0, "A<0 ratio > c: dual clip"),
    ],
)
def test_dual_clip_regions(ratio, adv, region):
    lp = torch.tensor([[math.log(ratio)]], dtype=D, requires_grad=True)
    olp = torch.zeros(1, 1, dtype=D)
    loss, stats = clipped_policy_loss(lp, olp, torch.tensor([adv], dtype=D), torch.ones(1, 1))
    expected = ppo_reference(math.log(ratio), 0.0, adv)
    assert loss.item() == pytest.approx(expected, rel=1e-12), region
    hand = {
        "unclipped": -2.2,
        "A>0 clipped high": -2 * 1.28,
        "A>0 below range: not clipped": -1.0,
        "A<0 clipped low": 0.8,
        "A<0 inside": 1.1,
        "A<0 ratio high, under c": 3.0,
        "A<0 ratio > c: dual clip": 10.0,
    }[region]
    assert loss.item() == pytest.approx(hand, rel=1e-12)
    loss.sum().backward()
    clipped = region in ("A>0 clipped high", "A<0 clipped low", "A<0 ratio > c: dual clip")
    assert (lp.grad.abs().item() == 0) == clipped  # clipped tokens carry no gradient
    assert stats["clipfrac_lower"].item() == (1.0 if "dual" in region else 0.0)


@pytest.mark.parametrize(
    "log_ratio, adv", [(19.5, -1.0), (25.0, -1.0), (1000.0, -1.0), (-19.5, 1.0), (-25.0, 1.0)]
)
def test_log_ratio_is_clamped_at_20(log_ratio, adv):
    """Beyond +-20 the ratio is e^+-20 and carries no gradient; inside it does. With c = inf
    the dual clip does not hide the clamp; A > 0 below 1 - eps is not PPO-clipped."""
    lp = torch.tensor([[log_ratio]], dtype=D, requires_grad=True)
    olp = torch.zeros(1, 1, dtype=D)
    a = torch.tensor([adv], dtype=D)
    loss, _ = clipped_policy_loss(lp, olp, a, torch.ones(1, 1), clip_c=math.inf)
    expected = -adv * math.exp(min(max(log_ratio, -20.0), 20.0))
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(expected, rel=1e-12)
    loss.sum().backward()
    inside = abs(log_ratio) < 20
    assert (lp.grad.item() != 0) == inside
    if inside:
        assert lp.grad.item() == pytest.approx(expected, rel=1e-12)  # d(-A e^x)/dx = -A e^x


def test_policy_loss_token_advantages_and_mask():
    g = torch.Generator().manual_seed(1)
    lp = torch.randn(3, 5, generator=g, dtype=D) * 0.3
    olp = torch.randn(3, 5, generator=g, dtype=D) * 0.3
    adv = torch.randn(3, 5, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=D)
    loss, _ = clipped_policy_loss(lp, olp, adv, mask)
    for i in range(3):
        for t in range(5):
            ref = ppo_reference(lp[i, t].item(), olp[i, t].item(), adv[i, t].item()) * mask[i, t].item()
            assert loss[i, t].item() == pytest.approx(ref, abs=1e-12)


# ---------------------------------------------------------------- reference anchor


@pytest.mark.parametrize("log_w", [-1.3, -0.2, 0.0, 0.4, 2.1])
def test_reference_kl_values_and_derivatives(log_w):
    ref_logp = torch.tensor([-2.0], dtype=D)
    w = math.exp(log_w)
    cases = {
        "fkl": (1 / w, -1 / w),
        "rkl": (0.5 * (log_w + 1) ** 2, log_w + 1),
        "ufkl": (1 / w + log_w, 1 - 1 / w),
        "urkl": (0.5 * log_w**2, log_w),
    }
    for mode, (value, deriv) in cases.items():
        lp = (ref_logp + log_w).clone().requires_grad_()
        out = reference_kl(lp, ref_logp, mode)
        out.backward()
        assert out.item() == pytest.approx(value, rel=1e-12, abs=1e-15), mode
        assert lp.grad.item() == pytest.approx(deriv, rel=1e-12, abs=1e-15), mode


def test_reference_kl_unknown_mode():
    with pytest.raises(ValueError, match="fkl, rkl, ufkl, urkl"):
        reference_kl(torch.zeros(1), torch.zeros(1), "k3")


# ---------------------------------------------------------------- beta schedule


def test_beta_schedule():
    assert beta_schedule(0, 100, 0.5) == 0.5
    assert beta_schedule(0, 100, 0.5, warmup_steps=10) == 0.0
    assert beta_schedule(5, 100, 0.5, warmup_steps=10) == pytest.approx(0.25)
    assert beta_schedule(10, 100, 0.5, warmup_steps=10) == pytest.approx(0.5)
    assert beta_schedule(50, 100, 0.5, warmup_steps=10, decay_steps=20) == pytest.approx(0.5)
    assert beta_schedule(90, 100, 0.5, warmup_steps=10, decay_steps=20) == pytest.approx(0.25)
    assert beta_schedule(100, 100, 0.5, warmup_steps=10, decay_steps=20) == 0.0
    assert beta_schedule(120, 100, 0.5, decay_steps=20) == 0.0
    assert beta_schedule(3, 10, 1.0, warmup_steps=4, decay_steps=8) == pytest.approx(0.75 * 0.875)


# ---------------------------------------------------------------- combined loss


def batch(seed=0, b=4, t=6):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(b, t, generator=g, dtype=D) * 3).requires_grad_()
    olp = lp.detach() + 0.1 * torch.randn(b, t, generator=g, dtype=D)
    rlp = lp.detach() + 0.3 * torch.randn(b, t, generator=g, dtype=D)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=D)[:b]
    kl = torch.rand(b, t, generator=g, dtype=D).requires_grad_()
    mask = torch.ones(b, t, dtype=D)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    return lp, olp, rlp, adv, kl, mask


def naive_sdpg(lp, olp, rlp, adv, kl, mask, beta, alpha, w_pg, gate, agg="token-mean"):
    total, rows = 0.0, []
    for i in range(lp.shape[0]):
        row = 0.0
        for t in range(lp.shape[1]):
            if mask[i, t] == 0:
                continue
            lw = lp[i, t].item() - rlp[i, t].item()
            g = 1.0 if (not gate or adv[i] > 0) else 0.0
            term = w_pg * ppo_reference(lp[i, t].item(), olp[i, t].item(), adv[i].item())
            term += beta * g * kl[i, t].item() + alpha * 0.5 * lw**2
            total += term
            row += term
        rows.append(row / max(1, mask[i].sum().item()))
    if agg == "token-mean":
        return total / mask.sum().item()
    return sum(rows) / len(rows)


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("w_pg, beta, alpha", [(1.0, 0.0, 0.0), (1.0, 0.3, 0.2), (0.0, 1.0, 0.0)])
def test_sdpg_loss_matches_naive(gate, agg, w_pg, beta, alpha):
    lp, olp, rlp, adv, kl, mask = batch()
    loss, metrics = sdpg_loss(
        lp,
        olp,
        adv,
        mask,
        kl,
        rlp,
        beta=beta,
        alpha=alpha,
        outcome_weight=w_pg,
        positive_adv_only=gate,
        agg=agg,
    )
    expected = naive_sdpg(lp, olp, rlp, adv, kl, mask, beta, alpha, w_pg, gate, agg)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-12)
    assert set(metrics) >= {"pg_loss", "kl_distill", "ref_kl", "clipfrac"}


def test_sdpg_with_zero_beta_alpha_is_grpo():
    lp, olp, rlp, adv, kl, mask = batch(seed=3)
    loss, _ = sdpg_loss(lp, olp, adv, mask, kl, rlp, beta=0.0, alpha=0.0)
    pg, _ = clipped_policy_loss(lp, olp, adv, mask)
    grpo = pg.sum() / mask.sum()
    assert loss.item() == pytest.approx(grpo.item(), rel=1e-14)
    (g1,) = torch.autograd.grad(loss, lp)
    (g2,) = torch.autograd.grad(grpo, lp)
    torch.testing.assert_close(g1, g2)


def test_masked_tokens_change_neither_loss_nor_gradient():
    lp, olp, rlp, adv, kl, mask = batch(seed=4)
    kwargs = dict(beta=0.5, alpha=0.1)
    loss1, _ = sdpg_loss(lp, olp, adv, mask, kl, rlp, **kwargs)
    g1 = torch.autograd.grad(loss1, (lp, kl))
    junk = (1 - mask) * 1e3  # garbage in every padded position
    lp2 = (lp.detach() + junk).requires_grad_()
    kl2 = (kl.detach() + junk).requires_grad_()
    loss2, _ = sdpg_loss(lp2, olp - junk, adv, mask, kl2, rlp + junk, **kwargs)
    g2 = torch.autograd.grad(loss2, (lp2, kl2))
    assert loss2.item() == pytest.approx(loss1.item(), rel=1e-12)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)
        assert (b[mask == 0] == 0).all()


def test_positive_gate_blocks_kl_gradient_for_nonpositive_advantage():
    lp, olp, rlp, adv, kl, mask = batch(seed=5)
    loss, _ = sdpg_loss(lp, olp, adv, mask, kl, beta=1.0, positive_adv_only=True)
    (gkl,) = torch.autograd.grad(loss, kl)
    assert (gkl[adv <= 0] == 0).all()
    assert (gkl[adv > 0][mask[adv > 0] > 0] > 0).all()


def test_normalizer_makes_micro_batches_sum_to_batch_loss():
    lp, olp, rlp, adv, kl, mask = batch(seed=6)
    full, _ = sdpg_loss(lp, olp, adv, mask, kl, rlp, beta=0.2, alpha=0.1)
    total = mask.sum().item()
    parts = sum(
        sdpg_loss(
            lp[i : i + 1],
            olp[i : i + 1],
            adv[i : i + 1],
            mask[i : i + 1],
            kl[i : i + 1],
            rlp[i : i + 1],
            beta=0.2,
            alpha=0.1,
            normalizer=total,
        )[0]
        for i in range(4)
    )
    assert parts.item() == pytest.approx(full.item(), rel=1e-12)


@pytest.mark.parametrize("kl_clamp", [20.0, None])
def test_distillation_kl_is_clamped_at_20(kl_clamp):
    lp = torch.zeros(1, 3, dtype=D, requires_grad=True)
    kl = torch.tensor([[19.5, 20.0, 25.0]], dtype=D, requires_grad=True)
    adv, mask = torch.zeros(1, dtype=D), torch.ones(1, 3, dtype=D)
    loss, metrics = sdpg_loss(lp, lp.detach(), adv, mask, kl, beta=0.5, kl_clamp=kl_clamp)
    seen = [min(k, kl_clamp or math.inf) for k in (19.5, 20.0, 25.0)]
    assert loss.item() == pytest.approx(0.5 * sum(seen) / 3, rel=1e-12)
    assert metrics["kl_distill"] == pytest.approx(sum(seen) / 3, rel=1e-12)
    (g,) = torch.autograd.grad(loss, kl)
    expected = [0.5 / 3, 0.5 / 3, 0.0 if kl_clamp else 0.5 / 3]  # the boundary value keeps its gradient
    torch.testing.assert_close(g, torch.tensor([expected], dtype=D))


def test_sdpg_loss_missing_inputs_are_errors():
    lp, olp, rlp, adv, kl, mask = batch()
    with pytest.raises(ValueError, match="beta"):
        sdpg_loss(lp, olp, adv, mask, None, rlp, beta=0.1)
    with pytest.raises(ValueError, match="alpha"):
        sdpg_loss(lp, olp, adv, mask, kl, None, alpha=0.1)
    with pytest.raises(ValueError, match="token-mean"):
        sdpg_loss(lp, olp, adv, mask, agg="sum")


# ---------------------------------------------------------------- OPSD and RLSD


def baseline_case(seed=0):
    """[3, 6] log-probs with padding, a NaN teacher token, and gaps and log-ratios at and
    beyond the +-20 clamps."""
    g = torch.Generator().manual_seed(seed)
    olp = -torch.rand(3, 6, generator=g, dtype=D) * 3
    lp = (olp + 0.4 * torch.randn(3, 6, generator=g, dtype=D)).detach()
    lp[0, 1], lp[1, 2] = olp[0, 1] + 25.0, olp[1, 2] - 20.0  # log-ratio beyond / at the clamp
    tlp = olp + 2.0 * torch.randn(3, 6, generator=g, dtype=D)
    tlp[0, 0], tlp[0, 2], tlp[1, 0] = olp[0, 0] + 20.0, olp[0, 2] + 30.0, olp[1, 0] - 30.0
    tlp[2, 1] = float("nan")
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=D)
    return lp.requires_grad_(), olp, tlp, mask


def clamp(x, lo, hi):
    return min(max(x, lo), hi)


def naive_opsd(lp, olp, tlp, adv, mask, el=0.2, eh=0.28):
    """The authors' formula token by token: mean over tokens of responses with A > 0."""
    terms = []
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if mask[i, t] == 0 or adv[i] <= 0:
                continue
            gap = tlp[i, t].item() - olp[i, t].item()
            w = clamp(0.0 if math.isnan(gap) else gap, 0.0, 20.0)
            r = torch.exp((lp[i, t] - olp[i, t]).clamp(-20, 20))
            terms.append(-w * torch.minimum(r, r.clamp(1 - el, 1 + eh)))
    return torch.stack(terms).sum() / len(terms) if terms else torch.zeros((), dtype=D)


def naive_rlsd(lp, olp, tlp, adv, mask, lam, eps_w=0.2, el=0.2, eh=0.28, c=10.0):
    terms = []
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if mask[i, t] == 0:
                continue
            gap = tlp[i, t].item() - olp[i, t].item()
            delta = clamp(0.0 if math.isnan(gap) else gap, -20.0, 20.0)
            a = adv[i].item()
            w = math.exp(clamp(math.copysign(1.0, a) * delta if a else 0.0, -20.0, 20.0))
            mixed = (1 - lam) * a + lam * a * clamp(w, 1 - eps_w, 1 + eps_w)
            r = torch.exp((lp[i, t] - olp[i, t]).clamp(-20, 20))
            ppo = torch.maximum(-mixed * r, -mixed * r.clamp(1 - el, 1 + eh))
            terms.append(torch.minimum(ppo, torch.tensor(-mixed * c, dtype=D)) if mixed < 0 else ppo)
    return torch.stack(terms).sum() / len(terms)


@pytest.mark.parametrize("adv", [[1.0, -0.5, 2.0], [0.0, -1.0, 0.0], [0.7, 0.7, 0.7]])
def test_opsd_loss_matches_the_authors_formula(adv):
    lp, olp, tlp, mask = baseline_case()
    adv = torch.tensor(adv, dtype=D)
    loss, metrics = opsd_loss(lp, olp, tlp, adv, mask)
    expected = naive_opsd(lp, olp, tlp, adv, mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-15)
    (g,) = torch.autograd.grad(loss, lp)
    if (adv > 0).any():
        (g_ref,) = torch.autograd.grad(expected, lp)
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-15)
        assert torch.isfinite(g).all() and metrics["opsd_weight"] >= 0
    assert (g[adv <= 0] == 0).all() and (g[mask == 0] == 0).all()  # the reward gate, padding
    assert math.isfinite(loss.item())


def test_opsd_weight_clamps_at_0_and_20():
    lp = torch.zeros(1, 4, dtype=D, requires_grad=True)
    olp = torch.zeros(1, 4, dtype=D)
    tlp = torch.tensor([[-3.0, 20.0, 25.0, float("nan")]], dtype=D)
    loss, metrics = opsd_loss(lp, olp, tlp, torch.ones(1, dtype=D), torch.ones(1, 4, dtype=D))
    assert metrics["opsd_weight"] == pytest.approx((0 + 20 + 20 + 0) / 4)
    assert loss.item() == pytest.approx(-40 / 4)  # ratio 1


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("adv", [[1.0, -0.5, 2.0], [0.0, -1.0, 0.3]])
def test_rlsd_loss_matches_the_authors_formula(lam, adv):
    lp, olp, tlp, mask = baseline_case(seed=1)
    adv = torch.tensor(adv, dtype=D)
    loss, metrics = rlsd_loss(lp, olp, tlp, adv, mask, lam=lam)
    expected = naive_rlsd(lp, olp, tlp, adv, mask, lam)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-15)
    (g,) = torch.autograd.grad(loss, lp)
    (g_ref,) = torch.autograd.grad(expected, lp)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-15)
    assert (g[mask == 0] == 0).all() and 0 <= metrics["rlsd_weight_clipfrac"] <= 1


def test_rlsd_with_lambda_0_is_the_dapo_loss():
    lp, olp, tlp, mask = baseline_case(seed=2)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=D)
    loss, _ = rlsd_loss(lp, olp, tlp, adv, mask, lam=0.0)
    pg, _ = clipped_policy_loss(lp, olp, adv, mask)
    assert loss.item() == pytest.approx((pg.sum() / mask.sum()).item(), rel=1e-14)


def test_rlsd_lambda_decays_linearly_to_zero():
    assert rlsd_lambda(1, 0.5, 50) == pytest.approx(0.49)
    assert rlsd_lambda(25, 0.5, 50) == pytest.approx(0.25)
    assert rlsd_lambda(50, 0.5, 50) == 0.0 and rlsd_lambda(80, 0.5, 50) == 0.0
    assert rlsd_lambda(80, 0.5, 0) == 0.5  # K = 0: constant


def test_what_each_anchor_mode_estimates_in_expectation_over_the_policy():
    """Exactly, over a 6-token vocabulary in float64: E_{y ~ pi_theta}[f'(log w) grad log
    pi_theta(y)] is grad KL(pi_ref || pi_theta) for fkl and ufkl and grad KL(pi_theta ||
    pi_ref) for rkl and urkl; E[fkl] = 1, E[ufkl] = 1 + KL(pi_theta || pi_ref), E[k3] = KL."""
    from losses import k3

    g = torch.Generator().manual_seed(5)
    z = torch.randn(6, generator=g, dtype=D).requires_grad_()
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=D), 0)
    logp = torch.log_softmax(z, 0)
    p = logp.exp().detach()
    reverse = (logp.exp() * (logp - ref)).sum()  # KL(pi_theta || pi_ref)
    forward = (ref.exp() * (ref - logp)).sum()  # KL(pi_ref || pi_theta)
    grads = {name: torch.autograd.grad(kl, z, retain_graph=True)[0] for name, kl in
             (("reverse", reverse), ("forward", forward))}  # fmt: skip
    for mode, target in (("fkl", "forward"), ("ufkl", "forward"), ("rkl", "reverse"), ("urkl", "reverse")):
        per_token = reference_kl(logp, ref, mode)  # [V]: f at each possible sampled token
        expected = sum(p[y] * torch.autograd.grad(per_token[y], z, retain_graph=True)[0] for y in range(6))
        torch.testing.assert_close(expected, grads[target], rtol=1e-10, atol=1e-12)
    value = lambda mode: float((p * reference_kl(logp, ref, mode)).sum())  # noqa: E731
    assert value("fkl") == pytest.approx(1.0, rel=1e-12)
    assert value("ufkl") == pytest.approx(1.0 + reverse.item(), rel=1e-12)
    assert float((p * k3(logp, ref)).sum()) == pytest.approx(reverse.item(), rel=1e-12)


@pytest.mark.parametrize("mode", ["fkl", "rkl", "ufkl", "urkl"])
def test_logged_ref_kl_reads_zero_when_the_policy_is_the_reference(mode):
    lp = torch.tensor([[-1.0, -0.5, -2.0]], dtype=D)
    mask, adv = torch.ones(1, 3, dtype=D), torch.ones(1, dtype=D)
    _, same = sdpg_loss(lp, lp, adv, mask, None, lp.clone(), alpha=0.1, kl_mode=mode)
    assert same["ref_kl"] == 0.0
    _, moved = sdpg_loss(lp, lp, adv, mask, None, lp + 0.3, alpha=0.1, kl_mode=mode)
    assert moved["ref_kl"] == pytest.approx(math.exp(0.3) - 1 - 0.3, rel=1e-12)


def test_the_contrast_teachers_kl_gradient_is_a_policy_gradient_of_the_log_ratio():
    """With p detached inside q' ∝ p q_right / q_wrong, grad_z KL(p || SG[q']) equals
    -grad_z E_p[log q_right - log q_wrong] (the ratio held fixed), exactly, in float64:
    a reward on tokens, not a distribution to match."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(3, 7, generator=g, dtype=D).requires_grad_()
    log_right, log_wrong = (torch.log_softmax(torch.randn(3, 7, generator=g, dtype=D), -1) for _ in range(2))
    tilted = z.detach() + log_right - log_wrong  # z' = z_student + z_right - z_wrong, up to constants
    (kl_grad,) = torch.autograd.grad(kl_from_logits(z, tilted).sum(), z)
    p = torch.softmax(z, -1)
    (reward_grad,) = torch.autograd.grad((p * (log_right - log_wrong)).sum(), z)
    torch.testing.assert_close(kl_grad, -reward_grad, rtol=0, atol=1e-15)
