# %% [markdown]
# # One SDPG step, in the open
#
# This file is a notebook in jupytext's percent format (Jupyter and VS Code open it as
# cells) and a plain script: `python docs/walkthrough.py` prints every stage of one SDPG
# update on the tiny offline model, in about 20 seconds on a laptop CPU. Every number comes
# from the project's own functions, the ones `sdpg.sdpg_step` calls; nothing is copied.
# The tests run it, so it cannot drift from the code.
#
# The stages follow the paper (and `sdpg.sdpg_step`):
# 1. sample G responses per prompt from the student view x;
# 2. score them with the verifier, turn rewards into group advantages;
# 3. read each response token under the teacher view (c, x) and the student view;
# 4. the loss: the clipped outcome term, beta times the full-vocabulary KL(p || SG[q]),
#    alpha times the anchor; backward.

# %%
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import cli, data  # noqa: E402
from harness.loading import load_policy, load_tokenizer  # noqa: E402
from harness.session import quiet_libraries  # noqa: E402
from losses import (  # noqa: E402
    Tokens,
    beta_schedule,
    clipped_policy_loss,
    group_advantages,
    kl_from_logits,
    sdpg_loss,
)
from rollout import (  # noqa: E402
    prompt_texts,
    reference_role,
    response_hidden,
    response_logprobs,
    rollout,
    score_tokens,
)
from verifier import make_verifier  # noqa: E402

quiet_libraries()
torch.manual_seed(0)
B, G, STEP = 2, 4, 10  # prompts, samples per prompt, the (0-based) training step we pretend to be at
cache = os.environ.get("SDPG_CACHE") or tempfile.mkdtemp()  # a short warm start, built once per cache
argv = ["--cache-dir", cache, "--tiny-warm-start-steps", "120", "--beta", "0.1", "--beta-warmup-steps", "20"]
cfg = args = cli.parse(cli.given_flags([*argv, "--output-dir", "unused"]))
path, tokenizer = load_tokenizer(args)  # builds the tiny Qwen2 and warm-starts it on first use
policy = load_policy(args, path, tokenizer)  # LoRA on: the student; LoRA off: the reference
model = policy.model
print(f"tiny Qwen2 with LoRA: vocabulary {len(tokenizer)}, beta {cfg.beta}, alpha {cfg.alpha}")

# %% [markdown]
# ## The two views of a prompt
# The student sees the question; the teacher sees the same question followed by the
# privileged context c, here the gold answer in the authors' words.

# %%
examples = data.arithmetic_split(B, "train", seed=3, context_template=args.context_template)
student_text, teacher_text = prompt_texts(tokenizer, examples[0])
print("student view x:     ", repr(student_text))
print("teacher view (c, x):", repr(teacher_text))

# %% [markdown]
# ## 1. Sample G responses per prompt from the student
# Rows are group-contiguous: row i*G + j is prompt i, sample j. The response mask is 1 up
# to and including the first end-of-sequence token.

# %%
batch = rollout(model, tokenizer, examples, G, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed)
print("response ids", tuple(batch.response_ids.shape), "# [B*G, T]")
for row, completion in enumerate(batch.completions):
    print(f"  row {row}: {completion!r}")

# %% [markdown]
# ## 2. Rewards, then group advantages
# A_i = (R_i - mean_G R) / (std_G R + eps), within each prompt's group of G; a group whose
# rewards are all equal carries no signal and gets exactly 0.

# %%
verifier = make_verifier()
rewards = torch.tensor([verifier(c, a).reward for c, a in zip(batch.completions, batch.answers, strict=True)])
advantages = group_advantages(rewards.double(), G).float()  # [B*G]
for i in range(B):
    r, a = rewards[i * G : (i + 1) * G], advantages[i * G : (i + 1) * G]
    shown = [round(x, 3) for x in a.tolist()]
    print(f"  prompt {i} (gold {examples[i].answer}): rewards {r.tolist()} -> advantages {shown}")
beta = beta_schedule(STEP + 1, cfg.steps, cfg.beta, cfg.beta_warmup_steps, cfg.beta_decay_steps)
print(f"beta at step {STEP + 1}: {cfg.beta} * min(1, {STEP + 1} / {cfg.beta_warmup_steps}) = {beta:.4f}")

# %% [markdown]
# ## 3. The teacher and the student read the same tokens
# The teacher never generates: its prompt ids are followed by the student's own response
# ids, so at every position q_t and p_t are distributions over the same next token. We
# keep final hidden states only; the LM head turns them into distributions chunk by chunk.

# %%
with torch.no_grad():
    teacher_h = response_hidden(
        model, batch.teacher_ids, batch.teacher_mask, batch.response_ids, batch.response_mask
    )
student_h = response_hidden(
    model, batch.student_ids, batch.student_mask, batch.response_ids, batch.response_mask
)
head = model.get_output_embeddings()
print("hidden states", tuple(student_h.shape), "# [B*G, T, H]")

logp, kl, entropy = score_tokens(
    head, student_h, batch.response_ids, batch.response_mask, teacher_h, cfg.temperature, cfg.kl_chunk_size
)  # [B*G, T] each
row, t = divmod(
    int((kl * batch.response_mask).argmax()), kl.shape[1]
)  # the token the teacher disagrees with most
with torch.no_grad():
    p_t = torch.softmax(head(student_h[row, t]) / cfg.temperature, -1)  # [V]
    q_t = torch.softmax(head(teacher_h[row, t]) / cfg.temperature, -1)
for name, dist in (("student p_t", p_t), ("teacher q_t", q_t)):
    top = dist.topk(5)
    shown = ", ".join(
        f"{tokenizer.decode([i])!r} {v:.2f}"
        for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    )
    print(f"  row {row}, position {t}: {name}: {shown}")
print(f"  KL(p_t || q_t) there = {kl[row, t]:.4f} nats")
print("per-token KL, masked (rows x positions):")
for r in range(kl.shape[0]):
    print(
        "  ",
        " ".join(
            f"{v:5.2f}" if m else "    -"
            for v, m in zip(kl[r].tolist(), batch.response_mask[r].tolist(), strict=True)
        ),
    )

# %% [markdown]
# ## 4. The loss
# Outcome: DAPO's dual-clip PPO surrogate. With one update per rollout pi_old is the
# current policy, so every ratio is 1 and the term is -A per token (its gradient is the
# policy gradient). Distillation: beta * KL. Anchor: alpha * 1/2 (log pi_theta - log pi_ref)^2
# on the sampled tokens, with the reference read with the LoRA adapter switched off.

# %%
mask = batch.response_mask
with torch.no_grad(), reference_role(policy) as reference:
    ref_logp = response_logprobs(reference, batch, cfg.temperature)  # [B*G, T]
outcome, stats = clipped_policy_loss(logp, logp.detach(), advantages, mask)  # [B*G, T]
i = int(advantages.abs().argmax())  # a row whose group is not flat
per_token = [round(x, 3) for x in outcome[i].tolist()]
print(f"outcome per token, row {i}: {per_token} (= -A_{i} = {-advantages[i]:.3f})")
print(f"clip fraction {float(stats['clipfrac']):.2f}, mean ratio {float(stats['ratio']):.2f}")
tokens = Tokens(logp, logp.detach(), advantages, mask, kl=kl, ref_logp=ref_logp)
loss, metrics = sdpg_loss(tokens, cfg, beta=beta)
print(
    "loss terms (means over tokens):",
    {k: round(metrics[k], 4) for k in ("pg_loss", "kl_distill", "ref_kl", "loss")},
)
print("(ref_kl is 0: a new LoRA adapter starts at zero, so the student is still the reference)")
loss.backward()
lora = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in lora]))
print(f"the gradient reaches {len(lora)} LoRA tensors; its norm is {norm:.4f}")
assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)  # the base is frozen

# %% [markdown]
# ## The chunked KL is the KL
# The same KL from full [B*G, T, V] logits, the way most implementations write it. At the
# tiny model's vocabulary the full tensor is small; at Qwen's 151,936 it is what the
# chunked path never builds.

# %%
with torch.no_grad():
    naive = kl_from_logits(head(student_h), head(teacher_h), cfg.temperature)  # [B*G, T]
m = mask.bool()
rel = float((kl.detach()[m] - naive[m]).abs().max() / naive[m].abs().max())
print(f"chunked vs full-logits KL: max relative difference {rel:.1e} (float32)")
assert rel <= 1e-5, rel
