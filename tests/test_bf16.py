"""The bfloat16 path (--dtype bfloat16; what `auto` picks on a GPU and on a CPU with bf16
matrix units), on the CPU: the loss math from bf16 hidden states, the ratio, one step,
resume, and what `auto` picks where the processor has no bf16 units."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL_RUN, load_small_policy, small_args
from peft.tuners.lora import Linear as LoraLinear
from test_reliability import metrics
from test_trainer import EXAMPLES, spread_lora_b, varied_reward

import sdpg
from harness import loading
from harness.data import CONTEXT_TEMPLATE, templated_example
from harness.optim import Optimizer
from losses import kl_from_logits
from rollout import batched_logprobs, reference_role, response_hidden, rollout, score_tokens

BF16 = ["--dtype", "bfloat16"]


def bf16_policy(tiny_path, *extra):
    args = small_args(tiny_path, *BF16, "--alpha", "0", *extra)
    torch.manual_seed(0)
    policy = load_small_policy(args)
    spread_lora_b(policy.model)  # an adapter that changes the output, so that it is in the numbers
    return args, policy


def test_the_base_is_bf16_and_lora_float32(tiny_path):
    _, policy = bf16_policy(tiny_path)
    dtypes = {("lora_" in n, p.dtype) for n, p in policy.model.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}


def test_the_adapter_computes_in_bf16_with_float32_weights_and_gradients(tiny_path):
    """loading.mixed_precision: the decoder runs under autocast, so a LoRA layer's products
    run in bf16 on its float32 weights. Checked on one layer inside the model against
    float64 on the same bf16 input, the same weights and the same upstream gradient: bf16
    rounds the adapter's intermediates (x A^T, its product with B^T, the scaling, the sum
    with the base output) to 8 significant bits, a relative 2^-9 each, so four roundings
    stay within 2^-7 of the output's largest magnitude (measured 5.4e-3); the gradients of
    A and B come through bf16 products too: within 1e-2 of their largest (measured 5e-3
    and 3.5e-3), and float32, as the weights and the optimizer are."""
    _, policy = bf16_policy(tiny_path)
    model = policy.model
    batch = rollout(model, policy.tokenizer, EXAMPLES[:2], 2, 5, seed=3)
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    seen = {}

    def keep(_, args, out):
        seen["x"], seen["y"] = args[0].detach(), out.detach()
        out.register_hook(lambda g: seen.update(g=g))

    layer.register_forward_hook(keep)
    layer.lora_A["default"].register_forward_hook(lambda _, a, out: seen.update(inner=out.dtype))
    h = response_hidden(model, batch.student_ids, batch.student_mask, batch.response_ids, batch.response_mask)
    torch.manual_seed(1)
    (h.float() * torch.randn(h.shape)).sum().backward()
    assert seen["inner"] == seen["y"].dtype == torch.bfloat16  # the adapter's product, in bf16
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.grad.dtype == b.grad.dtype == torch.float32
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    x = seen["x"].double()
    y64 = x @ layer.base_layer.weight.double().T + layer.scaling["default"] * (x @ a64.T) @ b64.T
    (y64 * seen["g"].double()).sum().backward()
    assert float((seen["y"].double() - y64).abs().max()) < 2**-7 * float(y64.abs().max())
    for got, want in ((a.grad, a64.grad), (b.grad, b64.grad)):
        assert float((got.double() - want).abs().max()) < 1e-2 * float(want.abs().max())


def test_autocast_leaves_a_float32_model_and_the_reference_as_they_were(tiny_path):
    """A float32 model is not wrapped and keeps PEFT's casts; with the adapter off (the
    reference) autocast changes no bit: the base's products were bf16 already."""
    plain = load_small_policy(small_args(tiny_path, "--dtype", "float32")).model
    assert "forward" not in vars(plain.get_decoder())
    assert all(m.cast_input_dtype_enabled for m in plain.modules() if isinstance(m, LoraLinear))
    _, policy = bf16_policy(tiny_path)
    decoder = policy.model.get_decoder()
    assert not any(m.cast_input_dtype_enabled for m in policy.model.modules() if isinstance(m, LoraLinear))
    batch = rollout(policy.model, policy.tokenizer, EXAMPLES[:2], 2, 5, seed=3)
    rows = (batch.student_ids, batch.student_mask, batch.response_ids, batch.response_mask)
    with torch.no_grad(), reference_role(policy) as reference:
        wrapped = response_hidden(reference, *rows)
        decoder.forward = decoder.forward.__wrapped__  # the decoder without autocast
        unwrapped = response_hidden(reference, *rows)
    assert torch.equal(wrapped, unwrapped)


def test_generate_runs_under_one_autocast_and_samples_the_same_tokens(tiny_path):
    """The whole call under autocast (the LM head too, which sits outside the decoder), so
    the adapter's bf16 weight copies last the call; the same tokens as per-step autocast,
    and autocast off again afterwards."""
    _, policy = bf16_policy(tiny_path)
    model, seen = policy.model, []
    model.get_output_embeddings().register_forward_pre_hook(
        lambda *_: seen.append(torch.is_autocast_enabled("cpu"))
    )
    batch = rollout(model, policy.tokenizer, EXAMPLES[:2], 3, 6, temperature=1.0, seed=0)
    assert seen and all(seen) and not torch.is_autocast_enabled("cpu")
    model.generate = model.generate.__wrapped__  # autocast per decoder call only
    again = rollout(model, policy.tokenizer, EXAMPLES[:2], 3, 6, temperature=1.0, seed=0)
    assert not seen[-1] and torch.equal(batch.response_ids, again.response_ids)


def test_the_lm_head_reads_a_contiguous_input_while_generating(tiny_path):
    """generate's first step gives the head a strided [B, 1, H] slice, which F.linear on a
    CPU serves by copying the whole head once per row (slow in bf16: bench/generate_bench);
    the loading hook hands it a contiguous copy, and the tokens sampled stay the same."""
    _, policy = bf16_policy(tiny_path)
    head = policy.model.get_output_embeddings()
    seen = []  # runs after the loading hook: what the head's matmul receives
    head.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous()))
    batch = rollout(policy.model, policy.tokenizer, EXAMPLES[:2], 3, 4, temperature=1.0, seed=0)
    assert len(seen) >= 2 and all(seen)  # the prefill step and every decode step
    head._forward_pre_hooks.clear()  # the raw head, as transformers calls it
    again = rollout(policy.model, policy.tokenizer, EXAMPLES[:2], 3, 4, temperature=1.0, seed=0)
    assert torch.equal(batch.response_ids, again.response_ids)


def test_loss_math_from_bf16_hidden_states_equals_float64_on_the_same_values(tiny_path):
    """The chunked head upcasts the bf16 hidden states and head to float32 (exactly: every
    bf16 number is a float32 number), so against float64 on the same bf16 values only
    float32 rounding remains: logits of H = 128 products and sums over V = 384 terms,
    ~1e-7 relative. Tolerance: 1e-5 nats for log p and the KL, 1e-5 relative for the
    entropy (~log V = 6 nats); measured 4e-7, 5e-7 and 6e-6 absolute. bf16 itself costs
    more (the last assertion): against a float64 copy of the whole model the log-probs
    differ by up to 5.8e-3 nats here, the rounding of the weights, of every layer's
    activations and of the adapter's bf16 products, which no loss code can undo."""
    args, policy = bf16_policy(tiny_path, "--beta", "0.5")
    model, head = policy.model, policy.model.get_output_embeddings()
    batch = rollout(model, policy.tokenizer, EXAMPLES[:2], 4, 6, seed=3)
    with torch.no_grad():
        hs = response_hidden(
            model, batch.student_ids, batch.student_mask, batch.response_ids, batch.response_mask
        )
        ht = response_hidden(
            model, batch.teacher_ids, batch.teacher_mask, batch.response_ids, batch.response_mask
        )
        logp, kl, entropy = score_tokens(head, hs, batch.response_ids, batch.response_mask, ht)
    assert hs.dtype == ht.dtype == head.weight.dtype == torch.bfloat16
    assert logp.dtype == kl.dtype == entropy.dtype == torch.float32
    zs, zt = hs.double() @ head.weight.double().T, ht.double() @ head.weight.double().T  # [B*G, T, V]
    log_p = torch.log_softmax(zs, -1)
    m = batch.response_mask.bool()
    expected_logp = log_p.gather(-1, batch.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(logp.double()[m], expected_logp[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(kl.double()[m], kl_from_logits(zs, zt)[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.double()[m], -(log_p.exp() * log_p).sum(-1)[m], rtol=1e-5, atol=0)
    assert float(kl[m].max()) > 1e-3  # the teacher view does differ
    full = load_small_policy(small_args(tiny_path, "--dtype", "float32"))  # the same weights in float64
    full.model.double().load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad():
        h64 = response_hidden(full.model, batch.student_ids, batch.student_mask, batch.response_ids, m)
        logp64, _, _ = score_tokens(full.model.get_output_embeddings(), h64, batch.response_ids, m)
    gap = float((logp.double() - logp64)[m].abs().max())
    assert 1e-4 < gap < 2e-2  # bf16's own rounding: 5.8e-3 nats here


def test_the_first_updates_ratio_in_bf16_is_one_whatever_the_batch_composition(tiny_path):
    """pi_old comes from a pass in micro-batches of 3 rows over prompts of two lengths; the
    loss's pass reads all 8 rows at once, with gradient. Measured max |ratio - 1|: 0.0 on
    this CPU (bf16 kernels here round a row the same whatever the rows beside it). The
    bound asserted is what matters for the clip: at 1e-2 a first-update ratio cannot reach
    1 - eps_low = 0.8 or 1 + eps_high = 1.28, so no token is clipped and the gradient is
    scaled by at most 1%."""
    args, policy = bf16_policy(tiny_path, "--beta", "0.5", "--micro-batch", "3")
    long = templated_example(
        "What is 3 + 4, counting every apple in both of the two baskets?", "7", CONTEXT_TEMPLATE
    )
    batch = rollout(policy.model, policy.tokenizer, [EXAMPLES[0], long], 4, 6, seed=3)
    assert batch.student_mask[0].sum() != batch.student_mask[-1].sum()  # two prompt lengths: padding
    batch.old_logp = batched_logprobs(policy.model, batch, args)  # [B*G, T], micro-batches of 3
    batch.advantages = torch.ones(8)
    seen = {}

    def keep(*a, **k):
        out = score_tokens(*a, **k)
        seen["logp"] = out[0].detach()
        return out

    sdpg_score, sdpg.score_tokens = sdpg.score_tokens, keep
    try:
        sdpg.micro_batch_loss(policy, batch, args, 0.5, sdpg.teacher_pass(policy, batch, args), None, 1.0)
    finally:
        sdpg.score_tokens = sdpg_score
    m = batch.response_mask.bool()
    gap = float(((seen["logp"] - batch.old_logp).exp() - 1).abs()[m].max())
    assert gap < 1e-2, gap


def test_one_bf16_step_changes_lora_and_not_the_base(tiny_path):
    args, policy = bf16_policy(tiny_path, "--beta", "0.5")
    optimizer = Optimizer(policy.model.parameters(), args.lr, args.weight_decay)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    m, _ = sdpg.sdpg_step(policy, optimizer, EXAMPLES[:2], 0, args, varied_reward)
    assert m["skipped_step"] == 0.0 and m["kl_distill"] > 0
    after = dict(policy.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_" in n)
    state = [s for s in optimizer.opt.state.values() if s]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state)  # the optimizer in float32


def test_resume_is_exact_in_bf16(tiny_path, tmp_path, capsys):
    steps = ["--model", str(tiny_path), *SMALL_RUN, *BF16, "--beta", "0.1", "--micro-batch", "8"]
    full, halves = tmp_path / "full", tmp_path / "halves"
    assert sdpg.main([*steps, "--steps", "3", "--output-dir", str(full)]) == 0
    assert sdpg.main([*steps, "--steps", "2", "--output-dir", str(halves)]) == 0
    assert sdpg.main([*steps, "--steps", "3", "--output-dir", str(halves), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((halves / "args.json").read_text())["dtype"] == "bfloat16"
    a, b = metrics(full), metrics(halves)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    for ra, rb in zip(a, b, strict=True):  # the 2-step run also evaluated at its end, step 2
        keys = [
            k for k in ("reward", "loss", "kl_distill", "grad_norm", "eval_mean@2", "eval_greedy") if k in ra
        ]
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}
    assert "kl_distill" in a[-1] and "eval_greedy" in a[-1]


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_bf16_only_where_the_cpu_computes_it_natively(native, monkeypatch):
    monkeypatch.setattr(loading, "native_bf16_cpu", lambda: native)
    assert loading.resolve_dtype("auto", cuda=False)[0] == ("bfloat16" if native else "float32")
    assert loading.resolve_dtype("float32", cuda=False)[0] == "float32"
    assert loading.resolve_dtype("bfloat16", cuda=False)[0] == "bfloat16"  # asked for: slow, but it runs


@pytest.mark.parametrize("dtype, chosen", [("auto", "float32"), ("bfloat16", "bfloat16")])
def test_a_cpu_without_bf16_units_keeps_float32_under_auto_and_runs_bf16_when_asked(
    tiny_path, tmp_path, monkeypatch, capsys, dtype, chosen
):
    monkeypatch.setattr(loading, "native_bf16_cpu", lambda: False)
    out = tmp_path / "run"
    argv = ["--model", str(tiny_path), *SMALL_RUN, "--dtype", dtype, "--steps", "1", "--output-dir", str(out)]
    assert sdpg.main(argv) == 0
    assert json.loads((out / "args.json").read_text())["dtype"] == chosen
    assert f"base weights in {chosen}" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out)] == [0, 1]


def test_a_full_fine_tune_keeps_float32_under_auto_and_refuses_bf16(monkeypatch):
    """It trains the base weights themselves: in bf16 an update of lr 1e-6 rounds away."""
    monkeypatch.setattr(loading, "native_bf16_cpu", lambda: True)
    assert loading.resolve_dtype("auto", cuda=False, full_finetune=True)[0] == "float32"
    from harness import cli
    from harness.errors import UsageError

    with pytest.raises(UsageError, match="--dtype float32"):
        cli.parse(cli.given_flags(["--full-finetune", "--dtype", "bfloat16"]))


def test_the_benchs_setting_without_autocast_is_pefts_float32_adapter_path(tiny_path):
    """bench/dtype_bench.py's WITHOUT_AUTOCAST: mixed_precision undone, so the adapter's
    product is float32 again (PEFT casts its input), outside any autocast."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import dtype_bench

    _, policy = bf16_policy(tiny_path)
    dtype_bench.without_autocast(policy.model)
    seen = []
    layer = next(m for m in policy.model.modules() if isinstance(m, LoraLinear))
    layer.lora_A["default"].register_forward_hook(lambda _, a, out: seen.append(out.dtype))
    batch = rollout(policy.model, policy.tokenizer, EXAMPLES[:2], 2, 4, seed=3)
    assert seen and set(seen) == {torch.float32} and not torch.is_autocast_enabled("cpu")
    assert batch.response_ids.shape[0] == 4
