"""Tasks: questions with a gold answer and the privileged context the teacher sees.

SDPG needs, per prompt, the question x, the gold answer for the verifier, and a
privileged context c that only the teacher view gets. By default c is built from the
answer with a template (DEFAULT_CONTEXT below); a source may instead give c verbatim
(e.g. GSM8K's worked solution, or a `context` column).

Sources:
- `arithmetic`: built in, generated offline from a seed; the default task. One-digit
  additions (a + b, 1 <= a, b <= 9) phrased as short word problems, with a fixed
  held-out split whose questions never occur in training. The 81 addition facts are
  shared by both splits: the held-out set measures answering new questions, not
  discovering new arithmetic.
- `gsm8k`: `openai/gsm8k` (config `main`) through `datasets`; gold = text after '####'.
- a local `.jsonl`, `.json`, `.parquet` or `.csv` file with columns `question` and
  `answer` and optional `context`. A `question` that holds the authors' separator
  `[TEACHER_CONTEXT_TOKEN]` is split there into question and context (verl data format).
"""

from __future__ import annotations

import functools
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from errors import UsageError

TEACHER_CONTEXT_TOKEN = "[TEACHER_CONTEXT_TOKEN]"
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HELD_OUT_SEED = 1_000_003  # the arithmetic eval split's own stream


@dataclass
class Example:
    """One prompt: what the student sees, the gold answer, what only the teacher sees."""

    question: str
    answer: str
    context: str | None = None  # privileged text used verbatim; None: template from answer


# ---------------------------------------------------------------- the two views


INSTRUCTION = "Put the final answer in \\boxed{}."
DEFAULT_CONTEXT = (
    "The correct answer to this problem is: {answer}. "
    "Use this to verify your reasoning, but show your full solution process."
)


def render(tokenizer, user_text: str) -> str:
    """The tokenizer's chat template when it has one, else plain 'Question/Answer' text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user_text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"Question: {user_text}\nAnswer:"


def prompt_texts(tokenizer, ex: Example) -> tuple[str, str]:
    """(student prompt x, teacher prompt (c, x)) for one example, as the model reads them."""
    context = ex.context if ex.context is not None else DEFAULT_CONTEXT.format(answer=ex.answer)
    student = render(tokenizer, f"{ex.question}\n{INSTRUCTION}")
    teacher = render(tokenizer, f"{ex.question}\n{context}\n{INSTRUCTION}")
    return student, teacher


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt (the template already holds any special tokens)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- arithmetic


_NAMES = ["Ann", "Ben", "Cal", "Dee", "Eli", "Fay", "Gus", "Ivy"]
_ITEMS = ["apples", "books", "coins", "pens", "shells", "stamps"]


def arithmetic_example(rng: random.Random) -> Example:
    """A word problem over a one-digit addition fact a + b; 81 facts in all."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return Example(f"{name} has {a} {item} and gets {b} more. How many {item} now?", str(a + b))


def arithmetic_split(n: int, split: str, seed: int = 0) -> list[Example]:
    """n examples: 'test' is fixed (its own seed); 'train' follows `seed` and never
    repeats a test question."""
    if split == "test":
        rng = random.Random(HELD_OUT_SEED)
        return [arithmetic_example(rng) for _ in range(n)]
    held_out = {e.question for e in arithmetic_split(500, "test")}
    rng, out = random.Random(seed), []
    while len(out) < n:
        ex = arithmetic_example(rng)
        if ex.question not in held_out:
            out.append(ex)
    return out


# ---------------------------------------------------------------- GSM8K and files


def gsm8k_split(split: str, solution_as_context: bool = False) -> list[Example]:
    """GSM8K from the hub (or the local HF cache); gold = the number after '####'."""
    import datasets

    try:
        ds = datasets.load_dataset("openai/gsm8k", "main", split="train" if split == "train" else "test")
    except Exception as e:  # offline, no cache: datasets raises ConnectionError, OSError, ...
        raise UsageError(
            f"could not load openai/gsm8k from the hub or the local cache ({type(e).__name__}). "
            "Use --data arithmetic, or --data FILE with question/answer columns."
        ) from e
    out = []
    for row in ds:
        solution, _, gold = row["answer"].rpartition("####")
        context = solution.strip() + f"\nThe final answer is {gold.strip()}." if solution_as_context else None
        out.append(Example(row["question"], gold.strip(), context))
    return out


def split_teacher_context(question: str) -> tuple[str, str | None]:
    """'x [TEACHER_CONTEXT_TOKEN] c' -> ('x', 'c'); no separator -> (question, None)."""
    if TEACHER_CONTEXT_TOKEN not in question:
        return question, None
    q, _, c = question.partition(TEACHER_CONTEXT_TOKEN)
    return q.strip(), c.strip() or None


def file_examples(path: str | Path) -> list[Example]:
    """Examples from a local .jsonl/.json/.parquet/.csv with question/answer[/context]."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"dataset file not found: {path}")
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise UsageError(f"unsupported dataset file type {path.suffix!r}: use one of {', '.join(FILE_TYPES)}")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our one-line error says it all
    try:  # parsed in memory, its Arrow cache in a temporary folder: nothing is left behind
        with tempfile.TemporaryDirectory() as cache:
            ds = datasets.load_dataset(
                kind, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
    except Exception as e:  # datasets raises many types for unreadable files
        raise UsageError(
            f"could not read {path} as {kind}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        ) from e
    missing = {"question", "answer"} - set(ds.column_names)
    if missing:
        raise UsageError(
            f"{path} needs columns 'question' and 'answer' (optional 'context'); "
            f"found {', '.join(ds.column_names) or 'none'}"
        )
    if len(ds) == 0:
        raise UsageError(f"{path} holds no rows")
    out = []
    for row in ds:
        question, context = split_teacher_context(str(row["question"]))
        if row.get("context"):
            context = str(row["context"])
        out.append(Example(question, str(row["answer"]), context))
    return out


def load_task(
    name: str, split: str, n: int = 0, seed: int = 0, solution_as_context: bool = False
) -> list[Example]:
    """`arithmetic`, `gsm8k`, or a file path; n > 0 keeps the first n examples."""
    if name == "arithmetic":
        return arithmetic_split(n or (2000 if split == "train" else 200), split, seed)
    examples = gsm8k_split(split, solution_as_context) if name == "gsm8k" else file_examples(name)
    return examples[:n] if n > 0 else examples


# ---------------------------------------------------------------- a run's splits and batches


def load_splits(
    data: str, eval_data: str | None, eval_size: int, seed: int = 0, solution_as_context: bool = False
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples; UsageError for data that cannot be used. Needs no model,
    so bad data fails before any model work. A single file holds out its last tenth."""
    train = load_task(data, "train", seed=seed, solution_as_context=solution_as_context)
    if eval_data:
        evals = load_task(eval_data, "test")
    elif data in ("arithmetic", "gsm8k"):
        evals = load_task(data, "test", n=eval_size)
    else:
        k = max(1, len(train) // 10)
        train, evals = (train[:-k], train[-k:]) if len(train) > 1 else (train, train)
    return train, evals[:eval_size]


def drop_long_prompts(examples: list[Example], tokenizer, max_length: int, name: str) -> list[Example]:
    """The examples whose longer view fits max_length tokens; the others are counted on stderr."""
    kept = [
        e
        for e in examples
        if max(len(encode(tokenizer, t)) for t in prompt_texts(tokenizer, e)) <= max_length
    ]
    if len(kept) < len(examples):
        print(
            f"{name}: dropped {len(examples) - len(kept)} of {len(examples)} examples whose prompt is "
            f"longer than --max-prompt-length {max_length}",
            file=sys.stderr,
        )
    if not kept:
        raise UsageError(f"no {name} example fits --max-prompt-length {max_length}: raise it")
    return kept


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A fixed shuffle of range(n) per (seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order


def step_examples(train: list[Example], step: int, batch_prompts: int, seed: int) -> list[Example]:
    """The step's prompts: a fixed shuffle per epoch, so step k always sees the same batch
    (which is what makes a resumed run continue at the right data position)."""
    positions = range(step * batch_prompts, (step + 1) * batch_prompts)
    return [train[epoch_order(len(train), seed, p // len(train))[p % len(train)]] for p in positions]
