"""docs/walkthrough.py runs one whole SDPG step (as a script: the percent-format cells are
plain Python), and its numbers say what it prints."""

import runpy
import sys
import tempfile
from pathlib import Path

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
    assert abs(run["sum_a"]) < 1e-5 and run["pg_mixed"] != 0.0  # advantages cancel, the token-mean does not
    assert list(scratch.iterdir()) == []
