"""End-to-end tests of train.py: DDP over a real 2-process gloo torchrun,
kill-and-resume, stage initialisation and the non-finite-loss stop (paper §4.1).

Each run is a real `train.py` process on a tiny synthetic data set written
with PyAV by tools/synthetic.py (conftest's `syn`: 8 videos, 24 images, 96-px crops of 4 frames)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def args(syn, out, *extra):
    # Smallest settings that masks allow (96 px: a 6x6 tokenizer grid) and a 32-code tokenizer.
    return ["--preset", "cpu", "--data", syn, "--out", str(out), "--crop", "96", "--short-side", "96", "104",
            "--frames", "4", "--frame-interval", "2", "--video-batch", "2", "--image-batch", "4",
            "--global-video-batch", "2", "--global-image-batch", "4", "--workers", "1",
            "--vocab-size", "32", "--log-every", "1", *extra]


def run(argv, launcher=(sys.executable,), timeout=300):
    return subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def metrics(out, stage):
    """step -> the last logged metrics of that step (a resumed run logs some steps again)."""
    rows = {}
    with open(os.path.join(out, stage, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:                                   # training rows (not the end-of-run baselines)
                rows[r["step"]] = r
    return rows


def ddp_against_one_process(tmp_path, *mode):
    """tests/ddp_worker.py under a 2-process gloo torchrun (`mode`: "compile" or nothing) and as
    one process with the doubled batch: the two ranks' parameters, the single process's, its init."""
    worker = os.path.join(ROOT, "tests", "ddp_worker.py")
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        worker, str(tmp_path / "ddp"), *mode], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, worker, str(tmp_path / "one")], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{i}.pt") for i in (0, 1))
    return r0, r1, torch.load(tmp_path / "one" / "rank0.pt"), torch.load(tmp_path / "one" / "init.pt")


def test_ddp_two_processes_match_one_process_with_the_doubled_batch(tmp_path):
    r0, r1, one, init = ddp_against_one_process(tmp_path)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k                       # DDP keeps the ranks identical
        assert torch.allclose(r0[k].float(), one[k].float(), atol=1e-5), k
    # ... and the three SGD steps really moved the weights (so the comparison means something).
    assert (r0["head.weight"] - init["head.weight"]).abs().max() > 1e-2
    # The trainers' DDP wrapper never re-broadcasts the relative-index buffers (nothing reads them).
    assert (tmp_path / "ddp" / "ddp_flags.txt").read_text().split() == [
        "broadcast_buffers=False", "find_unused_parameters=False", "gradient_as_bucket_view=True"]


def test_compiled_ddp_matches_eager_one_process(tmp_path):
    """compile -> DDP (2 gloo processes, accumulation under no_sync) gives the parameters of the
    eager single process after 3 SGD steps, to float-reordering tolerance."""
    r0, r1, one, init = ddp_against_one_process(tmp_path, "compile")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in r0)          # compiled in place: same keys
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.allclose(r0[k].float(), one[k].float(), atol=1e-5), k
    assert (r0["head.weight"] - init["head.weight"]).abs().max() > 1e-2


def test_cross_rank_helpers_and_a_nan_on_one_rank_stop_every_rank(tmp_path):
    worker = os.path.join(ROOT, "tests", "ddp_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        worker, str(tmp_path), "collectives"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [(tmp_path / f"collectives{i}.txt").read_text().splitlines() for i in (0, 1)]
    for rank_lines in lines:
        assert rank_lines[0] == "rows=[0, 1, 10, 11, 12] mean=0.5"             # rank order, unequal lengths
        # Both ranks decide on the all-reduced values: the same step, the same one-line message.
        assert rank_lines[1] == "non-finite loss nan (gradient norm 1.0) at step 2; stopping"
    # Rank 0 logged the finite step before the bad one, and nothing after it.
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]


def test_train_py_under_torchrun_gloo(syn, tmp_path):
    r = run(args(syn, tmp_path, "--stage", "joint", "--max-steps", "2", "--init", "scratch"),
            launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "world 2 x 2 clips" in r.stdout
    ck = torch.load(tmp_path / "joint" / "ckpt.pt", weights_only=True)
    assert ck["world"] == 2 and ck["step"] == 2 and len(ck["rng"]) == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])


def torchrun_worker(tmp_path, mode):
    worker = os.path.join(ROOT, "tests", "ddp_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        worker, str(tmp_path), mode], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_rank_0_decides_the_resume_for_a_rank_that_cannot_see_the_checkpoint(tmp_path):
    torchrun_worker(tmp_path, "resume")
    said = [(tmp_path / f"resume{i}.txt").read_text() for i in (0, 1)]
    assert said[0] == said[1] == f"{tmp_path / 'joint' / 'ckpt.pt'} 3 [1.0, 1.0] ['ckpt.pt']\n"


def test_finetune_ema_starts_equal_on_every_rank(tmp_path):
    torchrun_worker(tmp_path, "ema")
    r0, r1 = (torch.load(tmp_path / f"ema{i}.pt") for i in (0, 1))
    assert not torch.equal(r0["own"], r1["own"])                      # the ranks' own random heads differ ...
    assert torch.equal(r0["model"], r1["model"]) and torch.equal(r0["ema"], r1["ema"])   # ... DDP made them one
    assert torch.equal(r0["ema"], r0["model"])


def test_srun_without_torchrun_is_refused_before_anything_is_written(syn, tmp_path):
    """Two tasks started as `srun --ntasks=2 python train.py` starts them (SLURM_PROCID 0 and 1, no RANK):
    each would be a single-process run on the same --out; both refuse in one line, and nothing is written."""
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    argv = [sys.executable, os.path.join(ROOT, "train.py"), *args(syn, tmp_path, "--stage", "image")]
    slurm = [{"SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "SLURM_NTASKS": "2"} for i in range(2)]
    tasks = [subprocess.Popen(argv, cwd=ROOT, env={**env, **task}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for task in slurm]
    for p in tasks:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2 and err.count("\n") == 1, err
        assert "srun started 2 tasks without torchrun" in err and "srun --ntasks-per-node=1 torchrun" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("cmd", [["train.py", "--stage", "joint"], ["finetune.py"],
                                 ["train.py", "--preset", "cpu", "--mask-ratio", "0.3"]])
def test_checks_on_the_flags_fail_within_seconds_and_write_nothing(tmp_path, cmd):
    t = time.time()
    r = subprocess.run([sys.executable, os.path.join(ROOT, cmd[0]), *cmd[1:], "--out", str(tmp_path / "out")],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "error:" in r.stderr, r.stderr
    assert time.time() - t < 30 and os.listdir(tmp_path) == []


def test_kill_and_resume_continues_the_same_loss_curve(syn, tmp_path):
    base = args(syn, tmp_path / "full", "--stage", "video", "--max-steps", "10", "--ckpt-every", "2")
    r = run(base)
    assert r.returncode == 0, r.stderr[-3000:]
    full = metrics(tmp_path / "full", "video")
    assert sorted(full) == list(range(1, 11))
    assert all(r["clips_per_s"] > 0 for r in full.values())         # logged with every row (--log-every 1)

    # The same run, killed (SIGKILL) once its first checkpoint is on disk, then resumed.
    out = tmp_path / "killed"
    argv = args(syn, out, "--stage", "video", "--max-steps", "10", "--ckpt-every", "2")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "video" / "ckpt.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert killed_at < 10, "the run finished before it could be killed"
    r = run(argv + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpt}: step {killed_at}" in r.stdout
    resumed = metrics(out, "video")
    with open(out / "video" / "metrics.jsonl") as f:                  # each step logged once
        assert [r["step"] for r in map(json.loads, f) if "loss" in r] == list(range(1, 11))
    for step in range(killed_at + 1, 11):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5, abs=1e-6), step
        assert resumed[step]["lr"] == pytest.approx(full[step]["lr"], rel=1e-9)
    # On the same number of processes the resume is exact: the same weights, bit for bit.
    a, b = (torch.load(o / "video" / "final.pt", weights_only=True)["model"] for o in (tmp_path / "full", out))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_joint_stage_starts_from_the_image_stage(syn, tmp_path):
    r = run(args(syn, tmp_path, "--stage", "image", "--max-steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    final = tmp_path / "image" / "final.pt"
    assert final.exists()
    r = run(args(syn, tmp_path, "--stage", "joint", "--max-steps", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"initialising from the image stage's {final}" in r.stdout
    assert "missing (0, trained from scratch): []" in r.stdout and "unused (0): none" in r.stdout
    # Without an image-stage checkpoint a fresh joint stage is refused, naming the image stage; --init scratch runs it.
    r = run(args(syn, tmp_path / "fresh", "--stage", "joint", "--max-steps", "1"))
    assert r.returncode == 2 and "python train.py --stage image" in r.stderr and "--init scratch" in r.stderr
    assert not (tmp_path / "fresh").exists()
    r = run(args(syn, tmp_path / "fresh", "--stage", "joint", "--max-steps", "1", "--init", "scratch"))
    assert r.returncode == 0 and "init: scratch (random weights)" in r.stdout, r.stderr[-2000:]


def test_non_finite_loss_stops_the_run_naming_the_step(syn, tmp_path):
    r = run(args(syn, tmp_path, "--stage", "image", "--max-steps", "6", "--lr", "1e30", "--clip-grad", "1e30"))
    assert r.returncode != 0
    assert "non-finite loss" in r.stderr and "at step" in r.stderr


# -----------------------------------------------------------------------------
# Resume on another number of processes (a requeued cluster job): the effective batch is kept by
# changing the accumulation, and model, optimizer, step, schedule and data position carry over.

ONE = (sys.executable,)
TWO = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
K, N = 3, 6                              # resume after step 3 (mid-epoch: 2 steps per epoch), stop at 6
# Tolerance of the parameters after N AdamW steps, resumed vs straight. The two runs see the same
# global batches, cut into the same micro-batches of 1 clip + 2 images; only the order in which
# the 4 micro-batch gradients are summed differs (2 ranks x 2 accumulated, averaged by DDP, vs 4
# accumulated in one process), i.e. fp32 rounding, which the following steps carry on and grow.
# Measured on the cpu preset in fp32: 2 processes straight vs 1 process straight to step 6 differ
# by 1.3e-5 at most, the resumed runs from the straight ones by 4.5e-6 (2 -> 1) and 2.7e-6 (1 -> 2):
# under 1% of one step's move (AdamW moves a weight by ~lr = 2e-3 per step). A real fault is far
# larger: resuming one global step off left the weights 7.8e-3 apart. 1e-4 is 8x the largest
# measured rounding and 20x below one step. Absolute, not relative: many weights are near 0.
ATOL = 1e-4


def cross_world_args(syn, out, *extra):
    """The joint stage (both streams) at an effective batch of 4 clips + 8 images: 2 processes x
    accumulation 2 or 1 process x accumulation 4, in fp32 (bf16 rounding would swamp the comparison)."""
    return args(syn, out, "--stage", "joint", "--video-batch", "1", "--image-batch", "2", "--global-video-batch", "4",
                "--global-image-batch", "8", "--precision", "fp32", "--ckpt-every", "100", "--init", "scratch",
                *extra)


def final_model(out):
    return torch.load(os.path.join(out, "joint", "final.pt"), weights_only=True)["model"]


def resume_on_other_world(syn, tmp_path, first, then):
    """`first` to step K, then `then` to step N, against `first` straight to step N.
    Returns (the resumed run's stdout, the largest parameter difference at step N); checks on
    the way that the resumed steps follow the straight run's schedule and losses."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # ~10 s each on 2 idle cores; the generous limit is for a machine shared with other jobs.
    r = run(cross_world_args(syn, straight, "--max-steps", str(N)), launcher=first, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r = run(cross_world_args(syn, resumed, "--max-steps", str(K)), launcher=first, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r = run(cross_world_args(syn, resumed, "--max-steps", str(N)), launcher=then, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ckpt = resumed / "joint" / "ckpt.pt"
    a, b = final_model(straight), final_model(resumed)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    # The steps after the resume really moved the weights, by far more than the tolerance
    # (measured 5.7e-3: 3 steps of lr <= 2e-3), so a missing or repeated step cannot pass.
    at_k = torch.load(resumed / "joint" / "ckpt.prev.pt", weights_only=True)
    assert at_k["step"] == K
    assert max((at_k["model"][k].float() - b[k].float()).abs().max().item() for k in b) > 20 * ATOL
    # The same schedule (lr per step, exactly) and the same losses, step by step.
    full, res = metrics(straight, "joint"), metrics(resumed, "joint")
    assert sorted(res) == list(range(1, N + 1))
    for step in range(K + 1, N + 1):
        assert res[step]["lr"] == full[step]["lr"], step
        assert res[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-4), step
    ck = torch.load(ckpt, weights_only=True)
    assert ck["step"] == N and ck["batch"]["effective"] == {"clips": 4, "images": 8}
    return r.stdout, worst


def resumed_line(tmp_path, note):
    """What the resumed run logs: what changed, and where it goes on (the middle of epoch 1)."""
    return f"resumed from {tmp_path / 'resumed' / 'joint' / 'ckpt.pt'}: step {K}, epoch 1, step 1 of the epoch; {note}"


def test_two_processes_then_one_with_double_accumulation_match_two_straight(syn, tmp_path):
    out, worst = resume_on_other_world(syn, tmp_path, TWO, ONE)
    assert resumed_line(tmp_path, "world 2 -> 1, accumulation 2 -> 4: effective batch 4 clips + 8 images kept") \
        in out, out[-3000:]
    assert worst < ATOL, worst


def test_one_process_then_two_match_one_straight(syn, tmp_path):
    out, worst = resume_on_other_world(syn, tmp_path, ONE, TWO)
    assert resumed_line(tmp_path, "world 1 -> 2, accumulation 4 -> 2: effective batch 4 clips + 8 images kept") \
        in out, out[-3000:]
    assert worst < ATOL, worst


def test_a_batch_that_cannot_keep_the_effective_batch_is_refused_in_one_line(syn, tmp_path):
    """1 process x 3 clips cannot make up the run's 4 clips per step: one line naming the flags that keep it."""
    base = cross_world_args(syn, tmp_path, "--stage", "video")
    r = run(base + ["--max-steps", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(base + ["--max-steps", "2", "--video-batch", "3"])
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), r.stderr
    assert ("effective batch of 4 clips per step; 1 process(es) x 3 clips make 3 clips at best (accumulation 1): "
            "keep it with other --video-batch or process counts (learning rate 0.002 at that batch)") in lines[0]
    assert torch.load(tmp_path / "video" / "ckpt.pt", weights_only=True)["step"] == 1      # untouched
