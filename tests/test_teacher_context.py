"""The privileged context: the teacher check, --context-template auto, --instruction, and the
contrastive teacher (--teacher-contrast)."""

import json

import pytest
import torch
from conftest import SMALL_RUN, load_small_policy, small_args

import sdpg
from harness import cli, data, teacher_context
from harness.teacher_context import ViewStats
from rollout import TEACHER_CONTEXT_TOKEN, contrast_example, contrast_hidden, rollout, views
from verifier import answer_format, make_verifier, verify

D = torch.float64


def test_the_check_counts_what_a_hand_count_of_greedy_answers_gives(tiny_path):
    args = small_args(tiny_path, "--max-new-tokens", "4", "--context-template", "authors")
    policy = load_small_policy(args)
    cfg = args
    examples = data.arithmetic_split(10, "train", seed=2)
    verifier = make_verifier()
    for view in ("student", "teacher"):
        got = teacher_context.greedy_stats(policy, examples, view, cfg, verifier)
        right = length = cut = 0
        for ex in examples:  # one question at a time, counted by hand
            b = rollout(policy.model, policy.tokenizer, [ex], 1, 4, 0.0, view=view)
            right += verify(b.completions[0], ex.answer).reward
            length += int(b.response_mask.sum())
            cut += int(b.truncated[0])
        assert (got.accuracy, got.length, got.truncated) == pytest.approx((right / 10, length / 10, cut / 10))
        assert got.questions == [e.question for e in examples]


def test_the_check_warns_when_the_teacher_is_no_better_or_much_longer():
    student = ViewStats(0.40, 20.0, 0.05, ["q"] * 32)
    assert teacher_context.warnings(student, ViewStats(0.80, 22.0, 0.05, [])) == []
    (weak,) = teacher_context.warnings(student, ViewStats(0.45, 20.0, 0.05, []))
    assert "answers no better than the student (45% vs 40% of 32 training questions" in weak
    assert "--context-template auto" in weak
    (long,) = teacher_context.warnings(student, ViewStats(0.90, 45.0, 0.05, []))
    assert "much longer answers (45 vs 20 tokens" in long
    assert len(teacher_context.warnings(student, ViewStats(0.90, 20.0, 0.30, []))) == 1  # cut off more


def test_auto_takes_the_most_accurate_phrasing_ties_to_shorter_and_reads_only_training_questions(
    tiny_path, monkeypatch
):
    args = small_args(tiny_path, "--context-template", "auto", "--context-candidates", "Psst: {answer}.")
    train, evals = data.load_splits("arithmetic", None, args.eval_size, instruction=args.instruction)
    scored = []

    def stub(policy, examples, view, cfg, verifier):
        scored.extend(e.question for e in examples)
        if view == "student":
            return ViewStats(0.25, 8.0, 0.0, [e.question for e in examples])
        context = examples[0].messages[0]["content"].split(TEACHER_CONTEXT_TOKEN)[1]
        accuracy = {"Psst": 0.75, "Hint": 0.75}.get(context.strip()[:4], 0.5)  # a tie: Psst is shorter
        return ViewStats(accuracy, 5.0 if "Psst" in context else 6.0, 0.0, [e.question for e in examples])

    monkeypatch.setattr(teacher_context, "greedy_stats", stub)
    policy = load_small_policy(args)
    chosen, (train2, evals2), check = teacher_context.settle(policy, (train, evals), args, None, None)
    assert chosen == "Psst: {answer}."
    assert set(scored) <= {e.question for e in train} and not set(scored) & {e.question for e in evals}
    assert len(set(scored)) == args.check_size
    assert check["check_teacher_accuracy"] == 0.75 and check["check_student_accuracy"] == 0.25
    assert all(e.messages[0]["content"].endswith(f"Psst: {e.answer}.") for e in train2 + evals2)


def test_a_resumed_auto_run_keeps_the_phrasing_it_started_with(tiny_path, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--model", str(tiny_path), *SMALL_RUN, "--context-template", "auto", "--output-dir", str(out)]
    assert sdpg.main([*argv, "--steps", "1"]) == 0
    chosen = json.loads((out / "args.json").read_text())["context_template"]
    assert chosen in data.CONTEXT_TEMPLATES.values()
    step0 = [
        r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if r["step"] == 0
    ]
    assert {"check_student_accuracy", "check_teacher_length", "check_teacher_truncated"} <= set(step0[0])

    def no_second_choice(*a, **k):
        raise AssertionError("a resumed run must not choose again")

    monkeypatch.setattr(teacher_context, "choose", no_second_choice)
    seen = []
    real = sdpg.train
    monkeypatch.setattr(sdpg, "train", lambda run: seen.append(run.splits) or real(run))
    assert sdpg.main([*argv, "--steps", "2", "--resume"]) == 0
    assert json.loads((out / "args.json").read_text())["context_template"] == chosen
    train, evals = seen[0]
    assert all(e.messages[0]["content"].endswith(chosen.format(answer=e.answer)) for e in train[:5] + evals)


def test_instruction_reaches_both_views_and_the_verifier_reads_its_format(tiny_path):
    args = small_args(tiny_path, "--instruction", "answer-is")
    assert args.instruction == data.WORD_INSTRUCTION and answer_format(args.instruction) == "answer is"
    train, _ = data.load_splits("arithmetic", None, 4, instruction=args.instruction)
    student, teacher = views(train[0].messages)
    assert data.WORD_INSTRUCTION in student[0]["content"] and data.WORD_INSTRUCTION in teacher[0]["content"]
    assert data.INSTRUCTION not in student[0]["content"]
    reply = "Let me see: \\boxed{} ... The answer is 7."
    assert make_verifier("rule", True, answer_format(args.instruction))(reply, "7").reward == 1.0
    assert make_verifier("rule", True, None)(reply, "7").reward == 0.0  # the empty box would win
    custom = small_args(tiny_path, "--instruction", "Finish with #### and the number.")
    assert answer_format(custom.instruction) == "####"
    assert small_args(tiny_path, "--model", "smollm2-135m").instruction == data.WORD_INSTRUCTION
    with pytest.raises(Exception, match="asks for no format the rule verifier reads"):
        small_args(tiny_path, "--instruction", "Reply briefly.", "--no-last-number-fallback")


def test_presets_choose_the_context_on_real_models_and_keep_the_tiny_models_own():
    def resolved(*argv):
        return cli.parse(cli.given_flags(list(argv)))

    assert resolved().context_template == data.CONTEXT_TEMPLATE  # the text the tiny model was warm-started on
    assert resolved("--model", "smollm2-135m").context_template == "auto"
    assert resolved("--model", "Qwen2.5-0.5B").context_template == "auto"
    assert resolved("--model", "Qwen2.5-0.5B", "--context-template", "authors").context_template == (
        data.CONTEXT_TEMPLATE  # the paper's exact text stays one flag away
    )
    with pytest.raises(Exception, match="--context-candidates are for --context-template auto"):
        resolved("--context-candidates", "x {answer}")


# ---------------------------------------------------------------- the contrastive teacher


def test_contrast_teacher_is_the_tilted_distribution_in_float64():
    """KL(p || q') with q' = softmax(z_s + z_right - z_wrong), through hidden states, equals
    the definition computed from full logits, in value and student gradient."""
    from losses import chunked_head

    g = torch.Generator().manual_seed(21)
    hs, hr, hw = (torch.randn(3, 5, 4, generator=g, dtype=D) for _ in range(3))
    w, b = torch.randn(11, 4, generator=g, dtype=D), torch.randn(11, generator=g, dtype=D)
    h = hs.clone().requires_grad_()
    tilted32 = contrast_hidden(h, hr, hw)
    assert not tilted32.requires_grad and tilted32.dtype == torch.float32
    torch.testing.assert_close(tilted32, (hs + hr - hw).float())  # student + right - wrong, in that order
    tilted = (hs + hr - hw).detach()  # the same sum, kept in float64 for the comparison below
    _, kl, _ = chunked_head(h.view(-1, 4), w, torch.zeros(15, dtype=torch.long), tilted.view(-1, 4), b, 0.7)
    kl.sum().backward()
    h2 = hs.clone().requires_grad_()
    zs = (h2 @ w.T + b) / 0.7
    zq = ((hs @ w.T + b) + (hr @ w.T + b) - (hw @ w.T + b)) / 0.7  # z_s + z_right - z_wrong
    log_p, log_q = torch.log_softmax(zs, -1), torch.log_softmax(zq, -1)
    ref = (log_p.exp() * (log_p - log_q)).sum(-1)
    ref.sum().backward()
    torch.testing.assert_close(kl, ref.view(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-10, atol=1e-12)
    same = contrast_hidden(hs, hr, hr)  # a wrong answer that changes nothing: q' = p, KL 0
    _, kl0, _ = chunked_head(hs.view(-1, 4).float(), w.float(), None, same.view(-1, 4), b.float())
    assert kl0.abs().max() < 1e-6


def test_wrong_answers_are_other_training_answers_and_fixed():
    examples = data.arithmetic_split(50, "train", seed=1)
    a, b = data.with_wrong_answers(examples), data.with_wrong_answers(examples)
    assert [e.wrong_answer for e in a] == [e.wrong_answer for e in b]
    assert all(e.wrong_answer != e.answer and e.wrong_answer in {x.answer for x in examples} for e in a)
    wrong = contrast_example(a[0])
    assert wrong.messages[0]["content"].endswith(data.CONTEXT_TEMPLATE.format(answer=a[0].wrong_answer))
    given = data.plain_example("1+1?", "2", "It is 2.")  # a context given by the data: no template
    with pytest.raises(Exception, match="--teacher-contrast rewrites the context"):
        data.with_wrong_answers([given, data.plain_example("2+2?", "4", "It is 4.")])
