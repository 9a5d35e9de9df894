"""Rollouts: from examples to a batch of sampled responses that the losses can score.

Every example is shown to the model twice (data.prompt_texts):
  student view  x       the question and the instruction to answer in \\boxed{}
  teacher view  (c, x)  the same, plus the privileged context c (by default the answer)

The student view is sampled G times with HF `generate` (left padding, KV cache). The
teacher never generates: it reads the student's response token ids, appended to its own
prompt ids (ids are concatenated, never re-tokenised from text), so that q_t and p_t are
distributions over the same next token after the same prefix y<t.

Scoring never builds [B, T, V] logits: `response_hidden` returns the final hidden
states at the positions that predict response tokens and `score_tokens` sends the
masked ones through losses.chunked_head with the LM head's weight. Position ids
follow the attention mask, so left padding changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from data import Example, contrast_example, encode, prompt_texts
from losses import DEFAULT_CHUNK, chunked_head


@dataclass
class RolloutBatch:
    """B prompts x G responses, rows group-contiguous (row i*G + j is prompt i, sample j)."""

    student_ids: Tensor  # [B*G, Ls] left-padded student prompts
    student_mask: Tensor  # [B*G, Ls]
    teacher_ids: Tensor  # [B*G, Lt] left-padded teacher prompts
    teacher_mask: Tensor  # [B*G, Lt]
    response_ids: Tensor  # [B*G, T] sampled tokens, shared by both views
    response_mask: Tensor  # [B*G, T] 1 up to and including the first EOS
    truncated: Tensor  # [B*G] bool: no EOS within max_new_tokens
    completions: list[str]  # decoded responses, for the verifier
    answers: list[str]  # gold answer per row
    contrast_ids: Tensor | None = (
        None  # [B*G, Lc] teacher prompts stating a wrong answer (--teacher-contrast)
    )
    contrast_mask: Tensor | None = None  # [B*G, Lc]

    def rows(self, idx: slice) -> RolloutBatch:
        """A micro-batch of rows (tensors sliced, lists too)."""
        return RolloutBatch(
            *(None if (x := getattr(self, f)) is None else x[idx] for f in self.__dataclass_fields__)  # type: ignore[misc]
        )


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token id lists -> (ids, mask), both [n, max_len], padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [n, L]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [n, L]
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.tensor(list(s))
            mask[i, width - len(s) :] = 1
    return ids, mask


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a response: the generation config's (int or list) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def pad_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad token, else the first EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids(model, tokenizer)[0]


def response_mask(response_ids: Tensor, eos: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(mask [n, T]: 1 up to and including the first EOS, truncated [n]: no EOS at all)."""
    is_eos = torch.isin(response_ids, torch.tensor(list(eos), device=response_ids.device))  # [n, T]
    seen_before = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly earlier
    return (~seen_before).long(), ~is_eos.any(1)


def sampling_config(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    min_new_tokens: int = 0,
) -> GenerationConfig:
    """Plain temperature/top-p sampling (temperature 0: greedy); no top-k, no penalties
    from the model's own generation config."""
    greedy = temperature == 0.0
    return GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None if greedy else 0,
        repetition_penalty=1.0,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        pad_token_id=pad_id(model, tokenizer),
        eos_token_id=eos_ids(model, tokenizer),
        use_cache=True,
    )


@torch.no_grad()
def rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    min_new_tokens: int = 0,
    view: str = "student",
    contrast: bool = False,
) -> RolloutBatch:
    """Sample group_size responses per example from the student view (prompts repeated
    G times, so greedy decoding works with any G too). view="teacher" samples from the
    teacher prompt instead: only to measure how good the teacher is. contrast: also
    encode each example's teacher view stating its wrong answer (--teacher-contrast)."""
    device = next(model.parameters()).device
    texts = [prompt_texts(tokenizer, ex) for ex in examples]
    pad = pad_id(model, tokenizer)
    s_ids, s_mask = left_pad([encode(tokenizer, s) for s, _ in texts], pad)  # [B, Ls]
    t_ids, t_mask = left_pad([encode(tokenizer, t) for _, t in texts], pad)  # [B, Lt]
    G = group_size
    s_ids, s_mask = s_ids.repeat_interleave(G, 0), s_mask.repeat_interleave(G, 0)  # [B*G, Ls]
    t_ids, t_mask = t_ids.repeat_interleave(G, 0), t_mask.repeat_interleave(G, 0)  # [B*G, Lt]
    ids, mask = (t_ids, t_mask) if view == "teacher" else (s_ids, s_mask)
    cfg = sampling_config(model, tokenizer, max_new_tokens, temperature, top_p, min_new_tokens)
    torch.manual_seed(seed)  # generate samples from the global generator
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg)
    model.train(was_training)
    responses = out[:, ids.shape[1] :].cpu()  # [B*G, T]
    mask, truncated = response_mask(responses, eos_ids(model, tokenizer))
    c_ids = c_mask = None
    if contrast:
        wrong = [encode(tokenizer, prompt_texts(tokenizer, contrast_example(ex))[1]) for ex in examples]
        c_ids, c_mask = (x.repeat_interleave(G, 0) for x in left_pad(wrong, pad))  # [B*G, Lc]
    return RolloutBatch(
        student_ids=s_ids,
        student_mask=s_mask,
        teacher_ids=t_ids,
        teacher_mask=t_mask,
        response_ids=responses,
        response_mask=mask,
        truncated=truncated,
        completions=tokenizer.batch_decode(responses * mask + pad * (1 - mask), skip_special_tokens=True),
        answers=[ex.answer for ex in examples for _ in range(G)],
        contrast_ids=c_ids,
        contrast_mask=c_mask,
    )


def response_hidden(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
) -> Tensor:
    """Final hidden states [B, T, H] at the positions that predict each response token.

    Runs the decoder (no LM head) on [prompt | response]; position Lp - 1 + t predicts
    response token t because every prompt is left-padded to end at Lp - 1.
    """
    device = next(model.parameters()).device
    ids = torch.cat([prompt_ids, response_ids], 1).to(device)  # [B, Lp+T]
    mask = torch.cat([prompt_mask, response_mask], 1).to(device)  # [B, Lp+T]
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # [B, Lp+T]: padding does not shift positions
    hidden = model.get_decoder()(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
    ).last_hidden_state  # [B, Lp+T, H]
    lp, t = prompt_ids.shape[1], response_ids.shape[1]
    return hidden[:, lp - 1 : lp - 1 + t]  # [B, T, H]


def score_tokens(
    head: nn.Linear,
    hidden: Tensor,
    response_ids: Tensor,
    response_mask: Tensor,
    teacher_hidden: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
    entropy_grad: bool = False,
    *,
    divergence: str = "reverse",
    jsd_lambda: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, kl, entropy), each [B, T] and 0 on masked tokens, through the chunked head.

    Uses the sampling temperature, as the policy that produced the tokens did; kl is the
    distillation divergence (`divergence`, see losses.chunked_head); the entropy carries
    a gradient only with entropy_grad (an entropy bonus).
    """
    m = response_mask.to(hidden.device).bool()  # [B, T]
    teacher = None if teacher_hidden is None else teacher_hidden[m]  # [N, H]
    targets = response_ids.to(hidden.device)[m]  # [N]
    flat = chunked_head(
        hidden[m],
        head.weight,
        targets,
        teacher,
        head.bias,
        temperature,
        chunk_size,
        entropy_grad,
        divergence=divergence,
        jsd_lambda=jsd_lambda,
    )
    zeros = torch.zeros(m.shape, dtype=flat[0].dtype, device=hidden.device)  # [B, T]
    return tuple(zeros.masked_scatter(m, x) for x in flat)  # type: ignore[return-value]


def contrast_hidden(student: Tensor, right: Tensor, wrong: Tensor) -> Tensor:
    """The contrastive teacher's hidden states, [B, T, H], float32, no gradient:

        q'_t ∝ p_t q_right,t / q_wrong,t,  i.e.  z' = z_student + z_right - z_wrong

    for the teacher given the gold answer (right) and given a wrong one. The head is
    linear (h W^T + b, and b + b - b = b), so z' is the head applied to
    h_student + h_right - h_wrong. What both teachers do alike (the context's style:
    longer answers, later EOS) cancels; what the gold answer changes stays."""
    return (student.detach().float() + right.float() - wrong.float()).detach()


@torch.no_grad()
def response_logprobs(
    model: PreTrainedModel,
    batch: RolloutBatch,
    temperature: float,
    chunk_size: int = DEFAULT_CHUNK,
    view: str = "student",
) -> Tensor:
    """log pi(y_t | prompt, y<t) [B*G, T] of the sampled tokens, no grad, the prompt being
    the student view (reference or pi_old log-probs) or the teacher view (OPSD, RLSD)."""
    prompt_ids, prompt_mask = (
        (batch.teacher_ids, batch.teacher_mask)
        if view == "teacher"
        else (batch.student_ids, batch.student_mask)
    )
    h = response_hidden(
        model, prompt_ids, prompt_mask, batch.response_ids, batch.response_mask
    )  # [B*G, T, H]
    head = model.get_output_embeddings()
    logp, _, _ = score_tokens(head, h, batch.response_ids, batch.response_mask, None, temperature, chunk_size)
    return logp  # [B*G, T]
