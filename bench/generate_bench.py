"""Where a generate call's time goes on this machine, and what transformers' options give.

SmolLM2-135M-Instruct with the project's LoRA adapter (r 16 on every linear layer), the
small preset's prompts and sampling (T = 0.5), every call decoding exactly --tokens tokens
(min_new_tokens = max_new_tokens), per dtype in a process of its own. Rows: 16 (one
training step's rollout, 4 prompts x 4 samples), 60 (one evaluation's greedy call, 60
questions) and 120 (its sampled call, 60 questions x 2). Settings:
  loaded     as the project runs it: dynamic KV cache, the LM head fed a contiguous input,
             in bf16 the whole call under autocast (harness.loading.mixed_precision)
  strided    the same without loading's hook: the head gets generate's strided [B, 1, H]
             slice at the first step (how transformers calls it)
  static     cache_implementation="static" (a preallocated KV cache)
  compiled   static cache + the decode step compiled (CompileConfig, inductor), 16 rows
             only (PLAN); its first call, with the compilation, is reported apart
Each setting: one warm-up call, then --calls timed calls; the median in ms per token
step. For `loaded` at 16 rows, one profiled call splits the time into matrix products,
sampling over the vocabulary, the KV cache's concatenations, attention, the other ATen
ops and the time outside ATen (Python, generate's bookkeeping). Writes
bench/generate_bench.json with the processor it ran on.

    python bench/generate_bench.py
    python bench/generate_bench.py --from-json   # the table of the committed file
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dtype_bench import drive, parser  # noqa: E402

SETTINGS = ("loaded", "strided", "static", "compiled")
# (rows, setting): every setting for a step's rollout; for evaluation's calls (60 rows: a
# greedy view; 120: the sampled one) the settings without compilation
SHAPES = {16: (4, 4), 60: (60, 1), 120: (60, 2)}  # rows: (prompts, samples of each)
PLAN = [(16, s) for s in SETTINGS] + [(60, "loaded"), (120, "loaded"), (120, "strided"), (120, "static")]
GROUPS = {  # profiler op name -> part of the call
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm"),
    "sampling": ("aten::exponential_", "aten::_softmax", "aten::argmax", "aten::div", "aten::multinomial"),
    "kv cache": ("aten::cat",),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
}


def child(dtype: str, a) -> dict:
    """This dtype's timings, in this process."""
    import torch
    from transformers import CompileConfig

    import rollout as R
    from harness import cli, data
    from harness.loading import load_policy, load_tokenizer

    flags = ["--model", a.model, "--dtype", dtype, "--seed", "0", "--output-dir", "unused"]
    cfg = cli.parse(cli.given_flags([*flags, "--context-template", "authors"]))
    train, _ = data.load_splits(cfg.data, None, 60, 0, False, cfg.context_template, cfg.instruction)
    torch.manual_seed(0)
    policy = load_policy(cfg, *load_tokenizer(cfg))
    model, tok = policy.model, policy.tokenizer
    model.eval()
    head = model.get_output_embeddings()
    hooks = dict(head._forward_pre_hooks)  # loading's contiguous-input hook

    def inputs(rows: int, first: int = 0):
        prompts, samples = SHAPES[rows]
        texts = [R.prompt_texts(tok, e)[0] for e in train[first : first + prompts]]
        ids, mask = R.left_pad([R.encode(tok, t) for t in texts], R.pad_id(model, tok))  # [prompts, L]
        return ids.repeat_interleave(samples, 0), mask.repeat_interleave(samples, 0)  # [rows, L]

    def config(setting: str):
        gc = R.sampling_config(model, tok, a.tokens, cfg.temperature, 1.0, a.tokens)
        if setting in ("static", "compiled"):
            gc.cache_implementation = "static"
        if setting == "compiled":
            gc.compile_config = CompileConfig(dynamic=False, mode="default")
            gc.compile_config._compile_all_devices = True  # transformers compiles on GPUs only by default
        return gc

    def call(ids, mask, gc) -> float:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        return 1000 * (time.perf_counter() - t0) / a.tokens

    results = []
    for rows, setting in PLAN:
        ids, mask = inputs(rows)
        head._forward_pre_hooks.clear()
        head._forward_pre_hooks.update({} if setting == "strided" else hooks)
        gc = config(setting)
        first = call(ids, mask, gc)
        timed = [call(ids, mask, gc) for _ in range(a.calls)]
        results.append(
            {
                "rows": rows,
                "setting": setting,
                "ms_per_token": statistics.median(timed),
                "first_ms": first,
            }
        )
        if setting == "compiled":  # other prompts: another prompt length, other shapes
            results[-1]["other_prompts_ms"] = call(*inputs(rows, first=SHAPES[rows][0]), gc)
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    head._forward_pre_hooks.clear()
    head._forward_pre_hooks.update(hooks)
    return {"dtype": dtype, "results": results, "parts": profile(model, *inputs(16), config("loaded"), a)}


def profile(model, ids, mask, gc, a) -> dict[str, float]:
    """One `loaded` call, its wall time split into GROUPS, the other ATen ops and the rest
    (ms per token step)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    torch.manual_seed(0)
    with profiler(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        wall = time.perf_counter() - t0
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    parts = {g: sum(self_us.get(n, 0.0) for n in names) / 1e3 / a.tokens for g, names in GROUPS.items()}
    parts["other ATen ops"] = sum(self_us.values()) / 1e3 / a.tokens - sum(parts.values())
    parts["outside ATen"] = 1000 * wall / a.tokens - sum(parts.values())
    return parts


def table(data: dict) -> str:
    runs = {r["dtype"]: r for r in data["runs"]}
    names = list(runs)
    ratio_name = " / ".join(names) if len(names) == 2 else "ratio"
    lines = ["| rows | setting | " + " | ".join(f"{n} ms / token" for n in names) + f" | {ratio_name} |"]
    lines.append("|---|---|" + "---|" * (len(names) + 1))
    for i, row in enumerate(runs[names[0]]["results"]):
        ms = [runs[n]["results"][i]["ms_per_token"] for n in names]
        ratio = f"{ms[0] / ms[1]:.2f}×" if len(ms) == 2 else ""
        lines.append(
            f"| {row['rows']} | {row['setting']} | " + " | ".join(f"{m:.1f}" for m in ms) + f" | {ratio} |"
        )
    compiled = [next(r for r in runs[n]["results"] if r["setting"] == "compiled") for n in names]
    seconds = data["tokens"] / 1000
    lines += [
        "",
        "compiled, 16 rows: the first call (compiling) "
        + ", ".join(f"{n} {c['first_ms'] * seconds:.1f} s" for n, c in zip(names, compiled, strict=True))
        + "; then a call on 4 other prompts "
        + ", ".join(
            f"{n} {c['other_prompts_ms'] * seconds:.1f} s" for n, c in zip(names, compiled, strict=True)
        ),
    ]
    lines += ["", "| part of a `loaded` call, 16 rows, ms / token | " + " | ".join(names) + " |"]
    lines.append("|---|" + "---|" * len(names))
    for part in runs[names[0]]["parts"]:
        lines.append(f"| {part} | " + " | ".join(f"{runs[n]['parts'][part]:.1f}" for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__, "generate_bench.json", ["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--calls", type=int, default=2)
    a = ap.parse_args()
    drive(a, __file__, child, ["--tokens", str(a.tokens), "--calls", str(a.calls)], table, tokens=a.tokens)


if __name__ == "__main__":
    main()
