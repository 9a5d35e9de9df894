"""The model cache under concurrent and interrupted first runs (cache.filled_once)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from config import TINY_RIGHT_SHARE
from harness.cache import filled_once
from harness.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
# A child that waits for the file `go`, then asks for one cache entry and prints its path.
CHILD = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
open(sys.argv[2] + ".ready", "w").close()
while not os.path.exists(sys.argv[3]):
    time.sleep(0.01)
{call}
"""
TINY_CALL = (
    "from harness import tiny_model; print(tiny_model.ensure_tiny_model(sys.argv[1], warm_start_steps=20))"
)
GGUF_CALL = "from harness import loading; print(loading.gguf_folder(Path(sys.argv[4]), sys.argv[1]))"


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """The tiny Qwen2 as a float32 GGUF file (qwen2 architecture, byte-level BPE vocabulary)."""
    gguf = pytest.importorskip("gguf")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(out), "qwen2")
    w.add_name("tiny")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t == tok.eos_token else gguf.TokenType.NORMAL for t in tokens]
    )
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, c.num_hidden_layers)
    for key, value in model.state_dict().items():
        if key != "lm_head.weight":  # tied to the embedding
            w.add_tensor(
                names.get_name(key, try_suffixes=(".weight", ".bias")), value.numpy().astype(np.float32)
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def race(call: str, cache: Path, tmp: Path, *extra: str) -> list[subprocess.CompletedProcess]:
    """Two processes that ask for the same entry of an empty cache at the same moment."""
    script = CHILD.format(root=str(ROOT), call=call)
    go = tmp / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(cache), str(tmp / f"child{i}"), str(go), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp / f"child{i}.ready").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()  # both are imported and waiting: release them together
    for p in procs:
        p.wait(timeout=300)
    return [
        subprocess.CompletedProcess(p.args, p.returncode, p.stdout.read(), p.stderr.read()) for p in procs
    ]


@pytest.mark.parametrize("kind", ["tiny", "gguf"])
def test_two_runs_filling_an_empty_cache_at_once_both_succeed_and_build_once(kind, tiny_path, tmp_path):
    cache = tmp_path / "cache"
    extra = [str(write_tiny_gguf(tiny_path, tmp_path / "tiny.gguf"))] if kind == "gguf" else []
    results = race(TINY_CALL if kind == "tiny" else GGUF_CALL, cache, tmp_path, *extra)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    paths = {r.stdout.strip().splitlines()[-1] for r in results}
    assert len(paths) == 1  # the loser uses the winner's entry
    builds = sum("(once; later runs reuse it)" in r.stderr for r in results)
    assert builds == 1, [r.stderr for r in results]
    entries = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert entries == [Path(paths.pop()).name]  # no temporary folder left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (cache / entries[0]).stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700
    if kind == "gguf":  # the converted folder is the GGUF's model, logit for logit
        entry = cache / entries[0]
        a = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32)
        b = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
        ids = torch.tensor([[3, 14, 15, 92, 65]])
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_a_build_killed_midway_leaves_no_entry_and_the_next_run_repairs_it(tmp_path):
    cache = tmp_path / "cache"
    call = "from harness import tiny_model; "
    call += "print(tiny_model.ensure_tiny_model(sys.argv[1], warm_start_steps=100000))"
    script = CHILD.format(root=str(ROOT), call=call)
    (tmp_path / "go").touch()
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(cache), str(tmp_path / "child"), str(tmp_path / "go")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list(cache.glob(".tiny-*.tmp-*/entry/config.json")) and time.time() < deadline:
        time.sleep(0.05)  # the builder is inside its build: it has written the random model
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = list(cache.glob(".tiny-*.tmp-*"))
    assert stale and not [p for p in cache.iterdir() if p.name.startswith("tiny-")]

    from harness import tiny_model

    name = tiny_model.entry_name(0, 100000, TINY_RIGHT_SHARE)
    calls = []
    entry = filled_once(cache / name, lambda folder: calls.append((folder / "ok").touch()), "a test entry")
    assert calls and (entry / "ok").is_file()  # rebuilt under the lock the dead process dropped
    assert not list(cache.glob(".tiny-*.tmp-*"))  # and the dead builder's folder is gone


def test_a_failed_build_leaves_nothing_and_a_read_only_cache_still_serves(tmp_path):
    entry = tmp_path / "cache" / "thing"

    def fail(folder):
        (folder / "half").write_text("x")
        raise OSError(28, "No space left on device")

    with pytest.raises(UsageError, match="the disk is full.*--cache-dir"):
        filled_once(entry, fail, "a test entry")

    def fail_in_safetensors(folder):  # how save_pretrained reports a full disk
        from safetensors import SafetensorError

        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(UsageError, match="the disk is full"):
        filled_once(entry, fail_in_safetensors, "a test entry")
    assert sorted(p.name for p in entry.parent.iterdir()) == [".thing.lock"]
    filled_once(entry, lambda folder: (folder / "done").touch(), "a test entry")
    os.chmod(entry.parent, 0o555)  # read-only from now on: a finished entry needs no lock
    try:
        assert filled_once(entry, lambda folder: 1 / 0, "a test entry") == entry
        if os.geteuid() != 0:  # root writes anywhere
            with pytest.raises(UsageError, match="cannot write a test entry into the cache"):
                filled_once(entry.parent / "other", lambda folder: None, "a test entry")
    finally:
        os.chmod(entry.parent, 0o755)
    (tmp_path / "a-file").write_text("")  # a cache dir that is a file: unwritable even for root
    with pytest.raises(UsageError, match="cannot write a test entry into the cache"):
        filled_once(tmp_path / "a-file" / "thing", lambda folder: None, "a test entry")


def test_zero_warm_start_steps_keep_the_random_model(tiny_path, tmp_path):
    from harness import tiny_model

    folder = tiny_model.ensure_tiny_model(str(tmp_path), warm_start_steps=0)
    assert folder.name == tiny_model.entry_name(0, 0, TINY_RIGHT_SHARE)
    a = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).state_dict()  # seed 0, untrained
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
