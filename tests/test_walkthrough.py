"""docs/walkthrough.py runs to the end (as a script: the percent-format cells are plain
Python, so a notebook kernel would add dependencies without adding coverage)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_walkthrough_runs_one_step_and_its_kl_check_holds(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDPG_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "walkthrough.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for stage in ("student view x:", "teacher view (c, x):", "advantages", "beta at step 11", "teacher q_t"):
        assert stage in out, stage
    line = next(x for x in out.splitlines() if x.startswith("chunked vs full-logits KL"))
    assert float(line.split("difference ")[1].split()[0]) <= 1e-5  # the script asserts it too
    assert "the gradient reaches" in out
