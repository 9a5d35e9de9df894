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

    from data import arithmetic_split, render, views

    _, tokenizer = tiny
    examples = arithmetic_split(3, "train")
    rows = step_bench.trl_rows(tokenizer, examples)
    for row, e in zip(rows, examples, strict=True):
        student, teacher = (render(tokenizer, m) for m in views(e.messages))
        assert row["prompt"] == student and row["answer"] == e.answer
        assert row["privileged_context"] not in row["prompt"] and row["privileged_context"] in teacher
