"""The benchmark scripts that CI can afford: gpu_check --small runs SDPG steps on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_small_runs_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--small", "--steps", "2", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert len(summary["steps"]) == 2 and summary["new_tokens"] == 16
    for step in summary["steps"]:
        # forced length: every response is exactly 16 tokens, so the split timings are comparable
        assert step["response_len"] == 16 and step["truncated"] == 1.0
        assert step["generate_s"] > 0 and step["teacher_s"] > 0 and step["student_s"] > 0
        assert step["kl_distill"] > 0 and step["skipped_step"] == 0.0
    assert "generated tokens/s" in proc.stdout


def test_step_bench_gives_trl_the_prompt_and_context_ours_uses(tiny):
    """TRL itself is a bench-only install; the rows it trains on are built without it."""
    sys.path.insert(0, str(ROOT / "bench"))
    import step_bench

    from harness.data import arithmetic_split
    from rollout import render, views

    _, tokenizer = tiny
    examples = arithmetic_split(3, "train")
    rows = step_bench.trl_rows(tokenizer, examples)
    for row, e in zip(rows, examples, strict=True):
        student, teacher = (render(tokenizer, m) for m in views(e.messages))
        assert row["prompt"] == student and row["answer"] == e.answer
        assert row["privileged_context"] not in row["prompt"] and row["privileged_context"] in teacher


@pytest.mark.parametrize("family", ["two_step", "multiply"])
def test_real_model_families_are_fixed_right_and_never_train_on_held_out_rows(tmp_path, family):
    sys.path.insert(0, str(ROOT / "bench"))
    import real_model

    question = getattr(real_model, f"{family}_question")
    flags = real_model.write_family(tmp_path / "a", question, eval_size=24)
    assert flags == [
        "--data",
        str(tmp_path / "a" / "train.jsonl"),
        "--eval-data",
        str(tmp_path / "a" / "eval.jsonl"),
    ]
    real_model.write_family(tmp_path / "b", question, eval_size=24)
    rows = {}
    for split in ("train", "eval"):
        text = (tmp_path / "a" / f"{split}.jsonl").read_text()
        assert text == (tmp_path / "b" / f"{split}.jsonl").read_text()  # fixed seeds: same files
        rows[split] = [json.loads(line) for line in text.splitlines()]
    assert len(rows["train"]) == 400 and 20 <= len(rows["eval"]) <= 24
    assert not {r["question"] for r in rows["train"]} & {r["question"] for r in rows["eval"]}
    for r in rows["train"][:50] + rows["eval"]:
        a, b, *c = [int(t) for t in r["question"].replace(".", " ").split() if t.isdigit()]
        assert int(r["answer"]) == (a - b + c[0] if family == "two_step" else a * b)
