"""Tasks: prompts with a gold answer and the privileged context only the teacher sees.

Every prompt is held in the authors' format (their verl dataset code, github
lauyikfung/SDPG): chat messages whose first message holding `[TEACHER_CONTEXT_TOKEN]`
splits there, once, into the two views of `views`:

    student  that message's content before the token, unchanged
    teacher  the same text immediately followed by everything after the token

Both views are rendered with the chat template and add_generation_prompt=True. Before
the split, the DAPO instruction "The last line of your response should be of the form
Answer: ..." is replaced by their boxed one, as in their boxed runs. A plain question
becomes `question \n INSTRUCTION [TEACHER_CONTEXT_TOKEN] \n\n context`, where the context
is the authors' text with the gold answer in it (`--context-template`) unless a source
gives one. INSTRUCTION is ours, not their boxed sentence, which carries an example
answer (\boxed{42}): with it the tiny model's warm start learned its planted
misconception less (held-out greedy 49% before RL, ours 4%) and the default SDPG run
collapsed to empty boxes by step 80. A question that already says how to answer (a
\boxed answer, DAPO's 'Answer:' line) gets no instruction of ours.

Sources:
- `arithmetic`: built in, generated offline from a seed; the default task. One-digit
  additions (a + b, 1 <= a, b <= 9) phrased as short word problems, with a fixed
  held-out split whose questions never occur in training. The 81 addition facts are
  shared by both splits: the held-out set measures answering new questions, not
  discovering new arithmetic.
- `word-problems`: built in, offline: one-step GSM8K-style additions ("Tom has 12 apples
  and buys 7 more. How many ..."), one- and two-digit, for small real chat models; the
  held-out split is fixed and its questions never occur in training.
- `gsm8k`: `openai/gsm8k` (config `main`) through `datasets`; gold = text after '####'.
- a local `.jsonl`, `.json`, `.parquet` or `.csv` file, either in the authors' verl
  format (`prompt`: a list of chat messages, `reward_model.ground_truth`: the answer)
  or with columns `question`, `answer` and optional `context` and `solution` (a
  `question` holding the token is used as their message content). Rows with an empty
  question or answer are skipped, with a count.

A `context` from the data is used as given; --context-template phrases only rows
without one, with {answer} (the gold answer) and {solution} (a worked solution: the
file's `solution` column, GSM8K's text before '####') filled in.
"""

from __future__ import annotations

import dataclasses
import functools
import random
import string
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

from harness.errors import UsageError
from rollout import (
    DAPO_INSTRUCTION,
    TEACHER_CONTEXT_TOKEN,
    Example,
    contrast_example,
    encode,
    prompt_texts,
    views,
)

# Ours, for plain questions: no digits of its own, which a small model would read as operands.
INSTRUCTION = "Put the final answer in \\boxed{}."
CONTEXT_TEMPLATE = (
    "The correct answer to this problem is: {answer}\n"
    "Use this to verify your reasoning, but show your full solution process."
)
# Named privileged contexts: --context-template NAME, and the set `auto` chooses from (with
# any --context-candidates) by the teacher view's accuracy on training questions.
CONTEXT_TEMPLATES = {
    "authors": CONTEXT_TEMPLATE,
    "answer-is": "(The answer is {answer}.)",
    "hint": "Hint: the answer is {answer}.",
    "verify": "A teacher checked this problem: the final answer is {answer}.",
    # the paper's teacher prompt (its Fig. 4, after the token), around a worked solution
    "paper": (
        "[Hint] The correct answer is {answer}. A common way to solve this is:\n{solution}\n"
        "[Instruction] If possible, derive the answer {answer} using an alternative, equally rigorous "
        "mathematical approach (e.g., algebraic vs geometric, or different substitution). If no "
        "alternative exists, articulate the standard approach with exceptional clarity. Do NOT state "
        "that you were given the answer or reference."
    ),
}
FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HELD_OUT_SEED = 1_000_003  # the arithmetic eval split's own stream
HELD_OUT = 500  # generated tasks train on none of the first max(500, --eval-size) held-out questions


def template_fields(template: str) -> set[str]:
    """The {fields} a context template fills: {answer}, {solution}."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def context_text(template: str, answer: str, solution: str | None, question: str) -> str:
    """The template with the gold answer (and worked solution) in it; UsageError when it
    asks for a solution this question does not have."""
    if solution is None and "solution" in template_fields(template):
        raise UsageError(
            f"the teacher's context template needs {{solution}}, a worked solution, and the question "
            f"{question[:60]!r} has none: use a phrasing with only {{answer}} (e.g. authors), or data "
            "with a 'solution' column (gsm8k has one)"
        )
    return template.format(answer=answer, **({} if solution is None else {"solution": solution}))


def plain_example(
    question: str,
    answer: str,
    context: str,
    instruction: str = INSTRUCTION,
    template: str | None = None,
    solution: str | None = None,
) -> Example:
    """A question in the authors' format: the instruction (none when the question already
    says how to answer: a boxed answer or DAPO's 'Answer:' line), then the token and c."""
    if "\\boxed" in question or DAPO_INSTRUCTION in question:
        instruction = ""
    asked = f"{question}\n{instruction}" if instruction else question
    content = f"{asked}{TEACHER_CONTEXT_TOKEN}\n\n{context}"
    return Example(question, answer, [{"role": "user", "content": content}], template, solution=solution)


def templated_example(
    question: str, answer: str, template: str, instruction: str = INSTRUCTION, solution: str | None = None
) -> Example:
    """A plain question whose teacher context is `template` with the gold answer (and the
    worked solution) in it."""
    context = context_text(template, answer, solution, question)
    return plain_example(question, answer, context, instruction, template, solution)


def with_wrong_answers(examples: list[Example]) -> list[Example]:
    """The examples, each given a wrong answer for the contrastive teacher: another answer
    of the same examples, picked by a hash of the question (the same in every process)."""
    pool = sorted({e.answer.strip() for e in examples})
    if any(e.context_template is None for e in examples) or len(pool) < 2:
        raise UsageError(
            "--teacher-contrast rewrites the context with a wrong answer: it needs contexts written from "
            "--context-template (not given by the data) and at least two different answers"
        )
    out = []
    for e in examples:
        others = [a for a in pool if a != e.answer.strip()]
        out.append(dataclasses.replace(e, wrong_answer=others[zlib.crc32(e.question.encode()) % len(others)]))
    return out


# ---------------------------------------------------------------- arithmetic


_NAMES = ["Ann", "Ben", "Cal", "Dee", "Eli", "Fay", "Gus", "Ivy"]
_ITEMS = ["apples", "books", "coins", "pens", "shells", "stamps"]


def arithmetic_question(rng: random.Random) -> tuple[str, str]:
    """(question, answer): a word problem over a one-digit addition fact a + b; 81 facts."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"{name} has {a} {item} and gets {b} more. How many {item} now?", str(a + b)


def generated_pairs(
    question: Callable[[random.Random], tuple[str, str]],
    n: int,
    split: str,
    seed: int,
    held_out: int = HELD_OUT,
) -> list[tuple[str, str]]:
    """n (question, answer) pairs from a generator: 'test' is fixed (its own seed), a run
    evaluates on its first --eval-size; 'train' follows `seed` and never repeats one of the
    first max(HELD_OUT, held_out) test questions (a fixed 500, so that the training rows do
    not change with --eval-size up to there)."""
    if split == "test":
        rng = random.Random(HELD_OUT_SEED)
        return [question(rng) for _ in range(n)]
    test = random.Random(HELD_OUT_SEED)
    kept_out = {question(test)[0] for _ in range(max(HELD_OUT, held_out))}
    rng, pairs, draws = random.Random(seed), [], 0
    while len(pairs) < n:
        if draws == 100 * n + 10_000:  # bounded: a held-out set can cover every question there is
            raise UsageError(
                f"--eval-size {held_out} holds out nearly every question this task generates, leaving "
                "too few for training: lower --eval-size"
            )
        draws += 1
        q, a = question(rng)
        if q not in kept_out:
            pairs.append((q, a))
    return pairs


def arithmetic_split(
    n: int,
    split: str,
    seed: int = 0,
    context_template: str = CONTEXT_TEMPLATE,
    instruction: str | None = None,
    held_out: int = HELD_OUT,
) -> list[Example]:
    """n one-digit addition examples (generated_pairs). instruction None: ours, the \\boxed one."""
    return [
        templated_example(q, a, context_template, INSTRUCTION if instruction is None else instruction)
        for q, a in generated_pairs(arithmetic_question, n, split, seed, held_out)
    ]


# ---------------------------------------------------------------- word problems

# A 135M chat model almost never writes \boxed{} (measured on SmolLM2-135M-Instruct: 0 of
# 60 greedy answers), but ends with "The answer is N." 80-85% of the time when asked to.
WORD_INSTRUCTION = "Solve it, then end your response with: The answer is <number>."
# Named instructions for --instruction (each preset's default is one of them).
INSTRUCTIONS = {"boxed": INSTRUCTION, "answer-is": WORD_INSTRUCTION}
_WP_NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Jack", "Emma", "Leo", "Zoe", "Max", "Ava"]
_WP_ITEMS = ["apples", "marbles", "books", "stickers", "cookies", "pencils", "cards", "coins", "toys"]


def word_question(rng: random.Random) -> tuple[str, str]:
    """(question, answer): a one-step GSM8K-style addition, half with one-digit numbers
    (SmolLM2-135M-Instruct greedy: about half right), half with two-digit ones (a quarter)."""
    name, item = rng.choice(_WP_NAMES), rng.choice(_WP_ITEMS)
    a, b = (
        (rng.randint(2, 9), rng.randint(2, 9))
        if rng.random() < 0.5
        else (rng.randint(11, 60), rng.randint(11, 39))
    )
    return f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", str(a + b)


def word_problem_split(
    n: int,
    split: str,
    seed: int = 0,
    context_template: str = CONTEXT_TEMPLATE,
    instruction: str | None = None,
    held_out: int = HELD_OUT,
) -> list[Example]:
    """n word-problem examples (generated_pairs).
    instruction None: "... end your response with: The answer is <number>." """
    return [
        templated_example(q, a, context_template, WORD_INSTRUCTION if instruction is None else instruction)
        for q, a in generated_pairs(word_question, n, split, seed, held_out)
    ]


# ---------------------------------------------------------------- GSM8K and files


def gsm8k_split(
    split: str,
    solution_as_context: bool = False,
    context_template: str = CONTEXT_TEMPLATE,
    instruction: str = INSTRUCTION,
) -> list[Example]:
    """GSM8K from the hub (or the local HF cache); gold = the number after '####', the
    worked solution (for {solution}) the text before it."""
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
        gold, solution = gold.strip(), solution.strip()
        if solution_as_context:
            context = solution + f"\nThe final answer is {gold}."
            out.append(plain_example(row["question"], gold, context, instruction, solution=solution))
        else:
            out.append(templated_example(row["question"], gold, context_template, instruction, solution))
    return out


def read_table(path: Path):
    """A local file as a `datasets.Dataset`, parsed in memory; UsageError if unreadable."""
    import datasets

    if not path.is_file():
        raise UsageError(f"dataset file not found: {path}")
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise UsageError(f"unsupported dataset file type {path.suffix!r}: use one of {', '.join(FILE_TYPES)}")
    if not path.read_bytes()[:4096].strip():
        raise UsageError(f"{path} holds no rows")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our one-line error says it all
    try:  # parsed in memory, its Arrow cache in a temporary folder: nothing is left behind
        with tempfile.TemporaryDirectory() as cache:
            return datasets.load_dataset(
                kind, data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
    except Exception as e:  # datasets raises many types for unreadable files
        raise UsageError(
            f"could not read {path} as {kind}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        ) from e


def row_example(row: dict, context_template: str, instruction: str = INSTRUCTION) -> Example | None:
    """One file row as an Example, or None when its question or answer is empty."""
    if "prompt" in row:  # the authors' verl format
        messages = [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in row["prompt"] or []]
        answer = str(((row.get("reward_model") or {}).get("ground_truth")) or "").strip()
        student, _ = views(messages)
        question = next((m["content"] for m in reversed(student) if m["role"] == "user"), "").strip()
        if not (question and answer):
            return None
        if any(TEACHER_CONTEXT_TOKEN in m["content"] for m in messages):  # their context
            return Example(question, answer, messages)
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")  # none given: ours
        content = messages[last]["content"] + TEACHER_CONTEXT_TOKEN + "\n\n"
        context = context_text(context_template, answer, None, question)
        messages[last] = {**messages[last], "content": content + context}
        return Example(question, answer, messages, context_template)
    question, answer = str(row["question"] or ""), str(row["answer"] or "").strip()
    solution = str(row.get("solution") or "").strip() or None
    asked = question.split(TEACHER_CONTEXT_TOKEN)[0].strip()
    if not (asked and answer):
        return None
    if row.get("context"):  # the data's own: used as given
        return plain_example(asked, answer, str(row["context"]), instruction, solution=solution)
    if TEACHER_CONTEXT_TOKEN in question:  # already their message content
        return Example(asked, answer, [{"role": "user", "content": question}], solution=solution)
    return templated_example(asked, answer, context_template, instruction, solution)


def file_examples(
    path: str | Path, context_template: str = CONTEXT_TEMPLATE, instruction: str = INSTRUCTION
) -> list[Example]:
    """Examples from a local .jsonl/.json/.parquet/.csv: the authors' verl format
    (prompt, reward_model) or question/answer[/context][/solution]."""
    path = Path(path)
    ds = read_table(path)
    columns = set(ds.column_names)
    if not ({"prompt", "reward_model"} <= columns or {"question", "answer"} <= columns):
        raise UsageError(
            f"{path} needs columns 'question' and 'answer' (optional 'context', 'solution'), or the verl "
            f"format's 'prompt' and 'reward_model'; found {', '.join(ds.column_names) or 'none'}"
        )
    if len(ds) == 0:
        raise UsageError(f"{path} holds no rows")
    try:
        rows = [row_example(row, context_template, instruction) for row in ds]
    except (UnicodeDecodeError, TypeError, KeyError, AttributeError) as e:  # text or shapes it cannot use
        raise UsageError(
            f"could not read the rows of {path} ({type(e).__name__}: {' '.join(str(e).split())[:120]}): "
            "it must be UTF-8, and a verl-format 'prompt' must be a list of {role, content} messages"
        ) from e
    out = [e for e in rows if e is not None]
    if len(out) < len(rows):
        print(
            f"{path}: skipped {len(rows) - len(out)} of {len(rows)} rows with an empty question or answer",
            file=sys.stderr,
        )
    if not out:
        raise UsageError(f"{path}: every row has an empty question or answer; nothing to use")
    return out


def load_task(
    name: str,
    split: str,
    n: int = 0,
    seed: int = 0,
    solution_as_context: bool = False,
    context_template: str = CONTEXT_TEMPLATE,
    instruction: str | None = None,
    held_out: int = HELD_OUT,
) -> list[Example]:
    """`arithmetic`, `word-problems`, `gsm8k`, or a file path; n > 0 keeps the first n.
    instruction: appended to plain questions (None: each task's own, \\boxed for files).
    held_out: a built-in task's training rows avoid its first `held_out` test questions."""
    if name in BUILT_IN:
        size = n or (2000 if split == "train" else 200)
        return BUILT_IN[name](size, split, seed, context_template, instruction, held_out)
    instruction = INSTRUCTION if instruction is None else instruction
    if name == "gsm8k":
        examples = gsm8k_split(split, solution_as_context, context_template, instruction)
    else:
        examples = file_examples(name, context_template, instruction)
    return examples[:n] if n > 0 else examples


# ---------------------------------------------------------------- a run's splits and batches


BUILT_IN = {"arithmetic": arithmetic_split, "word-problems": word_problem_split}


def load_splits(
    data: str,
    eval_data: str | None,
    eval_size: int,
    seed: int = 0,
    solution_as_context: bool = False,
    context_template: str = CONTEXT_TEMPLATE,
    instruction: str | None = None,
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples; UsageError for data that cannot be used. Needs no model,
    so bad data fails before any model work. A single file holds out its last tenth; a
    built-in task never trains on a question of its held-out split, whatever eval_size."""
    prompting = {"context_template": context_template, "instruction": instruction}
    train = load_task(
        data, "train", seed=seed, solution_as_context=solution_as_context, held_out=eval_size, **prompting
    )
    if eval_data:
        evals = load_task(eval_data, "test", **prompting)
    elif data in ("arithmetic", "word-problems", "gsm8k"):
        evals = load_task(data, "test", n=eval_size, **prompting)
    elif len(train) < 2:  # one row cannot be both the training and the held-out set
        raise UsageError(
            f"{data} holds {len(train)} usable row: a run trains on its first nine tenths and evaluates "
            "on the last tenth, so it needs at least 2 rows; add rows, or give --eval-data FILE"
        )
    else:
        k = max(1, len(train) // 10)
        train, evals = train[:-k], train[-k:]
    return train, evals[:eval_size]


def drop_long_prompts(examples: list[Example], tokenizer, max_length: int, name: str) -> list[Example]:
    """The examples whose longest view (the contrastive teacher's too, when it has a wrong
    answer) fits max_length tokens; the others are counted on stderr."""

    def views_of(e: Example) -> tuple[str, ...]:  # the contrastive teacher's prompt too
        texts = prompt_texts(tokenizer, e)
        return texts if e.wrong_answer is None else (*texts, prompt_texts(tokenizer, contrast_example(e))[1])

    kept = [e for e in examples if max(len(encode(tokenizer, t)) for t in views_of(e)) <= max_length]
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
