"""benchmarks/gpu_check.py, the device check, in its CPU dry run (so that it cannot rot while no GPU runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_end_to_end(tmp_path):
    # every step but the notebook (notebook 06 runs in tests/test_notebooks.py; here only its command is built)
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--steps", "kernel_tests", "speed",
                           "epoch", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for group in ("p4", "p4m"):  # every row the GPU run measures is printed
        for batch in (8, 64):
            for impl in ("triton", "chunked", "plain"):
                assert f"speed {group} P=5 batch {batch} {impl}" in proc.stdout
    results = json.loads(out.read_text())
    assert results["meta"]["dry_run"] and results["kernel_tests"]["returncode"] == 0
    measured = [r for r in results["speed"] if "train_step_s" in r]
    assert [r["spec"]["impl"] for r in measured] == ["fast", "fast", "plain"]
    assert all(r["train_images_per_s"] > 0 for r in measured)
    assert results["epoch"]["result"]["images_per_s"] > 0
