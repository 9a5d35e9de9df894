"""The privileged context: the teacher check, --context-template auto, --instruction, and the
contrastive teacher (--teacher-contrast)."""

import dataclasses
import json
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import SMALL_RUN, load_small_policy, small_args

import config
import sdpg
from harness import cli, data, session, teacher_context
from harness.errors import UsageError
from harness.teacher_context import ViewStats
from rollout import (
    TEACHER_CONTEXT_TOKEN,
    contrast_example,
    contrast_hidden,
    prompt_texts,
    views,
    with_context,
)
from verifier import answer_format, make_verifier

D = torch.float64


def told_rollout(calls):
    """A stand-in for rollout with known greedy answers, read off the view's prompt text:
    the student view (no answer in it) always writes `the sum is \\boxed{7}` (4 tokens);
    the teacher view writes the answer it is told, \\boxed{N} (1 token), except a
    two-digit one, where it rambles until the token cap (cut off, no answer)."""

    def fake(model, tokenizer, chunk, group, max_new, temperature, top_p, seed, view):
        assert (group, temperature) == (1, 0.0)  # one greedy answer per question
        calls.append((view, len(chunk)))
        replies = []
        for ex in chunk:
            told = re.search(r"answer to this problem is: (\d+)", prompt_texts(None, ex)[view == "teacher"])
            if told is None:
                replies.append(["the", "sum", "is", "\\boxed{7}"])
            else:
                replies.append([f"\\boxed{{{told[1]}}}"] if len(told[1]) == 1 else ["first", "add"] * max_new)
        kept = [r[:max_new] for r in replies]
        mask = torch.tensor([[1] * len(r) + [0] * (max_new - len(r)) for r in kept])
        return SimpleNamespace(
            completions=[" ".join(r) for r in kept],
            answers=[e.answer for e in chunk],
            response_mask=mask,
            truncated=torch.tensor([len(r) > max_new for r in replies]),
        )

    return fake


def test_the_check_counts_what_a_hand_count_of_greedy_answers_gives(tiny_path, monkeypatch, capsys):
    """Five questions, answers 7, 7, 12, 3, 9. By hand: the student is right on the two 7s
    (40%), 4 tokens each, none cut off; the teacher is right on all but 12 (80%), where it
    runs to the 8-token cap: mean length (4 x 1 + 8) / 5 = 2.4, 20% cut off."""
    cfg = small_args(tiny_path, "--max-new-tokens", "8", "--check-size", "5", "--context-template", "authors")
    train = [
        data.templated_example(f"What is {a} + {b}?", str(a + b), data.CONTEXT_TEMPLATE)
        for a, b in [(2, 5), (3, 4), (6, 6), (1, 2), (4, 5)]
    ]
    calls = []
    monkeypatch.setattr(teacher_context, "rollout", told_rollout(calls))
    monkeypatch.setattr(teacher_context, "ROWS", 2)  # three chunks per view: 2 + 2 + 1
    policy = SimpleNamespace(model=None, tokenizer=None)  # the live teacher: the same stand-in model
    template, check = teacher_context.checked(policy, train, cfg, make_verifier(), report=True)
    assert template == data.CONTEXT_TEMPLATE
    assert check == pytest.approx(
        {
            "check_student_accuracy": 0.4,
            "check_student_length": 4.0,
            "check_student_truncated": 0.0,
            "check_teacher_accuracy": 0.8,
            "check_teacher_length": 2.4,
            "check_teacher_truncated": 0.2,
        }
    )
    assert calls == [(view, n) for view in ("student", "teacher") for n in (2, 2, 1)]
    table = capsys.readouterr().out
    assert "student         40.0%          4.0        0.0%" in table
    assert "teacher         80.0%          2.4       20.0%" in table
    stats = teacher_context.greedy_stats(policy, train, "teacher", cfg, make_verifier())
    assert stats.questions == [e.question for e in train]


def test_the_check_warns_when_the_teacher_is_no_better_or_much_longer():
    student = ViewStats(0.40, 20.0, 0.05, ["q"] * 32)
    assert teacher_context.warnings(student, ViewStats(0.80, 22.0, 0.05, [])) == []
    (weak,) = teacher_context.warnings(student, ViewStats(0.45, 20.0, 0.05, []))
    assert weak.startswith(
        "warning: the teacher view answers 45% vs the student's 40% of 32 training questions (greedy): "
        "+5.0 points, under the 10-point margin by which SDPG needs the teacher ahead"
    )
    assert "--context-template auto" in weak
    (worse,) = teacher_context.warnings(student, ViewStats(13 / 32, 20.0, 0.05, []))
    assert "answers 40.6% vs the student's 40% of 32 training questions (greedy): +0.6 points" in worse
    (behind,) = teacher_context.warnings(student, ViewStats(0.25, 20.0, 0.05, []))
    assert "-15.0 points, under the 10-point margin" in behind
    # exactly 10 points ahead is enough, though 0.2 + 0.1 > 0.3 in floating point
    assert teacher_context.warnings(ViewStats(0.2, 20.0, 0.05, []), ViewStats(0.3, 20.0, 0.05, [])) == []
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
    chosen, (train2, evals2), check = teacher_context.settle(policy, (train, evals), args, None)
    assert chosen == "Psst: {answer}."
    assert set(scored) <= {e.question for e in train} and not set(scored) & {e.question for e in evals}
    assert len(set(scored)) == args.check_size
    assert check["check_teacher_accuracy"] == 0.75 and check["check_student_accuracy"] == 0.25
    assert all(e.messages[0]["content"].endswith(f"Psst: {e.answer}.") for e in train2 + evals2)


def hint_wins(policy, examples, view, cfg, verifier):
    """greedy_stats as if `hint` (not the fallback, `authors`) made the best teacher."""
    questions = [e.question for e in examples]
    if view == "student":
        return ViewStats(0.25, 8.0, 0.0, questions)
    hint = examples[0].messages[0]["content"].endswith(f"Hint: the answer is {examples[0].answer}.")
    return ViewStats(0.75 if hint else 0.25, 6.0, 0.0, questions)


def test_a_resumed_auto_run_keeps_the_phrasing_it_started_with(tiny_path, tmp_path, monkeypatch, capsys):
    """The phrasing is part of the run: resumed with auto, or without the flag where the
    model's preset is `authors` (as --model tiny's), it keeps the text auto chose; a
    different one is refused."""
    hint = data.CONTEXT_TEMPLATES["hint"]
    out = tmp_path / "run"
    base = ["--model", str(tiny_path), *SMALL_RUN, "--output-dir", str(out)]
    monkeypatch.setattr(teacher_context, "greedy_stats", hint_wins)
    assert sdpg.main([*base, "--context-template", "auto", "--steps", "1"]) == 0
    assert json.loads((out / "args.json").read_text())["context_template"] == hint
    step0 = [
        r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if r["step"] == 0
    ]
    assert (step0[0]["check_student_accuracy"], step0[0]["check_teacher_accuracy"]) == (0.25, 0.75)

    def no_second_choice(*a, **k):
        raise AssertionError("a resumed run must not choose again")

    monkeypatch.setattr(teacher_context, "choose", no_second_choice)
    seen = []
    monkeypatch.setattr(sdpg, "train", lambda run: seen.append(run.splits) or 0)  # what it would train on
    monkeypatch.setitem(config.PRESETS["hub"], "context_template", "authors")  # a local folder's preset
    for flags in (["--context-template", "auto"], []):
        (out / "args.json").unlink()
        assert sdpg.main([*base, *flags, "--steps", "2", "--resume"]) == 0
        assert json.loads((out / "args.json").read_text())["context_template"] == hint
        train, evals = seen[-1]
        assert all(e.messages[0]["content"].endswith(hint.format(answer=e.answer)) for e in train + evals)
    capsys.readouterr()
    assert sdpg.main([*base, "--context-template", "authors", "--steps", "2", "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {out}/checkpoints/step-000001 trained with the teacher context {hint!r}, and "
        f"--context-template {data.CONTEXT_TEMPLATE[:60]!r} would change the run: drop the flag to "
        "continue it, or start a new run (another --output-dir, or --overwrite-output-dir without --resume)"
    )


def test_resuming_auto_from_a_checkpoint_without_its_phrasing_is_one_line_before_loading(
    tiny_path, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    base = ["--model", str(tiny_path), *SMALL_RUN, "--output-dir", str(out), "--context-template", "auto"]
    settings = dataclasses.asdict(cli.parse(cli.given_flags(base)))
    del settings["context_template"]  # an older version, or a damaged file
    newest = out / "checkpoints" / "step-000001"
    newest.mkdir(parents=True)
    (newest / "state.json").write_text(json.dumps({"step": 1, "args": settings}))

    def no_loading(*a, **k):
        raise AssertionError("the checkpoint's arguments are checked before any loading")

    monkeypatch.setattr(session, "load", no_loading)
    capsys.readouterr()
    assert sdpg.main([*base, "--steps", "2", "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {newest} does not record the teacher context its run trained with (an older or damaged "
        "checkpoint): resume with --context-template and the text it used, or start a new run (another "
        "--output-dir, or --overwrite-output-dir without --resume)"
    ]


def test_instruction_reaches_both_views_and_the_verifier_reads_its_format(tiny_path):
    """Through the run's own loading (session.load, as the command line): the training and
    held-out prompts ask for 'The answer is N' in both views, and the run's verifier reads
    that line before an empty box."""
    args = small_args(
        tiny_path, "--instruction", "answer-is", "--check-size", "0", "--context-template", "authors"
    )
    assert args.instruction == data.WORD_INSTRUCTION and answer_format(args.instruction) == "answer is"
    _, _, (train, evals), verifier, _ = session.load(args, None)
    for e in train[:3] + evals:
        student, teacher = views(e.messages)
        assert student[0]["content"] == f"{e.question}\n{data.WORD_INSTRUCTION}"
        assert teacher[0]["content"].startswith(student[0]["content"] + "\n\nThe correct answer")
    reply = "Let me see: \\boxed{} ... The answer is 7."
    assert verifier(reply, "7").reward == 1.0
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
        data.CONTEXT_TEMPLATE  # the authors' exact text stays one flag away
    )
    with pytest.raises(Exception, match="--context-candidates are for --context-template auto"):
        resolved("--context-candidates", "x {answer}")


# ---------------------------------------------------------------- phrasings: names, {solution}, data contexts


def test_a_misspelt_name_is_refused_and_a_text_without_answer_is_only_warned(capsys):
    def resolved(*argv):
        return cli.parse(cli.given_flags(list(argv)))

    assert resolved("--context-template", "paper").context_template == data.CONTEXT_TEMPLATES["paper"]
    with pytest.raises(UsageError) as e:
        resolved("--context-template", "verfy")
    assert str(e.value) == (
        "--context-template 'verfy' is not a phrasing's name (authors, answer-is, hint, verify, paper, auto) "
        "and, a single word, is read as one: use one of those names, or write the teacher's text with "
        "{answer} in it"
    )
    with pytest.raises(UsageError, match=r"--context-candidates 'hnt' is not a phrasing's name \(authors,"):
        resolved("--context-template", "auto", "--context-candidates", "Psst: {answer}.", "hnt")
    with pytest.raises(
        UsageError, match=r"'auto' is not a phrasing's name \(authors, answer-is, hint, verify, paper\)"
    ):
        resolved("--context-template", "auto", "--context-candidates", "auto")
    capsys.readouterr()
    assert resolved("--context-template", "Think it through.").context_template == "Think it through."
    assert capsys.readouterr().err.splitlines() == [
        "warning: --context-template 'Think it through.' holds neither {answer} nor {solution}: the teacher "
        "then knows nothing about a question that the student does not, and SDPG has little to distil"
    ]
    resolved("--context-template", "auto", "--context-candidates", "Psst: {answer}.", "Steps: {solution}")
    assert capsys.readouterr().err == ""


def test_when_no_phrasing_answers_any_question_auto_says_so_and_keeps_the_tie_break(capsys):
    """All at 0%: the rule is still the tie-break, shorter answers then the order listed
    (hint and verify tie at 5 tokens: hint is listed first), and a warning says plainly
    that no phrasing helps and what to do."""
    sample = data.arithmetic_split(4, "train")
    lengths = {"The correct": 9.0, "(The answer": 7.0, "Hint: the a": 5.0, "A teacher c": 5.0}

    def score(examples, view="teacher"):
        context = examples[0].messages[0]["content"].split(TEACHER_CONTEXT_TOKEN)[1].strip()
        return ViewStats(0.0, lengths[context[:11]], 0.0, [e.question for e in examples])

    text, stats = teacher_context.choose(sample, [], ViewStats(0.0, 8.0, 1.0, []), score)
    assert text == data.CONTEXT_TEMPLATES["hint"] and stats.length == 5.0
    out, err = capsys.readouterr()
    assert "note: not candidates, as these questions lack a worked solution ({solution}): paper" in out
    assert err.splitlines() == [
        "warning: no phrasing helps: every teacher view answers 0 of 4 training questions, so 'hint' won "
        "only the tie-break (shorter answers, then the order listed) and SDPG has nothing to distil. Give "
        "the teacher more than the answer (a 'solution' column and --context-template paper), train with "
        "--algo grpo, or use a model that can use the answer."
    ]
    lengths["(The answer"] = 6.0
    one_right = lambda examples, view="teacher": dataclasses.replace(  # noqa: E731
        score(examples), accuracy=0.25 if "(The answer" in examples[0].messages[0]["content"] else 0.0
    )
    text, _ = teacher_context.choose(sample, [], ViewStats(0.0, 8.0, 1.0, []), one_right)
    assert text == data.CONTEXT_TEMPLATES["answer-is"] and capsys.readouterr().err == ""


def test_the_paper_phrasing_renders_as_the_worked_solutions_bench_writes_it(tmp_path):
    from bench import worked_solutions as bench

    q, a = "Tom has 12 apples and buys 7 more. How many apples does Tom have now?", "19"
    bench.write_rows(tmp_path / "bench.jsonl", [(q, a)], bench.word_solution, "paper")
    row = json.loads((tmp_path / "bench.jsonl").read_text())
    solution = row["solution"]
    assert solution == "Tom has 12 apples and buys 7 more: 12 + 7 = 19. The answer is 19."
    (tmp_path / "ours.jsonl").write_text(json.dumps({"question": q, "answer": a, "solution": solution}))
    (theirs,) = data.file_examples(tmp_path / "bench.jsonl")  # the bench's `context` column, as given
    (ours,) = data.file_examples(tmp_path / "ours.jsonl", data.CONTEXT_TEMPLATES["paper"])
    assert ours.messages == theirs.messages and ours.solution == solution
    after = ours.messages[0]["content"].split(TEACHER_CONTEXT_TOKEN)[1]
    assert after == "\n\n" + bench.PAPER.format(answer=a, solution=solution)
    other = data.templated_example(q, a, data.CONTEXT_TEMPLATE, solution=solution)  # rewritten by auto
    assert with_context(other, data.CONTEXT_TEMPLATES["paper"]).messages == theirs.messages


def test_gsm8k_and_question_files_carry_the_worked_solution(monkeypatch, tmp_path):
    import datasets

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "2+3?", "answer": "5", "solution": " 2 + 3 = 5 "}) + "\n")
    (ex,) = data.file_examples(path, "{solution} It is {answer}.")
    assert ex.solution == "2 + 3 = 5" and ex.messages[0]["content"].endswith("\n\n2 + 3 = 5 It is 5.")
    rows = [{"question": "Q1?", "answer": "Half of 48 is <<48/2=24>>24.\nSo 48+24 = 72.\n#### 72"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows)
    (ex,) = data.load_task("gsm8k", "train", context_template="{solution} So: {answer}.")
    assert ex.solution == "Half of 48 is <<48/2=24>>24.\nSo 48+24 = 72."
    assert ex.messages[0]["content"].endswith(
        "[TEACHER_CONTEXT_TOKEN]\n\nHalf of 48 is <<48/2=24>>24.\nSo 48+24 = 72. So: 72."
    )


def solved_file(path, rows):
    """A question file: (a, b, with a solution?) rows of `a + b`."""
    lines = []
    for a, b, solved in rows:
        row = {"question": f"What is {a} + {b}?", "answer": str(a + b)}
        lines.append(json.dumps({**row, **({"solution": f"{a} + {b} = {a + b}."} if solved else {})}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_auto_weighs_the_paper_prompt_only_where_every_question_has_a_solution(
    tiny_path, tmp_path, monkeypatch
):
    scored = []

    def paper_best(policy, examples, view, cfg, verifier):
        contexts = [e.messages[0]["content"].split(TEACHER_CONTEXT_TOKEN)[1] for e in examples]
        scored.extend(contexts)
        accuracy = 0.75 if view == "teacher" and contexts[0].startswith("\n\n[Hint]") else 0.25
        return ViewStats(accuracy, 6.0, 0.0, [e.question for e in examples])

    monkeypatch.setattr(teacher_context, "greedy_stats", paper_best)
    train = solved_file(tmp_path / "train.jsonl", [(a, b, True) for a in range(1, 4) for b in range(1, 4)])
    for eval_rows, chosen in (([(5, 5, True)], "paper"), ([(5, 5, True), (6, 6, False)], "authors")):
        evals = solved_file(tmp_path / "eval.jsonl", eval_rows)
        args = small_args(tiny_path, "--data", train, "--eval-data", evals, "--context-template", "auto")
        scored.clear()
        cfg, _, (train2, evals2), _, check = session.load(args, None)
        assert cfg.context_template == data.CONTEXT_TEMPLATES[chosen]
        assert any(c.startswith("\n\n[Hint]") for c in scored) == (chosen == "paper")
    # every question of the run has a solution: paper wins, rendered with each row's own
    evals = solved_file(tmp_path / "eval.jsonl", [(5, 5, True)])
    args = small_args(tiny_path, "--data", train, "--eval-data", evals, "--context-template", "auto")
    _, _, (train2, evals2), _, check = session.load(args, None)
    assert check["check_teacher_accuracy"] == 0.75
    for e in train2 + evals2:
        text = data.CONTEXT_TEMPLATES["paper"].format(answer=e.answer, solution=e.solution)
        assert e.messages[0]["content"].endswith(text) and e.solution.endswith(f"= {e.answer}.")


@pytest.mark.parametrize(
    "flags, line",
    [
        (
            ["--context-template", "paper"],
            "error: the teacher's context template needs {solution}, a worked solution, and the question "
            "{first!r} has none: use a phrasing with only "
            "{answer} (e.g. authors), or data with a 'solution' column (gsm8k has one)",
        ),
        (
            ["--context-template", "auto", "--context-candidates", "Steps: {solution}"],
            "error: --context-candidates 'Steps: {solution}' needs {solution}, a worked solution, and 2200 "
            "questions have none: drop it, or give data with a 'solution' column (gsm8k has one)",
        ),
    ],
)
def test_a_phrasing_that_needs_a_solution_on_data_without_one_is_one_line_before_any_model_work(
    flags, line, tmp_path, capsys, monkeypatch
):
    """The tiny model is never built or loaded: the refusal comes from the data (2000
    training and 200 held-out arithmetic questions, none with a solution)."""

    def model_work(*a, **k):
        raise AssertionError("the data is refused before any model work")

    monkeypatch.setattr(session, "load_tokenizer", model_work)
    argv = ["--model", "tiny", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "o")]
    assert sdpg.main([*argv, *flags]) == 2
    first = data.arithmetic_split(1, "train")[0].question  # the first training question
    assert capsys.readouterr().err.splitlines() == [line.replace("{first!r}", repr(first))]
    assert not (tmp_path / "cache").exists()


def test_a_context_column_reaches_only_the_teacher_and_the_check_scores_training_rows(
    tiny_path, tmp_path, monkeypatch
):
    """Four training rows bring their own context ("Look: it is N."), two have none; the
    stand-in teacher is right where its context states the answer ("Look: it is N." or
    hint's "Hint: the answer is N."). auto phrases the two rows without a context only, and
    the check scores the six training rows: 4/6 right under authors, 6/6 under hint."""
    rows = [(1, 2, "Look: it is 3."), (2, 2, "Look: it is 4."), (3, 3, None), (4, 1, "Look: it is 5.")]
    rows += [(5, 1, None), (2, 7, "Look: it is 9.")]
    lines = [
        {"question": f"What is {a} + {b}?", "answer": str(a + b), **({"context": c} if c else {})}
        for a, b, c in rows
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "eval.jsonl").write_text(json.dumps({**lines[0], "question": "What is 0 + 3?"}) + "\n")
    scored = []

    def states_the_answer(policy, examples, view, cfg, verifier):
        prompts = [prompt_texts(None, e)[view == "teacher"] for e in examples]
        scored.extend(e.question for e in examples)
        right = sum(
            f"it is {e.answer}." in p or f"Hint: the answer is {e.answer}." in p
            for e, p in zip(examples, prompts, strict=True)
        )
        return ViewStats(right / len(examples), 6.0, 0.0, [e.question for e in examples])

    monkeypatch.setattr(teacher_context, "greedy_stats", states_the_answer)
    data_flags = [
        "--data",
        tmp_path / "train.jsonl",
        "--eval-data",
        tmp_path / "eval.jsonl",
        "--check-size",
        "6",
    ]
    for template, teacher in (("authors", 4 / 6), ("auto", 6 / 6)):
        scored.clear()
        args = small_args(tiny_path, *data_flags, "--context-template", template)
        cfg, _, (train, evals), _, check = session.load(args, None)
        assert (check["check_student_accuracy"], check["check_teacher_accuracy"]) == (0.0, teacher)
        assert set(scored) == {e.question for e in train}  # the six training rows, never the held-out one
        for e, (a, b, c) in zip(train + evals, rows + [rows[0]], strict=True):
            student, teacher_view = (m[0]["content"] for m in views(e.messages))
            own = c or cfg.context_template.format(answer=a + b)
            assert (
                teacher_view == f"{student}\n\n{own}" and "Look" not in student and "answer is" not in student
            )
    assert cfg.context_template == data.CONTEXT_TEMPLATES["hint"]


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
