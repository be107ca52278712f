"""Reliability: a run is never lost or silently spoiled, and every user error is one clear line.

One test per way a careless or hostile user (or a full disk, a kill, a frozen
rank) could lose or spoil a run, each run against the real thing: train.py
processes on a tiny synthetic set written with PyAV, real 2-process gloo
torchrun, a real full disk (/dev/full), real damaged files."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import finetune
import train
from tools import synthetic
from test_train import ENV, ROOT, args, metrics, run

ONE_PROCESS = train.Runtime(ddp=False, rank=0, world=1, device=torch.device("cpu"), bf16=False)


def one_line(r_or_err: str) -> str:
    lines = [line for line in r_or_err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, r_or_err
    assert "error:" in lines[0] and "Traceback" not in lines[0]
    return lines[0]


# -----------------------------------------------------------------------------
# 1. A second run on the same folder: resumed, refused or explicitly overwritten, never wiped


def test_rerun_resumes_and_never_wipes_a_previous_run(syn, tmp_path):
    base = args(syn, tmp_path, "--stage", "image")
    r = run(base + ["--max-steps", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = run(base + ["--max-steps", "4"])                               # the same command again, longer
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "step 2" in r.stdout
    with open(tmp_path / "image" / "metrics.jsonl") as f:              # no gap, no rows of two runs
        assert [r["step"] for r in map(json.loads, f) if "loss" in r] == [1, 2, 3, 4]
    assert f"curves: python tools/plot.py {tmp_path / 'image'}" in r.stdout      # the trainer draws no picture
    r = run(base + ["--max-steps", "4", "--resume", "no"])            # a fresh start must be asked for
    assert r.returncode == 2
    assert "holds a previous run" in one_line(r.stderr) and "--overwrite" in r.stderr
    r = run(base + ["--max-steps", "1", "--overwrite"])
    assert r.returncode == 0 and "resumed" not in r.stdout
    assert sorted(metrics(tmp_path, "image")) == [1]


def run_files(folder, names=("final.pt", "config.json", "metrics.jsonl", "ckpt.pt")) -> dict:
    """Each file's bytes and modification time: what a rerun that writes nothing leaves as it was."""
    return {n: ((folder / n).read_bytes(), os.stat(folder / n).st_mtime_ns) for n in names}


def test_a_finished_rerun_writes_nothing_and_names_the_flags_it_did_not_apply(syn, tmp_path):
    """Issue 29.5: a finished run rerun into its --out, even with other flags, trains nothing and so
    rewrites nothing (no final.pt recording flags it did not train with, no baselines line dropped)."""
    base = args(syn, tmp_path, "--stage", "image")
    r = run(base + ["--max-steps", "3"])
    assert r.returncode == 0, r.stderr[-2000:]
    before = run_files(tmp_path / "image")
    assert '"baselines"' in (tmp_path / "image" / "metrics.jsonl").read_text()
    time.sleep(0.01)                                                   # a rewrite would show in the mtimes
    for extra, flags in ((["--lr", "1e-4", "--max-steps", "2"], ["--lr 0.002 -> 0.0001", "--max-steps 3 -> 2"]),
                         (["--max-steps", "3"], [])):                  # the other flags; the same command again
        r = run(base + extra)
        assert r.returncode == 0, r.stderr[-2000:]
        assert run_files(tmp_path / "image") == before
        said = [line for line in r.stdout.splitlines() if "nothing to do" in line]
        assert len(said) == 1 and "already complete at step 3" in said[0], r.stdout
        assert all(f in said[0] for f in flags) and ("not applied" in said[0]) == bool(flags), said[0]
        assert "final:" not in r.stdout and "resumed from" not in r.stdout


def test_config_records_what_ran_and_resume_still_compares_the_flags(syn, tmp_path):
    """Issue 29.7: config.json and the checkpoints' config keep the flags as given and add what they resolved
    to: precision used, tokenizer file read and its sha256, device, world size, accumulation, torch."""
    r = run(args(syn, tmp_path, "--stage", "image", "--max-steps", "2"))
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "image" / "config.json").read_text())
    assert cfg["precision"] == "auto" and cfg["tokenizer"] == ""                # as given
    res = cfg["resolved"]
    used = "bf16" if train.resolve_precision("auto", torch.device("cpu")) else "fp32"
    tok = os.path.join(syn, "tokenizer_32.pt")
    with open(tok, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert res["precision"] == used and ("bf16 autocast" if used == "bf16" else "fp32 (") in r.stdout
    assert res["tokenizer"] == os.path.abspath(tok) and res["tokenizer_sha256"] == digest
    assert (res["device"], res["world"], res["accum_steps"], res["torch"]) == ("cpu", 1, 1, torch.__version__)
    for name in ("final.pt", "ckpt.pt"):
        assert json.loads(json.dumps(train.load_checkpoint(str(tmp_path / "image" / name))["config"])) == cfg
    r = run(args(syn, tmp_path, "--stage", "image", "--max-steps", "3", "--lr", "1e-3"))
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(line for line in r.stdout.splitlines() if "resumed from" in line)
    assert line.endswith("changed flags: --lr 0.002 -> 0.001"), line             # the record is no flag


HOLD = ("import sys, time, data\n"
        "assert data.FileLock(sys.argv[1]).acquire() is None\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


def hold_lock(path):
    """A live holder in another process (another open file description); returns once it holds the lock."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_process_on_the_same_folder_is_refused_and_a_dead_ones_lock_is_taken_over(syn, tmp_path):
    (tmp_path / "image").mkdir(parents=True)
    lock = tmp_path / "image" / "run.lock"
    holder = hold_lock(lock)
    try:
        r = run(args(syn, tmp_path, "--stage", "image", "--max-steps", "1"))
        assert r.returncode == 2
        msg = one_line(r.stderr)
        assert "in use by another run" in msg and f"pid {holder.pid} on {socket.gethostname()} since" in msg
    finally:
        holder.kill()                                                   # dies holding it: the kernel frees it
        holder.wait()
    r = run(args(syn, tmp_path, "--stage", "image", "--max-steps", "1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert lock.exists() and data.FileLock(lock).acquire() is None     # the file stays; the lock is free


def test_a_lock_is_reclaimed_after_any_restart_and_a_live_holder_is_refused(tmp_path):
    """Issue 32.3: a restarted job (SLURM requeue, elastic torchrun restart on other hosts) finds run.lock
    naming its earlier rank 0 on another host; nothing holds it any more, so it is taken. A live holder
    is refused with its description; once that holder is killed the lock is free."""
    lock = tmp_path / "run.lock"
    lock.write_text("pid 4242 on node-that-was-preempted since 2024-01-01 00:00:00\n")
    ours = data.FileLock(lock)
    assert ours.acquire() is None and ours.acquire() is None                     # taken; asking again is fine
    assert lock.read_text().startswith(f"pid {os.getpid()} on {socket.gethostname()} since ")
    ours.release()
    holder = hold_lock(lock)
    try:
        busy = data.FileLock(lock).acquire()
        assert busy.startswith(f"pid {holder.pid} on {socket.gethostname()} since ") and str(lock) in busy
        assert "\n" not in busy
    finally:
        holder.kill()
        holder.wait()
    again = data.FileLock(lock)
    assert again.acquire() is None
    again.release()


# -----------------------------------------------------------------------------
# 2-3, 10. Flags: one meaning, ranges checked at parse time, one line and exit 2


@pytest.mark.parametrize("argv, flag", [
    (["--clip-grad", "-1"], "--clip-grad"), (["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"),
    (["--max-steps", "-5"], "--max-steps"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"), (["--ckpt-every", "0"], "--ckpt-every"),
    (["--log-every", "0"], "--log-every"), (["--global-image-batch", "0"], "--global-image-batch"),
    (["--short-side", "160", "128"], "--short-side"), (["--drop-path", "2"], "--drop-path"),
    (["--accum-steps", "-1"], "--accum-steps"), (["--precision", "fp8"], "--precision"),
    (["--mask-strategy", "cube"], "--mask-strategy"), (["--stage", "audio"], "--stage"),
])
def test_train_flags_out_of_range_are_one_line_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--preset", "cpu", *argv])
    assert e.value.code == 2
    msg = one_line(capsys.readouterr().err)
    assert flag in msg and argv[-1] in msg                               # names the flag and what came


@pytest.mark.parametrize("argv, flag", [
    (["--ema", "2"], "--ema"), (["--global-batch", "0"], "--global-batch"), (["--clip-grad", "-1"], "--clip-grad"),
    (["--epochs", "0"], "--epochs"), (["--recipe", "k600"], "--recipe"), (["--eval-mode", "sideways"], "eval-mode"),
])
def test_finetune_flags_out_of_range_are_one_line_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        finetune.parse_args(["--preset", "cpu", *argv])
    assert e.value.code == 2
    assert flag in one_line(capsys.readouterr().err)


def test_clip_grad_zero_means_no_clipping_in_both_tools():
    """Both trainers' step (train.accumulate_gradients): --clip-grad 0 measures the norm, leaves the gradient."""
    rt = train.Runtime(False, 0, 1, torch.device("cpu"), False)
    x = torch.tensor([30.0, 40.0, 0.0])                                 # the gradient: norm 50
    for clip, after in ((0.0, x), (5.0, x / 10)):
        w = torch.nn.Linear(3, 1, bias=False)
        _, norm = train.accumulate_gradients(w, [x], rt, clip, lambda b: {"loss": (w.weight * b).sum()})
        assert norm.item() == pytest.approx(50.0) and torch.allclose(w.weight.grad[0], after, rtol=1e-4, atol=0)
    assert train.parse_args(["--clip-grad", "0"]).clip_grad == 0.0     # accepted: "off", as in finetune.py


def test_init_that_is_not_an_encoder_checkpoint_is_a_one_line_error(syn, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    r = run(args(syn, tmp_path / "a", "--stage", "image", "--max-steps", "1", "--init", str(text)))
    assert r.returncode == 2
    msg = one_line(r.stderr)
    assert "not a checkpoint of this project" in msg and "weights_only=False" not in msg
    tok = os.path.join(syn, "tokenizer_32.pt")                          # a file, but no encoder in it
    r = run(args(syn, tmp_path / "c", "--stage", "image", "--max-steps", "1", "--init", tok))
    assert r.returncode == 2 and "holds no encoder weights" in one_line(r.stderr)


def test_own_data_without_a_tokenizer_says_how_to_make_one(syn, tmp_path):
    vids = os.path.join(syn, "videos")
    r = run(["--preset", "cpu", "--stage", "video", "--out", str(tmp_path), "--video-root", vids,
             "--video-list", os.path.join(vids, "train_motion.txt")])
    assert r.returncode == 2
    msg = one_line(r.stderr)
    assert "--tokenizer is required with your own data" in msg and "tools/tokenizer_tool.py fit" in msg


def test_a_missing_synthetic_set_or_tokenizer_names_the_command_that_makes_it(syn, tmp_path):
    """train.py reads the synthetic set, it does not make it: one line naming tools/synthetic.py,
    before anything is written (no run folder claimed)."""
    for data_dir, what in ((tmp_path / "none", "no synthetic set"), (syn, "no tokenizer")):
        r = run(["--preset", "cpu", "--stage", "image", "--data", str(data_dir), "--out", str(tmp_path / "out"),
                 "--vocab-size", "64"])
        assert r.returncode == 2
        msg = one_line(r.stderr)
        assert what in msg and f"python tools/synthetic.py --out {data_dir}" in msg
        assert not (tmp_path / "out").exists() and not (tmp_path / "none").exists()


@pytest.mark.parametrize("cmd, expect", [
    (["tools/prepare_data.py", "check", "--video-list", "/no/such/list.txt", "--video-root", "/tmp"],
     "/no/such/list.txt"),
    (["tools/mask_sheet.py", "--strategy", "tube", "--out-file", "/tmp/m.png", "--crop", "40"], "multiples of"),
    (["tools/tokenizer_tool.py", "info", "/no/such/tok.pt"], "/no/such/tok.pt"),
])
def test_command_line_tools_end_user_errors_in_one_line(cmd, expect):
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert expect in one_line(r.stderr)


# -----------------------------------------------------------------------------
# 4, 12, 13. Media: 16-bit images decoded right; an all-bad list named; skips counted over the run


def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    grey = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")                  # a real 16-bit greyscale PNG
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = data.read_image(tmp_path / "deep.png")
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    expected = np.rint(grey / 257.0).astype(np.uint8)                  # 65535 -> 255, linear
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert rgb.min() == 0 and rgb.max() == 255


def _list_of(tmp_path, good: int, bad: int):
    root = tmp_path / "media"
    root.mkdir()
    rows = []
    for i in range(good):
        synthetic.write_video(root / f"good{i}.mp4", np.full((8, 32, 32, 3), 40 * i, np.uint8))
        rows.append(f"good{i}.mp4 0")
    for i in range(bad):
        (root / f"bad{i}.mp4").write_bytes(b"\x00" * 100 + os.urandom(200))
        rows.append(f"bad{i}.mp4 0")
    (tmp_path / "list.txt").write_text("\n".join(rows) + "\n")
    return root, tmp_path / "list.txt"


def _finetune_cfg(**kw):
    return data.FinetuneDataConfig(frames=4, interval=1, crop=32, short_side=32, num_workers=0, **kw)


def test_an_all_bad_list_is_one_line_naming_its_files(tmp_path):
    root, ann = _list_of(tmp_path, good=0, bad=4)
    loader = data.build_finetune_loader("val", dataclasses_replace(_finetune_cfg(), num_workers=1), ann=ann,
                                        root=root, verbose=False)
    with pytest.raises(data.AllBadMedia) as e:
        list(loader)
    msg = str(e.value)
    assert "\n" not in msg and "bad" in msg and ".mp4 (" in msg and "are the list and the root right" in msg


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_skip_count_covers_the_whole_run(tmp_path):
    root, ann = _list_of(tmp_path, good=3, bad=3)
    loader = data.build_finetune_loader("train", _finetune_cfg(batch_size=2), ann=ann, root=root, verbose=False)
    per_epoch = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        list(loader)
        per_epoch.append(loader.skipped)
    assert all(n >= 1 for n in per_epoch)                               # bad rows are visited every epoch
    assert loader.skipped_total == sum(per_epoch)                       # what train.py prints at the end


# -----------------------------------------------------------------------------
# 5. A stale lock of a killed synthetic-set generation is taken over, not waited on for 15 minutes


def test_stale_synthetic_lock_and_temp_folder_of_a_dead_generator(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = tmp_path / "syn"
    (tmp_path / ".syn.lock").write_text(f"{socket.gethostname()} {dead.pid}\n")
    leftover = tmp_path / f".syn.tmp-{dead.pid}"
    leftover.mkdir()
    (leftover / "half.mp4").write_bytes(b"x")
    t = time.time()
    synthetic.make_synthetic_set(root, seed=0, verbose=False, timeout=60, n_train=2, n_val=1, images_train=1,
                          images_val=1, frames=8, height=64, width=64)
    assert (root / synthetic.DONE_NAME).exists() and time.time() - t < 60
    assert not leftover.exists() and data.FileLock(tmp_path / ".syn.lock").acquire() is None   # kept, free


# -----------------------------------------------------------------------------
# 6. A frozen rank fails the job within the process-group timeout


def test_a_frozen_rank_fails_the_job_within_the_timeout(tmp_path):
    worker = os.path.join(ROOT, "tests", "ddp_worker.py")
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        worker, str(tmp_path), "frozen"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert (tmp_path / "timeout0.txt").read_text().startswith("RuntimeError after")   # rank 0 gave up ...
    assert time.time() - t < 50                                          # ... long before rank 1's 60 s sleep


def test_an_error_on_rank_0_before_training_stops_every_rank_at_once(syn, tmp_path):
    """Ranks started one by one, as srun starts them (no torchrun agent to stop the others): rank 0
    finds the run folder in use and stops; rank 1 learns it at once, not after --dist-timeout."""
    (tmp_path / "video").mkdir()
    holder = data.FileLock(tmp_path / "video" / "run.lock")
    assert holder.acquire() is None                                      # another live run holds the folder
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, os.path.join(ROOT, "train.py"),
            *args(syn, tmp_path, "--stage", "video", "--max-steps", "1", "--dist-timeout", "10")]
    procs = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in (0, 1)]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]          # NCCL's plain barrier: 10 min
    finally:
        for p in procs:
            p.kill()
        holder.release()
    assert [p.returncode for p in procs] == [2, 2], errs
    assert "Traceback" not in errs[0] + errs[1]
    assert "train.py: error: " in errs[0] and "in use by another run" in errs[0]
    assert "train.py: error: rank 0 stopped with an error" in errs[1]


# -----------------------------------------------------------------------------
# 7-8, 10. Damaged run files: torn log lines, torn or bit-flipped checkpoints, a full disk


def test_torn_last_metrics_line_is_tolerated(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in train.read_metrics(str(path))] == [1, 2]
    cfg = train.parse_args(["--preset", "cpu"])
    train.start_log(str(tmp_path), train.dataclasses.asdict(cfg), resumed_step=2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert not list(tmp_path.glob("*.tmp-*"))


def _two_checkpoints(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    big = torch.arange(2_000_000, dtype=torch.float32)                   # 8 MB: most of the file is tensor data
    train.save_checkpoint(path, {"model": {"w": big}, "step": 1}, keep_previous=True)
    train.save_checkpoint(path, {"model": {"w": big + 1}, "step": 2}, keep_previous=True)
    assert os.path.exists(tmp_path / "ckpt.prev.pt") and train.load_checkpoint(path)["step"] == 2
    return path


def test_checkpoint_cut_in_half_falls_back_to_the_previous_one(tmp_path):
    path = _two_checkpoints(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    said = []
    ck, read = train.load_for_resume(path, said.append)
    assert read.endswith("ckpt.prev.pt") and ck["step"] == 1 and torch.equal(ck["model"]["w"], torch.arange(2_000_000, dtype=torch.float32))
    assert len(said) == 1 and "ckpt.pt" in said[0] and "ckpt.prev.pt" in said[0]


def test_flipped_bits_in_a_checkpoint_are_detected_not_trained_on(tmp_path):
    path = _two_checkpoints(tmp_path)
    with open(path, "r+b") as f:                                        # 4 KB of flipped bits in the tensor data
        f.seek(os.path.getsize(path) // 2)
        block = bytearray(f.read(4096))
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in block))
    with pytest.raises(train.CheckpointError, match="damaged|not a checkpoint"):
        train.load_checkpoint(path)
    said = []
    assert train.load_for_resume(path, said.append)[0]["step"] == 1 and len(said) == 1


def test_full_disk_during_a_checkpoint_names_the_path_and_leaves_nothing(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    os.symlink("/dev/full", f"{path}.tmp-{os.getpid()}")               # every write there fails with ENOSPC
    with pytest.raises(OSError) as e:
        train.save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "step": 1})
    assert path in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []                                   # the temporary file is gone


# A 1.7 KB checkpoint whose tensor has stride 0 over one element declares 4 GB (issue 33): loading it
# under a 2 GB address-space cap must end in the one-line CheckpointError, and a resume falls back.
HOSTILE = r"""
import resource, sys, torch
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))      # the 2 GB this process may map
sys.path.insert(0, sys.argv[2])
import train
said = []
try:
    ck = train.load_for_resume(sys.argv[1], said.append)[0]
except train.CheckpointError as e:
    print("error:", e)
else:
    print("resumed", ck["step"], said)
"""


@pytest.mark.parametrize("stored, stride", [(1, (0, 0)),                  # one element repeated: a 1.7 KB file
                                            (1 << 16, (1, 1))])             # 256 KB read as 32768 overlapping rows
def test_a_tiny_checkpoint_declaring_gigabytes_is_refused_and_the_previous_one_used(tmp_path, stored, stride):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(str(tmp_path / "ckpt.prev.pt"), {"model": {"w": torch.zeros(4)}, "step": 1})
    huge = torch.as_strided(torch.zeros(stored), (32768, 32768), stride)             # 4 GB of fp32 declared
    torch.save({"model": {"w": huge}, "step": 2, "checksum": "0" * 32}, path)
    assert os.path.getsize(path) < 4 * stored + 2000
    code = [sys.executable, "-c", HOSTILE]
    r = subprocess.run(code + [path, ROOT], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith("resumed 1") and "stride" in r.stdout and "ckpt.prev.pt" in r.stdout, r.stdout
    os.remove(tmp_path / "ckpt.prev.pt")
    r = subprocess.run(code + [path, ROOT], capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stdout.strip().splitlines()) == 1 and "error:" in r.stdout and str(stride) in r.stdout, r.stdout


def test_a_tensor_overrunning_its_storage_is_a_one_line_checkpoint_error(tmp_path):
    """torch itself refuses a tensor that reaches past its storage (here 1000 elements over 300): the
    refusal arrives as the one-line CheckpointError, like every other unusable file."""
    torch.save({"w": torch.arange(300.0)[:200]}, tmp_path / "v.pt")
    with zipfile.ZipFile(tmp_path / "v.pt") as src, zipfile.ZipFile(tmp_path / "over.pt", "w") as dst:
        for name in src.namelist():                                    # the pickled size (200,) -> (1000,)
            b = src.read(name)
            dst.writestr(name, b.replace(b"K\x00K\xc8\x85", b"K\x00M\xe8\x03\x85") if name.endswith("data.pkl") else b)
    with pytest.raises(train.CheckpointError) as e:
        train.load_checkpoint(str(tmp_path / "over.pt"))
    assert "over.pt" in str(e.value) and "\n" not in str(e.value)
