"""Shared fixtures and the small run every training test starts from.

One tiny offline Qwen2 model folder is built per test session; `small_run` and
`load_small_policy` give the flags and the policy of a run that takes a second a step.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network, even by a retry loop

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from harness import cli  # noqa: E402
from harness.loading import load_policy, load_tokenizer  # noqa: E402
from harness.tiny_model import build_tiny_model  # noqa: E402

# B = 2 prompts x G = 4 samples x at most 6 tokens, one update per rollout, 4 held-out
# prompts, no evals between, a teacher check (and auto) on 8 training questions.
SMALL_RUN = [
    "--data",
    "arithmetic",
    "--num-generations",
    "4",
    "--batch-prompts",
    "2",
    "--mini-batch-prompts",
    "2",
    "--max-new-tokens",
    "6",
    "--lr",
    "1e-2",
    "--eval-size",
    "4",
    "--eval-samples",
    "2",
    "--eval-every",
    "0",
    "--check-size",
    "8",
    "--dtype",  # a folder model's auto picks bf16 on a CPU with bf16 units: the tests choose
    "float32",
]


def small_args(model_path, *extra):
    """Resolved flags of a small run on `model_path`, with `extra` flags on top."""
    argv = ["--model", str(model_path), *SMALL_RUN, *[str(x) for x in extra]]
    return cli.parse(cli.given_flags(argv))


def load_small_policy(args):
    path, tokenizer = load_tokenizer(args)
    return load_policy(args, path, tokenizer)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture()
def tiny(tiny_path):
    """A fresh (model, tokenizer) pair in float32; tests may change the model freely."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_path)
