"""The prepared GPU check must still run when a GPU is lent: its CPU dry run executes the same code
(resume, accumulation under torchrun with gloo, finetune + evaluation, the SDPA bias-gradient check)
at toy sizes, and every check must pass (about a minute)."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_gpu_check_dry_run_passes_every_check(tmp_path):
    r = subprocess.run([sys.executable, "tools/gpu_check.py", "--cpu-dry-run", "--no-compile", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    checks = json.load(open(tmp_path / "gpu_check.json"))["checks"]
    assert {"sdpa", "tokenizer", "step", "resume", "ddp-accum", "finetune"} <= set(checks), set(checks)
    assert all(c["ok"] for c in checks.values()), {k: c["ok"] for k, c in checks.items()}
