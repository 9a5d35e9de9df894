"""sdpg.py: the training step on the tiny offline model, against independent references."""

import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
from conftest import SMALL_RUN, load_small_policy, small_args
from transformers import AutoModelForCausalLM

import baselines
import sdpg
from config import TINY_RIGHT_SHARE, WARM_START_STEPS
from harness import cli, evaluation
from harness.data import arithmetic_split, with_wrong_answers
from harness.loading import resolve_model_path
from harness.optim import Optimizer
from harness.tiny_model import entry_name
from losses import kl_from_logits, loss_normalizer
from rollout import EmaWeights, response_logprobs, rollout
from verifier import Verdict, reward

EXAMPLES = arithmetic_split(4, "train", seed=1)


def varied_reward(completion: str, gold: str) -> Verdict:
    """A random model is never right; this verdict still splits every group."""
    return Verdict(float(len(completion) % 2), None, "none", "")


def accumulate(policy, batch, cfg, beta, adv, ref_logp=None, old_logp=None):
    """Stage 4 of sdpg_step on a given batch: each micro-batch's loss (teacher, then
    student) and backward, the mini-batch's token-mean; returns the summed loss."""
    batch.advantages, batch.ref_logp, batch.old_logp = adv, ref_logp, old_logp
    mask = batch.response_mask
    normalizer, tokens, total = loss_normalizer(mask, cfg.loss_agg), max(1.0, float(mask.sum())), 0.0
    for s in range(0, mask.shape[0], cfg.micro_batch):
        mb = batch.rows(slice(s, s + cfg.micro_batch))
        distill = beta > 0 or cfg.outcome_weight == 0
        teacher = sdpg.teacher_pass(policy, mb, cfg) if distill else None
        loss, metrics, _ = sdpg.micro_batch_loss(policy, mb, cfg, beta, teacher, normalizer, tokens)
        loss.backward()
        total += metrics["loss"]
    return total


def make_args(tiny_path, *extra: str):
    return small_args(tiny_path, "--micro-batch", "3", "--steps", "2", *extra)


def split_params(model):
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    return lora, base


def run_steps(args, n=2, reward_fn=varied_reward):
    torch.manual_seed(0)  # the LoRA initialisation
    policy = load_small_policy(args)
    optimizer = Optimizer(policy.model.parameters(), args.lr, args.weight_decay)
    before = split_params(policy.model)
    metrics = []
    step_fn = baselines.baseline_step if args.algo in ("opsd", "rlsd") else sdpg.sdpg_step
    for step in range(n):
        examples = EXAMPLES[2 * step : 2 * step + 2]
        metrics.append(step_fn(policy, optimizer, examples, step, args, reward_fn)[0])
    return policy.model, policy.tokenizer, before, metrics


@pytest.mark.parametrize("algo", ["sdpg", "grpo", "opd", "opsd", "rlsd"])
def test_two_steps_change_lora_and_leave_base_untouched(tiny_path, algo):
    anchor = ["--alpha", "0.01"] if algo in ("sdpg", "grpo", "opd") else []
    args = make_args(tiny_path, "--algo", algo, *anchor)
    model, tok, (lora0, base0), metrics = run_steps(args)
    lora1, base1 = split_params(model)
    assert lora0 and all(torch.equal(base0[n], base1[n]) for n in base0)
    assert any(not torch.equal(lora0[n], lora1[n]) for n in lora0)
    for m in metrics:
        assert m["skipped_step"] == 0.0 and torch.isfinite(torch.tensor(m["loss"]))
        assert ("kl_distill" in m) == (algo in ("sdpg", "opd"))
        if algo in ("sdpg", "grpo", "opd"):
            assert m["beta"] == (0.0 if algo == "grpo" else args.beta)
    if algo == "opsd":
        assert all(0 <= m["opsd_gate"] <= 1 and m["opsd_weight"] >= 0 for m in metrics)
    if algo == "rlsd":
        assert [m["rlsd_lambda"] for m in metrics] == pytest.approx([0.5 * 49 / 50, 0.5 * 48 / 50])
    # the reference (adapter off) is still exactly the base model
    base_model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    batch = rollout(base_model, tok, EXAMPLES[:2], 2, 6, seed=0)
    with model.disable_adapter():
        ref = response_logprobs(model, batch, 1.0)
    torch.testing.assert_close(ref, response_logprobs(base_model, batch, 1.0), rtol=0, atol=1e-6)
    assert not torch.allclose(response_logprobs(model, batch, 1.0), ref)  # the adapter did learn


def full_logits(model, batch, ids, mask):
    """Logits [B, T, V] in float64 at each response position, prompt `ids` then the response."""
    full, m = torch.cat([ids, batch.response_ids], 1), torch.cat([mask, batch.response_mask], 1)
    out = model(input_ids=full, attention_mask=m, position_ids=(m.cumsum(1) - 1).clamp(min=0)).logits
    return out[:, ids.shape[1] - 1 : -1].double()  # [B, T, V]


def spread_lora_b(model):
    """A fixed, non-zero adapter (LoRA B starts at 0), so the adapter changes the output."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))


def naive_loss(
    model,
    batch,
    adv,
    beta,
    alpha,
    ref_logp,
    outcome=1.0,
    teacher="live",
    old_logp=None,
    ema=None,
    divergence="reverse",
):
    """The SDPG loss from full [B, T, V] logits in float64, written independently.
    teacher="initial": the model with its adapter switched off; "ema": the model with the
    trainable weights replaced by `ema` (name -> tensor). old_logp: pi_old for an
    off-policy ratio with DAPO's dual clip (None: on-policy, ratio 1). divergence: the
    distillation term, reverse KL(p||q), forward KL(q||p), the JSD at lambda 0.5, or
    "contrast": reverse KL to q' = softmax(z_student + z_right - z_wrong)."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in (ema or {})}
    with torch.no_grad(), model.disable_adapter() if teacher == "initial" else nullcontext():
        for n, w in (ema or {}).items():
            params[n].copy_(w)
        z_teacher = full_logits(model, batch, batch.teacher_ids, batch.teacher_mask)
        if divergence == "contrast":
            z_teacher = z_teacher - full_logits(model, batch, batch.contrast_ids, batch.contrast_mask)
        for n, w in saved.items():
            params[n].copy_(w)
    student = full_logits(model, batch, batch.student_ids, batch.student_mask)  # after the swap
    if divergence == "contrast":
        z_teacher = z_teacher + student.detach()
    log_q = torch.log_softmax(z_teacher, -1)
    log_p = torch.log_softmax(student, -1)
    logp = log_p.gather(-1, batch.response_ids[..., None]).squeeze(-1)
    p, q = log_p.exp(), log_q.exp()
    if divergence in ("reverse", "contrast"):
        kl = (p * (log_p - log_q)).sum(-1)
    elif divergence == "forward":
        kl = (q * (log_q - log_p)).sum(-1)
    else:
        m = 0.5 * (p + q)
        kl = 0.5 * (q * (log_q - m.log())).sum(-1) + 0.5 * (p * (log_p - m.log())).sum(-1)
    kl = kl.clamp(max=20.0)
    a = adv[:, None].double()
    if old_logp is None:
        pg = -a * torch.exp(logp - logp.detach())  # on-policy: ratio 1, gradient -A dlogp
    else:
        r = torch.exp((logp - old_logp.double()).clamp(-20, 20))
        ppo = torch.maximum(-a * r, -a * r.clamp(0.8, 1.28))
        pg = torch.where(a < 0, torch.minimum(ppo, -a * 10.0), ppo)
    per_token = outcome * pg + beta * kl + alpha * 0.5 * (logp - ref_logp.double()) ** 2
    m = batch.response_mask.double()
    return (per_token * m).sum() / m.sum()


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "algo, beta, alpha, teacher, off_policy, divergence",
    [
        ("sdpg", 0.3, 0.2, "live", False, "reverse"),
        ("sdpg", 0.3, 0.2, "live", True, "reverse"),
        ("grpo", 0.0, 0.0, "live", True, "reverse"),
        ("opd", 0.5, 0.0, "live", False, "reverse"),
        ("sdpg", 0.7, 0.1, "initial", False, "reverse"),
        ("sdpg", 0.7, 0.1, "ema", False, "reverse"),
        ("sdpg", 0.7, 0.1, "live", True, "forward"),
        ("sdpg", 0.7, 0.1, "live", True, "jsd"),
        ("sdpg", 0.7, 0.1, "live", False, "contrast"),
        ("sdpg", 0.7, 0.1, "initial", False, "contrast"),
    ],
)
def test_gradient_equals_independent_full_logits_loss(
    tiny_path, algo, beta, alpha, teacher, off_policy, divergence
):
    beta_flags = ["--beta", str(beta)] if beta else []
    contrast = divergence == "contrast"
    divergence_flags = ["--teacher-contrast"] if contrast else ["--distill-divergence", divergence]
    divergence_flags = [] if algo == "grpo" else divergence_flags  # GRPO has no distillation term
    flags = ["--alpha", str(alpha), "--teacher", teacher, *divergence_flags, *beta_flags]
    args = make_args(tiny_path, "--algo", algo, *flags)
    policy = load_small_policy(args)
    model, tok = policy.model, policy.tokenizer
    with torch.no_grad():  # a non-zero adapter, so the teacher and reference differ from the student
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ema = None
    if teacher == "ema":  # an average that differs from the live weights
        policy.ema = EmaWeights(model.parameters(), 0.9)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        for w in policy.ema.shadow:
            w.add_(torch.randn_like(w) * 0.05)
        ema = dict(zip(names, policy.ema.shadow, strict=True))
    batch = rollout(model, tok, with_wrong_answers(EXAMPLES)[:2], 4, 6, seed=3, contrast=contrast)
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8, 0.0, 1.2, -1.1, 0.9])
    with model.disable_adapter():
        ref_logp = response_logprobs(model, batch, 1.0)
    old_logp = None
    if off_policy:  # pi_old ~1.5 nats away: every clip region, the dual clip included, is visited
        old_logp = response_logprobs(model, batch, 1.0) + 1.5 * torch.randn(
            ref_logp.shape, generator=torch.Generator().manual_seed(1)
        )
    model.zero_grad()
    ref = ref_logp if alpha else None
    loss = accumulate(policy, batch, args, beta, adv, ref, old_logp)
    ours = grads_of(model)
    model.zero_grad()
    outcome = 0.0 if algo == "opd" else 1.0
    expected = naive_loss(
        model, batch, adv, beta, alpha, ref_logp, outcome, teacher, old_logp, ema, divergence
    )
    expected.backward()
    theirs = grads_of(model)
    assert loss == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert set(ours) == set(theirs) and all("lora_" in n for n in ours)
    for n in ours:
        torch.testing.assert_close(ours[n].double(), theirs[n].double(), rtol=1e-4, atol=1e-7)
    if off_policy:  # every clip region, the dual clip included, is visited
        batch.old_logp = old_logp
        _, m, _ = sdpg.micro_batch_loss(policy, batch, args, 0.0, None, None, 1.0)
        assert 0 < m["clipfrac"] < 1 and m["clipfrac_lower"] > 0


def test_teacher_pass_carries_no_gradient(tiny_path, monkeypatch):
    args = make_args(tiny_path, "--beta", "0.5", "--alpha", "0")
    policy = load_small_policy(args)
    batch = rollout(policy.model, policy.tokenizer, EXAMPLES[:2], 4, 6, seed=3)
    seen = []
    real = sdpg.response_hidden

    def spy(m, prompt_ids, *rest):
        h = real(m, prompt_ids, *rest)
        seen.append(
            (
                prompt_ids is batch.teacher_ids or prompt_ids.shape[1] == batch.teacher_ids.shape[1],
                h.requires_grad,
            )
        )
        return h

    monkeypatch.setattr(sdpg, "response_hidden", spy)
    accumulate(policy, batch, args, 0.5, torch.ones(8))
    teacher = [g for is_teacher, g in seen if is_teacher]
    student = [g for is_teacher, g in seen if not is_teacher]
    assert teacher and not any(teacher) and student and all(student)


def test_gradient_accumulation_is_micro_batch_invariant(tiny_path):
    args = make_args(tiny_path, "--alpha", "0.1")
    policy = load_small_policy(args)
    model, tok = policy.model, policy.tokenizer
    spread_lora_b(model)
    batch = rollout(model, tok, EXAMPLES[:2], 4, 6, seed=11)
    with model.disable_adapter():
        ref_logp = response_logprobs(model, batch, 1.0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, -0.2, 0.0, 0.0])
    grads = []
    for micro in (8, 1, 3):
        cfg = make_args(tiny_path, "--alpha", "0.1", "--micro-batch", str(micro))
        model.zero_grad()
        accumulate(policy, batch, cfg, cfg.beta, adv, ref_logp)
        grads.append(grads_of(model))
    for other in grads[1:]:
        for n in grads[0]:
            torch.testing.assert_close(other[n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_four_bit_on_cpu_two_steps(tiny_path):
    pytest.importorskip("bitsandbytes")
    args = make_args(tiny_path, "--load-in-4bit")
    model, _, (lora0, _), metrics = run_steps(args)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    lora1, _ = split_params(model)
    assert any(not torch.equal(lora0[n], lora1[n]) for n in lora0)
    assert all(m["skipped_step"] == 0.0 for m in metrics)


def test_help_lists_every_flag_with_its_default():
    env = {**os.environ, "COLUMNS": "400"}  # no line break inside a "(default: ...)"
    out = subprocess.run(
        [sys.executable, "sdpg.py", "--help"], capture_output=True, text=True, check=True, env=env
    )
    flat = " ".join(out.stdout.split())
    for action in cli.build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.option_strings[0] in flat
        if action.dest in cli.PRESETS["tiny"]:
            tiny, small, hub = (cli.PRESETS[p][action.dest] for p in ("tiny", "small", "hub"))
            assert f"(default: {tiny} for tiny, {small} for smollm2-135m/.gguf, else {hub})" in flat, (
                action.dest
            )
        elif cli.DEFAULTS[action.dest] in (None, ()):
            assert "(default: " in action.help or action.dest == "context_candidates", action.dest
        elif "(default: " not in action.help:  # else it says its own
            assert f"(default: {' '.join(str(cli.DEFAULTS[action.dest]).split())})" in flat, action.dest


@pytest.mark.parametrize(
    "argv, keys",
    [
        (
            ["--algo", "opsd"],
            ["policy_loss.loss_mode=opsd", "policy_loss.opsd_teacher_temperature=1.0", "entropy_coeff=0.02"],
        ),
        (
            ["--algo", "rlsd"],
            ["loss_mode=rlsd", "rlsd_lambda=0.5", "rlsd_lambda_decay_steps=50", "rlsd_epsilon_w=0.2"],
        ),
        (
            ["--algo", "grpo", "--alpha", "0.01"],
            ["loss_mode=vanilla", "kl_loss_coef=0.01", "kl_loss_type=mse"],
        ),
        (
            ["--mini-batch-prompts", "4"],
            ["ppo_mini_batch_size=4", "data.train_batch_size=16", "weight_decay=0.0"],
        ),
    ],
)
def test_verl_overrides_map_every_algorithm(argv, keys):
    lines = cli.verl_overrides(resolved(*argv))
    for key in keys:
        assert any(line.endswith(key) for line in lines), (key, lines)


def test_print_verl_overrides():
    out = subprocess.run(
        [sys.executable, "sdpg.py", "--algo", "sdpg", "--beta", "0.002", "--print-verl-overrides"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "verl.trainer.main_ppo" in out
    assert "actor_rollout_ref.actor.policy_loss.beta=0.002" in out
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=sdpg" in out
    assert "actor_rollout_ref.rollout.n=8" in out


def test_resolve_defaults_and_short_names():
    assert resolve_model_path("Qwen2.5-0.5B", None, WARM_START_STEPS) == "Qwen/Qwen2.5-0.5B"
    assert resolve_model_path("Qwen2.5-0.5B-Instruct", None, WARM_START_STEPS) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model_path("meta-llama/x", None, WARM_START_STEPS) == "meta-llama/x"

    args = resolved("--model", "Qwen2.5-0.5B")
    assert (args.data, args.lr, args.beta, args.alpha, args.kl_mode) == ("gsm8k", 1e-5, 1e-3, 1e-3, "urkl")
    assert resolved("--model", "x", "--full-finetune").lr == cli.FULL_FINETUNE["lr"]
    args = resolved("--algo", "grpo")
    assert args.beta == 0.0 and args.alpha == 0.0
    assert args.last_number_fallback is True
    assert cli.build_parser().parse_args(["--no-last-number-fallback"]).last_number_fallback is False


def test_reward_is_the_verifier():
    assert reward("\\boxed{12}", "12") == 1.0


def test_default_entry_point_smoke(tmp_path):
    """`python sdpg.py` end to end on a freshly built tiny model (a 5-step warm start)."""
    out = tmp_path / "run"
    argv = [
        "--cache-dir",
        str(tmp_path / "cache"),
        "--tiny-warm-start-steps",
        "5",
        "--steps",
        "2",
        "--eval-size",
        "8",
        "--output-dir",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "sdpg.py", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "held-out accuracy before: mean@4" in proc.stdout
        and "held-out accuracy after:  mean@4" in proc.stdout
    )
    assert f"are in {out}" in proc.stdout
    for name in ("metrics.jsonl", "samples.jsonl", "curves.png"):
        assert (out / name).stat().st_size > 0
    assert (tmp_path / "cache" / entry_name(0, 5, TINY_RIGHT_SHARE) / "model.safetensors").exists()


def test_full_finetune_two_steps_with_a_frozen_reference(tiny_path):
    args = make_args(tiny_path, "--full-finetune", "--lr", "1e-3", "--alpha", "0.05")
    policy = load_small_policy(args)
    model, reference = policy.model, policy.frozen_reference
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    optimizer = Optimizer(model.parameters(), args.lr, args.weight_decay)
    for step in range(2):
        examples = EXAMPLES[2 * step : 2 * step + 2]
        m = sdpg.sdpg_step(policy, optimizer, examples, step, args, varied_reward)[0]
        assert m["skipped_step"] == 0.0 and m["ref_kl"] >= 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(torch.equal(ref_before[n], p) for n, p in reference.named_parameters())


# ---------------------------------------------------------------- the authors' recipe


def resolved(*argv):
    return cli.parse(cli.given_flags(list(argv)))


def test_explicit_flags_are_never_overridden():
    assert resolved("--model", "x", "--full-finetune", "--lr", "1e-5").lr == 1e-5
    ft = resolved("--model", "x", "--full-finetune")
    assert (ft.lr, ft.weight_decay, ft.lr_warmup_steps) == (1e-6, 0.1, 10)  # the authors' recipe
    assert resolved("--model", "x", "--full-finetune", "--weight-decay", "0").weight_decay == 0.0
    grpo = resolved("--algo", "grpo", "--alpha", "1e-3")
    assert (grpo.alpha, grpo.beta) == (1e-3, 0.0)
    assert resolved("--algo", "grpo").alpha == 0.0
    assert resolved("--kl-clamp", "0").kl_clamp is None and resolved().kl_clamp == 20.0
    assert resolved("--batch-prompts", "8").mini_batch_prompts == 4  # the tiny preset's
    assert resolved("--batch-prompts", "6").mini_batch_prompts == 6  # 4 does not divide 6: one update
    assert resolved("--batch-prompts", "8", "--mini-batch-prompts", "8").mini_batch_prompts == 8


def test_beta_schedule_reads_the_one_based_step(tiny_path):
    """verl counts training steps from 1: warm-up is already non-zero at the first step, and a
    decay reaches exactly 0 at the last."""
    warm = run_steps(make_args(tiny_path, "--beta", "0.4", "--beta-warmup-steps", "4"))[3]
    assert [m["beta"] for m in warm] == pytest.approx([0.1, 0.2])
    decay = run_steps(make_args(tiny_path, "--beta", "0.4", "--beta-decay-steps", "2"))[3]
    assert [m["beta"] for m in decay] == pytest.approx([0.2, 0.0])


def test_mini_batches_step_from_the_rollouts_old_logprobs(tiny_path, monkeypatch):
    """B = 2 prompts, one per mini-batch, two passes: 4 optimizer steps, every ratio's base
    the log-probs of the weights before the first one."""
    args = make_args(tiny_path, "--mini-batch-prompts", "1", "--ppo-epochs", "2", "--alpha", "0")
    policy = load_small_policy(args)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    optimizer = Optimizer(policy.model.parameters(), args.lr, args.weight_decay)
    seen, steps = [], []
    real_loss, real_step = sdpg.sdpg_loss, optimizer.step
    monkeypatch.setattr(
        sdpg, "sdpg_loss", lambda t, *a, **k: seen.append((t.logp, t.old_logp)) or real_loss(t, *a, **k)
    )
    monkeypatch.setattr(optimizer, "step", lambda: steps.append(1) or real_step())
    metrics, batch = sdpg.sdpg_step(policy, optimizer, EXAMPLES[:2], 0, args, varied_reward)
    assert len(steps) == 4 and metrics["clipfrac"] > 0  # the ratio moved off 1 and was clipped
    with torch.no_grad():  # pi_old, recomputed from the weights before the step
        for n, p in policy.model.named_parameters():
            if n in before:
                p.copy_(before[n])
        pi_old = response_logprobs(policy.model, batch, 1.0)  # [B*G, T]
    micro = args.micro_batch  # 3 rows of a 4-row mini-batch, then 1
    rows = [slice(0, 3), slice(3, 4), slice(4, 7), slice(7, 8)] * 2
    assert len(seen) == len(rows) == 8 and micro == 3
    for (_, old), r in zip(seen, rows, strict=True):
        torch.testing.assert_close(old, pi_old[r], atol=1e-5, rtol=1e-5)
    assert torch.allclose(seen[0][0], seen[0][1], atol=1e-5)  # first update: ratio 1
    assert not torch.allclose(seen[2][0], seen[2][1], atol=1e-3)  # second: the weights moved
    single = run_steps(make_args(tiny_path), n=1)[3][0]
    assert single["clipfrac"] == 0.0  # one update per rollout: the ratio is exactly 1


def test_mini_batch_updates_do_not_depend_on_the_micro_batch(tiny_path, monkeypatch):
    """Each optimizer step's gradient is its mini-batch's exact token-mean, whatever
    --micro-batch is. (A tiny lr keeps Adam's sign-like first steps from amplifying float
    noise in the weights the second update starts from.)"""
    grads = []
    real = Optimizer.step

    def capture(self):
        grads[-1].append({id(p): p.grad.clone() for p in self.params})
        return real(self)

    monkeypatch.setattr(Optimizer, "step", capture)
    for micro in ("1", "8"):
        grads.append([])
        run_steps(
            make_args(tiny_path, "--mini-batch-prompts", "1", "--micro-batch", micro, "--lr", "1e-7"), n=1
        )
    assert len(grads[0]) == len(grads[1]) == 2
    for a, b in zip(grads[0], grads[1], strict=True):
        for ga, gb in zip(a.values(), b.values(), strict=True):
            torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-7)


def test_lr_warm_up_follows_verl_and_resumes_mid_way():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = Optimizer([p], lr=1.0, weight_decay=0.0, warmup_steps=4)
    lrs = []
    for k in range(6):
        lrs.append(opt.lr)
        if k == 2:
            state = opt.state_dict()
            resumed = Optimizer([p], lr=1.0, weight_decay=0.0, warmup_steps=4)
            resumed.load_state_dict(state)
            assert resumed.lr == opt.lr
        opt.end_training_step()
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    resumed.end_training_step()
    assert resumed.lr == pytest.approx(0.75)


def test_ema_weights_average_and_swap_back_exactly():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    ema = EmaWeights([p], decay=0.8)
    expected = p.detach().clone()
    for value in (3.0, -1.0, 0.5):
        with torch.no_grad():
            p.fill_(value)
        ema.update()
        expected = 0.8 * expected + 0.2 * value
    torch.testing.assert_close(ema.shadow[0], expected, rtol=0, atol=1e-15)
    with ema.swapped_in():
        assert torch.equal(p.detach(), ema.shadow[0])
    assert torch.equal(p.detach(), torch.full((2,), 0.5, dtype=torch.float64))
    restored = EmaWeights([p], decay=0.8)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow[0], ema.shadow[0])


def test_evaluation_reports_pass_at_k_from_the_same_samples(tiny_path):
    from verifier import Verdict

    args = make_args(tiny_path, "--eval-samples", "3")
    policy, calls = load_small_policy(args), []

    def every_fifth(completion, gold):
        calls.append(len(calls) % 5 == 0)
        return Verdict(float(calls[-1]), "7", "boxed" if len(calls) % 2 else "last number", "")

    result = evaluation.evaluate(policy, EXAMPLES, args, every_fifth)
    n = len(EXAMPLES) * 3
    sampled = torch.tensor(calls[:n], dtype=torch.float64).view(-1, 3)  # the first call
    assert set(result) == {
        "eval_mean@3", "eval_pass@3", "eval_greedy", "eval_teacher_greedy",
        "eval_answered", "eval_truncated", "eval_response_len", "eval_teacher_len", "eval_teacher_truncated",
        "eval_greedy_len", "eval_greedy_truncated",
    }  # fmt: skip
    assert result["eval_mean@3"] == pytest.approx(float(sampled.mean()))
    assert result["eval_pass@3"] == pytest.approx(float(sampled.amax(1).mean()))
    assert result["eval_answered"] == pytest.approx(sum(1 for i in range(1, n + 1) if i % 2) / n)
    assert 0 < result["eval_response_len"] <= 6 and 0 <= result["eval_truncated"] <= 1
    assert 0 < result["eval_teacher_len"] <= 6 and 0 <= result["eval_teacher_truncated"] <= 1
    assert 0 < result["eval_greedy_len"] <= 6 and 0 <= result["eval_greedy_truncated"] <= 1


@pytest.mark.parametrize("teacher", ["live", "initial", "ema"])
def test_evaluation_reads_the_teacher_view_with_the_teachers_weights(tiny_path, teacher, monkeypatch):
    from verifier import Verdict

    args = make_args(tiny_path, "--teacher", teacher)
    policy = load_small_policy(args)
    lora = [p for p in policy.model.parameters() if p.requires_grad]
    policy.ema = EmaWeights(policy.model.parameters(), 0.5)
    with torch.no_grad():
        for p in lora:  # the adapter, and so the live weights, now differ from the EMA and the base
            p.add_(0.05 * torch.randn_like(p))
    probe = torch.tensor([[5, 9, 14, 2, 7]])
    with torch.no_grad():
        live = policy.model(probe).logits
        with policy.model.disable_adapter():
            base = policy.model(probe).logits
        with policy.ema.swapped_in():
            ema = policy.model(probe).logits
    expected = {"live": live, "initial": base, "ema": ema}[teacher]
    assert teacher == "live" or not torch.allclose(expected, live, atol=1e-4)
    seen = {}

    def spy(model, *a, view="student", **kw):
        seen.setdefault(view, model(probe).logits)
        return rollout(model, *a, view=view, **kw)

    monkeypatch.setattr(evaluation, "rollout", spy)
    evaluation.evaluate(policy, EXAMPLES[:2], args, lambda c, g: Verdict(0.0, None, "none", ""))
    torch.testing.assert_close(seen["student"], live)
    torch.testing.assert_close(seen["teacher"], expected)


def test_entropy_bonus_subtracts_coef_times_the_mean_entropy(tiny_path):
    """--entropy-coef c adds -c * mean_t H(p_t) to the loss: its gradient against the
    entropy of full-vocabulary logits, in float64."""
    policy = load_small_policy(make_args(tiny_path, "--algo", "grpo"))
    model, tok = policy.model, policy.tokenizer
    spread_lora_b(model)
    batch = rollout(model, tok, EXAMPLES[:2], 4, 6, seed=5)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, -0.2, 0.0, 0.0])
    losses, grads = [], []
    for coef in ("0", "0.3"):
        cfg = make_args(tiny_path, "--algo", "grpo", "--entropy-coef", coef)
        model.zero_grad()
        losses.append(accumulate(policy, batch, cfg, 0.0, adv))
        grads.append(grads_of(model))
    model.zero_grad()
    logits = full_logits(model, batch, batch.student_ids, batch.student_mask)  # [B*G, T, V]
    log_p = torch.log_softmax(logits / cfg.temperature, -1)
    entropy = -(log_p.exp() * log_p).sum(-1)  # [B*G, T]
    m = batch.response_mask.double()
    bonus = -0.3 * (entropy * m).sum() / m.sum()
    bonus.backward()
    assert losses[1] - losses[0] == pytest.approx(bonus.item(), rel=1e-4)
    for n, g in grads_of(model).items():
        torch.testing.assert_close(grads[1][n] - grads[0][n], g.float(), rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("algo", ["opsd", "rlsd"])
def test_teacher_logprobs_come_from_each_algorithms_teacher(tiny_path, algo, monkeypatch):
    """OPSD's teacher is the frozen reference reading the context, at
    --opsd-teacher-temperature; RLSD's the policy at the start of the step reading it, at
    the sampling temperature: where the authors' code ends up (their worker overwrites the
    trainer's 1.0 with the rollout temperature for RLSD, not for OPSD's reference)."""
    opsd_flags = ["--opsd-teacher-temperature", "0.5"] if algo == "opsd" else []
    args = make_args(tiny_path, "--algo", algo, "--temperature", "0.7", *opsd_flags)
    policy = load_small_policy(args)
    model = policy.model
    spread_lora_b(model)
    at_start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seen = []
    real = baselines.batched_logprobs

    def spy(m, batch, cfg, view="student", temperature=None):
        out = real(m, batch, cfg, view, temperature)
        if view == "teacher":
            seen.append((batch, out))
        return out

    monkeypatch.setattr(baselines, "batched_logprobs", spy)
    optimizer = Optimizer(model.parameters(), 1e-2, 0.0)
    baselines.baseline_step(policy, optimizer, EXAMPLES[:2], 0, args, varied_reward)
    ((batch, teacher_logp),) = seen
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in at_start:
                p.copy_(at_start[n])
        t = 0.5 if algo == "opsd" else 0.7
        live = response_logprobs(model, batch, t, view="teacher")
        with model.disable_adapter():
            reference = response_logprobs(model, batch, t, view="teacher")
    expected, other = (reference, live) if algo == "opsd" else (live, reference)
    torch.testing.assert_close(teacher_logp, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(teacher_logp, other, atol=1e-3)


def test_each_response_is_verified_once_per_step(tiny_path, tmp_path, monkeypatch):
    """The verdicts travel with the rollout to the reward, the logged samples and the
    `answered` metric: a counting verifier sees each of the B*G responses once, through
    the step and through the whole loop."""
    args = make_args(tiny_path)
    policy = load_small_policy(args)
    calls = []

    def counting(completion, gold):
        calls.append(completion)
        return varied_reward(completion, gold)

    optimizer = Optimizer(policy.model.parameters(), args.lr, args.weight_decay)
    _, batch = sdpg.sdpg_step(policy, optimizer, EXAMPLES[:2], 0, args, counting)
    assert calls == batch.completions and len(calls) == 2 * args.num_generations
    calls.clear()
    from harness import session

    monkeypatch.setattr(session, "make_verifier", lambda *a: counting)
    stub = {"eval_greedy": 0.0, "eval_teacher_greedy": 1.0}  # evaluation verifies its own answers
    stub |= {"eval_greedy_len": 6.0, "eval_teacher_len": 6.0, "eval_greedy_truncated": 0.0}
    stub |= {"eval_teacher_truncated": 0.0}
    monkeypatch.setattr(sdpg, "evaluate", lambda *a: stub)
    argv = [
        "--model",
        str(tiny_path),
        *SMALL_RUN,
        "--check-size",
        "0",
        "--context-template",
        "authors",
        "--steps",
        "1",
    ]
    assert sdpg.main([*argv, "--output-dir", str(tmp_path / "run")]) == 0
    assert len(calls) == 2 * args.num_generations


def test_distillation_kl_split_by_flat_and_mixed_groups_by_hand():
    """B = 2 groups of G = 3: the first flat (rewards 1, 1, 1), the second mixed; the mean KL
    per token of each kind, counted by hand."""
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    kl_sums = torch.tensor([0.4, 0.1, 0.6, 2.0, 0.5, 0.3])
    got = sdpg.kl_by_group_kind(kl_sums, mask, rewards, 3)
    assert got == pytest.approx({"kl_distill_flat": 1.1 / 6, "kl_distill_mixed": 2.8 / 6})
    only_flat = sdpg.kl_by_group_kind(kl_sums[:3], mask[:3], rewards[:3], 3)
    assert only_flat == pytest.approx({"kl_distill_flat": 1.1 / 6})
    assert sdpg.kl_by_group_kind(None, mask, rewards, 3) == {}


def test_a_step_logs_the_kl_of_flat_and_mixed_groups_that_make_up_kl_distill(tiny_path):
    """One update per rollout: the token-weighted mean of the two kinds is kl_distill."""
    args = make_args(tiny_path, "--beta", "0.5")
    policy = load_small_policy(args)
    optimizer = Optimizer(policy.model.parameters(), args.lr, args.weight_decay)
    all_wrong = lambda c, g: Verdict(0.0, None, "none", "")  # noqa: E731 (every group flat)
    for verifier in (all_wrong, varied_reward):
        m, batch = sdpg.sdpg_step(policy, optimizer, EXAMPLES[:2], 0, args, verifier)
        rewards = torch.tensor([v.reward for v in batch.verdicts]).view(2, -1)
        flat = (rewards.amax(1) == rewards.amin(1)).repeat_interleave(rewards.shape[1])
        tokens = batch.response_mask.sum(1).double()
        kinds = (("kl_distill_flat", flat), ("kl_distill_mixed", ~flat))
        parts = [(m[k], tokens[rows].sum()) for k, rows in kinds if k in m]
        assert len(parts) == int(flat.any()) + int((~flat).any())
        assert sum(v * n for v, n in parts) / tokens.sum() == pytest.approx(m["kl_distill"], rel=1e-5)


@pytest.mark.parametrize(
    "algo, teacher_then_student, warnings",
    [
        ("sdpg", [(0.9, 0.1), (0.9, 0.5), (0.55, 0.5), (0.4, 0.7), (0.9, 0.1)], 1),  # falls behind at step 2
        ("sdpg", [(0.9, 0.1), (0.9, 0.5), (0.3, 0.2), (0.9, 0.8), (0.9, 0.7)], 0),  # stays 10 points ahead
        ("grpo", [(0.9, 0.1), (0.3, 0.5), (0.3, 0.7), (0.3, 0.7), (0.3, 0.7)], 0),  # no teacher to follow
    ],
)
def test_the_teacher_drift_warning_fires_once_when_the_teacher_falls_behind(
    tiny_path, tmp_path, monkeypatch, capsys, algo, teacher_then_student, warnings
):
    evals = iter(teacher_then_student)

    def stub(*a):
        teacher, student = next(evals)
        lengths = {"eval_greedy_len": 6.0, "eval_teacher_len": 6.0}  # the same style: no style warning
        cut = {"eval_greedy_truncated": 0.0, "eval_teacher_truncated": 0.0}
        return {"eval_greedy": student, "eval_teacher_greedy": teacher, **lengths, **cut}

    monkeypatch.setattr(sdpg, "evaluate", stub)
    argv = ["--model", str(tiny_path), *SMALL_RUN, "--context-template", "authors", "--algo", algo]
    argv += ["--steps", "4", "--eval-every", "1", "--output-dir", str(tmp_path / "run")]
    assert sdpg.main(argv) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "teacher view is no longer ahead" in x]
    assert len(lines) == warnings
    if warnings:
        assert "greedy 55.0% vs 50.0%, +5.0 points; SDPG needs 10" in lines[0]
        assert "--teacher initial" in lines[0] and "--teacher ema" in lines[0]


def test_the_contrast_teacher_logs_its_quantity_under_its_own_name(tiny_path):
    """KL(p || q') under --teacher-contrast is no KL to a teacher: kl_contrast, never kl_distill."""
    args = make_args(tiny_path, "--teacher-contrast")
    policy = load_small_policy(args)
    optimizer = Optimizer(policy.model.parameters(), args.lr, args.weight_decay)
    m, _ = sdpg.sdpg_step(policy, optimizer, with_wrong_answers(EXAMPLES)[:2], 0, args, varied_reward)
    assert m["kl_contrast"] >= 0 and not [k for k in m if k.startswith("kl_distill")]
    assert {"kl_contrast_flat", "kl_contrast_mixed"} & set(m)


@pytest.mark.parametrize(
    "teacher, contrast",
    [("live", False), ("initial", False), ("ema", False), ("initial", True), ("ema", True)],
)
def test_full_finetune_teacher_logits_come_from_the_teachers_own_weights_head_included(
    tiny_path, teacher, contrast
):
    """A full fine-tune trains the tied embeddings, so the student's head is not the
    teacher's: the KL must be the one from the teacher model's own full logits (float64)."""
    extra = ["--teacher-contrast"] if contrast else []
    args = make_args(
        tiny_path,
        "--full-finetune",
        "--teacher",
        teacher,
        "--beta",
        "0.5",
        "--alpha",
        "0",
        "--kl-clamp",
        "0",
        *extra,
    )
    policy = load_small_policy(args)
    model = policy.model.double()
    policy.frozen_reference.double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the student moves away from the reference, its head (the embeddings) too
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    teacher_model = {"live": model, "initial": policy.frozen_reference}.get(teacher)
    if teacher == "ema":  # an average that is neither the student nor the reference
        policy.ema = EmaWeights(model.parameters(), 0.9)
        for w in policy.ema.shadow:
            w.add_(torch.randn(w.shape, generator=gen, dtype=w.dtype) * 0.05)
        teacher_model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float64)
        with torch.no_grad():
            for p, s in zip(teacher_model.parameters(), policy.ema.shadow, strict=True):
                p.copy_(s)
    batch = rollout(
        model, policy.tokenizer, with_wrong_answers(EXAMPLES)[:2], 4, 6, seed=3, contrast=contrast
    )
    batch.advantages = torch.zeros(8, dtype=torch.float64)
    student_before = {n: p.detach().clone() for n, p in model.named_parameters()}

    _, _, kl = sdpg.micro_batch_loss(
        policy, batch, args, 0.5, sdpg.teacher_pass(policy, batch, args), None, 1.0
    )

    with torch.no_grad():
        z_student = full_logits(model, batch, batch.student_ids, batch.student_mask)  # [B*G, T, V]
        z_teacher = full_logits(teacher_model, batch, batch.teacher_ids, batch.teacher_mask)
        if contrast:  # q' ∝ p q_right / q_wrong, each from its own model's full logits
            z_wrong = full_logits(teacher_model, batch, batch.contrast_ids, batch.contrast_mask)
            z_teacher = z_student + z_teacher - z_wrong
        expected = kl_from_logits(z_student, z_teacher) * batch.response_mask  # [B*G, T]
    assert expected.abs().max() > 1e-5  # the teacher differs from the student
    torch.testing.assert_close(kl.double(), expected, rtol=1e-9, atol=1e-11)
    assert all(torch.equal(student_before[n], p) for n, p in model.named_parameters())  # EMA swapped back


@pytest.mark.parametrize(
    "algo, teacher_len_cut, warnings",
    [
        ("sdpg", [(6, 0.0), (6, 0.0), (7, 0.5), (8, 1.0), (6, 0.0)], 1),  # cut off 50% vs 0% at step 2
        ("sdpg", [(6, 0.0), (9.5, 0.05), (9, 0.1), (6, 0.0), (6, 0.0)], 1),  # 9.5 > 1.5 x 6 tokens at step 1
        ("sdpg", [(6, 0.0), (9, 0.1), (9, 0.1), (6, 0.0), (6, 0.0)], 0),  # exactly 1.5 x and 10 points more
    ],
)
def test_the_teacher_style_warning_fires_once_when_its_answers_grow_or_get_cut_off(
    tiny_path, tmp_path, monkeypatch, capsys, algo, teacher_len_cut, warnings
):
    """The teacher view keeps its accuracy (no accuracy warning) while its held-out answers
    grow or are cut off at --max-new-tokens; the student's stay 6 tokens, none cut off."""
    evals = iter(teacher_len_cut)

    def stub(*a):
        length, cut = next(evals)
        student = {"eval_greedy": 0.5, "eval_greedy_len": 6.0, "eval_greedy_truncated": 0.0}
        return {
            **student,
            "eval_teacher_greedy": 0.9,
            "eval_teacher_len": float(length),
            "eval_teacher_truncated": cut,
        }

    monkeypatch.setattr(sdpg, "evaluate", stub)
    argv = ["--model", str(tiny_path), *SMALL_RUN, "--context-template", "authors", "--algo", algo]
    argv += ["--steps", "4", "--eval-every", "1", "--output-dir", str(tmp_path / "run")]
    assert sdpg.main(argv) == 0
    err = capsys.readouterr().err
    assert "no longer ahead" not in err
    lines = [x for x in err.splitlines() if "writes much longer held-out answers" in x]
    assert len(lines) == warnings
    if warnings and teacher_len_cut[2][1] == 0.5:
        assert "greedy 7 vs 6 tokens; cut off at --max-new-tokens 50% vs 0%" in lines[0]
