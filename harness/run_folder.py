"""The run folder: everything a run writes, and reads back to continue.

    <output-dir>/args.json        the flags of the run
                 metrics.jsonl    one row per step (and per evaluation)
                 samples.jsonl    a few responses per step, with their reward
                 curves.png       reward, held-out accuracy and KLs against the step
                 checkpoints/     step-<k>/: adapter or model, optimizer and lr schedule, RNG
                                  states, EMA teacher (if any), step
                 adapter/         the trained LoRA adapter (or model/ for a full fine-tune)

A long RL run on one consumer GPU gets interrupted. A checkpoint holds the trainable
weights (the LoRA adapter in PEFT's safetensors format, or the whole model with
--full-finetune), the optimizer state, every random generator in play (Python, NumPy,
torch CPU and CUDA), the step counter (which also fixes the data position: step k
always trains on the same prompts) and the run's arguments. It is written into a
temporary folder and renamed into place, so a crash or a kill during a save leaves the
previous checkpoints intact; only the newest `keep` are kept. Only tensors and plain
containers are ever loaded back (`torch.load(weights_only=True)`, safetensors), never
pickled objects. Nothing is deleted or overwritten before the flags have been checked.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model

from harness.errors import UsageError

# Arguments that must match to continue a run: anything else may change on resume.
IDENTITY = (
    "model",
    "tiny_warm_start_steps",
    "tiny_right_share",
    "algo",
    "teacher",
    "full_finetune",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "load_in_4bit",
)


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


def save_checkpoint(out_dir: Path, step: int, model, optimizer, settings: dict, keep: int, ema=None) -> Path:
    """Write checkpoints/step-<step> atomically, then drop all but the newest `keep`.
    `ema` (an EMA teacher's weights, if any) is saved beside the optimizer. A write that
    fails (a full disk) removes its temporary folder and is a UsageError: the checkpoints
    already there are untouched."""
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        if is_peft(model):
            model.save_pretrained(tmp / "adapter", safe_serialization=True)
        else:
            save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if ema is not None:
            torch.save(ema.state_dict(), tmp / "teacher_ema.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "args": settings}, indent=1))
    except (OSError, RuntimeError, SafetensorError) as e:  # safetensors and torch.save wrap ENOSPC
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(f"checkpoint step-{step:06d}", out_dir, e) from e
    final = root / f"step-{step:06d}"
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def write_error(what: str, out_dir: Path, e: Exception) -> UsageError:
    """One line for a write into the run folder that failed (a full disk, most often)."""
    last = latest_checkpoint(out_dir)
    then = (
        f"the newest complete checkpoint, {last}, is intact. Free some space, then run again with --resume"
        if last
        else "no checkpoint was saved yet. Free some space (or choose another --output-dir) and start again"
    )
    return UsageError(f"could not write the {what} into {out_dir}: {' '.join(str(e).split())[:160]}; {then}")


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary folders of a broken save are ignored)."""
    done = [p for p in sorted((out_dir / "checkpoints").glob("step-*")) if (p / "state.json").exists()]
    return done[-1] if done else None


def check_compatible(path: Path, settings: dict) -> dict:
    """The checkpoint's state; UsageError if it belongs to a different kind of run. A key
    that an older version did not record is not compared (one note says which)."""
    state = saved_state(path)
    saved = state["args"]
    unrecorded = [k for k in IDENTITY if k not in saved]
    if unrecorded:
        flags = ", ".join("--" + k.replace("_", "-") for k in unrecorded)
        print(
            f"note: {path} does not record {flags} (an older version); assuming they match", file=sys.stderr
        )
    diff = [
        f"--{k.replace('_', '-')} {saved[k]!r} (checkpoint) vs {settings[k]!r} (now)"
        for k in IDENTITY
        if k in saved and saved[k] != settings[k]
    ]
    if diff:
        raise UsageError(
            f"{path} is from a different run: "
            + "; ".join(diff)
            + ". Use another --output-dir, or the checkpoint's settings."
        )
    return state


def damaged(path: Path, e: Exception) -> UsageError:
    """One line for a checkpoint that cannot be read; nothing is deleted."""
    older = [p for p in sorted(path.parent.glob("step-*")) if p.name < path.name]
    hint = (
        f"move it aside to resume from the one before, {older[-1].name}"
        if older
        else "move it aside and start again without --resume"
    )
    return UsageError(f"checkpoint {path} is damaged ({type(e).__name__}): {hint}")


def saved_state(path: Path) -> dict:
    """A checkpoint's state.json ({"step", "args"}); UsageError if it cannot be read."""
    try:
        state = json.loads((path / "state.json").read_text())
        missing = {"step", "args"} - set(state)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise damaged(path, e) from e
    return state


def saved_args(path: Path) -> dict:
    """The arguments a checkpoint's run was started with (after `auto` was settled)."""
    return saved_state(path)["args"]


def load_checkpoint(path: Path, model, optimizer, ema=None) -> int:
    """Restore weights, optimizer (with its lr schedule), EMA teacher and RNG states;
    returns the step to continue from. A file that cannot be read is a UsageError that
    names the checkpoint to fall back on."""
    try:
        if is_peft(model):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(str(path / "adapter" / "adapter_model.safetensors")))
        else:
            load_model(model, str(path / "model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        if ema is not None:
            ema.load_state_dict(torch.load(path / "teacher_ema.pt", weights_only=True))
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        return json.loads((path / "state.json").read_text())["step"]
    except Exception as e:  # torch.load and safetensors raise many types for a damaged file
        raise damaged(path, e) from e


# ---------------------------------------------------------------- the folder


def checkpoint_to_resume(out: Path, settings: dict, missing: str) -> tuple[Path | None, Path | None]:
    """(the newest checkpoint in `out`, the one --resume takes): `yes` needs one (else the
    UsageError `missing`), `auto` takes it when there is one, and a checkpoint resumed
    must come from a run of the same kind."""
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    if settings["resume"] == "yes" and ckpt is None:
        raise UsageError(missing)
    resume = ckpt if settings["resume"] in ("yes", "auto") else None
    if resume is not None:
        check_compatible(resume, settings)
    return ckpt, resume


def check_run(settings: dict) -> tuple[Path, Path | None]:
    """Check the output folder before any work: (folder, checkpoint to resume or None).

    A folder holding another run needs --overwrite-output-dir; --resume needs a
    checkpoint from a run of the same kind. Nothing is created, deleted or overwritten:
    `start_run` does that once the data and the model have loaded.
    """
    out = Path(settings["output_dir"])
    if held_by_another_run(out):
        raise UsageError(BUSY.format(out=out))
    missing = f"--resume: no checkpoint in {out}/checkpoints. Run without --resume to start."
    ckpt, resume = checkpoint_to_resume(out, settings, missing)
    holds_run = ckpt is not None or (out / "metrics.jsonl").exists()
    if resume is None and holds_run and not settings["overwrite_output_dir"]:
        raise UsageError(
            f"{out} holds another run: pass --resume to continue it, --overwrite-output-dir to "
            "replace it, or choose another --output-dir"
        )
    if resume is not None:
        step = saved_state(resume)["step"]
        if step > settings["steps"]:
            raise UsageError(f"{resume} is at step {step}, past --steps {settings['steps']}: raise --steps")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise UsageError(f"cannot write to --output-dir {out}: {existing} is not a writable folder")
    return out, resume


BUSY = "another run is writing to {out} right now: wait for it to end, or choose another --output-dir"


def held_by_another_run(out: Path) -> bool:
    """Whether a live run holds `out`'s lock (`start_run`): asked before any loading, so a
    second run on a busy folder stops at once, not after the model has loaded."""
    try:
        with (out / ".lock").open() as probe:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file (or unreadable): nothing is running there
        return False
    return False


def start_run(out: Path, resume: Path | None, settings: dict) -> TextIO:
    """Make the folder and lock it for this process; a fresh run (not a resume) replaces
    the logs and checkpoints of the run it overwrites. Returns the lock: the run holds it
    until it exits, so a second run started on the same folder stops with one line
    instead of writing into the same files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = (out / ".lock").open("a")
    except OSError as e:
        raise UsageError(f"cannot write to --output-dir {out}: {e.strerror}") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        lock.close()
        raise UsageError(BUSY.format(out=out)) from e
    try:
        (out / "args.json").write_text(json.dumps(settings, indent=1))
    except OSError as e:
        raise UsageError(f"cannot write to --output-dir {out}: {e.strerror}") from e
    if resume is None:
        for name in ("metrics.jsonl", "samples.jsonl", "curves.png"):
            (out / name).unlink(missing_ok=True)
        if (out / "checkpoints").is_dir():
            shutil.rmtree(out / "checkpoints")
    return lock


def open_for_eval(settings: dict) -> tuple[Path, Path | None]:
    """--eval-only: (folder, checkpoint to evaluate or None). Nothing in the folder is
    removed; --resume needs a checkpoint of a run of the same kind."""
    out = Path(settings["output_dir"])
    missing = f"--eval-only --resume: no checkpoint in {out}/checkpoints"
    _, resume = checkpoint_to_resume(out, settings, missing)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.jsonl").touch()
    except OSError as e:
        raise UsageError(f"cannot write to --output-dir {out}: {e.strerror}") from e
    return out, resume


def log_metrics(out_dir: Path, row: dict) -> None:
    append_jsonl(out_dir / "metrics.jsonl", row)


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(out_dir: Path) -> list[dict]:
    """Every row of metrics.jsonl, in order."""
    return read_jsonl(out_dir / "metrics.jsonl")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def write_samples(out_dir: Path, rows: list[dict]) -> None:
    """Rows of samples.jsonl: a response with its gold answer, what the verifier took as the
    final answer and how (boxed, ####, answer is, last number, none), and the reward."""
    with (out_dir / "samples.jsonl").open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def sample_rows(
    step: int, completions: list[str], answers: list[str], verdicts: list, n: int = 4
) -> list[dict]:
    """The first n responses of a step as samples.jsonl rows, with what the verifier read."""
    return [
        {
            "step": step,
            "answer": a,
            "extracted": v.extracted,
            "method": v.method,
            "reward": v.reward,
            "completion": c,
        }
        for c, a, v in list(zip(completions, answers, verdicts, strict=True))[:n]
    ]


def bad_steps_message(max_bad_steps: int, lr: float, beta: float, out_dir: Path) -> str:
    """Why a run stopped on non-finite steps, and where its last good checkpoint is."""
    last = latest_checkpoint(out_dir)
    return (
        f"{max_bad_steps} steps in a row had a non-finite loss or gradient and were skipped. "
        f"Likely causes: --lr too high ({lr}), --beta too large ({beta}), or fp16 overflow "
        f"(use bf16 or float32). Last good checkpoint: {last or 'none yet'}"
    )


class RunLog:
    """Where a run's rows go: metrics.jsonl (and curves.png), samples.jsonl, and the
    experiment trackers (trackers.Trackers, or None). A row that cannot be written (a
    full disk) is a UsageError that says which checkpoint is intact. `lock` (from
    start_run) is released by close."""

    def __init__(self, out_dir: Path, trackers=None, lock: TextIO | None = None):
        self.out_dir, self.trackers, self.lock = out_dir, trackers, lock

    def metrics(self, row: dict, plot: bool = False) -> None:
        try:
            log_metrics(self.out_dir, row)
            if plot:
                plot_curves(self.out_dir)
        except OSError as e:
            raise write_error("metrics", self.out_dir, e) from e
        if self.trackers is not None:
            self.trackers.log(row)

    def samples(self, step: int, rows: list[dict]) -> None:
        try:
            write_samples(self.out_dir, rows)
        except OSError as e:
            raise write_error("samples", self.out_dir, e) from e
        if self.trackers is not None:
            self.trackers.log_samples(step, rows)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
        if self.lock is not None:
            self.lock.close()


def truncate_logs(out_dir: Path, step: int) -> None:
    """Drop log rows written after the checkpoint's step (a killed run may have some)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = out_dir / name
        if path.exists():
            keep = [row for row in read_jsonl(path) if row["step"] <= step]
            path.write_text("".join(json.dumps(row) + "\n" for row in keep))


def plot_curves(out_dir: Path) -> None:
    """curves.png, from the run's metrics.jsonl and args.json (`curves_figure`)."""
    import matplotlib.pyplot as plt

    settings = json.loads((out_dir / "args.json").read_text())
    fig = curves_figure(read_metrics(out_dir), settings["max_new_tokens"])
    fig.savefig(out_dir / "curves.png", dpi=90)
    plt.close(fig)


def curves_figure(rows: list[dict], max_new_tokens: int):
    """Training reward and held-out accuracy; the teacher view against the student on
    held-out questions (greedy accuracy, with both lengths on their own axis, from 0 to
    --max-new-tokens so that a fraction of a token does not fill the panel); the
    distillation KL (all responses, flat groups, mixed groups); the reference KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.5))
    train = [r for r in rows if "reward" in r]

    def line(ax, key, source, **style):
        pts = [r for r in source if key in r]
        if pts:
            ax.plot([r["step"] for r in pts], [r[key] for r in pts], label=key, **style)

    line(axes[0], "reward", train)
    accuracies = [k for k in (rows[-1] if rows else {}) if k.startswith(("eval_mean@", "eval_pass@"))]
    for key in accuracies:
        line(axes[0], key, rows, marker="o")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("reward, held-out accuracy")
    for key in ("eval_greedy", "eval_teacher_greedy"):
        line(axes[1], key, rows, marker="o")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("held-out greedy: student vs teacher view")
    lengths = axes[1].twinx()  # tokens, not a share: their own axis
    for key in ("eval_response_len", "eval_teacher_len"):
        line(lengths, key, rows, linestyle="--", marker=".")
    lengths.set_ylabel("mean length (tokens)")
    lengths.set_ylim(0, max_new_tokens)
    if lengths.get_legend_handles_labels()[0]:
        lengths.legend(fontsize=7, loc="lower right")
    for key in ("kl_distill", "kl_distill_flat", "kl_distill_mixed", "kl_contrast", "entropy"):
        line(axes[2], key, train)
    axes[2].set_title("distillation KL and entropy per token")
    line(axes[3], "ref_kl", train)
    axes[3].set_title("ref_kl")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def save_policy(model, tokenizer, out_dir: Path) -> Path:
    """The LoRA adapter in PEFT format (or the full model), safetensors, with the tokenizer."""
    target = out_dir / ("adapter" if is_peft(model) else "model")
    try:
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
    except (OSError, SafetensorError) as e:
        raise write_error(target.name, out_dir, e) from e
    return target


class StopOnCtrlC:
    """The first Ctrl-C (SIGINT), or a SIGTERM from a scheduler or `docker stop`, asks the
    loop to stop after the current step; a second one interrupts at once. `exit_code`
    is 128 + the signal's number (130, 143), as a shell reports it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.exit_code = 0

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, _frame):
        self.requested, self.exit_code = True, 128 + signum
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        print(
            f"\nstopping after this step ({signal.Signals(signum).name}; again to abort now)", file=sys.stderr
        )

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
