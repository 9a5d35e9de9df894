"""Rollouts: one model in three roles, its two prompt views, sampling and scoring.

One model plays three roles (`Policy`, `teacher_role`, `reference_role`):
  student    pi_theta(.|x)      LoRA on: samples G responses per prompt, gets the gradient
  teacher    pi_theta(.|x, c)   LoRA on, the privileged context c in its prompt, no gradient
             (--teacher initial: the reference's weights; ema: a moving average)
  reference  pi_ref(.|x)        the same weights with the LoRA adapter switched off

Every example is shown to the model twice (`prompt_texts`), in the authors' format:
chat messages whose first message holding [TEACHER_CONTEXT_TOKEN] splits there, once:
  student view  x       that message's content before the token: the question and the
                        instruction to answer
  teacher view  (x, c)  the same text immediately followed by everything after the token,
                        the privileged context c (by default a sentence with the answer)

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

import copy
import dataclasses
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from losses import DEFAULT_CHUNK, chunked_head

# ---------------------------------------------------------------- the two prompt views

TEACHER_CONTEXT_TOKEN = "[TEACHER_CONTEXT_TOKEN]"
BOXED_INSTRUCTION = "Present your final answer inside \\boxed{}, for example \\boxed{42}."
DAPO_INSTRUCTION = (
    "The last line of your response should be of the form Answer: $Answer (without quotes) "
    "where $Answer is the answer to the problem."
)


@dataclass
class Example:
    """One prompt: the question (for logs), the gold answer (for the verifier), the chat
    messages in the authors' format, the teacher's context after the token, and the
    template that context was written from (None: the source gave the context)."""

    question: str
    answer: str
    messages: list[dict[str, str]]
    context_template: str | None = None
    wrong_answer: str | None = None  # for --teacher-contrast (`with_wrong_answers`)
    solution: str | None = None  # a worked solution, for templates with {solution}


def with_context(ex: Example, template: str, answer: str | None = None) -> Example:
    """The example with its teacher context rewritten from `template` (with `answer`, by
    default the gold one, and its worked solution); an example whose context came from its
    source is unchanged."""
    if ex.context_template is None:
        return ex
    messages = copy.deepcopy(ex.messages)
    for m in messages:
        if TEACHER_CONTEXT_TOKEN in m["content"]:
            asked = m["content"].split(TEACHER_CONTEXT_TOKEN, 1)[0]
            # no solution: a template that asks for one raises KeyError rather than print "None"
            solution = {} if ex.solution is None else {"solution": ex.solution}
            context = template.format(answer=ex.answer if answer is None else answer, **solution)
            m["content"] = f"{asked}{TEACHER_CONTEXT_TOKEN}\n\n{context}"
            break
    return dataclasses.replace(ex, messages=messages, context_template=template)


def contrast_example(ex: Example) -> Example:
    """The example whose context states its wrong answer (the contrastive teacher's view)."""
    return with_context(ex, ex.context_template, ex.wrong_answer)


def views(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(student messages, teacher messages), split at the first message holding the token.
    Messages without the token give both views the same prompt."""
    messages = [
        {**m, "content": m["content"].replace(DAPO_INSTRUCTION, BOXED_INSTRUCTION, 1)} for m in messages
    ]
    for i, m in enumerate(messages):
        if TEACHER_CONTEXT_TOKEN in m["content"]:
            student_part, context = m["content"].split(TEACHER_CONTEXT_TOKEN, 1)
            student, teacher = copy.deepcopy(messages), copy.deepcopy(messages)
            student[i] = {**m, "content": student_part}
            teacher[i] = {**m, "content": student_part + context}
            return student, teacher
    return messages, copy.deepcopy(messages)


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template when it has one, else plain 'Question/Answer' text."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "Question: " + "\n".join(m["content"] for m in messages) + "\nAnswer:"


def prompt_texts(tokenizer, ex: Example) -> tuple[str, str]:
    """(student prompt x, teacher prompt (x, c)) for one example, as the model reads them."""
    student, teacher = views(ex.messages)
    return render(tokenizer, student), render(tokenizer, teacher)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt (the template already holds any special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- sampling


@dataclass
class RolloutBatch:
    """B prompts x G responses, rows group-contiguous (row i*G + j is prompt i, sample j),
    and what the step adds to each row: its verdict and advantage (stage 2) and the
    log-probs fixed for the step (stage 3; None where not used)."""

    student_ids: Tensor  # [B*G, Ls] left-padded student prompts
    student_mask: Tensor  # [B*G, Ls]
    teacher_ids: Tensor  # [B*G, Lt] left-padded teacher prompts
    teacher_mask: Tensor  # [B*G, Lt]
    response_ids: Tensor  # [B*G, T] sampled tokens, shared by both views
    response_mask: Tensor  # [B*G, T] 1 up to and including the first EOS
    truncated: Tensor  # [B*G] bool: no EOS within max_new_tokens
    completions: list[str]  # decoded responses, for the verifier
    answers: list[str]  # gold answer per row
    contrast_ids: Tensor | None = None  # [B*G, Lc] teacher prompts stating a wrong answer
    contrast_mask: Tensor | None = None  # [B*G, Lc]
    verdicts: list | None = None  # the verifier's, one per response
    advantages: Tensor | None = None  # [B*G] A_i
    ref_logp: Tensor | None = None  # [B*G, T] log pi_ref(y_t | x): the anchor
    old_logp: Tensor | None = None  # [B*G, T] log pi_old(y_t | x): the PPO ratio's base

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
    teacher_head: tuple[Tensor, Tensor | None] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp, kl, entropy), each [B, T] and 0 on masked tokens, through the chunked head.

    Uses the sampling temperature, as the policy that produced the tokens did; kl is the
    distillation divergence (`divergence`, see losses.chunked_head) to the teacher's
    logits, from its own head `teacher_head` (weight, bias) or, None, from `head`; the
    entropy carries a gradient only with entropy_grad (an entropy bonus).
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
        teacher_head=teacher_head,
    )
    zeros = torch.zeros(m.shape, dtype=flat[0].dtype, device=hidden.device)  # [B, T]
    return tuple(zeros.masked_scatter(m, x) for x in flat)  # type: ignore[return-value]


def contrast_hidden(student: Tensor, right: Tensor, wrong: Tensor) -> Tensor:
    """The contrastive teacher's hidden states, [B, T, H], float32, no gradient:

        q'_t ∝ p_t q_right,t / q_wrong,t,  i.e.  z' = z_student + z_right - z_wrong

    for the teacher given the gold answer (right) and given a wrong one. The head is
    linear (h W^T + b, and b + b - b = b), so z' is the head applied to
    h_student + h_right - h_wrong. What both teachers do alike (the context's style:
    longer answers, later EOS) cancels from q_right / q_wrong.

    This is not distillation toward a distribution: with p detached inside q', the
    gradient of KL(p || SG[q']) is exactly -grad E_p[log q_right - log q_wrong]
    (tests/test_losses.py), a token-level reward with no entropy term and no fixed
    target, whose optimum at each position is a point mass on the largest ratio; so the
    logged value (kl_contrast) is not a KL to any teacher, and a long run can lose
    entropy."""
    return (student.detach().float() + right.float() - wrong.float()).detach()


def contrast_teacher(
    student: Tensor, right: Tensor, wrong: Tensor, head: nn.Linear, teacher_head: tuple | None
) -> tuple[Tensor, tuple | None]:
    """(hidden, teacher_head) of the contrastive teacher q' for `score_tokens`. With one
    head for all three, `contrast_hidden` and no head of its own. A teacher with its own
    head (W_q, b_q) gives z' = (h_s W^T + b) + (h_r - h_w) W_q^T: one linear head [W | W_q]
    [V, 2H] over [h_s | h_r - h_w] [B, T, 2H], bias b."""
    if teacher_head is None:
        return contrast_hidden(student, right, wrong), None
    dtype = torch.promote_types(student.dtype, torch.float32)
    hidden = torch.cat([student.detach().to(dtype), right.to(dtype) - wrong.to(dtype)], -1)  # [B, T, 2H]
    weight = torch.cat([head.weight.detach(), teacher_head[0].to(head.weight.dtype)], 1)  # [V, 2H]
    return hidden, (weight, None if head.bias is None else head.bias.detach())


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


def batched_logprobs(
    model, batch: RolloutBatch, cfg, view: str = "student", temperature: float | None = None
) -> Tensor:
    """Log-probs [B*G, T] of the sampled tokens under `model` reading `view` (no grad), one
    micro-batch (cfg.micro_batch rows) at a time; at the sampling temperature unless one
    is given."""
    size, temperature = cfg.micro_batch, cfg.temperature if temperature is None else temperature
    parts = [
        response_logprobs(model, batch.rows(slice(s, s + size)), temperature, cfg.kl_chunk_size, view).cpu()
        for s in range(0, batch.response_ids.shape[0], size)
    ]
    return torch.cat(parts)  # [B*G, T]


# ---------------------------------------------------------------- one model, three roles


@dataclass
class Policy:
    """The model being trained, its tokenizer, (full fine-tune only) a frozen reference, and
    (--teacher ema only) the moving average of its trained weights."""

    model: torch.nn.Module
    tokenizer: object
    frozen_reference: torch.nn.Module | None = None
    ema: EmaWeights | None = None


@contextmanager
def reference_role(policy: Policy):
    """pi_ref: the frozen copy, or the adapter switched off for the duration."""
    if policy.frozen_reference is not None:
        yield policy.frozen_reference
    else:
        with policy.model.disable_adapter():
            yield policy.model


def teacher_head(policy: Policy, teacher: nn.Module, kind: str) -> tuple[Tensor, Tensor | None] | None:
    """The teacher's own LM head (weight [V, H], bias [V] or None), detached, where it is
    not the student's: a full fine-tune's frozen reference (--teacher initial) or its
    averaged weights (--teacher ema: copied, as they are swapped back out after the
    pass). None where the teacher reads the student's head: live, and with LoRA, which
    leaves the head alone."""
    head = teacher.get_output_embeddings()
    swapped = kind == "ema" and head.weight.requires_grad  # the average is in the trained weights
    if teacher is policy.model and not swapped:
        return None

    def keep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().clone() if swapped else t.detach()

    return keep(head.weight), keep(head.bias)


@contextmanager
def teacher_role(policy: Policy, teacher: str):
    """The teacher's weights: the policy itself ('live', the paper), the reference
    ('initial'), or the moving average of the trained weights ('ema')."""
    if teacher == "initial":
        with reference_role(policy) as reference:
            yield reference
    elif teacher == "ema":
        with policy.ema.swapped_in():
            yield policy.model
    else:
        yield policy.model


class EmaWeights:
    """theta' <- d theta' + (1 - d) theta over the trainable parameters, after every optimizer
    step; `swapped_in` puts theta' into the model for the teacher pass only.

    A live teacher is made of the weights being trained, so its reading of the context
    moves (and erodes) with every update; the average moves slowly, a teacher between
    the live one and the initial weights. With LoRA only the adapter is averaged.
    """

    def __init__(self, params, decay: float):
        self.params = [p for p in params if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            s.mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)

    @contextmanager
    def swapped_in(self):
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)
