"""Tests of data.py: decoding real files, frame sampling, augmentations, masks
per worker, distributed shards, bad media, and the synthetic data set
(paper §4.1 and Table 2; paper §3 "Mask strategy"; paper §4.1; paper §4.1-4.2).

Every video here is written inside the test with PyAV (H.264 mp4, one VP9
webm); expected values come from what the test wrote or from hand-computed
sampling formulas of the released SampleFrames, never from data.py's output.
Run: python -m pytest -q tests/test_data.py
"""

import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

import data
import finetune
import tokenizer
from masking import MaskGenerator
from tools import prepare_data
from tools import synthetic as synth

# A tiny synthetic set shared by several tests: 24 + 8 videos of 16 frames,
# 64 x 80 px, 4 + 2 images per class. Object radius 5-7.7 px, speed 1-1.8 px/frame.
TINY = dict(n_train=24, n_val=8, images_train=4, images_val=2, frames=16, height=64, width=80)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    return synth.make_synthetic_set(tmp_path_factory.mktemp("syn") / "set", seed=0, verbose=False, **TINY)


def level_clip(n=40, h=64, w=80):
    """Frame i: top half grey level 20 + 5i (its identity), bottom half one RGB colour (channel order)."""
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i, : h // 2] = 20 + 5 * i
        frames[i, h // 2:] = (200, 40, 90)
    return frames


def frame_levels(frames):
    """Decoded frames (..., H, W, 3) -> the grey level of each frame's top half (interior, away from edges)."""
    h = frames.shape[-3]
    return frames[..., 4:h // 2 - 4, 4:-4, :].mean(axis=(-3, -2, -1))


def denormalize(x):
    """(..., 3, H, W) normalised -> [0, 1]: the inverse of data.normalize."""
    return x * data._STD.view(3, 1, 1) + data._MEAN.view(3, 1, 1)


def write_list(path, rows):
    Path(path).write_text("".join(f"{rel} {label}\n" for rel, label in rows))
    return path


# -----------------------------------------------------------------------------
# Decoding real files


@pytest.mark.parametrize("codec,ext", [("libx264", "mp4"), ("libvpx-vp9", "webm")])
def test_decode_real_video_frames_and_pixels(tmp_path, codec, ext):
    written = level_clip()
    path = tmp_path / f"clip.{ext}"
    synth.write_video(path, written, fps=25, codec=codec, gop=8)
    assert data.count_frames(path) == 40          # webm has no stored count: counted by demuxing

    frames, idx, n = data.read_video(path)
    assert n == 40 and frames.shape == (40, 64, 80, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(frame_levels(frames), 20 + 5 * np.arange(40), atol=3)
    bottom = frames[:, 40:60, 8:72].reshape(-1, 3).mean(0)           # RGB order survives the YUV round trip
    np.testing.assert_allclose(bottom, (200, 40, 90), atol=6)

    # Frames in the middle (keyframes every 8 frames) come back exactly as asked.
    want = np.array([[5, 13], [21, 37]])
    frames, idx, _ = data.read_video(path, lambda n: want)
    assert frames.shape == (2, 2, 64, 80, 3)
    np.testing.assert_allclose(frame_levels(frames), 20 + 5 * want, atol=3)
    # Repeated and unordered indices (looping clips) come back in the asked order.
    frames, _, _ = data.read_video(path, lambda n: np.array([[39, 0, 39, 17]]))
    np.testing.assert_allclose(frame_levels(frames)[0], 20 + 5 * np.array([39, 0, 39, 17]), atol=3)


def test_sampling_dense_train_random_offsets():
    torch.manual_seed(0)
    offsets = set()
    for _ in range(1500):
        idx = data.sample_dense(100, clip_len=8, interval=4)          # span 32 -> starts 0..68
        assert idx.shape == (1, 8)
        assert (np.diff(idx[0]) == 4).all()
        offsets.add(int(idx[0, 0]))
    assert min(offsets) == 0 and max(offsets) == 68 and len(offsets) > 60


def test_sampling_hand_computed_cases():
    # Short video loops (released out_of_bound_opt='loop'): start 0, indices mod 10.
    np.testing.assert_array_equal(data.sample_dense(10, 8, 4), [[0, 4, 8, 2, 6, 0, 4, 8]])
    # Test mode, 3 clips of 8 x 2 in 100 frames: avg = (100-16+1)/3 = 28.33, starts int(28.33k + 14.17).
    idx = data.sample_dense(100, 8, 2, num_clips=3, test_mode=True)
    np.testing.assert_array_equal(idx[:, 0], [14, 42, 70])
    np.testing.assert_array_equal(idx[1], 42 + 2 * np.arange(8))
    # Uniform (SSv2), 8 of 64 frames: segment size 63/8; test takes each segment's middle.
    np.testing.assert_array_equal(data.sample_uniform(64, 8, test_mode=True), [[4, 12, 20, 28, 35, 43, 51, 59]])
    bounds = [(0, 8), (8, 16), (16, 24), (24, 32), (32, 39), (39, 47), (47, 55), (55, 63)]
    torch.manual_seed(1)
    seen = [set() for _ in bounds]
    for _ in range(300):
        idx = data.sample_uniform(64, 8)[0]
        for i, (lo, hi) in enumerate(bounds):
            assert lo <= idx[i] <= hi
            seen[i].add(int(idx[i]))
    assert all(len(s) == hi - lo + 1 for s, (lo, hi) in zip(seen, bounds))   # every frame of a segment drawn
    # Fewer frames than the clip: indices stay in range and in order.
    idx = data.sample_uniform(5, 8, test_mode=True)[0]
    assert idx.min() >= 0 and idx.max() <= 4 and (np.diff(idx) >= 0).all()


# -----------------------------------------------------------------------------
# Bad media and bad paths


def _bad_files(tmp_path):
    """Four good mp4s and five bad entries: corrupt bytes, truncated (no index), truncated
    mid-data (index first), zero frames, missing."""
    rows = []
    for k in range(4):
        synth.write_video(tmp_path / f"good{k}.mp4", level_clip(24), gop=8)
        rows.append((f"good{k}.mp4", k))
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    good = (tmp_path / "good0.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(good[: len(good) // 2])       # PyAV writes the index last
    faststart = tmp_path / "faststart.mp4"
    synth.write_video(faststart, np.random.default_rng(1).integers(0, 256, (24, 64, 80, 3), np.uint8),
                     gop=8, options={"movflags": "faststart"})
    raw = faststart.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(raw[: len(raw) // 2])               # index first, frames cut short
    import av
    with av.open(str(tmp_path / "zero.mp4"), "w") as c:                    # a container with no frames
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        c.start_encoding()
    bad = ["corrupt.mp4", "truncated.mp4", "cut.mp4", "zero.mp4", "missing.mp4"]
    return rows + [(b, 9) for b in bad], bad


def test_bad_videos_are_skipped_logged_once_and_counted(tmp_path, caplog):
    rows, bad = _bad_files(tmp_path)
    for b in bad[:4]:
        with pytest.raises(data.BadMedia):
            data.read_video(tmp_path / b, lambda n: data.sample_dense(n, 8, 3, test_mode=True))
    ann = write_list(tmp_path / "list.txt", rows)
    ds = data.VideoDataset(ann, tmp_path, data.FrameSampling(8, 3, test_mode=True),
                           data.FinetuneClipTransform("val", crop=48, short_side=64))
    loader = data.EpochLoader(ds, 1, shuffle=False, drop_last=False, num_workers=0, verbose=False)
    with caplog.at_level(logging.WARNING, logger="bevt.data"):
        for epoch in range(2):
            loader.set_epoch(epoch)
            labels = [int(b["label"]) for b in loader]
            assert len(labels) == len(rows) and max(labels) < 9             # bad ones replaced by good ones
            assert loader.skipped >= len(bad)                                # each bad row visited at least once
    logged = [r.getMessage() for r in caplog.records]
    for b in bad:                                                            # named, and only once over 2 epochs
        assert sum(str(tmp_path / b) in m for m in logged) == 1, b
    assert loader.skipped_total >= 2 * len(bad)


def test_a_bad_files_replacement_does_not_depend_on_what_the_process_already_knows(tmp_path):
    """Replacements are keyed by (seed, epoch, index) like every random choice: a process that has
    already met the bad files (and skips them undecoded) returns the same replacement, with the same
    random frames, as a fresh process that decodes them and fails, so re-sharded runs agree."""
    rows, bad = _bad_files(tmp_path)
    ann = write_list(tmp_path / "list.txt", rows)

    def dataset():
        ds = data.VideoDataset(ann, tmp_path, data.FrameSampling(8, 2),                 # random offsets
                               data.FinetuneClipTransform("val", crop=48, short_side=64))
        ds.seed, ds.epoch = 5, 1
        return ds

    seasoned = dataset()
    for i in range(len(rows)):
        seasoned[i]                                                      # learns every bad row
    assert seasoned._bad.sum() == len(bad)
    fresh = dataset()
    for i in range(len(rows) - len(bad), len(rows)):                     # the bad rows' samples
        a, b = fresh[i], seasoned[i]
        assert a["index"] == b["index"] and a["index"] < 4 and torch.equal(a["video"], b["video"]), i


def test_missing_paths_are_errors_naming_them(tmp_path):
    (tmp_path / "root").mkdir()
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.read_annotations(tmp_path / "nope.txt", tmp_path / "root")
    ann = write_list(tmp_path / "a.txt", [("x.mp4", 0)])
    with pytest.raises(FileNotFoundError, match="no_root"):
        data.read_annotations(ann, tmp_path / "no_root")
    with pytest.raises(FileNotFoundError, match="no_images"):
        data.ImageDataset(tmp_path / "no_images")
    (tmp_path / "bad.txt").write_text("clip.mp4 0\nclip_without_label.mp4\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        data.read_annotations(tmp_path / "bad.txt", tmp_path / "root")


def test_image_folder_list_file_and_broken_images(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("zebra", "ant", "mole"):                       # labels follow sorted class names
        (tmp_path / cls).mkdir()
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(tmp_path / cls / f"{k}.jpg")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = data.ImageDataset(tmp_path, transform=lambda im: {"shape": torch.tensor(im.shape)})
    assert ds.classes == ["ant", "mole", "zebra"]
    assert [(p.parent.name, l) for p, l in ds.samples][::2] == [("ant", 0), ("mole", 1), ("zebra", 2)]
    assert ds[0]["shape"].tolist() == [40, 50, 3]

    (tmp_path / "mole" / "2.png").write_text("a text file called png")
    full = (tmp_path / "zebra" / "0.jpg").read_bytes()
    (tmp_path / "zebra" / "2.jpg").write_bytes(full[: len(full) // 3])      # truncated JPEG
    ann = write_list(tmp_path / "list.txt", [("ant/0.jpg", 0), ("mole/2.png", 1), ("zebra/2.jpg", 2)])
    ds = data.ImageDataset(tmp_path, ann, transform=lambda im: {})
    loader = data.EpochLoader(ds, 1, shuffle=False, drop_last=False, num_workers=0, verbose=False)
    assert [int(b["label"]) for b in loader] == [0, 0, 0]                   # both broken ones replaced by row 0
    assert loader.skipped >= 2                                              # each bad row visited at least once


# -----------------------------------------------------------------------------
# Sample lists: compact rows, one folder scan per run (issue 21)


def old_read_annotations(ann_file, root):
    """data.read_annotations before issue 21 (a list of (Path, int) tuples), verbatim: the reference."""
    ann_file, root = Path(ann_file), Path(root)
    samples = []
    for lineno, line in enumerate(ann_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        rel, label = parts[0], int(parts[1])
        samples.append((root / rel, label))
    return samples


def old_scan_image_folder(root):
    """data.scan_image_folder before issue 21, verbatim: the reference."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = [(p, label) for label, c in enumerate(classes)
               for p in sorted((root / c).rglob("*")) if p.suffix.lower() in data.IMAGE_EXTS and p.is_file()]
    return samples, classes


# Names the readers must keep as they are: spaces (also several, and before the label), non-ASCII
# (accents, CJK, an emoji), a '#' inside a name, dots, a name that is one suffix, upper-case suffixes.
ODD_NAMES = ["plain.jpg", "two  spaces.JPEG", "café au lait.png", "日本語の写真.jpg", "emoji 🦓.webp",
             "not#a comment.jpg", "a.b.c.bmp", "..jpg", "UPPER.JPG", "trailing dot.jpg.", "notes.txt", ".hidden.jpg"]


def odd_folder(root):
    """A class tree with ODD_NAMES in every class, a nested folder, a folder named like an image, a
    symlinked folder (not entered) and a symlinked file (listed), as rglob treats them."""
    for cls in ("zebra", "ant é", "mole 2"):
        (root / cls).mkdir(parents=True)
        for name in ODD_NAMES:
            (root / cls / name).write_bytes(b"x")
    (root / "ant é" / "a").mkdir()
    (root / "ant é" / "a" / "x.jpg").write_bytes(b"x")          # 'a/x.jpg' sorts before 'a-b.jpg' (by parts)
    (root / "ant é" / "a-b.jpg").write_bytes(b"x")
    (root / "ant é" / "dir.jpg").mkdir()                         # a folder, not an image
    (root / "mole 2" / "linked").symlink_to(root / "zebra", target_is_directory=True)
    (root / "mole 2" / "link.jpg").symlink_to(root / "zebra" / "plain.jpg")
    (root / ".cache").mkdir()                                    # hidden: not a class
    return root


def test_compact_lists_give_the_old_readers_pairs(tmp_path):
    root = odd_folder(tmp_path / "imgs")
    # The folder scan: same classes, same (path, label) rows in the same order.
    new, classes = data.scan_image_folder(root)
    old, old_classes = old_scan_image_folder(root)
    assert isinstance(new, data.SampleList) and classes == old_classes == ["ant é", "mole 2", "zebra"]
    assert list(new) == old and len(old) == 3 * 10 + 2 + 1       # 10 image names per class (+ a/x, a-b, link)
    assert [new[i] for i in (0, -1)] == [old[0], old[-1]]
    # A list file: comments, blank lines, CRLF, tabs and runs of spaces, './' and '//' in paths.
    rows = [f"{c}/{n}" for c in classes for n in ODD_NAMES]
    text = "# header comment\n\n" + "".join(f"{r}{sep}{k % 7}{end}" for k, (r, sep, end) in enumerate(
        zip(rows, [" ", "\t", "   "] * 20, ["\n", "\r\n", " \n"] * 20)))
    text += "./zebra//plain.jpg 3\n   indented/path.jpg 4\n"
    (tmp_path / "list.txt").write_text(text, encoding="utf-8")
    new = data.read_annotations(tmp_path / "list.txt", root)
    assert list(new) == old_read_annotations(tmp_path / "list.txt", root)
    assert len(new) == len(rows) + 2 and new.label(len(rows)) == 3 and new.path(-1) == root / "indented/path.jpg"
    with pytest.raises(IndexError, match="out of range"):
        new[len(new)]
    with pytest.raises(IndexError, match="out of range"):
        new.label(-len(new) - 1)


def test_compact_list_costs_about_its_bytes(tmp_path):
    """100k ImageNet-like rows: under 80 bytes a row (the list of tuples took ~400), and none of it
    in Python objects: a forked worker reading rows must not write into the list's pages."""
    import gc
    import tracemalloc
    n = 100_000
    with open(tmp_path / "big.txt", "w") as f:
        for i in range(n):
            f.write(f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG {i % 1000}\n")
    gc.collect()
    objects = len(gc.get_objects())
    tracemalloc.start()
    samples = data.read_annotations(tmp_path / "big.txt", tmp_path)
    kept, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(samples) == n and samples.label(n - 1) == (n - 1) % 1000
    assert samples.path(12345) == tmp_path / "n00000345/n00000345_12345.JPEG"
    assert kept < 80 * n, kept
    assert samples._paths.nbytes + samples._offsets.nbytes + samples.labels.nbytes < 50 * n
    assert len(gc.get_objects()) - objects < 100                      # no object per row


def test_an_image_folder_list_is_written_once_by_prepare_data(tmp_path, capsys):
    """`python tools/prepare_data.py lists images`: the scan's rows, labels and classes as a list
    file that every rank reads instead of scanning the folder itself."""
    root = odd_folder(tmp_path / "imgs")
    out = tmp_path / "lists" / "images.txt"
    with pytest.raises(SystemExit) as end:
        prepare_data.main(["lists", "images", "--image-root", str(root), "--out-file", str(out)])
    assert end.value.code == 0 and "33 rows in 3 classes" in capsys.readouterr().out
    old, classes = old_scan_image_folder(root)
    assert list(data.ImageDataset(root, out).samples) == old == list(data.ImageDataset(root).samples)
    assert Path(f"{out}.classes.txt").read_text(encoding="utf-8").splitlines() == classes


def test_list_entries_outside_the_data_root_are_refused_never_read(tmp_path, monkeypatch):
    """Issue 33, item 4: a list comes from outside like its files. Entries that climb out of the
    root (`..`) or are absolute are skipped and counted as bad media, and never opened; good
    entries (spaces, `./`, `//`) still load."""
    root = tmp_path / "root"
    (root / "cat").mkdir(parents=True)
    Image.new("RGB", (40, 40), (10, 20, 30)).save(root / "cat" / "a b.png")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(secret)
    hostile = ["../secret.png", "cat/../../secret.png", str(secret), "../../../../etc/hostname", "/etc/passwd"]
    ann = write_list(tmp_path / "list.txt", [("cat/a b.png", 0), ("./cat//a b.png", 1)]
                     + [(h, 7) for h in hostile])
    opened, real = [], data.read_image
    monkeypatch.setattr(data, "read_image", lambda p, *a: opened.append(str(p)) or real(p, *a))
    ds = data.ImageDataset(root, ann, transform=lambda im: {"pixel": torch.tensor(im[0, 0])})
    loader = data.EpochLoader(ds, 1, shuffle=False, drop_last=False, num_workers=0, verbose=False)
    batches = list(loader)
    assert [int(b["label"]) for b in batches][:2] == [0, 1]
    assert all(int(b["label"]) in (0, 1) and b["pixel"].tolist() == [[10, 20, 30]] for b in batches)
    assert loader.skipped >= len(hostile)
    assert not any("secret" in p or p.startswith("/etc") for p in opened), opened


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")        # Pillow only warns: the point
def test_an_image_with_too_many_pixels_is_bad_media_before_it_is_decoded(tmp_path):
    """Issue 33, item 5: a 13000 x 13000 PNG is a few hundred KB but 507 MB decoded; Pillow only
    warns. It is refused from its header (MAX_IMAGE_PIXELS), and a loader replaces it."""
    big = tmp_path / "c" / "big.png"
    big.parent.mkdir()
    Image.new("L", (13000, 13000)).save(big, optimize=True)
    Image.new("RGB", (40, 40)).save(tmp_path / "c" / "ok.png")
    assert big.stat().st_size < 2**20
    with pytest.raises(data.BadMedia, match="13000 x 13000 pixels"):
        data.read_image(big)
    ds = data.ImageDataset(tmp_path, transform=lambda im: {"shape": torch.tensor(im.shape)})
    loader = data.EpochLoader(ds, 1, shuffle=False, drop_last=False, num_workers=0, verbose=False)
    assert [b["shape"].tolist() for b in loader] == [[[40, 40, 3]]] * 2 and loader.skipped >= 1


# -----------------------------------------------------------------------------
# Augmentations


def test_pretrain_clip_one_crop_and_flip_for_all_frames_and_tokenizer_copy():
    torch.manual_seed(0)
    noise = np.random.default_rng(0).integers(0, 256, (100, 120, 3), np.uint8)
    frames = np.broadcast_to(noise, (1, 4, 100, 120, 3)).copy()             # 4 identical frames
    gen = MaskGenerator("tube", (4, 96, 96), seed=0)
    tf = data.PretrainTransform("video", crop=96, short_side=(100, 130), mask_gen=gen)
    for _ in range(5):
        out = tf(frames)
        v, tok = out["video"], out["video_half"]
        # Samples ship as uint8 (4x fewer bytes through shared memory); the trainer normalises.
        assert v.shape == (3, 4, 96, 96) and v.dtype == torch.uint8 and tok.dtype == torch.uint8
        assert tok.shape == (3, 4, 48, 48)                                   # the tokenizer copy is half size
        assert out["video_mask"].shape == (2, 6, 6)
        assert out["video_mask"].dtype == torch.bool
        for t in range(1, 4):                                                # same crop and flip in every frame
            assert torch.equal(v[:, t], v[:, 0]) and torch.equal(tok[:, t], tok[:, 0])
        pixels = data.to_float(v.transpose(0, 1))                            # (T, 3, H, W) in [0, 1]
        # video_half is the same crop as video, Lanczos-halved, then rounded to 8 bits.
        half = tokenizer.half_copy(pixels).transpose(0, 1) * 255
        assert (half - tok.float()).abs().max() <= 0.5 + 1e-3
        # On the device, normalisation gives exactly what normalising in the worker gave.
        batch = v[None].clone()
        assert torch.equal(data.normalize_batch(batch)[0], data.normalize(pixels, channels_first=True))


def test_pretrain_image_ships_uint8_and_its_own_tokenizer_copy():
    torch.manual_seed(0)
    img = np.random.default_rng(2).integers(0, 256, (100, 120, 3), np.uint8)
    tf = data.PretrainTransform("image", crop=96, short_side=(100, 130),
                                mask_gen=MaskGenerator("block", (96, 96), seed=0))
    out = tf(img)
    x, tok = out["image"], out["image_half"]
    assert x.shape == (3, 96, 96) and x.dtype == torch.uint8 and tok.shape == (3, 48, 48) and tok.dtype == torch.uint8
    half = tokenizer.half_copy(data.to_float(x[None]))[0] * 255            # the copy is of the 8-bit image
    assert (half - tok.float()).abs().max() <= 0.5 + 1e-3
    imgs = x[None].expand(2, -1, -1, -1)
    assert torch.equal(data.normalize_batch(imgs)[1], data.normalize(data.to_float(x[None]))[0])
    with pytest.raises(ValueError, match="expected a uint8 batch, got torch.float32"):
        data.normalize_batch(imgs.float())


def test_decode_threads_share_the_allocated_cpus_among_ranks_and_workers(monkeypatch, capsys):
    monkeypatch.setattr(os, "cpu_count", lambda: 256)                      # the machine: not what the job got
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))    # the job's allocation
    assert data.decode_threads(4, local_world_size=1) == 16
    assert data.decode_threads(4, local_world_size=8) == 2                  # 8 ranks x 4 workers on 64 cores
    assert data.decode_threads(16, local_world_size=8) == 1                 # never below one thread
    assert data.decode_threads(16, local_world_size=8, threads=3) == 3      # --decode-threads given
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")                             # what torchrun sets
    assert data.decode_threads(2) == 4
    assert capsys.readouterr().out == ""
    assert data.decode_threads(4, 2, say=True) == 1                         # 2 loaders: 64 processes on 64 CPUs
    plan = capsys.readouterr().out
    assert "8 rank(s) on this node x 2 loader(s) x 4 worker(s) = 64 loading process(es)" in plan
    assert plan.strip().endswith("1 decoder thread(s) each, on 64 CPUs")


def test_normalize_batch_copies_its_constants_to_a_device_once(monkeypatch):
    """Issue 32.2: no host-to-device copy per call. After the first call on a device the host
    constants are not read again, and the result stays the same."""
    x = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    first = data.normalize_batch(x)
    monkeypatch.setattr(data, "_STD", None)
    monkeypatch.setattr(data, "_MEAN", None)
    assert torch.equal(data.normalize_batch(x), first)
    assert torch.equal(data.normalize(data.to_float(x[0].transpose(0, 1)), channels_first=True), first[0])


def test_crop_and_flip_are_windows_of_the_frame():
    """Without rescaling (short side fixed to the frame's), every output is a window of the
    frame or its mirror image; both kinds and several offsets occur."""
    torch.manual_seed(0)
    img = np.random.default_rng(1).integers(0, 256, (60, 70, 3), np.uint8)
    ref = torch.from_numpy(img).permute(2, 0, 1).float() / 255              # (3, 60, 70)
    tf = data.PretrainTransform("video", crop=48, short_side=(60, 60))
    found = set()
    for _ in range(30):
        out = data.to_float(tf(img[None, None])["video"][:, 0])             # (3, 48, 48)
        hits = [(t, l, f) for t in range(13) for l in range(23) for f in (False, True)
                if torch.allclose((ref.flip(-1) if f else ref)[:, t:t + 48, l:l + 48], out, atol=1e-5)]
        assert len(hits) == 1
        found.add(hits[0])
    assert {f for _, _, f in found} == {False, True} and len(found) > 10


def test_finetune_val_and_test_views_are_the_released_crops():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (2, 3, 128, 160, 3), np.uint8)           # 2 clips x 3 frames
    ref = torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float() / 255     # (clips, T, 3, H, W)
    val = data.FinetuneClipTransform("val", crop=112, short_side=128)(frames[:1])["video"]
    assert val.shape == (3, 3, 112, 112)                                    # (3, T, H, W)
    torch.testing.assert_close(denormalize(val.transpose(0, 1)), ref[0, :, :, 8:120, 24:136], atol=1e-5, rtol=0)

    test = data.FinetuneClipTransform("test", crop=128, test_short_side=128)(frames)["video"]
    assert test.shape == (6, 3, 3, 128, 128)                                # (crops*clips, 3, T, H, W)
    for k, left in enumerate((0, 32, 16)):                                  # left, right, middle along the width
        for clip in range(2):
            view = denormalize(test[k * 2 + clip].transpose(0, 1))     # crop-major
            torch.testing.assert_close(view, ref[clip, :, :, :, left:left + 128], atol=1e-5, rtol=0)

    torch.manual_seed(0)
    tr = data.FinetuneClipTransform("train", crop=64, short_side=128, flip=0.5, erase=0.0,
                                    randaug=data.RandAugment(2, 9))
    shapes = {tuple(tr(frames[:1])["video"].shape) for _ in range(5)}
    assert shapes == {(3, 3, 64, 64)}


def test_random_resized_crop_box_law():
    torch.manual_seed(0)
    for _ in range(300):
        t, l, ch, cw = data.random_resized_crop_box(256, 340)
        assert 0 <= t and t + ch <= 256 and 0 <= l and l + cw <= 340
        if (ch, cw) != (256, 256):                                          # not the fallback
            assert 0.08 * 256 * 340 * 0.95 <= ch * cw <= 256 * 340
            assert 3 / 4 * 0.95 <= cw / ch <= 4 / 3 * 1.05


def _pil(x):
    return Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy())


def _from_pil(im):
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255


def test_randaugment_ops_against_pil_and_shared_over_frames():
    rng = np.random.default_rng(3)
    img = torch.from_numpy(rng.integers(60, 180, (3, 40, 48), np.uint8)).float() / 255   # low contrast
    clip = img[None].expand(3, -1, -1, -1).contiguous()                    # 3 identical frames
    ra = data.RandAugment(n=1, m=7)
    # Equalize and the two filters match PIL (filters: interior pixels; PIL keeps the border).
    torch.testing.assert_close(ra.apply("equalize", clip)[0], _from_pil(ImageOps.equalize(_pil(img))), atol=1e-6, rtol=0)
    for name, filt in (("blur", ImageFilter.BLUR), ("smooth", ImageFilter.SMOOTH)):
        ours, theirs = ra.apply(name, clip)[0], _from_pil(_pil(img).filter(filt))
        assert (ours - theirs)[:, 3:-3, 3:-3].abs().max() <= 1 / 255 + 1e-6, name
    auto = ra.apply("autocontrast", clip)[0]
    assert auto.amin(dim=(1, 2)).max() == 0 and auto.amax(dim=(1, 2)).min() == 1
    torch.testing.assert_close(ra.apply("invert", ra.apply("invert", clip)), clip)
    solar = ra.apply("solarize", clip)                                      # threshold 256 - int(256*7/30) = 197
    assert torch.equal(solar, torch.where(clip >= 197 / 255, 1 - clip, clip))
    poster = (ra.apply("posterize", clip) * 255).round().long()             # 8 - int(6*7/30) = 7 bits kept
    assert (poster % 2 == 0).all()
    torch.manual_seed(0)
    for name in data.RandAugment.OPS:
        out = ra.apply(name, clip)
        assert out.shape == clip.shape, name
        assert torch.equal(out[1], out[0]) and torch.equal(out[2], out[0]), name   # one draw for all frames
    full = data.RandAugment(n=4, m=7)
    changed = 0
    for _ in range(10):
        out = full(clip)
        assert out.shape == clip.shape and torch.equal(out[2], out[0])
        changed += not torch.allclose(out, clip)
    assert changed >= 8
    torch.testing.assert_close(data.RandAugment(n=0, m=0)(clip), clip)    # n = 0, m = 0: identity


def test_random_erasing_one_rectangle_in_every_frame():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 50, 60) + 5                                       # no zeros to begin with
    for _ in range(20):
        out = data.random_erasing(x, p=1.0)
        zero = out == 0
        assert torch.equal(zero, zero[:1].expand_as(zero))                  # same rectangle in every frame
        rows, cols = zero[0, 0].any(1).nonzero(), zero[0, 0].any(0).nonzero()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert zero[0, 0].sum() == h * w                                    # one filled rectangle
        assert 0.015 * 3000 <= h * w <= 3000 / 3 * 1.1
    assert torch.equal(data.random_erasing(x, p=0.0), x)


def test_color_jitter():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 0.5 + 0.25
    torch.testing.assert_close(data.color_jitter(x, 0, 0, 0), x)
    for _ in range(10):
        y = data.color_jitter(x, brightness=0.4, contrast=0, saturation=0)  # brightness alone: one factor
        ratio = (y / x)[y < 1]                                              # where not clamped at 1
        assert 0.6 - 1e-5 <= ratio.min() and ratio.max() <= 1.4 + 1e-5
        assert ratio.max() - ratio.min() < 1e-4
        y = data.color_jitter(x)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1


def test_temporal_probes():
    video = torch.arange(2 * 3 * 6 * 2 * 2, dtype=torch.float32).view(2, 3, 6, 2, 2)
    g = torch.Generator().manual_seed(0)
    one = data.single_frame(video, g)
    assert all(torch.equal(one[:, :, t], one[:, :, 0]) for t in range(6))
    assert any(torch.equal(one[:, :, 0], video[:, :, t]) for t in range(6))
    sh = data.shuffle_frames(video, g)
    order = [next(t for t in range(6) if torch.equal(sh[:, :, k], video[:, :, t])) for k in range(6)]
    assert sorted(order) == list(range(6))


# -----------------------------------------------------------------------------
# Loaders: global batches, per-sample keys, shards, the joint ratio


def _image_cfg(num_workers=0):
    return data.PretrainDataConfig(crop=96, short_side=(96, 112), image_batch=2, video_batch=2, frames=4,
                                   interval=2, num_workers=num_workers)


def test_distributed_shards_are_disjoint(synthetic):
    cfg = _image_cfg()
    shards = []
    for rank in (0, 1):
        loader = data.build_pretrain_loader("image", cfg, image_root=synthetic / "images/train", rank=rank,
                                            world_size=2, verbose=False)
        loader.set_epoch(0)
        e0 = [int(i) for b in loader for i in b["index"]]
        loader.set_epoch(1)
        e1 = [int(i) for b in loader for i in b["index"]]
        assert sorted(e0) != e0 or sorted(e1) != e1                        # shuffled
        assert e0 != e1                                                     # a new order each epoch
        shards.append(e0)
    assert not set(shards[0]) & set(shards[1])
    assert len(shards[0]) == len(shards[1]) == 12                           # 24 images over 2 ranks
    assert len(set(shards[0]) | set(shards[1])) == 24


def test_global_batches_are_cut_the_same_for_any_process_count():
    """GlobalBatchSampler (no data needed): an epoch's global batches are one order for every process;
    world 1 x accumulation 4 and world 2 x accumulation 2 give the same micro-batches (the same rows in
    the same order within each global batch), and the shares of the processes never overlap."""
    n, batch = 50, 3                                                    # 50 rows, global batch 12: 4 steps, 2 left over
    one = data.GlobalBatchSampler(n, batch, accum=4, rank=0, world=1, seed=7)
    two = [data.GlobalBatchSampler(n, batch, accum=2, rank=r, world=2, seed=7) for r in (0, 1)]
    for epoch in (0, 3):
        for smp in (one, *two):
            smp.set_epoch(epoch)
        a, b = list(one), [list(t) for t in two]
        assert one.steps == 4 and len(a) == 16 and len(b[0]) == len(b[1]) == 8
        for s in range(4):                                              # step s: micro m of 1 process = ...
            for m in range(4):                                          # ... micro m % 2 of rank m // 2
                assert a[4 * s + m] == b[m // 2][2 * s + m % 2], (epoch, s, m)
        rows = [i for mb in a for i in mb]
        assert rows == one.order(epoch)[:48].tolist() and len(set(rows)) == 48    # a permutation, cut in order
        assert not {i for mb in b[0] for i in mb} & {i for mb in b[1] for i in mb}
    assert one.order(0).tolist() != one.order(1).tolist()               # a new order each epoch ...
    assert one.order(1).tolist() == data.GlobalBatchSampler(n, 2, 1, 0, 1, seed=7).order(1).tolist()   # ... of (seed, epoch)
    one.set_epoch(3, start=2)                                           # a resume: from global step 2, nothing replayed
    assert list(one) == a[8:]


def test_samples_are_keyed_by_seed_epoch_and_index_not_by_rank_or_worker(synthetic):
    """Every random choice of a sample (frames, crop, flip, mask) is keyed by (seed, epoch, index): the
    joint loader gives the same micro-batches on 1 process x accumulation 2, on each of 2 processes,
    with 2 workers, and from a resumed position; and different samples or epochs still differ."""
    def batches(rank=0, world=1, accum=2, workers=0, epoch=1, start=0):
        cfg = data.PretrainDataConfig(frames=4, interval=2, crop=96, short_side=(96, 112), video_batch=2,
                                      image_batch=2, num_workers=workers)
        loader = data.build_pretrain_loader(
            "joint", cfg, video_ann=synthetic / "videos/train_motion.txt", video_root=synthetic / "videos",
            image_root=synthetic / "images/train", rank=rank, world_size=world, accum=accum, verbose=False)
        loader.set_epoch(epoch, start)
        return list(loader)

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    one = batches()                                                     # 24 clips / 4 per step: 6 steps x 2 micro
    assert len(one) == 12
    ranks = [batches(rank=r, world=2, accum=1) for r in (0, 1)]
    for s in range(6):
        assert same(one[2 * s], ranks[0][s]) and same(one[2 * s + 1], ranks[1][s]), s
    assert all(same(a, b) for a, b in zip(one, batches(workers=2)))     # worker processes change nothing
    assert all(same(a, b) for a, b in zip(one[6:], batches(start=3)))   # resumed at global step 3
    # ... and the keys really vary: other samples, another epoch, draw other masks and crops.
    masks = torch.cat([b["video_mask"] for b in one])                   # (24, T/2, h, w)
    assert len({m.numpy().tobytes() for m in masks}) > 12
    other = {int(i): m for b in batches(epoch=2) for i, m in zip(b["video_index"], b["video_mask"])}
    here = {int(i): m for b in one for i, m in zip(b["video_index"], b["video_mask"])}
    assert sum(not torch.equal(here[i], other[i]) for i in here) > 12   # the same clip, a new epoch: new masks



def test_persistent_workers_follow_the_epoch(synthetic):
    """Loader workers live across epochs (persistent) and keep their own copy of the dataset, so
    the epoch travels with every index: one joint loader with 2 workers, iterated over epochs 1,
    2 and a resume inside epoch 1, gives what fresh loaders without workers give."""
    def loader(workers):
        cfg = data.PretrainDataConfig(frames=4, interval=2, crop=96, short_side=(96, 112), video_batch=2,
                                      image_batch=2, num_workers=workers)
        return data.build_pretrain_loader(
            "joint", cfg, video_ann=synthetic / "videos/train_motion.txt", video_root=synthetic / "videos",
            image_root=synthetic / "images/train", accum=2, verbose=False)

    def epoch(ld, e, start=0):
        ld.set_epoch(e, start)
        return list(ld)

    kept = loader(2)
    assert kept.videos.loader.persistent_workers and kept.images.loader.persistent_workers
    got = [epoch(kept, 1), epoch(kept, 2), epoch(kept, 1, start=3)]
    fresh = [epoch(loader(0), 1), epoch(loader(0), 2), epoch(loader(0), 1, start=3)]
    for g, f in zip(got, fresh):
        assert len(g) == len(f) > 0
        for a, b in zip(g, f):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(got[0][0]["video"], got[1][0]["video"])           # epochs really differ


def test_a_finished_loader_lets_its_workers_go(synthetic):
    """Persistent workers end with their loader: nothing (no reference cycle) keeps a loader
    that went out of scope alive, so runs that build many loaders in one process (finetune.py
    tables) do not pile up idle worker processes."""
    cfg = data.PretrainDataConfig(frames=4, interval=2, crop=96, short_side=(96, 112), video_batch=2,
                                  num_workers=2)
    loader = data.build_pretrain_loader("video", cfg, video_ann=synthetic / "videos/train_motion.txt",
                                        video_root=synthetic / "videos", verbose=False)
    next(iter(loader))
    assert len(mp.active_children()) >= 2                                   # its two workers
    del loader                                                              # no gc.collect(): refcounts alone
    deadline = time.time() + 20
    while mp.active_children() and time.time() < deadline:
        time.sleep(0.1)
    assert not mp.active_children()

def test_joint_loader_ratio_and_image_cycling(synthetic):
    cfg = data.PretrainDataConfig(frames=4, interval=2, crop=96, short_side=(96, 112), video_batch=2,
                                  image_batch=16, num_workers=0)
    joint = data.build_pretrain_loader("joint", cfg, video_ann=synthetic / "videos/val_motion.txt",
                                       video_root=synthetic / "videos", image_root=synthetic / "images/train",
                                       verbose=False)
    assert len(joint) == 4 and len(joint.images) == 1                      # 8 videos / 2; 24 images / 16
    joint.set_epoch(3)
    batches = list(joint)
    assert len(batches) == 4                                                # images cycled 4 times per epoch
    for b in batches:
        assert b["video"].shape == (2, 3, 4, 96, 96) and b["video_half"].shape == (2, 3, 4, 48, 48)
        assert b["video_mask"].shape == (2, 2, 6, 6) and "video_target" not in b
        assert b["image"].shape == (16, 3, 96, 96) and b["image_half"].shape == (16, 3, 48, 48)
        assert b["image_mask"].shape == (16, 6, 6) and "image_target" not in b
        assert {"video_label", "video_index", "image_label", "image_index"} <= set(b)
    assert joint.images.epoch == 3 * joint.passes + 3                       # its own epochs, from 3*P on


def test_finetune_loaders_on_synthetic(synthetic):
    # The SSv2 recipe as finetune.py defines it (RECIPES), at test sizes.
    ft = finetune.data_config(finetune.resolve_config(dict(recipe="ssv2", frames=8, crop=48, short_side=64,
                                                           test_short_side=48, batch_size=4, eval_batch_size=2,
                                                           workers=0)))
    kw = dict(ann=synthetic / "videos/val_motion.txt", root=synthetic / "videos", verbose=False)
    b = next(iter(data.build_finetune_loader("train", ft, **kw)))
    assert b["video"].shape == (4, 3, 8, 48, 48) and b["label"].shape == (4,)
    b = next(iter(data.build_finetune_loader("val", ft, **kw)))
    assert b["video"].shape == (2, 3, 8, 48, 48)
    b = next(iter(data.build_finetune_loader("test", ft, **kw)))
    assert b["video"].shape == (2, 3, 3, 8, 48, 48)                         # 1 clip x 3 crops


# -----------------------------------------------------------------------------
# The synthetic data set


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic_from_its_seed(tmp_path):
    small = dict(n_train=3, n_val=1, images_train=2, images_val=1, frames=8, height=32, width=40)
    a = _files(synth.make_synthetic(tmp_path / "a", seed=5, **small))
    b = _files(synth.make_synthetic(tmp_path / "b", seed=5, **small))
    c = _files(synth.make_synthetic(tmp_path / "c", seed=6, **small))
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [str(k) for k in a if a[k] != b.get(k)]
    assert any(k.suffix == ".mp4" for k in a) and any(k.suffix == ".png" for k in a) \
        and any(k.suffix == ".jpg" for k in a)
    videos = [k for k in a if k.suffix == ".mp4"]
    assert all(a[k] != c[k] for k in videos)


def _object_track(frames):
    """(T, H, W, 3) decoded frames -> per frame the object's circular centroid (x, y) and mean colour.

    The object is the only saturated thing in the picture: max - min channel > 90."""
    f = frames.astype(np.float32)
    sat = f.max(-1) - f.min(-1)
    T, H, W = sat.shape
    out = []
    for t in range(T):
        m = sat[t] > 90
        ys, xs = np.nonzero(m)
        cx = np.angle(np.exp(2j * np.pi * xs / W).mean()) * W / (2 * np.pi)    # centroid on the torus
        cy = np.angle(np.exp(2j * np.pi * ys / H).mean()) * H / (2 * np.pi)
        out.append((cx, cy, *f[t][m].mean(0)))
    return np.array(out), (W, H)


def _background_shift(a, b, search=12):
    """(dx, dy) px that moves frame a's texture onto frame b's: the integer shift (on the torus)
    with the least mean squared grey-level difference over the pixels that are texture in both
    frames (the object, saturated pixels dilated by 2 px for its antialiased edge, left out)."""
    def grey_and_texture(f):
        f = f.astype(np.float32)
        m = f.max(-1) - f.min(-1) > 90
        for axis in (0, 1):
            for s in (-2, -1, 1, 2):
                m = m | np.roll(m, s, axis)
        return f.mean(-1), ~m
    (ga, ta), (gb, tb) = grey_and_texture(a), grey_and_texture(b)
    best, arg = np.inf, None
    for dy in range(-search, search + 1):
        for dx in range(-search, search + 1):
            sa, st = np.roll(ga, (dy, dx), (0, 1)), np.roll(ta, (dy, dx), (0, 1)) & tb
            err = ((sa - gb)[st] ** 2).mean()
            if err < best:
                best, arg = err, (dx, dy)
    return arg


def _direction(track, size, order):
    """Mean frame-to-frame displacement (wrapped) along `order` -> 0 right, 1 left, 2 down, 3 up."""
    W, H = size
    p = track[order, :2]
    d = np.diff(p, axis=0)
    d[:, 0] = (d[:, 0] + W / 2) % W - W / 2
    d[:, 1] = (d[:, 1] + H / 2) % H - H / 2
    dx, dy = d.mean(0)
    if abs(dx) > abs(dy):
        return 0 if dx > 0 else 1                                           # right, left
    return 2 if dy > 0 else 3                                               # down, up (y grows downward)


def test_synthetic_labels_motion_needs_time_appearance_does_not(synthetic):
    videos = synthetic / "videos"
    motion = data.read_annotations(videos / "train_motion.txt", videos)
    appearance = dict(data.read_annotations(videos / "train_appearance.txt", videos))
    assert (videos / "classes_motion.txt").read_text().split() == ["right", "left"]
    colours = (videos / "classes_appearance.txt").read_text().split()
    assert colours == sorted(synth.COLOURS)
    palette = np.array([synth.COLOURS[c] for c in colours], np.float32)      # (6, 3) RGB
    g = torch.Generator().manual_seed(0)
    right = shuffled = 0
    for path, label in motion:
        frames, _, n = data.read_video(path)
        assert n == TINY["frames"]
        track, size = _object_track(frames)
        assert _direction(track, size, np.arange(n)) == label              # moves in the labelled direction
        perm = torch.randperm(n, generator=g).numpy()                       # shuffle_frames' permutation law
        shuffled += _direction(track, size, perm) == label
        rgb = track[:, 2:].mean(0)                                          # appearance: the object's colour
        assert np.argmin(((palette - rgb) ** 2).sum(1)) == appearance[path]
        shift = _background_shift(frames[0], frames[8])                     # the texture pans the same way
        assert _direction(np.array([[0, 0], shift]), (1e9, 1e9), [0, 1]) == label
        pan = np.hypot(*shift) / 8                                          # px per frame
        assert synth.PAN_FRAC[0] * TINY["width"] - 0.3 < pan < synth.PAN_FRAC[1] * TINY["width"] + 0.3
        right += 1
    assert right == TINY["n_train"]
    assert shuffled / right < 0.8                                           # shuffling destroys it: chance 0.5


def _frame_features(frame):
    """Single-frame features a classifier could use: a coarse colour histogram of the
    saturated pixels, the object's position, size and bounding-box fill (circle pi/4,
    square 1, triangle 1/2), an 8 x 10 thumbnail."""
    f = frame.astype(np.float32)
    H, W = frame.shape[:2]
    sat = (f.max(-1) - f.min(-1)) > 90
    ys, xs = np.nonzero(sat)
    cx = np.angle(np.exp(2j * np.pi * xs / W).mean()) * W / (2 * np.pi)
    cy = np.angle(np.exp(2j * np.pi * ys / H).mean()) * H / (2 * np.pi)
    ox, oy = (xs - cx + W / 2) % W - W / 2, (ys - cy + H / 2) % H - H / 2    # offsets on the torus
    fill = len(xs) / ((np.ptp(ox) + 1) * (np.ptp(oy) + 1))
    hist = np.histogramdd(f[sat], bins=(4, 4, 4), range=[(0, 256)] * 3)[0].ravel() / max(1, sat.sum())
    thumb = np.asarray(Image.fromarray(frame).resize((10, 8), Image.BILINEAR), np.float32).ravel() / 255
    shape = [fill, fill ** 2, (fill > 0.65) * 1.0, (fill > 0.9) * 1.0]
    pos = [(cx % W) / W, (cy % H) / H, sat.mean() * 10]
    return np.concatenate([hist, shape, pos, thumb, [1.0]])


def test_synthetic_single_frame_classifier_is_at_chance_on_motion():
    """Ridge classifiers on single random frames: far above chance on appearance (colour is
    in one frame), at chance on motion (2 classes, chance 0.5)."""
    rng = np.random.default_rng(0)
    X, ya, ym = [], [], []
    for k in range(480):
        p = synth._syn_params(11, "train", k, 64, 80)
        frame = synth.render_synthetic(p, [int(rng.integers(32))], 64, 80)[0]
        X.append(_frame_features(frame))
        ya.append(p["colour"])
        ym.append(p["direction"])
    X = np.array(X)

    def accuracy(y, classes):
        Y = np.eye(classes)[y]
        tr, te = slice(0, 320), slice(320, None)
        W = np.linalg.solve(X[tr].T @ X[tr] + 1e-2 * np.eye(X.shape[1]), X[tr].T @ Y[tr])
        return (np.argmax(X[te] @ W, 1) == np.array(y)[te]).mean()

    assert accuracy(ya, 6) > 0.55                                           # chance 1/6
    assert accuracy(ym, 2) < 0.5 + 0.12                                     # 160 test frames: sd 0.04


def _ensure_in_process(root, q):
    try:
        q.put(str(synth.make_synthetic_set(root, seed=1, verbose=False, n_train=4, n_val=2, images_train=1,
                                        images_val=1, frames=8, height=32, width=40)))
    except Exception as e:                                                  # report instead of hanging
        q.put(repr(e))


def test_ensure_synthetic_is_safe_for_concurrent_ranks(tmp_path):
    root = tmp_path / "syn"
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_process, args=(root, q)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == [str(root)] * 2
    assert (root / "DONE").exists() and len(list((root / "videos" / "train").glob("*.mp4"))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".syn.lock", "syn"]    # no temp folder; the lock file stays
    with pytest.raises(ValueError, match="made with"):
        synth.make_synthetic_set(root, seed=2, verbose=False)                  # another seed: refuse, do not mix
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="foreign"):
        synth.make_synthetic_set(tmp_path / "foreign", verbose=False)
