"""Checkpoints: all a run needs to continue exactly where it stopped.

A long RL run on one consumer GPU gets interrupted. A checkpoint holds the trainable
weights (the LoRA adapter in PEFT's safetensors format, or the whole model with
--full-finetune), the optimizer state, every random generator in play (Python, NumPy,
torch CPU and CUDA), the step counter (which also fixes the data position: step k
always trains on the same prompts) and the run's arguments.

It is written into a temporary folder and renamed into place, so a crash or a kill
during a save leaves the previous checkpoints intact; only the newest `keep` are kept.
Only tensors and plain containers are ever loaded back (`torch.load(weights_only=True)`,
safetensors), never pickled objects.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_model

# Arguments that must match to continue a run: anything else may change on resume.
IDENTITY = ("model", "algo", "full_finetune", "lora_r", "lora_alpha", "lora_target_modules", "load_in_4bit")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message says why."""


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, step: int, model, optimizer, args, keep: int) -> Path:
    """Write checkpoints/step-<step> atomically, then drop all but the newest `keep`."""
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    if is_peft(model):
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
    else:
        save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "args": vars(args)}, indent=1))
    final = root / f"step-{step:06d}"
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary folders of a broken save are ignored)."""
    done = [p for p in sorted((out_dir / "checkpoints").glob("step-*")) if (p / "state.json").exists()]
    return done[-1] if done else None


def check_compatible(path: Path, args) -> dict:
    """The checkpoint's state; CheckpointError if it belongs to a different kind of run."""
    state = json.loads((path / "state.json").read_text())
    saved = state["args"]
    diff = [
        f"--{k.replace('_', '-')} {saved.get(k)!r} (checkpoint) vs {getattr(args, k)!r} (now)"
        for k in IDENTITY
        if saved.get(k) != getattr(args, k)
    ]
    if diff:
        raise CheckpointError(
            f"{path} is from a different run: "
            + "; ".join(diff)
            + ". Use another --output-dir, or the checkpoint's settings."
        )
    return state


def load_checkpoint(path: Path, model, optimizer) -> int:
    """Restore weights, optimizer and RNG states; returns the step to continue from."""
    if is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path / "adapter" / "adapter_model.safetensors")))
    else:
        load_model(model, str(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())["step"]
