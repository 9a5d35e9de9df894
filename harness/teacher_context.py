"""The privileged context: does the teacher view answer better, and in which phrasing.

SDPG pulls the student toward the same model shown a privileged context c. That helps
only where the teacher view answers better than the student, and the phrasing of c
decides both how well the teacher answers and the style it pulls the student toward:
shown the authors' "... but show your full solution process", SmolLM2-135M answers
worse than without it, in longer answers, and SDPG then grows the student's answers
until they hit the length cap (README, "The teacher check"). So both are measured
before step 1, on training questions only (never held-out ones):

  check   greedy accuracy, mean length and truncation of the student view and of the
          teacher view on a fixed sample of training questions, with a warning when the
          teacher is not clearly better or writes much longer answers;
  choose  `--context-template auto`: of data.CONTEXT_TEMPLATES and --context-candidates,
          the phrasing whose teacher view answers most questions right (ties: the
          shorter answers, then the order listed). A phrasing with {solution} is a
          candidate only when every question it would phrase has a worked solution.
          When every phrasing answers none right, no phrasing helps: the tie-break
          still picks one (the run needs a context), and a warning says so and what
          to do instead.

A context the data gives (a `context` column) is used as given: `auto` phrases only the
rows without one, and the check reports the teacher view with it, as for a phrasing.

Greedy decoding, as the evaluation's teacher column, so the figures are one number per
question and repeatable.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

from config import Config
from harness import data
from harness.errors import UsageError
from rollout import Example, Policy, rollout, teacher_role, with_context
from verifier import Verdict

Splits = tuple[list[Example], list[Example]]  # (train, eval)
Verifier = Callable[[str, str], Verdict]

ROWS = 256  # responses per generate call, as in evaluation
MARGIN = 0.10  # the teacher view must be right on 10 points more questions to count as better
LONGER = 1.5  # ... and its answers no more than 1.5x as long as the student's


@dataclass
class ViewStats:
    """Greedy answers of one view on the check sample."""

    accuracy: float  # share of questions answered right
    length: float  # mean response length in tokens
    truncated: float  # share cut off at --max-new-tokens
    questions: list[str]  # which questions were scored (the check sample: training questions only)

    def row(self, name: str) -> str:
        return f"  {name:<12} {100 * self.accuracy:7.1f}% {self.length:12.1f} {100 * self.truncated:10.1f}%"


def check_sample(train: list[Example], size: int, seed: int) -> list[Example]:
    """A fixed sample of `size` training questions (the check never reads held-out ones)."""
    return random.Random(seed * 7919 + 17).sample(train, min(size, len(train)))


def greedy_stats(
    policy: Policy, examples: list[Example], view: str, cfg: Config, verifier: Verifier
) -> ViewStats:
    """Greedy answers of the student view, or of the teacher view read by the run's
    --teacher weights, scored by the verifier."""
    right, lengths, cut = [], [], []
    for s in range(0, len(examples), ROWS):
        chunk = examples[s : s + ROWS]
        with teacher_role(policy, cfg.teacher) if view == "teacher" else nullcontext(policy.model) as model:
            b = rollout(model, policy.tokenizer, chunk, 1, cfg.max_new_tokens, 0.0, 1.0, cfg.seed, view=view)
        right += [verifier(c, a).reward for c, a in zip(b.completions, b.answers, strict=True)]
        lengths += b.response_mask.sum(1).tolist()
        cut += b.truncated.tolist()
    n = max(1, len(examples))
    return ViewStats(sum(right) / n, sum(lengths) / n, sum(cut) / n, [e.question for e in examples])


def choose_template(
    candidates: dict[str, str], sample: list[Example], score: Callable[[list[Example]], ViewStats]
) -> tuple[str, dict[str, ViewStats]]:
    """(the chosen name, every candidate's teacher-view stats): most questions right, ties
    broken by the shorter answers, then by the order given. `score` greedy-decodes the
    teacher view of examples rewritten with one candidate."""
    stats = {name: score([with_context(e, text) for e in sample]) for name, text in candidates.items()}
    order = list(candidates)
    best = min(
        order, key=lambda n: (-round(stats[n].accuracy * len(sample)), stats[n].length, order.index(n))
    )
    return best, stats


def percent(share: float) -> str:
    """45, 40.6: a share in percent, at most one decimal, no trailing zero."""
    return f"{100 * share:.1f}".removesuffix(".0")


def much_longer(teacher_len: float, teacher_cut: float, student_len: float, student_cut: float) -> bool:
    """The style rule: the teacher view's answers over LONGER x as long as the student's, or
    cut off at --max-new-tokens on MARGIN more of them."""
    return teacher_len > LONGER * student_len or teacher_cut > student_cut + MARGIN


def warnings(student: ViewStats, teacher: ViewStats) -> list[str]:
    """What the check says when SDPG has little to distil, or a style to copy."""
    out = []
    ahead = round(100 * (teacher.accuracy - student.accuracy), 6)  # points; rounded: 0.3 - 0.2 is 10
    if ahead < 100 * MARGIN:
        out.append(
            f"warning: the teacher view answers {percent(teacher.accuracy)}% vs the student's "
            f"{percent(student.accuracy)}% of {len(student.questions)} training questions (greedy): "
            f"{ahead:+.1f} points, under the {100 * MARGIN:.0f}-point margin by which SDPG needs the "
            "teacher ahead to have something to distil. Try --context-template auto, a context that "
            "states the answer plainly, or --algo grpo."
        )
    if much_longer(teacher.length, teacher.truncated, student.length, student.truncated):
        out.append(
            f"warning: the teacher view writes much longer answers ({teacher.length:.0f} vs "
            f"{student.length:.0f} tokens; cut off {100 * teacher.truncated:.0f}% vs "
            f"{100 * student.truncated:.0f}%): SDPG pulls the student toward that style and its answers "
            "grow. Try a shorter --context-template, or --context-template auto."
        )
    return out


def table(rows: dict[str, ViewStats], title: str) -> str:
    head = f"{title}\n  {'view':<12} {'accuracy':>8} {'mean length':>12} {'truncated':>11}"
    return "\n".join([head, *(stats.row(name) for name, stats in rows.items())])


def metrics(student: ViewStats, teacher: ViewStats) -> dict[str, float]:
    """The check as metrics.jsonl keys (logged with step 0)."""
    return {
        f"check_{who}_{key}": getattr(stats, key)
        for who, stats in (("student", student), ("teacher", teacher))
        for key in ("accuracy", "length", "truncated")
    }


def settle(
    policy: Policy, splits: Splits, cfg: Config, verifier: Verifier, check: bool = True
) -> tuple[str, Splits, dict[str, float]]:
    """The run's privileged context, then the check: (the template text, (train, eval)
    rewritten with it, the check's metrics for step 0; {} without a check).

    `auto` chooses on training questions; the caller records the chosen text in the run's
    arguments, and a resumed run comes back with that text in place of `auto`
    (session.resumed_context), so nothing is chosen again. `check`: False when resuming
    or only evaluating (not a step 0)."""
    template, check_metrics = cfg.context_template, {}
    if cfg.check_size == 0 or cfg.algo == "grpo":  # GRPO reads no teacher: nothing to check
        template = data.CONTEXT_TEMPLATE if template == "auto" else template  # eval's teacher column
    elif check or template == "auto":  # auto chooses even for an evaluation, but logs no check
        solved = not missing_solutions(splits)
        template, check_metrics = checked(policy, splits[0], cfg, verifier, report=check, solved=solved)
    return template, rewrite(splits, template, policy.tokenizer, cfg.max_prompt_length), check_metrics


def missing_solutions(splits: Splits) -> int:
    """How many questions a template would phrase (no context of their own) lack a worked
    solution: a template with {solution} can phrase none of them."""
    return sum(e.context_template is not None and e.solution is None for examples in splits for e in examples)


def check_candidates(candidates: tuple[str, ...], splits: Splits) -> None:
    """UsageError, before any model work, for a --context-candidates text that needs a
    worked solution these questions do not all have."""
    lacking = missing_solutions(splits)
    for text in candidates:
        if lacking and "solution" in data.template_fields(text):
            raise UsageError(
                f"--context-candidates {text[:60]!r} needs {{solution}}, a worked solution, and {lacking} "
                "questions have none: drop it, or give data with a 'solution' column (gsm8k has one)"
            )


def checked(
    policy: Policy,
    train: list[Example],
    cfg: Config,
    verifier: Verifier,
    *,
    report: bool,
    solved: bool = False,
) -> tuple[str, dict[str, float]]:
    """(the template, chosen first when `auto`; the check's metrics, {} unless `report`):
    both views answer the check sample greedily; `report` prints the table and warnings.
    `solved`: every question to phrase has a worked solution ({solution} phrasings may run)."""
    sample = check_sample(train, cfg.check_size, cfg.seed)

    def score(examples: list[Example], view: str = "teacher") -> ViewStats:
        return greedy_stats(policy, examples, view, cfg, verifier)

    student = score(sample, "student")
    template = cfg.context_template
    if template == "auto":
        template, teacher = choose(sample, list(cfg.context_candidates), student, score, solved)
    else:
        teacher = score([with_context(e, template) for e in sample])
    if not report:
        return template, {}
    print(
        table({"student": student, "teacher": teacher}, f"teacher check on {len(sample)} training questions")
    )
    for line in warnings(student, teacher):
        print(line, file=sys.stderr)
    return template, metrics(student, teacher)


def choose(
    sample: list[Example],
    extra: list[str],
    student: ViewStats,
    score: Callable[..., ViewStats],
    solved: bool = False,
) -> tuple[str, ViewStats]:
    """`--context-template auto`: (the chosen text, its teacher-view stats); prints every
    candidate's row and the choice. `solved`: the questions carry worked solutions, so a
    phrasing with {solution} is a candidate too (else it is skipped, with a note)."""
    if not any(e.context_template for e in sample):
        print("note: every question brings its own context: --context-template auto has nothing to choose")
        return data.CONTEXT_TEMPLATE, score(sample)
    named = {**data.CONTEXT_TEMPLATES, **{f"yours-{i + 1}": text for i, text in enumerate(extra)}}
    candidates = {n: t for n, t in named.items() if solved or "solution" not in data.template_fields(t)}
    if len(candidates) < len(named):
        skipped = ", ".join(n for n in named if n not in candidates)
        print(f"note: not candidates, as these questions lack a worked solution ({{solution}}): {skipped}")
    name, stats = choose_template(candidates, sample, score)
    title = f"--context-template auto: each phrasing's teacher view on {len(sample)} training questions"
    print(table({"student": student, **stats}, title))
    print(f"chose {name!r}: {candidates[name]!r}")
    if stats[name].accuracy == 0:
        print(no_phrasing_helps(name, len(sample)), file=sys.stderr)
    return candidates[name], stats[name]


def no_phrasing_helps(name: str, questions: int) -> str:
    return (
        f"warning: no phrasing helps: every teacher view answers 0 of {questions} training questions, so "
        f"{name!r} won only the tie-break (shorter answers, then the order listed) and SDPG has nothing "
        "to distil. Give the teacher more than the answer (a 'solution' column and --context-template "
        "paper), train with --algo grpo, or use a model that can use the answer."
    )


def rewrite(splits: Splits, template: str, tokenizer, max_prompt_length: int) -> Splits:
    """(train, eval) with their contexts written from `template`, prompts that no longer
    fit --max-prompt-length dropped (with a count)."""
    return tuple(
        data.drop_long_prompts(
            [with_context(e, template) for e in examples], tokenizer, max_prompt_length, name
        )
        for examples, name in zip(splits, ("train", "eval"), strict=True)
    )
