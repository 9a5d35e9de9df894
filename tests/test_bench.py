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


def test_regime_map_resumes_from_its_json_and_pairs_each_contender_with_grpo_on_its_seed(
    tmp_path, monkeypatch
):
    """A recorded run is never redone; the report's differences are same-seed, by hand."""
    sys.path.insert(0, str(ROOT / "bench"))
    import regime_map

    def fake_run(right_share, contender, seed, out):
        final = {"grpo": 0.5, "sdpg": 0.6}[contender] + 0.1 * seed  # sdpg = grpo + 10 points, every seed
        curve = [(s, final * s / 200, final * s / 200, 1.0) for s in range(0, 201, 25)]
        flat = [0.8 if right_share < 0.1 else 0.3] * 200
        kl = [0.5] * 200 if contender != "grpo" else [None] * 200
        return {"right_share": right_share, "contender": contender, "seed": seed, "seconds": 1.0,
                "curve": curve, "response_len": 6.0, "entropy": 0.1, "step_s": 1.0,
                "flat_groups": flat, "kl_distill_flat": kl, "kl_distill_mixed": kl}  # fmt: skip

    calls = []
    monkeypatch.setattr(regime_map, "run_record", lambda *job: calls.append(job[:3]) or fake_run(*job))
    monkeypatch.setattr(regime_map.subprocess, "run", lambda *a, **k: None)  # no model build
    args = ["--difficulties", "0.15", "0.02", "--contenders", "grpo", "sdpg", "--seeds", "2", "--jobs", "1"]
    monkeypatch.setattr(sys, "argv", ["regime_map.py", *args, "--out", str(tmp_path)])
    path = tmp_path / "regime_map.json"
    path.write_text(json.dumps([fake_run(0.15, "grpo", 0, None)]))  # one run already recorded
    regime_map.main()
    assert len(calls) == 7 and (0.15, "grpo", 0) not in calls
    assert len(json.loads(path.read_text())) == 8
    calls.clear()
    regime_map.main()  # everything recorded: nothing runs again
    assert calls == []
    md = (tmp_path / "regime_map.md").read_text()
    assert md == regime_map.report(json.loads(path.read_text())) and (tmp_path / "regime_map.png").exists()
    assert "| 0.02 | sdpg | 2 | 10.0 ± 0.0 | above, beyond 1 sd | 10.0 ± 0.0 | above, beyond 1 sd |" in md
    assert "| 0.02 | 80.0 ± 0.0 | grpo | 2 |" in md


def test_dtype_runs_resume_from_their_json_and_pair_bf16_with_float32_on_its_seed(tmp_path, monkeypatch):
    """A recorded run is never redone; the same-seed difference is bf16 minus float32, by hand."""
    sys.path.insert(0, str(ROOT / "bench"))
    import dtype_runs

    def fake_run_all(jobs, parallel):
        ((folder, flags),) = jobs
        dtype, seed = flags[flags.index("--dtype") + 1], int(flags[flags.index("--seed") + 1])
        folder.mkdir(parents=True)
        (folder / "args.json").write_text(json.dumps({"dtype": dtype, "seed": seed}))
        calls.append((dtype, seed))

    def fake_summary(folder, eval_steps):
        settings = json.loads((folder / "args.json").read_text())
        lift = {"float32": 0.0, "bfloat16": 0.1 + 0.1 * settings["seed"]}[
            settings["dtype"]
        ]  # +10, +20 points
        evals = [{"step": s, "eval_mean@2": 0.2 + lift * s / 16, "eval_greedy": 0.5, "eval_truncated": 0.4,
                  "eval_response_len": 40.0} for s in sorted(eval_steps)]  # fmt: skip
        return {"seed": settings["seed"], "evals": evals, "step_s": 20.0, "seconds": 600.0}

    calls = []
    monkeypatch.setattr(dtype_runs.real_model, "run_all", fake_run_all)
    monkeypatch.setattr(dtype_runs.real_model, "summary", fake_summary)
    monkeypatch.setattr(dtype_runs, "processor", lambda: "a test CPU")
    argv = ["dtype_runs.py", "--work", str(tmp_path / "runs"), "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    recorded = tmp_path / "runs" / "float32" / "seed0"
    fake_run_all([(recorded, ["--dtype", "float32", "--seed", "0"])], 1)
    done = {**fake_summary(recorded, {0, 8, 16}), "machine": "a test CPU", "steps": 16, "eval_every": 8}
    runs = {"float32": [done], "bfloat16": []}
    (tmp_path / "dtype_runs.json").write_text(json.dumps(runs))
    calls.clear()
    dtype_runs.main()
    assert calls == [("bfloat16", 0), ("float32", 1), ("bfloat16", 1)]  # seed 0's float32 was recorded
    calls.clear()
    dtype_runs.main()
    assert calls == []
    md = (tmp_path / "dtype_runs.md").read_text()
    assert "| bfloat16 (2) | 0.0 ± 0.0 | 7.5 ± 3.5 | 15.0 ± 7.1 |" in md  # (+10, +20) at step 16, half at 8
    assert "| bfloat16 | 0, 1 | 20.0 ± 0.0 | 10.0 ± 0.0 |" in md and "a test CPU" in md
    monkeypatch.setattr(sys, "argv", [*argv, "--steps", "8"])  # runs of 16 steps are recorded
    with pytest.raises(SystemExit, match="another --out"):
        dtype_runs.main()
    assert calls == []
