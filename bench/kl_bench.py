"""Full-vocabulary distillation divergences: chunked_kl against the naive materialised-logits path.

For each shape (N tokens, H hidden, V vocab), each divergence (reverse KL, forward KL,
JSD at lambda 0.5) and each variant (naive, chunked at each chunk size) a fresh process
builds the inputs, runs forward + backward of sum_n c_n D_n w.r.t. the student hidden
states (the head is frozen, as under LoRA), and reports its time and its peak memory
above what the inputs already took (CPU: peak RSS, reset after set-up; CUDA:
max_memory_allocated). A separate process measures the relative error of the loss and
the input gradient against a float64 reference on a smaller case. Prints a table, with
each divergence's time and memory relative to the reverse KL's at the same variant, and
writes the raw numbers as JSON.

    python bench/kl_bench.py                         # Qwen2.5-0.5B head, N = 2048, all three
    python bench/kl_bench.py --shapes 2048x896x151936 8192x896x151936 --chunks 128 256 512 1024 2048
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from losses import DIVERGENCES, chunked_kl, divergence_from_logits  # noqa: E402


def make_inputs(n: int, h: int, v: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Student hidden states, a nearby teacher (self-distillation: q is close to p), the head."""
    g = torch.Generator().manual_seed(seed)
    hs = 3.0 * torch.randn(n, h, generator=g)
    ht = hs + 0.3 * torch.randn(n, h, generator=g)
    w = 0.02 * torch.randn(v, h, generator=g)
    coeff = torch.rand(n, generator=g)  # per-token weights, like beta * gate / n_tokens
    return [x.to(device=device, dtype=dtype) for x in (hs, ht, w, coeff)]


def kl_loss(variant: str, divergence: str, hs, ht, w, coeff):
    if variant == "naive":
        kl = divergence_from_logits(hs @ w.T, ht @ w.T, divergence=divergence)  # [N]
    else:
        kl = chunked_kl(hs, ht, w, chunk_size=int(variant), divergence=divergence)  # [N]
    return (kl * coeff).sum()


def status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) from /proc/self/status."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so input set-up is not counted."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker_speed(variant: str, divergence: str, n: int, h: int, v: int, device: str, repeats: int) -> dict:
    hs, ht, w, coeff = make_inputs(n, h, v, device, torch.float32)
    hs.requires_grad_()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = status_bytes("VmRSS")
    times = []
    for _ in range(repeats):
        hs.grad = None
        sync()
        t0 = time.perf_counter()
        kl_loss(variant, divergence, hs, ht, w, coeff).backward()
        sync()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = status_bytes("VmHWM") - base
    return {"seconds": min(times), "peak_extra_bytes": peak}


def worker_error(variant: str, divergence: str, n: int, h: int, v: int, device: str) -> dict:
    """Relative error of loss and input gradient vs float64 (the reference runs in float64)."""
    out = {}
    for dtype in (torch.float64, torch.float32):
        hs, ht, w, coeff = make_inputs(n, h, v, device, dtype, seed=1)
        hs.requires_grad_()
        loss = kl_loss(variant if dtype == torch.float32 else "naive", divergence, hs, ht, w, coeff)
        loss.backward()
        out[dtype] = (loss.detach().double(), hs.grad.double())
    (l64, g64), (l32, g32) = out[torch.float64], out[torch.float32]
    return {
        "loss_rel_err": float((l32 - l64).abs() / l64.abs()),
        "grad_rel_err": float((g32 - g64).norm() / g64.norm()),
    }


def run_worker(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def naive_fits(n: int, v: int, device: str) -> bool:
    """The naive path holds about six [N, V] float32 tensors at its peak."""
    need = 6 * n * v * 4
    if device == "cuda":
        return need < torch.cuda.get_device_properties(0).total_memory * 0.9
    return need < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["2048x896x151936"], help="NxHxV")
    ap.add_argument("--chunks", nargs="+", type=int, default=[256, 512])
    ap.add_argument("--divergences", nargs="+", choices=DIVERGENCES, default=list(DIVERGENCES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant; the best is kept")
    ap.add_argument("--error-tokens", type=int, default=256, help="N of the float64 error check")
    ap.add_argument("--json", default="bench/kl_bench.json")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kind, variant, divergence, n, h, v, device, repeats = a.worker
        n, h, v, repeats = int(n), int(h), int(v), int(repeats)
        res = (
            worker_speed(variant, divergence, n, h, v, device, repeats)
            if kind == "speed"
            else worker_error(variant, divergence, n, h, v, device)
        )
        print(json.dumps(res))
        return

    rows = []
    for shape in a.shapes:
        n, h, v = (int(x) for x in shape.split("x"))
        for variant in ["naive"] + [str(c) for c in a.chunks]:
            for divergence in a.divergences:
                row = {"shape": shape, "variant": variant, "divergence": divergence, "device": a.device}
                sizes = [str(h), str(v), a.device]
                if variant == "naive" and not naive_fits(n, v, a.device):
                    row["error"] = "skipped: naive logits do not fit in memory"
                else:
                    row.update(run_worker(["speed", variant, divergence, str(n), *sizes, str(a.repeats)]))
                row.update(run_worker(["error", variant, divergence, str(a.error_tokens), *sizes, "1"]))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    print_table(rows)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"machine": machine(a.device), "rows": rows}, indent=1))


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def print_table(rows: list[dict]) -> None:
    """One row per (shape, variant, divergence): time and peak memory, against the naive
    path of the same divergence and against the reverse KL at the same variant."""
    timed = {(r["shape"], r["variant"], r["divergence"]): r for r in rows if "seconds" in r}
    print(f"\n{machine(rows[0]['device'])}")
    print(
        "| N x H x V | variant | divergence | fwd+bwd s | x naive | x reverse | peak MiB | % naive "
        "| x reverse | loss err | grad err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "seconds" not in r:
            print(f"| {r['shape']} | {r['variant']} | {r['divergence']} | {r.get('error', '')} |" + " |" * 7)
            continue
        naive = timed.get((r["shape"], "naive", r["divergence"]))
        reverse = timed.get((r["shape"], r["variant"], "reverse"))
        mib = r["peak_extra_bytes"] / 2**20
        print(
            f"| {r['shape']} | {r['variant']} | {r['divergence']} | {r['seconds']:.2f} | "
            f"{ratio(r, naive, 'seconds')} | {ratio(r, reverse, 'seconds')} | {mib:.0f} | "
            f"{ratio(r, naive, 'peak_extra_bytes', 100, '.1f')} | {ratio(r, reverse, 'peak_extra_bytes')} | "
            f"{r.get('loss_rel_err', float('nan')):.1e} | {r.get('grad_rel_err', float('nan')):.1e} |"
        )


def ratio(row: dict, base: dict | None, key: str, scale: float = 1.0, fmt: str = ".2f") -> str:
    return f"{scale * row[key] / base[key]:{fmt}}" if base else "-"


if __name__ == "__main__":
    main()
