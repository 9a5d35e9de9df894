"""docs/walkthrough.py runs one whole SDPG step (as a script: the percent-format cells are
plain Python), and its numbers say what it prints."""

import runpy
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_the_walkthrough_takes_one_whole_step_and_its_numbers_hold(tmp_path, monkeypatch):
    """The weights change; a flat group's outcome gradient is exactly zero while its
    distillation gradient is not; the ratio is 1 on the first update and not on the
    second; nothing is left in the temporary folder."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flags = ["--cache-dir", str(tmp_path / "cache"), "--tiny-warm-start-steps", "120"]
    monkeypatch.setattr(sys, "argv", ["walkthrough.py", *flags])
    run = runpy.run_path(str(ROOT / "docs" / "walkthrough.py"), run_name="__main__")
    assert any(not torch.equal(a, b) for a, b in zip(run["before"], run["after"], strict=True))
    assert run["norms"]["flat"]["outcome"] == 0.0 and run["norms"]["flat"]["distill"] > 1e-4
    assert run["norms"]["mixed"]["outcome"] > 1e-4
    assert run["ratio_gaps"][0] < 1e-4 and run["ratio_gaps"][-1] > 1e-3
    assert run["flat"].any() and (~run["flat"]).any()
    assert abs(run["sum_a"]) < 1e-5  # a group's advantages cancel
    assert run["two"] == pytest.approx(0.5)  # (-2 + 6) / 8: the token-mean does not
    # the sentence follows its numbers: equal lengths cancel, unequal ones do not
    say = run["length_sentence"]
    same = say(0.0, 0.0, torch.tensor([7.0, 7.0, 7.0]))
    assert "every mixed response has 7 tokens" in same and "do not cancel" not in same
    assert "do not cancel" in say(0.0, 0.25, torch.tensor([2.0, 6.0]))
    equal = bool((run["lengths"][run["mixed_rows"]] == run["lengths"][run["mixed_rows"]][0]).all())
    assert equal == (abs(run["pg_mixed"]) < 1e-6)
    assert list(scratch.iterdir()) == []
