# %% [markdown]
# # One SDPG step, in the open
#
# A notebook in jupytext's percent format (Jupyter and VS Code open it as cells) and a
# plain script: `python docs/walkthrough.py` runs one whole SDPG step on the default tiny
# model, the one `python sdpg.py` warm-starts and caches, with the same functions and the
# same five stages as `sdpg.sdpg_step`, and prints what each stage computes. It takes
# sdpg.py's flags (`python docs/walkthrough.py --beta 0.5`); the tests run it.
#
# 1. sample G responses per prompt from the student view x
# 2. verify each, rewards -> group advantages
# 3. log-probs fixed for the step: pi_ref (anchor) and pi_old (ratio)
# 4. per mini-batch, per micro-batch: the teacher reads (c, x, y<t), the student x, y<t;
#    the loss; backward
# 5. clip the gradient, optimizer step; then the same response's log-prob, before and after

# %%
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import cli, data  # noqa: E402
from harness.loading import load_policy, load_tokenizer  # noqa: E402
from harness.optim import Optimizer  # noqa: E402
from harness.session import quiet_libraries  # noqa: E402
from losses import (  # noqa: E402
    aggregate,
    beta_schedule,
    clipped_policy_loss,
    group_advantages,
    kl_from_logits,
    loss_normalizer,
    masked_mean,
    reference_kl,
)
from rollout import (  # noqa: E402
    batched_logprobs,
    prompt_texts,
    reference_role,
    response_hidden,
    response_logprobs,
    rollout,
    score_tokens,
)
from sdpg import micro_batch_loss, teacher_pass  # noqa: E402
from verifier import answer_format, make_verifier  # noqa: E402

quiet_libraries()
# 4 prompts, 2 per mini-batch: two optimizer steps on one rollout, so pi_old matters
cfg = cli.parse(cli.given_flags(["--batch-prompts", "4", "--mini-batch-prompts", "2", *sys.argv[1:]]))
path, tokenizer = load_tokenizer(cfg)  # the default run's cached tiny model (built on first use)
torch.manual_seed(cfg.seed)
policy = load_policy(cfg, path, tokenizer)  # LoRA on: the student and the teacher; off: the reference
model, G = policy.model, cfg.num_generations
optimizer = Optimizer(model.parameters(), cfg.lr, cfg.weight_decay, cfg.lr_warmup_steps)
train, _ = data.load_splits(cfg.data, None, cfg.eval_size, cfg.seed, False, cfg.context_template,
                            cfg.instruction)  # fmt: skip
verifier = make_verifier(cfg.verifier, cfg.last_number_fallback, answer_format(cfg.instruction))
print(f"tiny Qwen2 + LoRA, vocabulary {len(tokenizer)}; B = {cfg.batch_prompts}, G = {G}, beta {cfg.beta}")

# %% [markdown]
# ## 1. Sample G responses per prompt from the student view
# The teacher view is the same prompt followed by the privileged context c (here the
# gold answer in the authors' words). We take the first training step whose rollout has
# both a flat group (all G rewards equal) and a mixed one, to compare them below.

# %%
for step in range(20):
    examples = data.step_examples(train, step, cfg.batch_prompts, cfg.seed)
    batch = rollout(model, tokenizer, examples, G, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                    seed=cfg.seed * 1_000_003 + step)  # fmt: skip
    batch.verdicts = [verifier(c, a) for c, a in zip(batch.completions, batch.answers, strict=True)]
    rewards = torch.tensor([v.reward for v in batch.verdicts])  # [B*G]
    flat = (rewards.view(-1, G).amax(1) == rewards.view(-1, G).amin(1)).repeat_interleave(G)  # [B*G]
    if flat.any() and (~flat).any():
        break
else:
    raise SystemExit("no step in the first 20 has both a flat and a mixed group")
student_text, teacher_text = prompt_texts(tokenizer, examples[0])
print(f"training step {step}; student view x:\n  {student_text!r}\nteacher view (c, x):\n  {teacher_text!r}")
print("response ids", tuple(batch.response_ids.shape), "# [B*G, T]")

# %% [markdown]
# ## 2. Rewards, then group advantages
# A_i = (R_i - mean_G R) / (std_G R + eps) within each prompt's group; a flat group gets
# exactly 0: no outcome gradient at all.

# %%
batch.advantages = group_advantages(rewards.double(), G).float()  # [B*G]
for i in range(cfg.batch_prompts):
    rows = slice(i * G, (i + 1) * G)
    kind = "flat " if flat[i * G] else "mixed"
    print(f"  prompt {i} ({kind}, gold {examples[i].answer}): rewards {rewards[rows].int().tolist()} "
          f"-> A {[round(a, 2) for a in batch.advantages[rows].tolist()]}")  # fmt: skip
beta = beta_schedule(step + 1, cfg.steps, cfg.beta, cfg.beta_warmup_steps, cfg.beta_decay_steps)
print(f"beta at step {step + 1}: {beta} (constant unless --beta-warmup-steps / --beta-decay-steps)")

# %% [markdown]
# ## 3. Log-probs fixed for the step
# pi_ref reads the student view with the adapter off; pi_old is the policy before the
# first update. Both stay fixed while the step's two updates move the weights.

# %%
with reference_role(policy) as reference:
    batch.ref_logp = batched_logprobs(reference, batch, cfg)  # [B*G, T]
batch.old_logp = batched_logprobs(model, batch, cfg)  # [B*G, T]
mask = batch.response_mask  # [B*G, T]

# %% [markdown]
# ## 4a. The three terms and where their gradients come from
# On the whole rollout, before any update: the outcome term (DAPO's clipped surrogate),
# beta times the full-vocabulary KL(p_t || SG[q_t]), alpha times the anchor. The teacher
# reads its prompt followed by the student's own tokens, so q_t and p_t are over the same
# next token.

# %%
teacher_h, _, _ = teacher_pass(policy, batch, cfg)  # [B*G, T, H], no grad; LoRA: the student's head
student_h = response_hidden(model, batch.student_ids, batch.student_mask, batch.response_ids, mask)
logp, kl, _ = score_tokens(model.get_output_embeddings(), student_h, batch.response_ids, mask, teacher_h,
                           cfg.temperature, cfg.kl_chunk_size)  # [B*G, T] each  # fmt: skip
outcome, _ = clipped_policy_loss(logp, batch.old_logp, batch.advantages, mask)  # [B*G, T]
anchor = reference_kl(logp, batch.ref_logp, cfg.kl_mode)  # [B*G, T]
lora = [p for p in model.parameters() if p.requires_grad]


def grad_norm(per_token: torch.Tensor, rows: torch.Tensor) -> float:
    """The norm of the gradient, over the LoRA weights, of a term's token-mean on `rows`."""
    term = (per_token * mask)[rows].sum() / mask.sum()
    grads = torch.autograd.grad(term, lora, retain_graph=True, allow_unused=True)
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None])))


norms = {
    kind: {
        "outcome": grad_norm(outcome, rows),
        "distill": grad_norm(beta * kl, rows),
        "anchor": grad_norm(cfg.alpha * anchor, rows),
    }  # fmt: skip
    for kind, rows in (("flat", flat), ("mixed", ~flat))
}
for kind, n in norms.items():
    shown = ", ".join(f"{k} {v:.2e}" for k, v in n.items())
    rows = flat if kind == "flat" else ~flat
    kl_mean = float(masked_mean(kl.detach()[rows], mask[rows]))
    print(f"  {kind} groups: gradient norms {shown}; KL per token {kl_mean:.3f}")
assert norms["flat"]["outcome"] == 0.0 and norms["flat"]["distill"] > 0
print("A flat group has A = 0 and so no outcome gradient: only the teacher speaks to it.")
if norms["flat"]["anchor"] == 0.0:
    print("The anchor's gradient is 0: a new LoRA adapter starts at zero, so the student is the reference.")
head = model.get_output_embeddings()
r, t = divmod(int((kl.detach() * mask).argmax()), kl.shape[1])  # where the teacher disagrees most
with torch.no_grad():
    for name, h in (("student p_t", student_h), ("teacher q_t", teacher_h)):
        top = torch.softmax(head(h[r, t]) / cfg.temperature, -1).topk(3)  # [V] -> its 3 likeliest tokens
        shown = ", ".join(f"{tokenizer.decode([i])!r} {v:.2f}" for v, i in zip(*top, strict=True))
        print(f"  row {r} (gold {batch.answers[r]}), after {tokenizer.decode(batch.response_ids[r, :t])!r}: "
              f"{name}: {shown}")  # fmt: skip


def length_sentence(sum_a: float, loss: float, lengths: torch.Tensor) -> str:
    """What the mixed groups' outcome loss says about the token-mean, from its numbers."""
    if bool((lengths == lengths[0]).all()):
        return (f"The mixed groups' advantages sum to {sum_a:.1e} and every mixed response has "
                f"{int(lengths[0])} tokens, so their outcome loss is {loss:.4f} too; its gradient is "
                "not 0 (each token's log-prob moves with its own response's advantage).")  # fmt: skip
    return (
        f"The mixed groups' advantages sum to {sum_a:.1e}, yet their outcome loss is {loss:.4f}: the "
        "token-mean weighs each response by its length, so long and short answers do not cancel."
    )


mixed_rows = ~flat
sum_a = float(batch.advantages[mixed_rows].sum())
lengths = mask.sum(1).float()  # [B*G]
pg_mixed = float(-(batch.advantages * lengths)[mixed_rows].sum() / lengths[mixed_rows].sum())
print(length_sentence(sum_a, pg_mixed, lengths[mixed_rows]))
# The length effect on its own: one group's two responses, A = +1 and -1, of 2 and 6 tokens, on-policy.
two_mask = torch.tensor([[1.0, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])  # [2, 6]
two_pg, _ = clipped_policy_loss(torch.zeros(2, 6), torch.zeros(2, 6), torch.tensor([1.0, -1.0]), two_mask)
two = float(aggregate(two_pg, two_mask, "token-mean", None))
print(f"Two responses of one group, A = +1 and -1, of 2 and 6 tokens: token-mean outcome loss {two:+.3f} "
      "= (-2 + 6) / 8, not 0: the longer answer weighs more.")  # fmt: skip

# %% [markdown]
# The chunked KL is the KL: the same values from full [B*G, T, V] logits, the tensor the
# chunked path never builds (at Qwen's V = 151,936 it is 1.2 GB per 2,048 tokens).

# %%
with torch.no_grad():
    naive = kl_from_logits(head(student_h), head(teacher_h), cfg.temperature)  # [B*G, T]
m = mask.bool()
rel = float((kl.detach()[m] - naive[m]).abs().max() / naive[m].abs().max())
print(f"chunked vs full-logits KL: max relative difference {rel:.1e} (float32)")
assert rel <= 1e-5, rel
del student_h, logp, kl, outcome, anchor

# %% [markdown]
# ## 4b-5. The step: per mini-batch of whole groups, per micro-batch, backward; clip, step
# This is `sdpg_step`'s loop. The first update's ratio pi_theta / pi_old is exactly 1;
# the second reads the weights the first one moved.

# %%
before = [p.detach().clone() for p in lora]
row = int(torch.nonzero(flat)[0])  # a flat-group response: what does distillation do to it?
rows_per_update, ratio_gaps = cfg.mini_batch_prompts * G, []
for start in range(0, len(batch.completions), rows_per_update):
    end = start + rows_per_update
    normalizer = loss_normalizer(mask[start:end], cfg.loss_agg)
    tokens = max(1.0, float(mask[start:end].sum()))
    optimizer.zero_grad()
    for s in range(start, end, cfg.micro_batch):
        mb = batch.rows(slice(s, min(s + cfg.micro_batch, end)))
        teacher = teacher_pass(policy, mb, cfg)
        loss, metrics, _ = micro_batch_loss(policy, mb, cfg, beta, teacher, normalizer, tokens)
        loss.backward()
        with torch.no_grad():  # how far the ratio is from 1 on this micro-batch's tokens
            now = response_logprobs(model, mb, cfg.temperature)  # [b, T]
            ratio_gaps.append(float(((now - mb.old_logp).exp() - 1).abs()[mb.response_mask.bool()].max()))
    norm = torch.nn.utils.clip_grad_norm_(optimizer.params, cfg.grad_clip)
    optimizer.step()
    print(f"  update on rows {start}-{end - 1}: loss {metrics['loss']:.4f}, gradient norm {float(norm):.3f}, "
          f"max |ratio - 1| {ratio_gaps[-1]:.1e}")  # fmt: skip
optimizer.end_training_step()
assert ratio_gaps[0] < 1e-4 and ratio_gaps[-1] > 1e-3
after = [p.detach().clone() for p in lora]
changed = sum(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
with torch.no_grad():
    logp_after = response_logprobs(model, batch.rows(slice(row, row + 1)), cfg.temperature)[0]
old_sum, new_sum = float(batch.old_logp[row].sum()), float(logp_after.sum())
direction = "less" if new_sum < old_sum else "more"
print(f"{changed} of {len(lora)} LoRA tensors changed. Flat-group response {row} "
      f"({batch.completions[row]!r}, gold {batch.answers[row]}): log pi_theta {old_sum:.3f} before the "
      f"step, {new_sum:.3f} after: {direction} likely, with no outcome gradient")  # fmt: skip
