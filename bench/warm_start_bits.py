"""Why the tiny model's figures differ by machine: its warm start's float32 bits depend on
the thread count and on the kernels' instruction set.

Builds the tiny model with --steps of its supervised warm start (seed 0, as every run
builds it) under each setting, in a process of its own: 2 threads and 1 thread with the
processor's own kernels, then both with AVX2 kernels forced (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA,
MKL_ENABLE_INSTRUCTIONS), as on a processor without AVX512 or AMX. Prints a digest of
each result's weights and the largest weight difference from the first setting.

    python bench/warm_start_bits.py
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
SETTINGS = {
    "2 threads, native kernels": {"OMP_NUM_THREADS": "2"},
    "1 thread, native kernels": {"OMP_NUM_THREADS": "1"},
    "2 threads, AVX2 kernels": {"OMP_NUM_THREADS": "2", **AVX2},
    "1 thread, AVX2 kernels": {"OMP_NUM_THREADS": "1", **AVX2},
}


def child(steps: int, out: Path) -> None:
    """The tiny model, built and warm-started in this process as every run builds it
    (`ensure_tiny_model`, in a cache of its own); its weights saved to `out`."""
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import load_file

    from harness.tiny_model import ensure_tiny_model

    folder = ensure_tiny_model(str(out.with_suffix(".cache")), warm_start_steps=steps)
    torch.save(load_file(folder / "model.safetensors"), out)
    print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.steps, a.child)
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        weights = {}
        for name, env in SETTINGS.items():
            out = Path(tmp) / f"{len(weights)}.pt"
            cmd = [sys.executable, __file__, "--steps", str(a.steps), "--child", str(out)]
            kernels = subprocess.run(
                cmd, env={**os.environ, **env}, check=True, capture_output=True, text=True
            )
            weights[name] = torch.load(out)
            first = next(iter(weights.values()))
            digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in weights[name].values())).hexdigest()
            gap = max(float((weights[name][k] - first[k]).abs().max()) for k in first)
            cap, threads = kernels.stdout.split()[-2:]
            print(
                f"{name:<26} ({cap}, {threads} threads): weights {digest[:12]}, "
                f"max |dw| from the first {gap:.1e}"
            )


if __name__ == "__main__":
    main()
