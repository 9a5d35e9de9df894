"""Shared fixtures: one tiny offline Qwen2 model folder per test session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network, even by a retry loop

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture()
def tiny(tiny_path):
    """A fresh (model, tokenizer) pair in float32; tests may change the model freely."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(tiny_path)
