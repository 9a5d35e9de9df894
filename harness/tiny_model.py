"""The tiny offline model: a small Qwen2 built from nothing, so everything runs offline.

Tests and the default demo need a real causal LM without the Hugging Face hub. This
module trains a byte-level BPE tokenizer on the arithmetic task's own text, with
Qwen2's pre-tokenizer (same regex, NFC, byte-level), and wraps it in transformers'
`Qwen2Tokenizer`, so `AutoTokenizer.from_pretrained` reloads it with identical ids. The
model is a randomly initialised `Qwen2ForCausalLM` of a few layers. Both are saved with
`save_pretrained` (safetensors) and load like any hub model folder.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

from config import TINY_RIGHT_SHARE, WARM_START_STEPS
from harness.cache import cache_root, filled_once
from harness.data import arithmetic_split
from rollout import Example, encode, prompt_texts

EOS = "<|endoftext|>"
TINY_VERSION = "v4"  # bump when the recipe changes, so caches rebuild
QWEN2_PRETOKENIZE_REGEX = (  # transformers' Qwen2Tokenizer uses this exact pattern
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def tokenizer_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Text the tokenizer learns from: both prompt views and answers of the task, in the
    template-free rendering the tiny model reads."""

    class NoTemplate:  # data.render falls back to plain text without a chat template
        chat_template = None

    out = []
    for ex in arithmetic_split(n, "train", seed=seed):
        student, teacher = prompt_texts(NoTemplate(), ex)
        out.append(f"{student} {teacher} \\boxed{{{ex.answer}}}")
    return out


def train_tokenizer(vocab_size: int = 384, seed: int = 0) -> Qwen2Tokenizer:
    """A byte-level BPE with Qwen2's pre-tokenizer, as a transformers Qwen2Tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(seed=seed), trainer)
    trained = json.loads(bpe.to_str())["model"]  # vocab and ordered merges
    merges = [tuple(m) for m in trained["merges"]]
    return Qwen2Tokenizer(vocab=trained["vocab"], merges=merges, eos_token=EOS, pad_token=EOS, unk_token=EOS)


TINY_SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def build_tiny_model(
    path: str | Path, seed: int = 0, tokenizer: Qwen2Tokenizer | None = None, **shape
) -> Path:
    """Build, save and return a folder holding a random Qwen2 and a tokenizer.

    The tokenizer is the tiny one unless given (bench/step_bench.py passes Qwen2's real
    one). `shape` overrides Qwen2Config fields of TINY_SHAPE (bench/gpu_check.py builds
    Qwen2.5-0.5B's shape this way); vocab_size defaults to the tokenizer's size.
    """
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = tokenizer or train_tokenizer(seed=seed)
    config = Qwen2Config(
        **{"vocab_size": len(tokenizer), **TINY_SHAPE, **shape},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def ensure_tiny_model(
    cache_dir: str | None = None,
    seed: int = 0,
    warm_start_steps: int = WARM_START_STEPS,
    right_share: float = TINY_RIGHT_SHARE,
) -> Path:
    """The cached tiny model folder, built and warm-started on first use (`cache.filled_once`:
    safe when several runs start at once or one is killed while building), one per setting.
    0 warm-start steps keep the random initialisation; `right_share` sets the difficulty
    (`sft_rows`)."""

    def build(folder: Path) -> None:
        build_tiny_model(folder, seed=seed)
        if warm_start_steps > 0:
            model = Qwen2ForCausalLM.from_pretrained(folder)
            tokenizer = Qwen2Tokenizer.from_pretrained(folder)
            torch.manual_seed(seed)
            warm_start(model, tokenizer, warm_start_steps, right_share=right_share, seed=seed)
            model.save_pretrained(folder)

    entry = cache_root(cache_dir) / entry_name(seed, warm_start_steps, right_share)
    return filled_once(entry, build, "the tiny model")


def entry_name(seed: int, warm_start_steps: int, right_share: float) -> str:
    """The cache folder's name: one per recipe version and setting."""
    return f"tiny-{TINY_VERSION}-seed{seed}-warm{warm_start_steps}-right{right_share:g}"


def misconception(ex: Example) -> str:
    """The warm-started student's fixed wrong answer to a fact: the gold answer off by
    1 or 2, the offset chosen by a hash of the question's numbers (the same for every
    phrasing of the fact, and the same in every process). Answers are a + b >= 2, so
    it is never negative."""
    fact = " ".join(re.findall(r"\d+", ex.question) + [ex.answer])
    offset = (-2, -1, 1, 2)[zlib.crc32(fact.encode()) % 4]
    return str(int(ex.answer) + offset)


def sft_rows(
    tokenizer, examples: list[Example], teacher_share: float, right_share: float, rng: random.Random
) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) rows: a prompt view, then ' \\boxed{answer}' and EOS, loss on the answer.

    Teacher-view rows carry the gold answer (the teacher learns to use its context).
    Student-view rows carry it only `right_share` of the time and the fact's
    misconception otherwise, so the warm-started student usually answers wrong but
    samples the right answer sometimes: RL has something to find.
    """
    rows = []
    for ex in examples:
        student, teacher = prompt_texts(tokenizer, ex)
        use_teacher = rng.random() < teacher_share
        answer = ex.answer if use_teacher or rng.random() < right_share else misconception(ex)
        p = encode(tokenizer, teacher if use_teacher else student)
        r = encode(tokenizer, f" \\boxed{{{answer}}}") + [tokenizer.eos_token_id]
        rows.append((p + r, [0] * len(p) + [1] * len(r)))
    return rows


def warm_start(
    model,
    tokenizer,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    teacher_share: float = 0.4,
    right_share: float = TINY_RIGHT_SHARE,
    seed: int = 0,
    progress: bool = True,
) -> None:
    """Supervised warm start on the task format: prompt -> ' \\boxed{answer}'."""
    rng = random.Random(seed)
    examples = arithmetic_split(steps * batch_size, "train", seed=seed + 17)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 20) * (1 - k / steps))
    model.train()
    for k in tqdm(range(steps), desc="warm start", disable=not progress):
        chunk = examples[k * batch_size : (k + 1) * batch_size]
        rows = sft_rows(tokenizer, chunk, teacher_share, right_share, rng)
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)  # [b, L] right-padded
        loss_mask = torch.zeros((len(rows), width))  # [b, L]
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, m) in enumerate(rows):
            ids[i, : len(r)], loss_mask[i, : len(m)], attn[i, : len(r)] = torch.tensor(r), torch.tensor(m), 1
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # [b, L-1, V]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
