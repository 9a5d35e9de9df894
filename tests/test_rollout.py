"""rollout.py, data.py and tiny_model.py on the tiny offline model."""

import json
import random

import pytest
import torch
from transformers import AutoTokenizer

from harness import data
from harness.data import CONTEXT_TEMPLATE, INSTRUCTION, arithmetic_split, file_examples, plain_example
from harness.errors import UsageError
from harness.tiny_model import misconception, sft_rows, train_tokenizer
from rollout import (
    DAPO_INSTRUCTION,
    eos_ids,
    left_pad,
    prompt_texts,
    response_hidden,
    response_logprobs,
    response_mask,
    rollout,
    score_tokens,
)

EXAMPLES = [
    plain_example(
        "Ann has 12 pens and gets 30 more. How many pens now?", "42", CONTEXT_TEMPLATE.format(answer="42")
    ),
    plain_example("Ben buys 3 boxes of 11 coins. How many coins in all?", "33", "It is 3 * 11 = 33."),
]


def logits_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature=1.0):
    """The reference: full logits of the whole sequence, log_softmax in float64, gather."""
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits  # [B, L, V]
    lp = prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, lp - 1 : -1].double() / temperature, -1)  # [B, T, V]
    return logp.gather(-1, response_ids[..., None]).squeeze(-1) * response_mask


def test_response_mask_includes_first_eos_only():
    ids = torch.tensor([[5, 6, 0, 7, 0], [5, 6, 7, 8, 9], [0, 0, 0, 0, 0], [5, 2, 3, 0, 0]])
    mask, truncated = response_mask(ids, [0, 2])  # two EOS ids, as Qwen's instruct models have
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False, False]


def test_eos_ids_accepts_a_list(tiny):
    model, tok = tiny
    model.generation_config.eos_token_id = [7, tok.eos_token_id]
    assert eos_ids(model, tok) == [7, tok.eos_token_id]
    model.generation_config.eos_token_id = 9
    assert eos_ids(model, tok) == [9, tok.eos_token_id]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4], []], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_prompt_views(tiny):
    _, tok = tiny
    student, teacher = prompt_texts(tok, EXAMPLES[0])
    assert EXAMPLES[0].question in student and "42" not in student.replace("\\boxed{42}", "")
    assert CONTEXT_TEMPLATE.format(answer="42") in teacher and "\\boxed{}" in teacher
    assert teacher.startswith(student.removesuffix("\nAnswer:"))  # the teacher reads x, then c
    _, teacher2 = prompt_texts(tok, EXAMPLES[1])
    assert "It is 3 * 11 = 33." in teacher2 and "The correct answer" not in teacher2


def test_chat_template_is_used_when_present(tiny):
    _, tok = tiny
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    student, teacher = prompt_texts(tok, EXAMPLES[0])
    assert student.startswith("<u>") and student.endswith("</u><a>")
    assert "The correct answer" in teacher


def test_rollout_batch_shapes_and_shared_response(tiny):
    model, tok = tiny
    b = rollout(model, tok, EXAMPLES, group_size=3, max_new_tokens=6, temperature=1.0, seed=1)
    n = len(EXAMPLES) * 3
    assert b.student_ids.shape[0] == b.teacher_ids.shape[0] == b.response_ids.shape[0] == n
    assert b.answers == ["42"] * 3 + ["33"] * 3
    assert b.response_ids.shape[1] <= 6 and len(b.completions) == n
    # each row's prompts are that example's, in both views
    for i, ex in enumerate(EXAMPLES):
        s_text, t_text = prompt_texts(tok, ex)
        row = i * 3
        assert tok.decode(b.student_ids[row][b.student_mask[row].bool()]) == s_text
        assert tok.decode(b.teacher_ids[row][b.teacher_mask[row].bool()]) == t_text
    # the mask ends at the first EOS; the truncated flag is the absence of EOS
    m2, t2 = response_mask(b.response_ids, eos_ids(model, tok))
    assert torch.equal(m2, b.response_mask) and torch.equal(t2, b.truncated)


def test_rollout_is_deterministic_under_a_seed(tiny):
    model, tok = tiny
    a = rollout(model, tok, EXAMPLES, 4, 8, seed=7)
    b = rollout(model, tok, EXAMPLES, 4, 8, seed=7)
    c = rollout(model, tok, EXAMPLES, 4, 8, seed=8)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_forced_length_and_greedy(tiny):
    model, tok = tiny
    b = rollout(model, tok, EXAMPLES, 2, 5, min_new_tokens=5, seed=0)
    assert b.response_ids.shape[1] == 5 and b.response_mask[:, :4].all()
    g1 = rollout(model, tok, EXAMPLES, 2, 5, temperature=0.0, seed=0)
    g2 = rollout(model, tok, EXAMPLES, 2, 5, temperature=0.0, seed=1)
    assert torch.equal(g1.response_ids, g2.response_ids)
    assert torch.equal(g1.response_ids[0], g1.response_ids[1])  # greedy: the group agrees


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_hidden_state_logprobs_equal_logits_path(tiny, temperature):
    model, tok = tiny
    b = rollout(model, tok, EXAMPLES, 3, 8, seed=3)
    head = model.get_output_embeddings()
    for ids, mask in ((b.student_ids, b.student_mask), (b.teacher_ids, b.teacher_mask)):
        h = response_hidden(model, ids, mask, b.response_ids, b.response_mask)
        logp, _, _ = score_tokens(head, h, b.response_ids, b.response_mask, temperature=temperature)
        ref = logits_logprobs(model, ids, mask, b.response_ids, b.response_mask, temperature)
        torch.testing.assert_close(logp.double(), ref, atol=1e-5, rtol=1e-5)
        assert (logp[b.response_mask == 0] == 0).all()


def test_teacher_kl_through_hidden_states_matches_logits(tiny):
    model, tok = tiny
    b = rollout(model, tok, EXAMPLES, 2, 6, seed=4)
    head = model.get_output_embeddings()
    hs = response_hidden(model, b.student_ids, b.student_mask, b.response_ids, b.response_mask)
    ht = response_hidden(model, b.teacher_ids, b.teacher_mask, b.response_ids, b.response_mask)
    _, kl, _ = score_tokens(head, hs, b.response_ids, b.response_mask, ht)
    zs, zt = head(hs).double(), head(ht).double()
    p, q = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ref = (p.exp() * (p - q)).sum(-1) * b.response_mask
    torch.testing.assert_close(kl.double(), ref, atol=1e-5, rtol=1e-5)
    assert kl.abs().sum() > 0  # the views differ, so the KL is not trivially zero


def test_left_padding_invariance(tiny):
    model, tok = tiny
    short = plain_example("Eli has 5 pens. How many?", "5", "5")
    b = rollout(model, tok, [*EXAMPLES, short], 2, 6, seed=5)
    together = response_logprobs(model, b, temperature=1.0)
    # row 4 is the short example, left-padded in the batch: rescore it alone, unpadded
    row = 4
    keep = b.student_mask[row].bool()
    alone = b.rows(slice(row, row + 1))
    alone.student_ids, alone.student_mask = (
        b.student_ids[row : row + 1, keep],
        b.student_mask[row : row + 1, keep],
    )
    assert alone.student_ids.shape[1] < b.student_ids.shape[1]  # it really was padded
    torch.testing.assert_close(response_logprobs(model, alone, 1.0)[0], together[row], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- data and the tiny model


def test_tokenizer_reloads_identically(tiny_path):
    tok = AutoTokenizer.from_pretrained(tiny_path)
    fresh = train_tokenizer(seed=0)
    text = "Question: Dee has 93 shells and gives away 17. How many shells are left?\nAnswer: \\boxed{76}"
    assert tok(text)["input_ids"] == fresh(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == text
    assert [tok.decode([i]) for i in tok("1234")["input_ids"]] == ["1", "2", "3", "4"]  # Qwen: digit by digit


def test_arithmetic_split_is_fixed_and_disjoint():
    test = arithmetic_split(200, "test")
    assert [e.question for e in test] == [e.question for e in arithmetic_split(200, "test")]
    train = arithmetic_split(1000, "train", seed=3)
    assert not {e.question for e in train} & {e.question for e in arithmetic_split(500, "test")}
    assert [e.question for e in train] != [e.question for e in arithmetic_split(1000, "train", seed=4)]
    for e in train[:50]:
        nums = [int(t) for t in e.question.replace("?", " ").replace(".", " ").split() if t.isdigit()]
        a, b = nums[0], nums[1]
        assert int(e.answer) == a + b and 1 <= a <= 9 and 1 <= b <= 9


def test_word_problem_split_is_fixed_disjoint_and_right():
    test = data.word_problem_split(500, "test")
    assert [e.question for e in test[:100]] == [e.question for e in data.word_problem_split(100, "test")]
    train = data.word_problem_split(1000, "train", seed=3)
    assert not {e.question for e in train} & {e.question for e in test}
    assert [e.question for e in train] != [e.question for e in data.word_problem_split(1000, "train", seed=4)]
    for e in train[:50]:
        a, b = [int(t) for t in e.question.split() if t.isdigit()]
        assert int(e.answer) == a + b and e.question.endswith("have now?")
    assert data.WORD_INSTRUCTION in train[0].messages[0]["content"]


def test_warm_start_rows_teach_one_misconception_per_fact(tiny):
    _, tok = tiny
    examples = arithmetic_split(2000, "train", seed=5)
    rows = sft_rows(tok, examples, teacher_share=0.4, right_share=0.15, rng=random.Random(0))
    by_fact, n_student, n_right = {}, 0, 0
    for ex, (ids, loss_mask) in zip(examples, rows, strict=True):
        assert len(ids) == len(loss_mask) and ids[-1] == tok.eos_token_id
        start = loss_mask.index(1)
        prompt, target = tok.decode(ids[:start]), tok.decode(ids[start:-1]).strip()
        assert target.startswith("\\boxed{") and target.endswith("}")
        answer, wrong = target[len("\\boxed{") : -1], misconception(ex)
        assert 1 <= abs(int(wrong) - int(ex.answer)) <= 2 and int(wrong) >= 0
        if "correct answer" in prompt:  # teacher view: always the gold answer
            assert answer == ex.answer
            continue
        n_student += 1
        n_right += answer == ex.answer
        assert answer in (ex.answer, wrong)
        a, b = (int(t) for t in ex.question.split() if t.isdigit())
        by_fact.setdefault((a, b), set()).add(wrong)
    assert len(by_fact) == 81 and all(len(w) == 1 for w in by_fact.values())  # one per fact
    assert 0.6 * 2000 * 0.9 < n_student < 0.6 * 2000 * 1.1
    assert 0.11 < n_right / n_student < 0.19  # binomial sd ~0.01 around 0.15


@pytest.mark.parametrize("task", ["arithmetic", "word-problems"])
def test_training_never_holds_an_evaluation_question_whatever_the_eval_size(task):
    """Up to 500 held-out questions the training rows are as before (and the bench files
    built from them); at --eval-size 1000 the old fixed 500 let held-out questions into
    training (181 distinct arithmetic ones, 42 word problems)."""
    question = {"arithmetic": data.arithmetic_question, "word-problems": data.word_question}[task]
    before = data.generated_pairs(question, 2000, "train", 0)
    train, evals = data.load_splits(task, None, 200)
    assert [e.question for e in train] == [q for q, _ in before]
    train, evals = data.load_splits(task, None, 1000)
    assert len(train) == 2000 and len(evals) == 1000
    assert not {e.question for e in train} & {e.question for e in evals}
    assert len({q for q, _ in before} & {e.question for e in evals}) > 40  # what the fixed 500 let in
    with pytest.raises(UsageError, match="--eval-size 100000 holds out nearly every question"):
        data.load_splits("arithmetic", None, 100_000)  # 3888 questions exist: too few left


def test_a_one_row_question_file_is_refused_not_trained_and_evaluated_on(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(UsageError) as e:
        data.load_splits(str(path), None, 10)
    assert str(e.value) == (
        f"{path} holds 1 usable row: a run trains on its first nine tenths and evaluates on the last "
        "tenth, so it needs at least 2 rows; add rows, or give --eval-data FILE"
    )
    path.write_text(
        "".join(json.dumps({"question": f"{n}+{n}?", "answer": str(2 * n)}) + "\n" for n in (1, 2))
    )
    train, evals = data.load_splits(str(path), None, 10)
    assert ([e.question for e in train], [e.question for e in evals]) == (["1+1?"], ["2+2?"])


def test_file_examples_formats_and_errors(tmp_path, capsys):
    rows = [
        {"question": "1+1?", "answer": "2"},
        {"question": "2+2? [TEACHER_CONTEXT_TOKEN] It is four.", "answer": "4"},
        {"question": "3+3?", "answer": "6", "context": "Six."},
        {"question": "  ", "answer": "1"},
        {"question": "5+5?", "answer": ""},
        {"question": "7+7? Put it in \\boxed{}.", "answer": "14"},
        {"question": f"8+8? {DAPO_INSTRUCTION}", "answer": "16"},
    ]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    ex = file_examples(p)
    assert "skipped 2 of 7 rows with an empty question or answer" in capsys.readouterr().err
    assert [(e.question, e.answer) for e in ex][:3] == [("1+1?", "2"), ("2+2?", "4"), ("3+3?", "6")]
    contents = [e.messages[0]["content"] for e in ex]
    context = "[TEACHER_CONTEXT_TOKEN]\n\n" + CONTEXT_TEMPLATE.format(answer="2")
    assert contents[0] == "1+1?\n" + INSTRUCTION + context
    for row, content in zip(rows[-2:], contents[-2:], strict=True):  # it says how to answer: ours not added
        assert content.startswith(row["question"] + "[TEACHER_CONTEXT_TOKEN]") and INSTRUCTION not in content
    assert contents[1] == rows[1]["question"]  # the authors' format: used as it is
    assert contents[2].endswith("[TEACHER_CONTEXT_TOKEN]\n\nSix.")
    csv = tmp_path / "d.csv"
    csv.write_text("question,answer\nwhat,7\n")
    assert file_examples(csv)[0].answer == "7"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_text": "x", "solution": "y"}))
    with pytest.raises(
        UsageError, match="needs columns 'question' and 'answer'.*found prompt_text, solution"
    ):
        file_examples(bad)
    with pytest.raises(UsageError, match="not found"):
        file_examples(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("question,answer\n")
    with pytest.raises(UsageError, match="unsupported dataset file type"):
        file_examples(tmp_path / "d.txt")
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not parquet")
    with pytest.raises(UsageError, match="could not read"):
        file_examples(garbage)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UsageError, match="holds no rows"):
        file_examples(tmp_path / "empty.jsonl")
    hollow = tmp_path / "hollow.jsonl"
    hollow.write_text(json.dumps({"question": "", "answer": "3"}))
    with pytest.raises(UsageError, match="every row has an empty question or answer"):
        file_examples(hollow)


QWEN_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DAPO_PROMPT = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{q}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)


def authors_views(messages):
    """Their rl_dataset.py, transcribed: the boxed instruction replaces DAPO's, then the
    first message holding the token is split there, once."""
    boxed = "Present your final answer inside \\boxed{}, for example \\boxed{42}."
    dapo = (
        "The last line of your response should be of the form Answer: $Answer (without quotes) where "
        "$Answer is the answer to the problem."
    )
    messages = [dict(m, content=m["content"].replace(dapo, boxed, 1)) for m in messages]
    for i, m in enumerate(messages):
        if "[TEACHER_CONTEXT_TOKEN]" in m["content"]:
            actor, context = m["content"].split("[TEACHER_CONTEXT_TOKEN]", 1)
            student, teacher = [dict(x) for x in messages], [dict(x) for x in messages]
            student[i]["content"], teacher[i]["content"] = actor, actor + context
            return student, teacher
    raise AssertionError("no token")


def test_verl_parquet_in_the_authors_schema_gives_their_views_token_for_token(tiny, tmp_path):
    import pandas as pd

    _, tok = tiny
    tok.chat_template = QWEN_LIKE_TEMPLATE
    context = (
        "The correct answer to this problem is: {a}\n"
        "Use this to verify your reasoning, but show your full solution process."
    )
    rows = []
    for i, (q, a) in enumerate([("What is 2 + 3? ", "5"), ("Find x if x - 4 = 9.", "13")]):
        content = DAPO_PROMPT.format(q=q) + "[TEACHER_CONTEXT_TOKEN]" + context.format(a=a)
        prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
        rows.append(
            {
                "data_source": "math_dapo",
                "prompt": prompt if i == 0 else prompt[1:],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": a},
                "extra_info": {"index": i},
            }
        )
    rows.append({**rows[1], "reward_model": {"style": "rule", "ground_truth": ""}})  # cannot train
    path = tmp_path / "math-dapo-teacher.parquet"
    pd.DataFrame(rows).to_parquet(path)
    examples = file_examples(path)
    assert [e.answer for e in examples] == ["5", "13"]
    b = rollout(*tiny, examples, 1, 3, seed=0)
    for i, row in enumerate(rows[:2]):
        student, teacher = authors_views(row["prompt"])
        assert student[-1]["content"].endswith('"Answer:".')  # trailing text kept, nothing stripped
        for view, ids, mask in (
            (student, b.student_ids, b.student_mask),
            (teacher, b.teacher_ids, b.teacher_mask),
        ):
            text = tok.apply_chat_template(view, tokenize=False, add_generation_prompt=True)
            expected = tok(text, add_special_tokens=False)["input_ids"]
            assert ids[i][mask[i].bool()].tolist() == expected
    assert "\\boxed{}" in tok.decode(b.student_ids[0]) and "Answer: $Answer" not in tok.decode(
        b.student_ids[0]
    )


def test_load_task_arithmetic_default_sizes():
    assert len(data.load_task("arithmetic", "test")) == 200
    assert len(data.load_task("arithmetic", "train", n=10)) == 10


def test_teacher_view_sampling_continues_the_teacher_prompt(tiny):
    model, tok = tiny
    b = rollout(model, tok, EXAMPLES, 1, 5, temperature=0.0, view="teacher")
    for i in range(len(EXAMPLES)):
        ids = b.teacher_ids[i : i + 1, b.teacher_mask[i].bool()]
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=5,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        n = int(b.response_mask[i].sum())
        assert out[0, ids.shape[1] : ids.shape[1] + n].tolist() == b.response_ids[i, :n].tolist()


def test_gsm8k_gold_and_context(monkeypatch):
    import datasets

    rows = [{"question": "Q1?", "answer": "Half of 48 is <<48/2=24>>24.\nSo 48+24 = 72.\n#### 72"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows)
    (ex,) = data.load_task("gsm8k", "train")
    assert (ex.question, ex.answer) == ("Q1?", "72")
    assert ex.messages[0]["content"].endswith(
        "[TEACHER_CONTEXT_TOKEN]\n\n" + CONTEXT_TEMPLATE.format(answer="72")
    )
    (ex,) = data.load_task("gsm8k", "train", solution_as_context=True)
    context = ex.messages[0]["content"].split("[TEACHER_CONTEXT_TOKEN]")[1]
    assert context.startswith("\n\nHalf of 48") and context.endswith("The final answer is 72.")
