"""Held-out evaluation: how well the student answers, and whether the teacher still knows more.

mean@k and pass@k of k samples at the training temperature, greedy accuracy, and the
teacher view's greedy accuracy (read by the run's --teacher weights), with lengths and
the share cut off before EOS.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from config import Config
from harness.teacher_context import MARGIN, much_longer
from rollout import Policy, rollout, teacher_role

EVAL_ROWS = 256  # responses per generate call in evaluation: bounds the KV cache with k = 32
EXPLICIT_ANSWERS = ("boxed", "####", "answer is")  # verifier methods that are a stated answer


@torch.no_grad()
def evaluate(policy: Policy, examples: list, cfg: Config, verifier) -> dict[str, float]:
    """Held-out accuracy: mean@k and pass@k (k samples at the training temperature; pass@k
    is the share of prompts with at least one right answer), greedy accuracy, and the
    teacher's greedy accuracy on its view (the --teacher weights), to see whether the
    teacher still knows more than the student, with its mean length and share cut off
    (the style it pulls toward). Of the k samples also: the share that state a final
    answer explicitly (answered: boxed, '####' or 'the answer is', not only a last
    number), their mean length in tokens, and the share cut off before EOS."""
    k = cfg.eval_samples
    settings = [("sampled", cfg.temperature, k, "student"), ("greedy", 0.0, 1, "student")]
    settings.append(("teacher_greedy", 0.0, 1, "teacher"))
    scores: dict[str, list[float]] = {name: [] for name, *_ in settings}
    answered: list[bool] = []
    lengths: dict[str, list[float]] = {name: [] for name, *_ in settings}  # per setting: tokens
    truncated: dict[str, list[float]] = {name: [] for name, *_ in settings}  # per setting: cut off
    per_call = max(1, EVAL_ROWS // k)
    for s in range(0, len(examples), per_call):
        chunk = examples[s : s + per_call]
        for name, temperature, n, view in settings:
            # the teacher view is read by the weights the run's teacher uses (--teacher)
            role = teacher_role(policy, cfg.teacher) if view == "teacher" else nullcontext(policy.model)
            with role as model:
                b = rollout(
                    model,
                    policy.tokenizer,
                    chunk,
                    n,
                    cfg.max_new_tokens,
                    temperature,
                    cfg.top_p,
                    cfg.seed + s,
                    view=view,
                )
            verdicts = [verifier(c, a) for c, a in zip(b.completions, b.answers, strict=True)]
            scores[name] += [v.reward for v in verdicts]
            lengths[name] += b.response_mask.sum(1).tolist()
            truncated[name] += b.truncated.tolist()
            if name == "sampled":
                answered += [v.method in EXPLICIT_ANSWERS for v in verdicts]
    sampled = torch.tensor(scores.pop("sampled")).view(-1, k)  # [prompts, k]
    return {
        f"eval_mean@{k}": float(sampled.mean()),
        f"eval_pass@{k}": float((sampled.amax(1) == 1).float().mean()),
        **{f"eval_{name}": mean(v) for name, v in scores.items()},
        "eval_answered": mean(answered),
        "eval_truncated": mean(truncated["sampled"]),
        "eval_response_len": mean(lengths["sampled"]),
        # greedy, both views: is the teacher's style drifting from the student's? (drift_warnings)
        "eval_greedy_truncated": mean(truncated["greedy"]),
        "eval_greedy_len": mean(lengths["greedy"]),
        "eval_teacher_truncated": mean(truncated["teacher_greedy"]),
        "eval_teacher_len": mean(lengths["teacher_greedy"]),
    }


def mean(values: list[float]) -> float:
    """The mean of a non-empty list."""
    return sum(values) / len(values)


def format_accuracy(evaluation: dict[str, float]) -> str:
    return ", ".join(
        f"{k.removeprefix('eval_')} {v:.1f}"
        if k.endswith("len")
        else f"{k.removeprefix('eval_')} {100 * v:.1f}%"
        for k, v in evaluation.items()
    )


def drift_warnings(evaluation: dict[str, float]) -> dict[str, str]:
    """The warnings that hold at this evaluation, by kind. The live teacher is made of the
    weights being trained, so what it knows and how it writes can drift while the student
    learns:
      accuracy  the teacher view no longer answers held-out questions better than the
                student by the teacher check's margin (greedy, both views): SDPG now
                pulls toward a teacher that knows no more;
      style     the teacher view's answers are much longer or more often cut off than
                the student's (greedy, both views; the teacher check's rule,
                teacher_context.much_longer): the student is pulled toward that style."""
    out = {}
    teacher, student = evaluation["eval_teacher_greedy"], evaluation["eval_greedy"]
    if round(teacher - student, 9) < MARGIN:  # rounded: 0.3 - 0.2 is ahead by the margin
        out["accuracy"] = (
            f"warning: the teacher view is no longer ahead of the student on held-out questions (greedy "
            f"{100 * teacher:.1f}% vs {100 * student:.1f}%, {100 * (teacher - student):+.1f} points; SDPG "
            f"needs {100 * MARGIN:.0f}): distillation now pulls toward a teacher that knows no more. "
            "Options: --teacher initial (the frozen initial model reads the context), --teacher ema (a "
            "slow average), or a context that tells the teacher more (a worked solution). Printed once per "
            "run."
        )
    t_len, t_cut = evaluation["eval_teacher_len"], evaluation["eval_teacher_truncated"]
    s_len, s_cut = evaluation["eval_greedy_len"], evaluation["eval_greedy_truncated"]
    if much_longer(t_len, t_cut, s_len, s_cut):
        out["style"] = (
            f"warning: the teacher view now writes much longer held-out answers than the student (greedy "
            f"{t_len:.0f} vs {s_len:.0f} tokens; cut off at --max-new-tokens {100 * t_cut:.0f}% vs "
            f"{100 * s_cut:.0f}%): SDPG pulls the student toward that style and its answers grow. Options: "
            "--teacher initial or --teacher ema (a teacher that drifts less), a shorter --context-template. "
            "Printed once per run."
        )
    return out
