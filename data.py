"""Data: video clips and images on disk -> augmented, masked batches for BEVT.

Implements the data side of the paper's §4.1 "Implementation details" and the
finetuning protocols: §4.1 (pretraining recipe and augmentation; finetuning
data), §4.2 (the Table 2 temporal probes) and §3 (masks, drawn here per sample
with masking.py). The released BEVT configs
(`swin_base_patch244_window877_bevt_in1k_k400.py`, `..._finetune_k400.py`,
`..._window1677_bevt_finetune_ssv2.py`) settle the details the paper leaves out;
every difference from them is marked `# Differs from the released code:`.

What is here, in the order of the file: the pretraining path first, in the
order a sample goes through it, then what finetuning adds, then the tools.

    annotation lists      `relative/path.mp4 label` per line + a root folder (Kinetics/SSv2 style);
                          images as an ImageNet folder tree (`class/xxx.JPEG`) or the same list format;
                          held as `SampleList` (numpy arrays, no object per row: forked workers share
                          it); a folder is scanned once per run, by rank 0, into a list file
    frame sampling        dense with an interval (pretraining 16 x 8, K400 32 x 2), uniform segments
                          (SSv2, 32 frames over the whole video), N evenly spaced test clips; short
                          videos loop (indices mod num_frames), as the released SampleFrames does
    decoding              PyAV: frame i is the i-th picture decoding from the start outputs (at i/fps
                          after the first frame in constant-rate video); seek to the keyframe before
                          the first needed frame and check where the decoder landed, else decode from
                          the start (logged once per file); convert only the needed frames to RGB
    pretraining transform torch tensors only (torchvision has no CPU build here): short-side rescale,
                          colour jitter (images), random crop, flip, Lanczos half-size tokenizer copy;
                          mean/std normalisation on the training device. One crop and flip for all
                          frames of a clip; an image is the one-frame case of a clip (`PretrainTransform`)
    masks                 masking.MaskGenerator per sample; every random choice of a sample (frames,
                          crop, flip, jitter, mask, replacement) keyed by (seed, epoch, row index)
    robustness            a file that cannot be decoded is replaced by another sample, logged once
                          with its path and counted; every epoch reports the count
    loaders               training: global batches cut from one epoch order for all processes, each
                          process its share as micro-batches (`GlobalBatchSampler`, `EpochLoader`);
                          evaluation: DistributedSampler shards; the joint stage pairs each video
                          batch with an image batch in the recipe ratio (`JointLoader`); the
                          pretraining config and loader (`build_pretrain_loader`)
    finetuning            what only the finetuning recipes use: centre / three crops, random-resized-
                          crop, random erasing, RandAugment (n, m); the clip transform, config and
                          loader (`build_finetune_loader`); Table 2's temporal probes
    tools                 `lists`, `resize`, `check` (a real data set from the downloaders' files to
                          what the loaders read), then `make-synthetic`: a small real data set (H.264
                          mp4, PNG/JPEG) whose labels need appearance only or need time (CPU stand-in
                          for K400 vs SSv2, Table 2), and the command line

Sample layouts (one dict per sample; the default collate stacks them into a
batch with a leading B axis; `label` and `index` become int64 tensors):

    pretraining clip      video         (3, T, H, W)        uint8 crop; normalised on the training
                                                            device by `normalize_batch`
                          video_tok     (3, T, H/2, W/2)    uint8: the same crop, Lanczos half size,
                                                            rounded to 8 bits (the tokenizer input)
                          video_mask    (T/2, H/16, W/16)   bool input mask, True = masked (masking.py)
                          video_target  (T, H/16, W/16)     bool target mask (input mask repeated x2 in time)
                          label, index  int                 annotation label; row of the annotation list
    pretraining image     image (3, H, W), image_tok (3, H/2, W/2), image_mask (H/16, W/16),
                          image_target (H/16, W/16), label, index      (same conventions, uint8)
    finetuning clip       video (3, T, H, W) normalised, label, index            (train / val)
                          video (V, 3, T, H, W), V = clips x crops, crop-major   (test)
    joint batch           the video keys and the image keys in one dict, with `video_label`,
                          `video_index`, `image_label`, `image_index` instead of label / index

Pretraining samples leave the workers as uint8, a quarter of the bytes of
float32: a paper-size batch (8 clips of 16 x 224² + 64 images) is ~24 MB
through shared memory and the host-to-device copy instead of ~96 MB + 48 MB.
The trainer normalises on its device (`normalize_batch`). Finetuning samples
are still float32, because RandAugment and random erasing run in the workers.

`index` is the row actually returned (a replaced bad file gives its
replacement's row), so evaluation can drop the duplicates that
DistributedSampler pads in. Samples also carry `skipped` (a string naming the
files that failed before this sample was found); the loaders consume it.

Usage (train.py / finetune.py):

    cfg = PretrainDataConfig(frames=8, crop=112, short_side=(128, 160))     # CPU demo sizes
    root = ensure_synthetic("data/synthetic")                              # generated on first use
    loader = build_pretrain_loader("joint", cfg, video_ann=root / "videos/train_appearance.txt",
                                   video_root=root / "videos", image_root=root / "images/train",
                                   rank=rank, world_size=world_size, accum=accum)
    for epoch in range(epochs):
        loader.set_epoch(epoch)              # the epoch's global order; keys every sample's crops and masks
        for batch in loader: ...             # this rank's `accum` micro-batches of each global batch:
                                             # batch["video"], batch["image_tok"], ...

    # The finetuning recipes (K400, SSv2, Diving48) are finetune.py's RECIPES:
    ft = finetune.data_config(finetune.resolve_config({"recipe": "ssv2", "frames": 8}))
    train = build_finetune_loader("train", ft, ann=..., root=..., rank=rank, world_size=world_size)

Commands (the tools at the end of this file):

    python data.py make-synthetic --out data/synthetic [--seed 0 --train 200 --val 60]
    python data.py check --ann LIST --root DIR [--official k400-val | --expect N] [--quick]
                                                    # missing, unreadable and slow-path files; count vs split size
    python data.py lists {k400,ssv2,diving48} --ann OFFICIAL_FILE --out LIST [--root DIR]
                                                    # official annotations -> `path label` list + class names
    python data.py resize --src DIR --dst DIR --short-side 256 [--workers N]
                                                    # H.264 mp4 at a short side, parallel, resumable
    (file naming conventions and official split sizes: the "Tools" section at the end of this file)

Speed: `python tests/bench_data.py`. Memory of the sample lists at ImageNet / K400 size: `python tests/bench_lists.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import operator
import os
import shutil
import socket
import sys
import time
from array import array
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from masking import (KEY_ORDER, KEY_PIXELS, KEY_REPLACE, MASK_RATIO, MaskGenerator, derive_seed,
                     find_mask_generators, sample_seed)
from tokenizer import half_copy

PathLike = Union[str, os.PathLike]
logger = logging.getLogger("bevt.data")

# -----------------------------------------------------------------------------
# The pretraining recipe's numbers: paper §4.1 and the released
# video_train_pipeline / image_train_pipeline. Defined once: the mask ratio is
# masking.MASK_RATIO, the tokenizer's half size tokenizer.DOWNSAMPLE; the
# finetuning numbers open the finetuning section below.

# Normalisation (paper §4.1; released img_norm_cfg, RGB on 0-255).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

PRETRAIN_FRAMES = 16            # §4.1: "16 frames"; SampleFrames(clip_len=16)
PRETRAIN_INTERVAL = 8           # SampleFrames(frame_interval=8)
CROP = 224                      # §4.1: 224 x 224 crops; RandomCrop(size=224)
RESCALE_RANGE = (256, 320)      # RandomRescale(scale_range=(256, 320)), bicubic
FLIP_P = 0.5                    # Flip(flip_ratio=0.5)
JITTER = 0.4                    # images: ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0)
VIDEO_BATCH = 8                 # per GPU: omni_videos_per_gpu=[8, 64] (paper §4.1: 8 clips + 64 images)
IMAGE_BATCH = 64
WORKERS = 4                     # released workers_per_gpu=4


# -----------------------------------------------------------------------------
# Annotation lists and image folders
#
# A sample list is a list of (path, label). It is kept in `SampleList`, three
# numpy arrays, rather than as a Python list of (Path, int) tuples: at
# ImageNet size (1.28M rows) the tuples cost ~500 MB in every process, and
# every forked DataLoader worker that reads an entry writes to its reference
# count, which un-shares the page it lives on: ~+300 MB of private memory per
# worker per epoch (PyTorch issue 13246; Detectron2 and mmengine serialise
# their lists for the same reason). numpy arrays hold no Python object per
# row, so reading them writes nothing and the workers keep sharing them.
#
# A folder tree given instead of a list (the image stream) is scanned once per
# run, by rank 0, into a list file the other ranks read (`list_image_folder_once`).

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")   # the image files a folder scan lists
LIST_MAGIC = b"# bevt image-folder list"       # first line of a list file written by a folder scan
LIST_VERSION = 1                               # bump when the scan or the file format changes


class SampleList:
    """A list of (path, label) pairs: `samples[i]` is (root / relative_path_i, label_i).

    It is stored as three arrays, not as Python objects per row, so that a
    list costs about its bytes (~46 per ImageNet row, against ~400 as tuples)
    and forked DataLoader workers share it instead of copying it (see above):

        _paths    uint8 (total bytes,)   every relative path, as file-system bytes, back to back
        _offsets  int64 (n + 1,)         path i is _paths[_offsets[i]:_offsets[i + 1]]
        labels    int64 (n,)

    Paths are kept as the bytes of the name (os.fsencode), so any file name
    round-trips, and relative to `root`, so the common prefix is stored once.
    Reading a row builds its Path on the fly (~3 us on this CPU, under load).
    """

    def __init__(self, root: PathLike, paths: np.ndarray, offsets: np.ndarray, labels: np.ndarray):
        self.root = Path(root)
        self._paths, self._offsets, self.labels = paths, offsets, labels

    @classmethod
    def from_parts(cls, root: PathLike, paths: bytearray, ends: array, labels: array) -> "SampleList":
        """From what a reader accumulated: the paths' bytes back to back, where each ends, the labels.
        Copied into exact-size numpy arrays (the growable buffers over-allocate)."""
        offsets = np.zeros(len(ends) + 1, np.int64)
        offsets[1:] = np.frombuffer(ends, np.int64)
        return cls(root, np.frombuffer(paths, np.uint8).copy(), offsets, np.frombuffer(labels, np.int64).copy())

    @classmethod
    def from_pairs(cls, root: PathLike, pairs) -> "SampleList":
        """From (relative path, label) pairs; a path may be str or bytes."""
        paths, ends, labels = bytearray(), array("q"), array("q")
        for rel, label in pairs:
            paths += os.fsencode(rel)
            ends.append(len(paths))
            labels.append(label)
        return cls.from_parts(root, paths, ends, labels)

    def __len__(self) -> int:
        return len(self.labels)

    def _row(self, i: int) -> int:
        i, n = operator.index(i), len(self.labels)            # an int (or numpy int), as a list takes
        if not -n <= i < n:
            raise IndexError(f"row {i} of a list of {n} samples")
        return i + n if i < 0 else i

    def relpath_bytes(self, i: int) -> bytes:
        i = self._row(i)
        return self._paths[self._offsets[i]:self._offsets[i + 1]].tobytes()

    def path(self, i: int) -> Path:
        """root / the i-th relative path (as the old list of tuples held it)."""
        return self.root / os.fsdecode(self.relpath_bytes(i))

    def label(self, i: int) -> int:
        return int(self.labels[self._row(i)])

    def __getitem__(self, i: int) -> tuple[Path, int]:
        return self.path(i), self.label(i)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return self._paths.nbytes + self._offsets.nbytes + self.labels.nbytes

    def __repr__(self):
        return f"SampleList({len(self)} samples under {self.root}, {self.nbytes / 2**20:.1f} MiB)"


def _check_exists(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _parse_list(lines, root: Path, where) -> SampleList:
    """`relative/path label` lines (bytes) -> SampleList; comments ('#') and blank lines skipped.

    Each line is read as bytes and its path kept as bytes, so no Python object
    per row outlives its line; line numbers count every line (for errors).
    """
    paths, ends, labels = bytearray(), array("q"), array("q")
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        parts = line.rsplit(None, 1)                       # the label is the last field: paths may hold spaces
        try:
            rel, label = parts[0], int(parts[1])
            labels.append(label)
        except (IndexError, ValueError, OverflowError):
            raise ValueError(f"{where}:{lineno}: expected 'relative/path label', got {os.fsdecode(line)!r}") from None
        paths += rel
        ends.append(len(paths))
    return SampleList.from_parts(root, paths, ends, labels)


def read_annotations(ann_file: PathLike, root: PathLike) -> SampleList:
    """`relative/path label` per line -> SampleList of (root/relative/path, label).

    The format of the mmaction lists Kinetics and SSv2 users already have. The
    path may contain spaces (the label is the last field); blank lines and
    lines starting with '#' are skipped. Paths are the bytes of the line, as
    the file system stores names. A missing list or root is an error naming
    the path; a listed file that is missing is not (it is skipped at load time
    like any unreadable file, as big video sets always have a few).
    """
    ann_file, root = Path(ann_file), Path(root)
    _check_exists(ann_file, "annotation file")
    _check_exists(root, "data root")
    with open(ann_file, "rb") as f:                        # line by line: never the whole text as str
        samples = _parse_list(f, root, ann_file)
    if not len(samples):
        raise ValueError(f"annotation file {ann_file} lists no samples")
    return samples


def _suffix(name: str) -> str:
    """Path(name).suffix without building a Path: from the last dot, unless the name starts or ends there."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def _walk_images(folder: str, rel: str, unreadable: list):
    """Relative paths (rel/...) of the image files under `folder`, in the order sorted(Path.rglob) gives.

    Depth first with each folder's entries sorted by name, which is the order
    of the paths' component tuples. Symlinked folders are not entered (as
    rglob); symlinked files count. os.scandir knows files from folders without
    a stat call per file on most file systems. An unreadable folder is noted
    in `unreadable` and skipped.
    """
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        unreadable.append(f"{folder} ({e.strerror or e})")
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            yield from _walk_images(e.path, f"{rel}/{e.name}", unreadable)
        elif _suffix(e.name).lower() in IMAGE_EXTS and e.is_file():
            yield f"{rel}/{e.name}"


def scan_image_folder(root: PathLike) -> tuple[SampleList, list[str]]:
    """ImageNet-style tree root/<class>/**/<image> -> (SampleList of (path, label), classes).

    Labels are the positions of the class folders in sorted order, as
    torchvision's ImageFolder assigns them; rows are in sorted path order.
    Skipped, counted and logged: unreadable sub-folders, and names a list file
    cannot hold (a line break in the name, or a class folder starting with
    white space).
    """
    root = _check_exists(Path(root), "image folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders (expected root/<class>/<image>)")
    paths, ends, labels = bytearray(), array("q"), array("q")
    unreadable, unlistable = [], []
    for label, c in enumerate(classes):
        for rel in _walk_images(str(root / c), c, unreadable):
            b = os.fsencode(rel)
            if b"\n" in b or b"\r" in b or b[:1].isspace():
                unlistable.append(rel)
                continue
            paths += b
            ends.append(len(paths))
            labels.append(label)
    for what, items in (("unreadable folder(s)", unreadable), ("image(s) whose name a list cannot hold", unlistable)):
        if items:
            logger.warning("%s: skipped %d %s, e.g. %r", root, len(items), what, items[0])
    if not ends:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    return SampleList.from_parts(root, paths, ends, labels), classes


# ---- One scan per run: the folder as a list file, written by rank 0, read by every rank
#
# The file is an ordinary `relative/path label` list (read_annotations reads it,
# and it can be passed as --image-list), after two comment lines:
#
#     # bevt image-folder list
#     # {"version": 1, "root": ..., "fingerprint": ..., "count": N, "sha256": ..., "classes": [...]}
#
# It is trusted only when all of these hold: same root; same folder
# fingerprint (the names and modification times of the class folders, taken
# *before* the scan, so a change during the scan makes the file stale); N
# lines after the header; their SHA-256 as recorded. A torn, truncated,
# edited or stale file is rebuilt. Adding, removing or renaming an image
# changes its folder's modification time; changes deeper than the class
# folders (root/<class>/<sub>/...) are not seen: delete the file to rescan.
# Keep the file outside the class folders (writing it would change their time).


def _folder_fingerprint(root: Path) -> str:
    """SHA-256 of the scan rule, the class folders' names and their modification times (~1000 stats).

    Not root's own time: the class folders' names already say what changed
    there, and a list file kept in root (allowed) would change it.
    """
    h = hashlib.sha256(f"{LIST_VERSION} {IMAGE_EXTS}\n".encode())
    with os.scandir(root) as it:
        for e in sorted(it, key=lambda e: e.name):
            if not e.name.startswith(".") and e.is_dir():
                h.update(os.fsencode(e.name) + b"\0" + str(e.stat().st_mtime_ns).encode() + b"\n")
    return h.hexdigest()


def _list_header(path: PathLike) -> Optional[dict]:
    """The header of a folder-scan list file, or None if `path` is not one (or has a damaged header)."""
    try:
        with open(path, "rb") as f:
            if f.readline().rstrip(b"\n") != LIST_MAGIC:
                return None
            header = json.loads(f.readline().lstrip(b"# "))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _check_list_file(path: Path, root: Path, fingerprint: str) -> tuple[Optional[str], Optional[dict]]:
    """(None, header) when `path` is a complete list of the folder `root` as it is now, else (why not, None)."""
    if not path.exists():
        return "no list file yet", None
    header = _list_header(path)
    if header is None or header.get("version") != LIST_VERSION:
        return f"{path} is not a version-{LIST_VERSION} folder list (or its header is damaged)", None
    if header.get("root") != str(root):
        return f"it lists {header.get('root')}, not {root}", None
    if header.get("fingerprint") != fingerprint:
        return "the folder changed since it was written", None
    digest, lines = hashlib.sha256(), 0
    with open(path, "rb") as f:
        f.readline(), f.readline()                                     # the header
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            lines += chunk.count(b"\n")
    if lines != header.get("count") or digest.hexdigest() != header.get("sha256"):
        return f"it is torn or damaged ({lines} lines, header says {header.get('count')}; or its checksum differs)", None
    return None, header


def _write_atomic_bytes(path: Path, payload: bytes) -> None:
    """Write through a temporary file in the same folder and rename: readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())                                   # on disk before the name points at it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_folder_list(path: PathLike, root: Path, samples: SampleList, classes: list, fingerprint: str) -> None:
    """Write a folder scan as a list file with its header (above), atomically."""
    body = bytearray()
    for i in range(len(samples)):
        body += samples.relpath_bytes(i) + b" %d\n" % samples.labels[i]
    header = {"version": LIST_VERSION, "root": str(root), "fingerprint": fingerprint, "count": len(samples),
              "sha256": hashlib.sha256(body).hexdigest(), "classes": classes}
    _write_atomic_bytes(Path(path), LIST_MAGIC + b"\n# " + json.dumps(header).encode() + b"\n" + body)


def list_image_folder_once(root: PathLike, cache: PathLike, rank: int = 0, timeout: float = 3600.0,
                           poll: float = 0.2, verbose: Optional[bool] = None) -> Path:
    """The image folder `root` as the list file `cache`, scanned at most once per run -> `cache`.

    Rank 0 reuses `cache` when it is a complete list of the folder as it is now
    (header checks above), else scans the folder and writes the file
    atomically, printing how many images and classes it found and how long the
    scan took. Every other rank never scans: it waits until `cache` is a
    valid list of the folder, then returns; with a valid file from an earlier
    run nobody waits. Pass the result as the list file:
    ImageDataset(root, ann_file=cache), build_pretrain_loader(image_ann=cache).

    The wait watches the file rather than using a collective: a scan of
    ImageNet on a network file system can outlast a process group's timeout.
    Every rank must see `cache` (on several nodes: a shared file system).
    """
    root = _check_exists(Path(root), "image folder").absolute()
    cache = Path(cache)
    verbose = (rank == 0) if verbose is None else verbose
    if rank == 0:
        fingerprint = _folder_fingerprint(root)                       # before the scan (see above)
        why, header = _check_list_file(cache, root, fingerprint)
        if why is None:
            if verbose:
                print(f"image folder {root}: {header['count']} images in {len(header['classes'])} classes, "
                      f"from {cache} (the folder is unchanged since it was scanned)", flush=True)
            return cache
        if verbose:
            print(f"scanning the image folder {root} for {cache} ({why}) ...", flush=True)
        t0 = time.perf_counter()
        samples, classes = scan_image_folder(root)
        took = time.perf_counter() - t0
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            _write_folder_list(cache, root, samples, classes, fingerprint)
        except OSError as e:
            raise OSError(f"cannot write the image list {cache}: {e.strerror or e} "
                          f"(choose another place with --image-list-cache)") from None
        if verbose:
            print(f"image folder {root}: {len(samples)} images in {len(classes)} classes, scanned in {took:.1f} s "
                  f"-> {cache}", flush=True)
        return cache
    # Other ranks: check each new version of the file (a new inode, time or size) until one is valid.
    deadline, seen, why = time.monotonic() + timeout, None, "no list file yet"
    while True:
        try:
            st = cache.stat()
            version = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            version = None
        if version is not None and version != seen:
            seen = version
            why, _ = _check_list_file(cache, root, _folder_fingerprint(root))
            if why is None:
                return cache
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank} waited {timeout:.0f} s for rank 0 to write the list of {root} to "
                               f"{cache} (last check: {why}); does every rank see that path?")
        time.sleep(poll)


# -----------------------------------------------------------------------------
# Frame sampling (released mmaction SampleFrames)
#
# All modes return an int64 array (num_clips, clip_len) of frame indices in
# [0, num_frames). Random choices use torch's global generator, which the
# data sets seed per sample from (seed, epoch, index) (_RobustDataset).


def _randint(lo: int, hi: int) -> int:
    """Uniform int in {lo .. hi}, both inclusive, from torch's generator."""
    return int(torch.randint(lo, hi + 1, ()).item())


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()).item())


def sample_dense(num_frames: int, clip_len: int, interval: int, num_clips: int = 1,
                 test_mode: bool = False) -> np.ndarray:
    """`clip_len` frames `interval` apart, per clip; `num_clips` clips.

    Training: one random start in [0, num_frames - clip_len*interval]; test:
    N clips evenly spaced, each centred in its share of the valid starts (the
    released _get_test_clips). A video shorter than clip_len*interval starts
    at 0 and loops: indices are taken mod num_frames (out_of_bound_opt='loop').
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    span = clip_len * interval                                  # frames one clip covers
    if test_mode:
        avg = (num_frames - span + 1) / num_clips
        if num_frames > span - 1:
            offsets = (np.arange(num_clips) * avg + avg / 2.0).astype(np.int64)
        else:
            offsets = np.zeros(num_clips, np.int64)
    else:
        avg = (num_frames - span + 1) // num_clips
        if avg > 0:                                             # room for every clip: one per share
            offsets = np.arange(num_clips) * avg + np.array([_randint(0, avg - 1) for _ in range(num_clips)])
        elif num_frames > max(num_clips, span):                 # (only reachable for num_clips > 1)
            offsets = np.sort([_randint(0, num_frames - span) for _ in range(num_clips)])
        else:                                                   # too short: start at 0 and loop
            offsets = np.zeros(num_clips, np.int64)
    idx = offsets[:, None] + np.arange(clip_len)[None, :] * interval     # (num_clips, clip_len)
    return np.mod(idx, num_frames).astype(np.int64)


def sample_uniform(num_frames: int, clip_len: int, test_mode: bool = False) -> np.ndarray:
    """One frame from each of `clip_len` equal segments of the whole video (SSv2).

    The released `get_seq_frames` (from SlowFast's ssv2.py): segment i spans
    [round(s*i), round(s*(i+1))] with s = (num_frames-1)/clip_len; training
    takes a random frame of it, testing the middle. Returns (1, clip_len).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    seg = (num_frames - 1) / clip_len
    idx = []
    for i in range(clip_len):
        start, end = int(np.round(seg * i)), int(np.round(seg * (i + 1)))
        idx.append((start + end) // 2 if test_mode else _randint(start, end))
    return np.asarray(idx, np.int64)[None]


@dataclass(frozen=True)
class FrameSampling:
    """Which frames a sample takes: `dense` (clip_len x interval) or `uniform` (segments)."""
    clip_len: int
    interval: int = 1
    mode: str = "dense"
    num_clips: int = 1
    test_mode: bool = False

    def __post_init__(self):
        if self.mode not in ("dense", "uniform"):
            raise ValueError(f"frame sampling mode must be 'dense' or 'uniform', got {self.mode!r}")
        if self.mode == "uniform" and self.num_clips != 1:
            raise ValueError("uniform (SSv2) sampling takes one clip over the whole video; num_clips must be 1")
        if self.clip_len < 1 or self.interval < 1 or self.num_clips < 1:
            raise ValueError(f"clip_len, interval and num_clips must be >= 1, got {self}")

    def __call__(self, num_frames: int) -> np.ndarray:
        if self.mode == "uniform":
            return sample_uniform(num_frames, self.clip_len, self.test_mode)
        return sample_dense(num_frames, self.clip_len, self.interval, self.num_clips, self.test_mode)


# -----------------------------------------------------------------------------
# Decoding with PyAV
#
# What "frame i" means (read_video's contract, the same in every container):
#
#     frame i is the i-th picture, counting from 0, that decoding the stream
#     from its first packet outputs (presentation order); the frame count is
#     the number of those pictures.
#
# In a constant-frame-rate stream this is the frame whose timestamp is
# t0 + i / fps, t0 the timestamp of frame 0: the rule read_video has always
# used, and what lets a clip start with a seek instead of decoding everything
# before it (the fast path). t0 is the container's start time where the
# container stores every frame's timestamp (MP4/MOV, Matroska/WebM, FLV);
# elsewhere the start time is unreliable and t0 is the first decoded frame's
# timestamp (AVI stores no timestamps: FFmpeg derives them from the decode
# order, and with B-frames the first frame gets 1 while the start time is 0;
# MPEG-TS/PS start times are estimates from the first packets).
#
# The seek check (_decode_after_seek): a seek lands on some keyframe, and the
# frames decoded from there are placed by their timestamps only if the first
# key frame out of the decoder is on the t0 + k / fps grid at or before the
# first needed frame (and, where the container seeks by byte position, has
# the timestamp of a keyframe in a from-start scan), and every next frame is
# exactly one frame after the one before. Landing too late, or at the end of
# the file, means seeking again, earlier.
#
# Where timestamps cannot place frames (none at all; not 1/fps apart, as in
# variable-frame-rate files or AVI "drop frames"; not one frame apart from one
# decoded frame to the next, as in AVI H.264 with B-frames; or not the same
# after a seek as from the start, as in MPEG-PS), frames are counted in decode
# order from the start instead: the slow path. It is exact, logged once per
# file, and never a reason to drop the file; `data.py check` lists such files.


class BadMedia(Exception):
    """A file that cannot be decoded (unreadable, corrupt, truncated, no frames)."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), str(reason)


_MOV = "mov,mp4,m4a,3gp,3g2,mj2"                   # FFmpeg's demuxer names (container.format.name)
_STORED_START = (_MOV, "matroska,webm", "flv")      # every frame's timestamp is in the file: t0 = start time
# Containers whose seeks go to a keyframe through an index (or by reading
# forward) and give frames the timestamps they have from the start. Anywhere
# else (MPEG-TS/PS seek by byte position and re-derive timestamps from there)
# a landing is also checked against the keyframe timestamps of a from-start scan.
_SEEK_BY_INDEX = (_MOV, "matroska,webm", "flv", "avi")
_GRID_TOL = 0.25            # how far from t0 + k / fps a timestamp may be, in frames (WebM/FLV round to 1 ms)
_SEEK_BACKOFF_S = (0, 1, 10)  # seek to the first needed frame, then 1 s and 10 s before it, then from the start
_SLOW: dict = {}            # path -> why its frames are placed by decode order (this process; logged once)


def _open_video(path: PathLike, threads: int):
    container = av.open(str(path), metadata_errors="ignore")
    if not container.streams.video:
        container.close()
        raise BadMedia(path, "no video stream")
    stream = container.streams.video[0]
    # Frame + slice threads inside the decoder ("AUTO"); 0 lets FFmpeg pick one per core.
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    return container, stream


def _frame_rate(stream) -> Optional[Fraction]:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate else None


def _scan(container, stream, path: Optional[PathLike] = None) -> tuple[int, Optional[str], Optional[set]]:
    """(frame count, why timestamps cannot place frames or None, keyframe timestamps or None).

    The count is the pictures with data, one per packet. MP4/MOV store it
    (the sample table): nothing is read, and the stream's duration checks
    that the n frames are 1/fps apart. AVI's header counts its empty "drop
    frame" chunks too, which decode to nothing; its index lists the chunks
    with data, numbered in time including the drops, so the gaps show.
    Other containers (Matroska/WebM, MPEG-TS/PS, ...) store no count: the
    packets are demuxed, not decoded (cheap next to a decode), then the
    container rewinds; their timestamps must be the 1/fps grid, and the
    keyframes' are kept for the seek check. A file whose timestamps fail is
    noted for the slow path (`path`).
    """
    rate, tb = _frame_rate(stream), stream.time_base
    fmt = container.format.name
    avi = _avi_index(stream) if fmt == "avi" else None
    if fmt == _MOV and stream.frames > 0:
        n, why = int(stream.frames), None
        if stream.duration and stream.base_rate:             # base_rate: the rate all timestamps fit
            span = float(stream.duration * tb * stream.base_rate)
            if abs(span - n) > 1:                            # one frame of slack for the last frame's duration
                why = f"{n} frames span {span:.1f} frame durations (variable frame rate?)"
        keys = None
    elif avi is not None:
        n, why, keys = len(avi), _grid_problem(avi, tb, rate), None
    else:
        pts, keys = [], set()
        for pkt in container.demux(stream):
            if pkt.size:                                     # the flush packet at the end is empty
                pts.append(pkt.pts)
                if pkt.is_keyframe:
                    keys.add(pkt.pts)
        container.seek(0)                                    # back to the start for decoding
        n, why = len(pts), _grid_problem(pts, tb, rate)
    if why and path is not None:
        _note_slow(path, why)
    return n, why, keys


def _avi_index(stream) -> Optional[list]:
    """Times (chunk numbers) of the AVI index's chunks with data; None unless it covers the whole stream."""
    entries = getattr(stream, "index_entries", None)             # PyAV >= 14: the demuxer's index, no reading
    if entries is None:
        return None
    times = [e.timestamp for e in entries if e.size > 0]
    return times if times and times[-1] + 1 == stream.frames else None


def _grid_problem(pts: list, tb, rate) -> Optional[str]:
    """Why packet timestamps are not t0 + k / fps for k = 0, 1, ... (None if they are)."""
    if rate is None or tb is None:
        return "no frame rate"
    if not pts or any(p is None for p in pts):
        return "packets without timestamps"
    pts = sorted(pts)
    k = float(tb * rate)                                     # frames per time-base tick
    for i, p in enumerate(pts):
        x = (p - pts[0]) * k
        if abs(x - i) > _GRID_TOL:
            return (f"timestamps are not 1/fps apart (frame {i} is at {x:.2f} frame durations): "
                    f"variable frame rate or dropped frames")
    return None


def _count_frames(container, stream, path: Optional[PathLike] = None) -> int:
    """Frames in the stream (see _scan); the container is left at the start."""
    return _scan(container, stream, path)[0]


def count_frames(path: PathLike) -> int:
    """Frames in the first video stream of a file: what decoding it from the start outputs (see _scan)."""
    container, stream = _open_video(path, 1)
    with container:
        return _count_frames(container, stream, path)


def _note_slow(path, reason: str) -> None:
    """Remember (and log, once per file) that a file's frames are placed by decode order."""
    key = str(path)
    if path is not None and key not in _SLOW:
        _SLOW[key] = reason
        logger.warning("%s: %s; its frames are decoded from the start (slow path, exact)", key, reason)


def read_video(path: PathLike, sample: Optional[Callable[[int], np.ndarray]] = None, threads: int = 1,
               num_frames: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode the frames a clip needs -> (frames, idx, num_frames).

    frames: uint8 (*idx.shape, H, W, 3) RGB; idx = sample(num_frames), the
    frame indices (any shape, e.g. (clips, T)); sample None takes every frame.
    Frame i is the i-th picture decoding the stream from its start outputs;
    in a constant-frame-rate stream, the one whose timestamp is i / fps after
    the first frame's (see "What frame i means" above). Only frames from the
    keyframe before min(idx) to max(idx) are decoded, after a seek whose
    landing is checked; where the file's timestamps cannot place frames, from
    the start (slow path, logged once per file). Only the needed frames are
    converted to RGB. Raises BadMedia if the file cannot be opened, has no
    frames, or a needed frame never arrives (truncated file, or a frame count
    larger than what decodes). `num_frames` skips the count when the caller
    knows it (the data sets cache it).
    """
    try:
        container, stream = _open_video(path, threads)
        with container:
            keys = None
            if num_frames is None:
                n, _, keys = _scan(container, stream, path)
            else:
                n = num_frames
            if n < 1:
                raise BadMedia(path, "zero frames")
            idx = np.arange(n) if sample is None else np.asarray(sample(n))
            wanted = np.unique(idx)                              # sorted
            got = _decode_indices(container, stream, wanted, path, keys)
    except BadMedia:
        raise
    except Exception as e:                                       # anything the demuxer/decoder throws: bad file
        raise BadMedia(path, f"{type(e).__name__}: {e}") from e
    missing = [int(i) for i in wanted if int(i) not in got]
    if missing:
        raise BadMedia(path, f"decoded {len(got)} of the {len(wanted)} needed frames of {n} "
                             f"(first missing: {missing[0]}; truncated?)")
    frames = np.stack([got[int(i)] for i in idx.reshape(-1)])           # (numel(idx), H, W, 3)
    return frames.reshape(*idx.shape, *frames.shape[1:]), idx, n


def _decode_indices(container, stream, wanted: np.ndarray, path: Optional[PathLike] = None,
                    keys: Optional[set] = None) -> dict[int, np.ndarray]:
    """{index: (H, W, 3) uint8} for the sorted frame indices `wanted`.

    Seeks (the fast path, checked) when the first needed frame is not frame 0
    and the file is not known to need the slow path, else and whenever the
    seek check fails, decodes from the start. `keys`: the keyframe timestamps
    from _scan, if it ran; `path` names the file for the slow-path record.
    """
    first, key = int(wanted[0]), str(path)
    if first > 0 and key not in _SLOW:
        if keys is None and container.format.name not in _SEEK_BY_INDEX:
            keys = _scan(container, stream, path)[2]             # byte-position seeks need the keyframe table
        if key not in _SLOW:                                     # (the scan may have found a reason)
            got, why = _decode_after_seek(container, stream, wanted, keys)
            if got is not None:
                return got
            if why:
                _note_slow(path, why)
        container.seek(0)
    return _decode_from_start(container, stream, wanted)


def _decode_from_start(container, stream, wanted: np.ndarray) -> dict[int, np.ndarray]:
    """Frame i = the i-th frame out of the decoder: exact by definition, needs no timestamps."""
    last, wanted_set, got = int(wanted[-1]), set(int(i) for i in wanted), {}
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted_set:
            got[i] = frame.to_ndarray(format="rgb24")            # YUV -> RGB only for needed frames
        if i >= last:
            break
    return got


def _decode_after_seek(container, stream, wanted: np.ndarray, keys: Optional[set]):
    """The fast path: (frames, None), or (None, why the file needs the slow path), or
    (None, None) when the seek ends up at the start anyway (a short distance, no problem).

    The seek check. A seek goes to a keyframe at or before a target time, but
    which frame the decoder then outputs first (the landing) depends on the
    demuxer and the codec, so the landing is trusted only if
      1. it is the first key frame out of the decoder (frames before it were
         decoded from references the seek skipped: dropped), its timestamp
         is on the grid t0 + L / fps, and 0 <= L <= first (the first needed frame);
      2. where the container seeks by byte position (MPEG-TS/PS), its
         timestamp is one of the keyframe timestamps a from-start scan read,
         i.e. the frame was not re-timed after the seek;
      3. every later frame is exactly one frame after the one before, so its
         index is its timestamp's place on the grid (and L + its rank).
    A landing after `first` (a keyframe past the target, or leading pictures
    of an open GOP the decoder drops after a seek) or no frame at all (a seek
    past the last keyframe) is retried 1 s, then 10 s earlier; anything else
    cannot be placed, and the file takes the slow path.
    """
    rate, tb = _frame_rate(stream), stream.time_base
    if rate is None or tb is None:
        return None, "no frame rate"
    k = float(tb * rate)                                         # frames per time-base tick
    if container.format.name in _STORED_START:
        t0 = stream.start_time or 0
    else:                                                        # the first decoded frame's timestamp
        frame = next(iter(container.decode(stream)), None)
        if frame is None or frame.pts is None:
            return None, "the first frame has no timestamp"
        t0 = frame.pts
    first, last, wanted_set = int(wanted[0]), int(wanted[-1]), set(int(i) for i in wanted)
    why = None
    for back in _SEEK_BACKOFF_S:
        target = first - int(back * rate)                       # frame index to seek to
        if target <= 0:
            return None, None                                    # from the start is as cheap
        got, prev, late = {}, None, None
        try:
            container.seek(t0 + int(Fraction(target) / rate / tb), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                x = None if frame.pts is None else (frame.pts - t0) * k
                i = None if x is None else round(x)
                if i is None or abs(x - i) > _GRID_TOL:
                    return None, f"frame timestamp {frame.pts} off the 1/fps grid after a seek"
                if prev is None:                                 # the landing
                    if i > first:                                # past the first needed frame: seek earlier
                        late = i
                        break
                    if not frame.key_frame:                      # decoded from missing references: skip
                        continue
                    if i < 0 or (keys is not None and frame.pts not in keys):
                        return None, f"a seek landed on timestamp {frame.pts}, not a keyframe's from the start"
                elif i != prev + 1:
                    return None, f"timestamps not one frame apart after a seek (frame {prev} then {i})"
                prev = i
                if i in wanted_set:
                    got[i] = frame.to_ndarray(format="rgb24")    # YUV -> RGB only for needed frames
                if i >= last:
                    break
        except av.error.FFmpegError as e:                        # e.g. a byte-position seek into a packet
            return None, f"seeking or decoding after a seek failed ({type(e).__name__}: {e})"
        if prev is not None:
            return got, None                                     # landed at or before `first`, all checks passed
        why = (f"seeks land after the needed frame (asked {first}, landed at {late})" if late is not None
               else f"a seek to frame {target} gave no frame")  # past the last keyframe
    return None, why


def read_image(path: PathLike, min_short: Optional[int] = None) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB, decoded completely (truncated files raise).

    min_short: JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8)
    that keeps the short side >= min_short (PIL `draft`), which makes big
    ImageNet JPEGs several times cheaper when the pipeline shrinks them anyway.
    """
    try:
        with Image.open(path) as im:
            if min_short is not None and im.format == "JPEG":
                w, h = im.size
                s = min_short / min(w, h)
                if s < 1:
                    im.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                # 16-bit greyscale (PNG): PIL's convert("RGB") clips every value above 255,
                # which turns the image white; scale 0..65535 to 0..255 instead.
                grey = np.asarray(im, dtype=np.float64) / 257.0
                grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Exception as e:                                       # PIL raises OSError, SyntaxError, ValueError...
        raise BadMedia(path, f"{type(e).__name__}: {e}") from e


# -----------------------------------------------------------------------------
# The pretraining transform: decoded pixels -> the sample dicts of the module docstring
#
# Shape vocabulary: decoded frames (T, H, W, 3) uint8 -> `frames_to_tensor` ->
# (T, 3, H, W) uint8 in channels-last memory (a view, no copy), which is the
# layout torch's fast uint8 resize takes. Geometry (resize, crops) runs on
# uint8 so only the crop is ever converted to float; colour ops, the tokenizer
# copy and normalisation run on floats in [0, 1]. An image is a 1-frame clip.
# The pixel operations come in the order the transform (`PretrainTransform`,
# at the end of this section) applies them.


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 numpy -> (T, 3, H, W) uint8 tensor (channels-last view)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (..., H, W) -> contiguous float32 in [0, 1]."""
    return x.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255.0)


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(h', w') with min(h', w') = short and the aspect kept (mmcv rescale_size: int(x*s + 0.5))."""
    s = short / min(h, w)
    return max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(N, 3, H, W) uint8 or float -> (N, 3, h, w), same dtype; antialiased when shrinking.

    Differs from the released code: it resizes with OpenCV (mmcv.imresize),
    which does not antialias when shrinking; here torch's antialiased
    bilinear/bicubic (PIL's filters, bicubic a = -0.5 where OpenCV uses
    -0.75). For the upscaling that dominates on 256-px-short-side Kinetics
    (to [256, 320]) antialiasing changes nothing.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    y = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return y.clamp_(0.0, 1.0) if y.is_floating_point() else y   # bicubic overshoots on floats


# Greyscale weights of the released ColorJitter (torchvision's).
_GREY_JITTER = (0.2989, 0.587, 0.114)


def _grey(x: torch.Tensor, weights) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 1, H, W)."""
    r, g, b = x.unbind(-3)
    return (weights[0] * r + weights[1] * g + weights[2] * b).unsqueeze(-3)


def color_jitter(x: torch.Tensor, brightness=JITTER, contrast=JITTER, saturation=JITTER) -> torch.Tensor:
    """Released ColorJitter (hue 0) on (N, 3, H, W) floats in [0, 1], factors drawn once per call.

    brightness: x*b; contrast: blend with the mean grey level of each image;
    saturation: blend with the per-pixel grey. Clamped once at the end, as the
    released code clamps only when converting back to uint8.
    Differs from the released code: it draws the order of the three ops once
    per process (a permutation in __init__); here it is drawn per call, as
    torchvision's ColorJitter does.
    """
    b, c, s = (_uniform(1 - brightness, 1 + brightness), _uniform(1 - contrast, 1 + contrast),
               _uniform(1 - saturation, 1 + saturation))
    for op in torch.randperm(3).tolist():
        if op == 0:
            x = x * b
        elif op == 1:
            mean = _grey(x, _GREY_JITTER).mean(dim=(-3, -2, -1), keepdim=True)     # (N, 1, 1, 1)
            x = c * x + (1 - c) * mean
        else:
            x = s * x + (1 - s) * _grey(x, _GREY_JITTER)
    return x.clamp(0.0, 1.0)


def random_crop_box(h: int, w: int, size: int) -> tuple[int, int]:
    """Top-left (top, left) of a uniformly random size x size window.

    Differs from the released code: its np.random.randint(0, h - size) never
    picks the last offset; here all h - size + 1 offsets are possible.
    """
    if size > h or size > w:
        raise ValueError(f"crop {size} larger than the frame {h}x{w}")
    return _randint(0, h - size), _randint(0, w - size)


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] -> uint8, rounded to the nearest level (what a sample ships as)."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


_MEAN = torch.tensor(IMAGENET_MEAN) / 255.0
_STD = torch.tensor(IMAGENET_STD) / 255.0


def normalize(x: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (x - mean) / std with the ImageNet RGB statistics (paper §4.1).

    channels_first=True returns (3, N, H, W) instead: the clip layout (3, T,
    H, W), written in the same single pass (x * (1/std) + (-mean/std)).
    """
    scale = (1.0 / _STD).view(3, 1, 1, 1)
    shift = (-_MEAN / _STD).view(3, 1, 1, 1)
    if channels_first:
        return torch.addcmul(shift, x.transpose(0, 1), scale)           # (3, N, H, W), contiguous
    return torch.addcmul(shift.view(3, 1, 1), x, scale.view(3, 1, 1))   # (N, 3, H, W)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize` (for pictures and tests)."""
    return x * _STD.view(3, 1, 1) + _MEAN.view(3, 1, 1)


def normalize_batch(x: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """A uint8 pretraining batch on the training device -> float32, mean/std normalised.

    (B, 3, T, H, W) clips or (B, 3, H, W) images, channels at `channel_dim`.
    The same arithmetic as `normalize` after `to_float` (x·(1/255), then
    x·(1/std) − mean/std in fp32), so the result is identical to normalising
    in the worker; only the bytes that travel are 4x fewer.
    """
    if x.dtype != torch.uint8:
        raise ValueError(f"normalize_batch: expected a uint8 batch, got {x.dtype}")
    shape = [1] * x.dim()
    shape[channel_dim] = 3
    scale = (1.0 / _STD).to(x.device).view(shape)
    shift = (-_MEAN / _STD).to(x.device).view(shape)
    return torch.addcmul(shift, x.float().mul_(1.0 / 255.0), scale)


class PretrainTransform:
    """A pretraining sample, clip or image: rescale the short side, [colour jitter], random crop, flip,
    tokenizer copy, masks.

    The released video_train_pipeline: RandomRescale(256, 320) bicubic ->
    RandomCrop(224) -> Flip(0.5) -> CopyResize(112, lanczos) -> Normalize, then
    MaskedPositionGenerate (tube). Its image_train_pipeline is the same with
    ColorJitter(0.4, 0.4, 0.4, hue 0) after the rescale, and the blockwise
    mask: an image is the one-frame case of a clip, and colour jitter (images
    only) is where the two recipes differ. One scale, crop and flip for all
    frames of a clip. The random draws, in this order: short side, [jitter
    factors and order], crop offsets, flip. Normalize runs on the training
    device (`normalize_batch`): samples ship as uint8.

    stream "video": frames (1, T, H, W, 3) uint8 -> {video, video_tok, video_mask, video_target};
    stream "image": an image (H, W, 3) uint8 -> {image, image_tok, image_mask, image_target}
    (shapes in the module docstring; no masks without a mask_gen). The
    recipes' defaults: PretrainClipTransform and PretrainImageTransform below.
    """

    def __init__(self, stream: str, crop: int, short_side, flip: float, jitter: float,
                 mask_gen: Optional[MaskGenerator] = None, resample: str = "pil"):
        if stream not in ("video", "image"):
            raise ValueError(f"stream must be 'video' or 'image', got {stream!r}")
        if min(short_side) < crop:
            raise ValueError(f"short side range {short_side} must be >= the crop {crop}")
        self.stream, self.crop, self.short_side, self.flip = stream, crop, tuple(short_side), flip
        self.jitter, self.mask_gen, self.resample = jitter, mask_gen, resample

    def __call__(self, pixels: np.ndarray) -> dict:
        if self.stream == "video":
            assert pixels.ndim == 5 and pixels.shape[0] == 1, f"one clip (1, T, H, W, 3) expected, got {pixels.shape}"
            x = frames_to_tensor(pixels[0])                                  # (T, 3, H, W) uint8
        else:
            x = frames_to_tensor(pixels[None])                               # (1, 3, H, W) uint8: T = 1
        size = short_side_size(*x.shape[-2:], _randint(*self.short_side))
        x = resize(x, size, "bicubic")                                       # (T, 3, h', w') uint8
        if self.jitter > 0:                        # the whole frame (contrast: its mean grey), back to 8 bits
            x = to_uint8(color_jitter(to_float(x), self.jitter, self.jitter, self.jitter))   # (T, 3, h', w')
        top, left = random_crop_box(*size, self.crop)
        x = x[..., top:top + self.crop, left:left + self.crop]               # (T, 3, crop, crop) uint8 view
        if _uniform(0, 1) < self.flip:
            x = hflip(x)                                                     # flipped while still 1 byte/px
        tok = half_copy(to_float(x), self.resample)                          # (T, 3, crop/2, crop/2) in [0, 1]
        # Both ship as uint8 and are normalised on the training device (normalize_batch).
        x = x.transpose(0, 1).contiguous()                                   # (3, T, crop, crop) uint8
        tok = to_uint8(tok).transpose(0, 1).contiguous()                     # (3, T, crop/2, crop/2) uint8
        if self.stream == "image":
            x, tok = x[:, 0], tok[:, 0]                                      # (3, crop, crop), (3, crop/2, crop/2)
        out = {self.stream: x, f"{self.stream}_tok": tok}
        if self.mask_gen is not None:                  # video (T/2, h, w), (T, h, w); image (h, w), (h, w)
            inp, tgt = self.mask_gen()
            out[f"{self.stream}_mask"], out[f"{self.stream}_target"] = torch.from_numpy(inp), torch.from_numpy(tgt)
        return out


class PretrainClipTransform(PretrainTransform):
    """The released video_train_pipeline: frames (1, T, H, W, 3) -> the video keys; no colour jitter."""

    def __init__(self, crop: int = CROP, short_side=RESCALE_RANGE, flip: float = FLIP_P,
                 mask_gen: Optional[MaskGenerator] = None, resample: str = "pil"):
        super().__init__("video", crop, short_side, flip, 0.0, mask_gen, resample)


class PretrainImageTransform(PretrainTransform):
    """The released image_train_pipeline: an image (H, W, 3) -> the image keys; colour jitter 0.4."""

    def __init__(self, crop: int = CROP, short_side=RESCALE_RANGE, flip: float = FLIP_P, jitter: float = JITTER,
                 mask_gen: Optional[MaskGenerator] = None, resample: str = "pil"):
        super().__init__("image", crop, short_side, flip, jitter, mask_gen, resample)


# -----------------------------------------------------------------------------
# Masks and robustness: the data sets around the transforms
#
# Every random choice of a sample (frames, rescale, crop, flip, jitter, its
# masks) is drawn from streams keyed by (seed, epoch, row index); a file that
# cannot be decoded is replaced by another sample (`_RobustDataset`).

# How many replacement samples to try before deciding the data set itself
# (not one file) is broken. Not a paper number.
MAX_REPLACEMENTS = 50


class AllBadMedia(ValueError):
    """Every file tried in a row was bad: the list or the root is wrong, not one file."""


class _RobustDataset(Dataset):
    """Shared by the video and image sets: per-sample randomness, and bad files replaced.

    Randomness: sample `index` of epoch `epoch` draws every random choice
    (frame offsets, rescale, crop, flip, jitter: torch's CPU generator; its
    masks: the transform's MaskGenerators) from streams keyed by (seed, epoch,
    index) alone (masking.sample_seed), never from a stream of the rank or the
    DataLoader worker. A sample is therefore the same whichever process and
    whichever batch position draws it, which lets train.py re-shard a run over
    another number of processes. `seed` and `epoch` are set by EpochLoader.
    torch's generator is forked around the sample, so a loader without workers
    leaves the trainer's own torch stream (dropout, drop path) untouched.

    Bad files: a file that raises BadMedia while decoding is replaced by the
    next row of a replacement sequence drawn from (seed, epoch, index) (up to
    MAX_REPLACEMENTS tries); the sample records every failure in `skipped`
    ("path<TAB>reason" lines), which EpochLoader logs once per path in the
    main process and counts per epoch. A row known to be bad (in this process)
    is not decoded again, but still counted when visited; since the sequence
    and each try's key do not depend on what this process already knows, the
    replacement is the same in every process. Only decoding is guarded: an
    error in a transform is a bug and propagates.

    `samples` is a SampleList (compact, shared by forked workers); the
    known-bad rows are one flag per row (a bool array, 1.3 MB at ImageNet
    size) plus the reasons of the first KEPT_REASONS of them, so this cache
    stays bounded whatever the data set.
    """

    KEPT_REASONS = 1000

    def __init__(self, samples: SampleList):
        self.samples = samples
        self.seed, self.epoch = 0, 0                             # the key of the samples' streams (EpochLoader)
        self._mask_gens = None                                   # the transform's MaskGenerators, found on first use
        self._bad = np.zeros(len(samples), np.bool_)             # row -> known bad, this process
        self._reasons: dict[int, str] = {}                       # row -> why, for the first KEPT_REASONS

    def __len__(self):
        return len(self.samples)

    def load(self, index: int) -> dict:
        raise NotImplementedError

    @contextlib.contextmanager
    def _sample_streams(self, seed: int, epoch: int, index: int, attempt: int):
        """Within: torch's CPU generator and the masks draw from the streams of (seed, epoch, index, attempt)."""
        if self._mask_gens is None:
            self._mask_gens = find_mask_generators(getattr(self, "transform", None))
        with torch.random.fork_rng(devices=[]):                  # restores the caller's CPU stream after
            # Only the CPU generator (torch.manual_seed would also reseed the GPUs, the trainer's).
            torch.default_generator.manual_seed(sample_seed(seed, KEY_PIXELS, epoch, index, attempt))
            for g in self._mask_gens:
                g.reseed_sample(epoch, index, attempt)
            yield

    def __getitem__(self, key) -> dict:
        """key: (index, seed, epoch) as EpochLoader sends it, or a row index alone (the dataset's
        own `seed` and `epoch`, for direct use)."""
        index, seed, epoch = key if isinstance(key, tuple) else (key, self.seed, self.epoch)
        skipped = []
        i, replacements = index, None
        for attempt in range(MAX_REPLACEMENTS):
            if not self._bad[i]:
                try:
                    with self._sample_streams(seed, epoch, index, attempt):
                        out = self.load(i)
                    break
                except BadMedia as e:
                    self._bad[i] = True
                    if len(self._reasons) < self.KEPT_REASONS:
                        self._reasons[i] = e.reason
            skipped.append(f"{self.samples.path(i)}\t{self._reasons.get(i, 'known bad (reason not kept)')}")
            if replacements is None:                             # drawn only once a file has failed
                rng = np.random.default_rng(sample_seed(seed, KEY_REPLACE, epoch, index))
                replacements = rng.integers(len(self.samples), size=MAX_REPLACEMENTS)
            i = int(replacements[attempt])
        else:
            first = "; ".join(line.replace("\t", " (", 1) + ")" for line in skipped[:3])
            raise AllBadMedia(f"{MAX_REPLACEMENTS} files in a row could not be decoded, e.g. {first}; "
                              f"are the list and the root right?")
        out["label"] = self.samples.label(i)
        out["index"] = i
        out["skipped"] = "\n".join(skipped)
        return out


class VideoDataset(_RobustDataset):
    """Clips from an annotation list (`relative/path.mp4 label`) under `root`.

    sampling: which frames (FrameSampling); transform: decoded frames
    (clips, T, H, W, 3) uint8 -> dict. Frame counts are cached per process in
    one int32 per row (0 = not counted yet; a video without frames is bad).
    """

    def __init__(self, ann_file: PathLike, root: PathLike, sampling: FrameSampling, transform: Callable,
                 decode_threads: int = 1):
        super().__init__(read_annotations(ann_file, root))
        self.sampling, self.transform, self.decode_threads = sampling, transform, decode_threads
        self._num_frames = np.zeros(len(self.samples), np.int32)

    def load(self, index: int) -> dict:
        path = self.samples.path(index)
        known = int(self._num_frames[index]) or None
        frames, _, n = read_video(path, self.sampling, self.decode_threads, known)
        self._num_frames[index] = n                          # no re-count later in this process
        return self.transform(frames)                        # frames (clips, T, H, W, 3)

    def __repr__(self):
        return f"VideoDataset({len(self)} videos, {self.sampling}, decode_threads={self.decode_threads})"


class ImageDataset(_RobustDataset):
    """Images from an ImageNet-style folder tree (root/<class>/<image>) or a list file under root.

    `classes`: the class folder names, from the scan (or from the header of a
    list file that list_image_folder_once wrote); None for other list files.
    """

    def __init__(self, root: PathLike, ann_file: Optional[PathLike] = None, transform: Callable = None,
                 min_short: Optional[int] = None):
        if ann_file is not None:
            samples = read_annotations(ann_file, root)
            self.classes = (_list_header(ann_file) or {}).get("classes")
        else:
            samples, self.classes = scan_image_folder(root)
        super().__init__(samples)
        self.transform, self.min_short = transform, min_short

    def load(self, index: int) -> dict:
        return self.transform(read_image(self.samples.path(index), self.min_short))

    def __repr__(self):
        return f"ImageDataset({len(self)} images)"


# -----------------------------------------------------------------------------
# Loaders: global batches for training, DistributedSampler shards for evaluation
#
# Training is defined by the seed and the global batch, not by the process
# count: the order of an epoch's samples and which of them form global step s
# are drawn once for all processes (GlobalBatchSampler), each process computes
# its share of every global batch as micro-batches, and every random choice of
# a sample is keyed by (seed, epoch, index) (_RobustDataset). Running the same
# global batch on another number of processes therefore changes only who
# computes which part of it (train.py resumes a run that way).

_LOGGED_BAD: set = set()          # paths already logged by this process ("logged once")


class GlobalBatchSampler(torch.utils.data.Sampler):
    """The row indices of one process's micro-batches, cut from global batches.

    Epoch e: a permutation of the n rows drawn from (seed, epoch) alone
    (masking.sample_seed; the identity when shuffle=False). The epoch holds
    `steps` = n // G global batches of G = world x accum x batch rows; global
    step s of the epoch is perm[s*G : (s+1)*G], and the n - steps*G rows left
    over wait for another epoch's order (a step never spans two epochs).
    Process r takes the contiguous rows [r*accum*batch, (r+1)*accum*batch) of
    every global batch, as `accum` micro-batches of `batch` rows:

        one global batch (G = 8 rows, batch 2):  | 0 1 | 2 3 | 4 5 | 6 7 |
        world 2, accum 2:                          r0 m0 r0 m1 r1 m0 r1 m1
        world 1, accum 4:                          m0    m1    m2    m3

    so with the same global and per-process batch, the micro-batches are the
    same rows on any number of processes. set_epoch(e, start) begins at global
    step `start` of epoch e, without drawing the skipped samples.
    """

    def __init__(self, n: int, batch: int, accum: int = 1, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if not (0 <= rank < world and batch >= 1 and accum >= 1):
            raise ValueError(f"expected 0 <= rank < world, batch >= 1 and accum >= 1, got rank {rank}, world "
                             f"{world}, batch {batch}, accum {accum}")
        self.n, self.batch, self.accum, self.rank, self.world = n, batch, accum, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = world * accum * batch
        self.steps = n // self.global_batch                     # global batches per epoch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.steps:
            raise ValueError(f"start step {start} outside the epoch's {self.steps} steps")
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> torch.Tensor:
        """(n,) int64: the rows of epoch `epoch` in the order the global batches take them."""
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(sample_seed(self.seed, KEY_ORDER, epoch))
        return torch.randperm(self.n, generator=g)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum             # micro-batches still to come this epoch

    def __iter__(self):
        perm = self.order(self.epoch)
        share = self.accum * self.batch                           # rows of one process per global batch
        for s in range(self.start, self.steps):
            first = s * self.global_batch + self.rank * share
            rows = perm[first:first + share].view(self.accum, self.batch)     # (accum, batch)
            for m in range(self.accum):
                yield rows[m].tolist()


class _KeyedBatches(Sampler):
    """A batch sampler's batches of row indices -> batches of sample keys (index, seed, epoch).
    EpochLoader.set_epoch sets `epoch` (no reference back to the loader: no cycle keeps a
    finished loader, and its worker processes, alive)."""

    def __init__(self, batches, seed: int):
        self.batches, self.seed, self.epoch = batches, seed, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        seed, epoch = self.seed, self.epoch
        for batch in self.batches:
            yield [(i, seed, epoch) for i in batch]


class EpochLoader:
    """A DataLoader with `set_epoch`, yielding dicts.

    Training (drop_last=True): the micro-batches of this process's share of
    every global batch (GlobalBatchSampler: `accum` micro-batches of
    `batch_size` per global step, `steps_per_epoch` steps per epoch); `len()`
    is the micro-batches of a whole epoch. set_epoch(e, start) also sets
    `dataset.epoch = e` and `dataset.seed`, which key every sample's random
    choices, so an epoch's batches are a function of (seed, epoch) and the
    global batch, not of the rank, the workers or the trainer's RNG use.
    Evaluation (drop_last=False): DistributedSampler shards, which keep every
    sample (the last shard is padded with repeats; drop them by `index`).
    Each batch's `skipped` entries are logged once per path and counted;
    `skipped` (this epoch) and `skipped_total` hold the counts, and with
    `report=True` the end of every epoch prints them (rank 0).
    """

    def __init__(self, dataset: _RobustDataset, batch_size: int, *, shuffle: bool, drop_last: bool,
                 num_workers: int, rank: int = 0, world_size: int = 1, seed: int = 0, name: str = "data",
                 verbose: Optional[bool] = None, report: bool = True, accum: int = 1):
        self.dataset, self.name, self.rank, self.seed = dataset, name, rank, seed
        self.verbose = (rank == 0) if verbose is None else verbose
        self.report = report
        if drop_last:
            self.sampler = GlobalBatchSampler(len(dataset), batch_size, accum, rank, world_size, seed, shuffle)
            if self.sampler.steps == 0:
                raise ValueError(f"{name}: {len(dataset)} samples give no global batch of {self.sampler.global_batch} "
                                 f"({world_size} process(es) x {batch_size} x accumulation {accum}); use a smaller "
                                 f"batch or more data")
            batches = self.sampler
        else:
            self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                              seed=seed, drop_last=False)
            batches = BatchSampler(self.sampler, batch_size, drop_last=False)
            if len(batches) == 0:
                raise ValueError(f"{name}: {len(dataset)} samples give no batch of {batch_size} per rank over "
                                 f"{world_size} rank(s); use a smaller batch or more data")
        # Workers live as long as the loader (persistent): restarting them every
        # epoch cost ~1 s each time on the CPU demo. They keep their own copy of
        # the dataset, so each index travels with its key (index, seed, epoch).
        self.keys = _KeyedBatches(batches, seed)
        self.loader = DataLoader(dataset, batch_sampler=self.keys, num_workers=num_workers,
                                 pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
        self.skipped, self.skipped_total = 0, 0
        self.set_epoch(0)

    @property
    def steps_per_epoch(self) -> int:
        """Global steps (optimizer steps) per epoch of a training loader."""
        return self.sampler.steps

    def __len__(self):
        if isinstance(self.sampler, GlobalBatchSampler):
            return self.sampler.steps * self.sampler.accum       # a whole epoch, whatever set_epoch's start
        return len(self.loader)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch `epoch`, from its global step `start` (training loaders; evaluation: start 0)."""
        self.epoch = epoch
        if isinstance(self.sampler, GlobalBatchSampler):
            self.sampler.set_epoch(epoch, start)
        elif start:
            raise ValueError("an evaluation loader (drop_last=False) starts its epochs at 0")
        else:
            self.sampler.set_epoch(epoch)
        self.keys.epoch = epoch                                      # what every index of the epoch carries
        self.dataset.seed, self.dataset.epoch = self.seed, epoch    # for direct indexing; batches carry their keys
        # The workers' own seeds come from this generator when an epoch's iterator starts.
        # Nothing in a sample draws from them any more (see _RobustDataset), but a generator
        # of its own keeps the DataLoader from drawing them from the trainer's torch stream.
        self.loader.generator = torch.Generator().manual_seed(derive_seed(self.seed, rank=self.rank, epoch=epoch))

    def note_skipped(self, skipped) -> None:
        """Log (once per path) and count the failures a batch carries."""
        for entry in skipped or ():
            for line in entry.split("\n") if entry else ():
                path, _, reason = line.partition("\t")
                self.skipped += 1
                self.skipped_total += 1
                if path not in _LOGGED_BAD:
                    _LOGGED_BAD.add(path)
                    logger.warning("skipped unreadable file %s (%s); replaced by another sample", path, reason)

    def __iter__(self):
        self.skipped = 0
        try:
            for batch in self.loader:
                self.note_skipped(batch.pop("skipped", None))
                yield batch
        except AllBadMedia as e:
            # From a worker, the message carries the worker's traceback; keep its last line.
            raise AllBadMedia(str(e).strip().splitlines()[-1].split("AllBadMedia: ")[-1]) from None
        if self.report and self.verbose:
            print(f"[data] {self.name} epoch {self.epoch}: {self.skipped} unreadable file(s) skipped "
                  f"({self.skipped_total} in total)", flush=True)


class JointLoader:
    """The joint stage (BEVT, §3 + paper §4.1): every video batch comes with an image batch.

    One epoch = one pass over the videos, in global steps; every micro-batch
    of videos is paired with the next micro-batch of images (both loaders cut
    their global batches with the same world and accumulation). The image
    stream cycles on its own, in its own global steps: at video step s of
    epoch e it is at image epoch e*P + s // S, step s % S, with S image steps
    per image epoch and P = ceil(video steps / S). Every video epoch thus sees
    fresh image orders, and a resume (set_epoch(e, start)) finds its place in
    both streams without replaying them. Yields one dict: the video keys, the
    image keys, and video_label/video_index/image_label/image_index.

    Differs from the released code: its MultiSourceRunner also pairs each K400
    batch with the next batch of a cycled ImageNet loader (RepeatDataset x5),
    but restarts that cycle every epoch with the sampler at the video epoch,
    so repeated image passes within an epoch reuse one order; here every pass
    has its own epoch number.
    """

    def __init__(self, videos: EpochLoader, images: EpochLoader):
        self.videos, self.images = videos, images
        self.videos.report = self.images.report = False              # reported here, per video epoch
        self.passes = math.ceil(videos.steps_per_epoch / images.steps_per_epoch)
        self.epoch, self.start = 0, 0

    def __len__(self):
        return len(self.videos)

    @property
    def steps_per_epoch(self) -> int:
        return self.videos.steps_per_epoch

    @property
    def skipped_total(self) -> int:
        """Unreadable files met over the whole run, videos and images."""
        return self.videos.skipped_total + self.images.skipped_total

    def image_position(self, epoch: int, step: int) -> tuple[int, int]:
        """(image epoch, image step) paired with video step `step` of video epoch `epoch`."""
        per = self.images.steps_per_epoch
        return epoch * self.passes + step // per, step % per

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.videos.set_epoch(epoch, start)
        self.images.set_epoch(*self.image_position(epoch, start))

    @staticmethod
    def _prefixed(batch: dict, prefix: str) -> dict:
        return {(f"{prefix}_{k}" if k in ("label", "index") else k): v for k, v in batch.items()}

    def __iter__(self):
        img_epoch, img_start = self.image_position(self.epoch, self.start)
        self.images.set_epoch(img_epoch, img_start)
        images = iter(self.images)
        skipped_images = 0
        for vb in self.videos:
            try:
                ib = next(images)
            except StopIteration:                                     # images exhausted: next image epoch
                skipped_images += self.images.skipped
                img_epoch += 1
                self.images.set_epoch(img_epoch)
                images = iter(self.images)
                ib = next(images)
            yield {**self._prefixed(vb, "video"), **self._prefixed(ib, "image")}
        skipped_images += self.images.skipped
        self.skipped = self.videos.skipped + skipped_images
        if self.videos.verbose:
            print(f"[data] joint epoch {self.epoch}: {self.videos.skipped} unreadable video(s) and "
                  f"{skipped_images} image(s) skipped", flush=True)


def auto_decode_threads(num_workers: int, local_world_size: Optional[int] = None) -> int:
    """PyAV decoder threads per loading process: the node's cores shared by every process that decodes.

    Under torchrun, LOCAL_WORLD_SIZE ranks share the node and each runs
    `num_workers` DataLoader workers (the joint stage: that many for videos and
    as many for images), so each worker gets cores / (ranks x workers), at least 1.
    """
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, (os.cpu_count() or 1) // (max(1, local_world_size) * max(1, num_workers)))


def loading_plan(num_workers: int, threads: int, streams: int = 1, local_world_size: Optional[int] = None) -> str:
    """One line on how the node's cores are spent on data loading (printed at start)."""
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    procs = local_world_size * max(1, num_workers) * streams
    return (f"data loading: {local_world_size} rank(s) on this node x {streams} loader(s) x {num_workers} "
            f"worker(s) = {procs} loading process(es), {threads} decoder thread(s) each, on {os.cpu_count()} cores")


# -----------------------------------------------------------------------------
# The pretraining data config and loader (train.py)


@dataclass
class PretrainDataConfig:
    """Pretraining data (paper §4.1). Defaults are the paper's; the CPU demo shrinks them
    (e.g. frames=8, crop=112, short_side=(128, 160))."""
    frames: int = PRETRAIN_FRAMES              # §4.1: 16-frame clips
    interval: int = PRETRAIN_INTERVAL          # released SampleFrames(frame_interval=8)
    crop: int = CROP                           # 224 px
    short_side: tuple = RESCALE_RANGE          # RandomRescale(256, 320)
    flip: float = FLIP_P                       # Flip(0.5)
    jitter: float = JITTER                     # images only: brightness/contrast/saturation 0.4
    video_mask: str = "tube"                   # §3 MVM: tube masking (Table 8 ablations: masking.STRATEGIES)
    mask_ratio: float = MASK_RATIO             # §3: 0.5 per masked frame (masking.py)
    video_batch: int = VIDEO_BATCH             # per GPU: 8 clips ...
    image_batch: int = IMAGE_BATCH             # ... + 64 images (omni_videos_per_gpu=[8, 64])
    num_workers: int = WORKERS                 # per rank
    decode_threads: Optional[int] = None       # None: cores // workers (auto_decode_threads)
    tok_resample: str = "pil"                  # tokenizer copy: "pil" (BEiT) or "cv2" (released CopyResize)
    seed: int = 0                              # base of the mask streams and of the sampler shuffle


def build_pretrain_loader(stage: str, cfg: PretrainDataConfig, *, video_ann: Optional[PathLike] = None,
                          video_root: Optional[PathLike] = None, image_root: Optional[PathLike] = None,
                          image_ann: Optional[PathLike] = None, rank: int = 0, world_size: int = 1,
                          accum: int = 1, verbose: Optional[bool] = None) -> Union[EpochLoader, JointLoader]:
    """The training loader of a pretraining stage: "image" (BEVT-I), "video" (BEVT-V) or "joint" (BEVT).

    Videos: `video_ann` list under `video_root`; images: the folder tree
    `image_root` or the list `image_ann` under it. Returns an object with
    set_epoch(epoch, start_step), len(), steps_per_epoch and iteration over
    batch dicts (module docstring): this process's `accum` micro-batches of
    every global batch of world_size x accum x batch samples.
    Seeds (orders, pixels, masks): images cfg.seed, clips cfg.seed + 1 (distinct streams).
    """
    if stage not in ("image", "video", "joint"):
        raise ValueError(f"stage must be image, video or joint, got {stage!r}")
    streams = 2 if stage == "joint" else 1                        # the joint stage runs two loaders
    threads = cfg.decode_threads or auto_decode_threads(cfg.num_workers * streams)
    if verbose or (verbose is None and rank == 0):
        print(loading_plan(cfg.num_workers, threads, streams), flush=True)
    common = dict(shuffle=True, drop_last=True, num_workers=cfg.num_workers, rank=rank,
                  world_size=world_size, accum=accum, verbose=verbose)
    videos = images = None
    if stage in ("video", "joint"):
        if video_ann is None or video_root is None:
            raise ValueError(f"stage {stage!r} needs video_ann and video_root")
        gen = MaskGenerator(cfg.video_mask, (cfg.frames, cfg.crop, cfg.crop), mask_ratio=cfg.mask_ratio,
                            seed=cfg.seed + 1)
        transform = PretrainClipTransform(cfg.crop, cfg.short_side, cfg.flip, gen, cfg.tok_resample)
        ds = VideoDataset(video_ann, video_root, FrameSampling(cfg.frames, cfg.interval), transform, threads)
        videos = EpochLoader(ds, cfg.video_batch, name="videos", seed=cfg.seed + 1, **common)
    if stage in ("image", "joint"):
        if image_root is None:
            raise ValueError(f"stage {stage!r} needs image_root (a folder tree, or the root of image_ann)")
        gen = MaskGenerator("block", (cfg.crop, cfg.crop), mask_ratio=cfg.mask_ratio, seed=cfg.seed)
        transform = PretrainImageTransform(cfg.crop, cfg.short_side, cfg.flip, cfg.jitter, gen, cfg.tok_resample)
        ds = ImageDataset(image_root, image_ann, transform, min_short=max(cfg.short_side))
        images = EpochLoader(ds, cfg.image_batch, name="images", seed=cfg.seed, **common)
    if stage == "joint":
        return JointLoader(videos, images)
    return videos if stage == "video" else images


# -----------------------------------------------------------------------------
# Finetuning (paper §4.1-4.2)
#
# Finetuning reuses the pretraining path's lists, frame sampling, decoding,
# data sets and loaders. What only its recipes use follows: the evaluation
# crops, random-resized-crop, random erasing and RandAugment (SSv2), the clip
# transform, its config and loader. Which recipe turns on what (K400, SSv2,
# Diving48) is finetune.py's RECIPES; FinetuneDataConfig's defaults are K400's.

# The released finetune configs' numbers (paper §4.1-4.2).
K400_FRAMES, K400_INTERVAL = 32, 2     # SampleFrames(clip_len=32, frame_interval=2)
FINETUNE_SHORT_SIDE = 256              # train/val: Resize(scale=(-1, 256))
TEST_SHORT_SIDE = 224                  # test: Resize(scale=(-1, 224)) + ThreeCrop(224)
K400_TEST_CLIPS = 4                    # paper §4.1-4.2: 4 clips x 3 crops (K400; SSv2 1 x 3)
TEST_CROPS = 3
RRC_SCALE = (0.08, 1.0)                # RandomResizedCrop defaults: area_range
RRC_RATIO = (3 / 4, 4 / 3)             # aspect_ratio_range (w/h)
RRC_ATTEMPTS = 10                      # get_crop_bbox(max_attempts=10), then a centre crop
RANDAUG_N, RANDAUG_M = 4, 7            # SSv2: Imgaug RandAugment(n=4, m=7)
RANDAUG_M_MAX = 30                     # imgaug's RandAugment magnitude scale [0 .. 30]
RANDAUG_FILL = 128                     # imgaug RandAugment cval
ERASE_P = 0.25                         # SSv2: RandomErasing(probability=0.25) (timm)
ERASE_AREA = (0.02, 1 / 3)             # timm RandomErasing min_area, max_area
ERASE_ASPECT = 0.3                     # timm min_aspect; log-uniform in [0.3, 1/0.3]
FINETUNE_BATCH = 8                     # videos_per_gpu=8
EVAL_BATCH = 1                         # val/test videos_per_gpu=1


def center_crop_box(h: int, w: int, size: int) -> tuple[int, int]:
    return (h - size) // 2, (w - size) // 2


def three_crop_boxes(h: int, w: int, size: int) -> list[tuple[int, int]]:
    """Three size x size windows along the long side: start, end, middle (released ThreeCrop order)."""
    if min(h, w) != size:
        raise ValueError(f"three-crop needs the short side resized to the crop size {size}, got {h}x{w}")
    if w >= h:
        step = (w - size) // 2
        return [(0, 0), (0, 2 * step), (0, step)]               # left, right, middle
    step = (h - size) // 2
    return [(0, 0), (2 * step, 0), (step, 0)]                   # top, bottom, middle


def random_resized_crop_box(h: int, w: int, scale=RRC_SCALE, ratio=RRC_RATIO) -> tuple[int, int, int, int]:
    """(top, left, ch, cw): area in `scale` x h*w, aspect cw/ch log-uniform in `ratio`.

    The released get_crop_bbox: 10 candidates, the first that fits wins,
    else the centred square of the short side.
    """
    area = h * w
    for _ in range(RRC_ATTEMPTS):
        target = _uniform(*scale) * area
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < ch <= h and 0 < cw <= w:
            return _randint(0, h - ch), _randint(0, w - cw), ch, cw
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s, s


def random_erasing(x: torch.Tensor, p: float = ERASE_P, area=ERASE_AREA, min_aspect: float = ERASE_ASPECT):
    """timm RandomErasing(mode='const'): with probability p one rectangle set to 0 in every frame.

    x: (..., H, W) *normalised* (it runs after Normalize, so 0 is the mean
    colour), e.g. a clip (3, T, H, W). The released wrapper replays one RNG state per frame, so all
    frames of a clip lose the same rectangle; here it is drawn once.
    """
    if p <= 0 or _uniform(0, 1) >= p:
        return x
    h, w = x.shape[-2:]
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)
    for _ in range(10):                                          # timm: 10 attempts
        target = _uniform(*area) * h * w
        aspect = math.exp(_uniform(log_lo, log_hi))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if ew < w and eh < h:
            top, left = _randint(0, h - eh), _randint(0, w - ew)
            x = x.clone()
            x[..., top:top + eh, left:left + ew] = 0.0
            break
    return x


# ---- RandAugment (SSv2 finetuning): imgaug's iaa.RandAugment(n, m) on tensors

# Greyscale weights of RandAugment's enhance ops: PIL's ("L" conversion, ITU-R 601-2).
_GREY_PIL = (0.299, 0.587, 0.114)


def _conv_same(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 2D filter of (N, 3, H, W) with edge replication (PIL filters keep the border)."""
    k = kernel.shape[-1]
    weight = kernel.to(x.dtype).expand(3, 1, k, k)
    return F.conv2d(F.pad(x, (k // 2,) * 4, mode="replicate"), weight, groups=3)


_SMOOTH = torch.tensor([[1., 1, 1], [1, 5, 1], [1, 1, 1]]) / 13             # PIL ImageFilter.SMOOTH
_BLUR = torch.tensor([[1., 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1],
                      [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]) / 16               # PIL ImageFilter.BLUR


def _affine(x: torch.Tensor, m: torch.Tensor, fill: float) -> torch.Tensor:
    """Warp (N, 3, H, W) with m: 2x3 map from output to input pixel coordinates; outside -> fill."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    src_x = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]               # (H, W) input x of every output pixel
    src_y = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    grid = torch.stack([(2 * src_x + 1) / w - 1, (2 * src_y + 1) / h - 1], -1)   # align_corners=False
    grid = grid.expand(n, h, w, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    inside = F.grid_sample(torch.ones_like(x[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return out + fill * (1 - inside)                           # blend the fill in where samples fell outside


class RandAugment:
    """imgaug's `iaa.RandAugment(n, m)` as the released SSv2 config runs it, on tensors.

    Same ops and magnitudes (m on imgaug's [0, 30] scale): a random crop of up
    to m/224 of each side resized back, then `n` distinct ops in random order
    from: identity, autocontrast, equalize, invert, rotate +-m deg, posterize
    to 8 - int(6m/30) bits, solarize above 256 - int(256m/30), colour /
    contrast / brightness / sharpness factor 1 +- 0.9m/30, shear x/y +-m/30 *
    0.3 rad, translate x/y +-0.33m/30 of the size, one square cutout of
    (20/32)m/30 of the height, PIL's BLUR and SMOOTH filters. Affine ops fill
    with grey 128 and sample bilinearly. The released Imgaug wrapper freezes
    one draw (`to_deterministic`) for all frames of a clip; here one draw is
    applied to the whole (T, 3, H, W) tensor. Statistics-based ops
    (autocontrast, equalize, contrast) use each frame's own statistics, as
    imgaug applied per frame does.

    Differs from the released code: imgaug's RandAugment also flips
    horizontally with p = 0.5 before the ops, although the SSv2 config sets
    Flip(flip_ratio=0) because left/right matters there ("pushing something
    from left to right"). That flip is off here (`flip=False`); pass
    flip=True to reproduce the released behaviour.
    """

    OPS = ("identity", "autocontrast", "equalize", "invert", "rotate", "posterize", "solarize", "color",
           "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
           "cutout", "blur", "smooth")
    # imgaug's maxima (reached at m = 30), from iaa.RandAugment._create_*_augmenters_list:
    CROP_PX = 224              # initial crop: Uniform(0, m)/224 of each side
    ROTATE_DEG = 30            # rotate: +-30 degrees
    POSTERIZE_BITS = 6         # posterize: drop up to 6 of the 8 bits
    SOLARIZE = 256             # solarize threshold 256 - int(256 * m/30)
    ENHANCE = 0.9              # colour/contrast/brightness/sharpness factor 1 +- 0.9, clipped to [0.1, 1.9]
    SHEAR_RAD = 0.3            # shear: +-0.3 rad
    TRANSLATE = 0.33           # translate: +-0.33 of the size
    CUTOUT = 20 / 32           # cutout side: up to 20/32 of the image

    def __init__(self, n: int = RANDAUG_N, m: int = RANDAUG_M, fill: int = RANDAUG_FILL, flip: bool = False):
        if not 0 <= n <= len(self.OPS):
            raise ValueError(f"RandAugment n must be in [0, {len(self.OPS)}], got {n}")
        self.n, self.m, self.fill, self.flip = n, m, fill / 255.0, flip
        self.level = m / RANDAUG_M_MAX                          # magnitude as a fraction of imgaug's max

    def __repr__(self):
        return f"RandAugment(n={self.n}, m={self.m}, flip={self.flip})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(T, 3, H, W) floats in [0, 1] -> same shape, one random draw for all T frames."""
        h, w = x.shape[-2:]
        if self.flip and _uniform(0, 1) < 0.5:
            x = hflip(x)
        # imgaug: Crop(percent=Uniform(0, m)/224 per side) + KeepSizeByResize(linear).
        t, b, l, r = (int(round(_uniform(0, self.m) / self.CROP_PX * s)) for s in (h, h, w, w))
        if t + b < h and l + r < w and (t or b or l or r):
            x = F.interpolate(x[..., t:h - b, l:w - r], size=(h, w), mode="bilinear", align_corners=False)
        for op in torch.randperm(len(self.OPS))[:self.n].tolist():   # SomeOf(n, random_order=True)
            x = self.apply(self.OPS[op], x).clamp(0.0, 1.0)
        return x

    def _sign(self) -> float:
        return 1.0 if _uniform(0, 1) < 0.5 else -1.0

    def apply(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One op on (T, 3, H, W) floats in [0, 1]."""
        lv, h, w = self.level, x.shape[-2], x.shape[-1]
        if name == "identity":
            return x
        if name == "autocontrast":                              # per frame and channel: min -> 0, max -> 1
            lo = x.amin(dim=(-2, -1), keepdim=True)
            hi = x.amax(dim=(-2, -1), keepdim=True)
            return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
        if name == "equalize":
            return _equalize(x)
        if name == "invert":
            return 1.0 - x
        if name == "posterize":                                 # keep the top 8 - int(6*lv) bits
            bits = 8 - min(int(self.POSTERIZE_BITS * lv), self.POSTERIZE_BITS)
            q = (x * 255).round().to(torch.uint8) & (0xFF << (8 - bits) & 0xFF)
            return q.float() / 255
        if name == "solarize":                                  # invert values >= threshold (0-255 scale)
            thr = max(0, min(256, self.SOLARIZE - int(self.SOLARIZE * lv))) / 255.0
            return torch.where(x >= thr, 1.0 - x, x)
        if name in ("color", "contrast", "brightness", "sharpness"):
            f = min(max(1.0 + self._sign() * self.ENHANCE * lv, 0.1), 1.9)   # 1 +- 0.9*m/30, clipped
            if name == "color":
                degenerate = _grey(x, _GREY_PIL).expand_as(x)
            elif name == "contrast":                            # PIL: mean of the grey image, per frame
                degenerate = _grey(x, _GREY_PIL).mean(dim=(-3, -2, -1), keepdim=True).expand_as(x)
            elif name == "brightness":
                degenerate = torch.zeros_like(x)
            else:
                degenerate = _conv_same(x, _SMOOTH)
            return degenerate + f * (x - degenerate)            # PIL ImageEnhance blend
        if name == "rotate":                                    # about the centre, +-30*lv degrees
            a = math.radians(self._sign() * self.ROTATE_DEG * lv)
            cx, cy = (w - 1) / 2, (h - 1) / 2
            cos, sin = math.cos(a), math.sin(a)
            m = torch.tensor([[cos, -sin, cx - cos * cx + sin * cy], [sin, cos, cy - sin * cx - cos * cy]])
            return _affine(x, m, self.fill)
        if name in ("shear_x", "shear_y"):                      # about the top-left corner (imgaug center=(0, 0))
            s = math.tan(self._sign() * self.SHEAR_RAD * lv)    # shear angle +-0.3 rad * m/30
            m = torch.tensor([[1.0, s, 0.0], [0.0, 1.0, 0.0]]) if name == "shear_x" else \
                torch.tensor([[1.0, 0.0, 0.0], [s, 1.0, 0.0]])
            return _affine(x, m, self.fill)
        if name in ("translate_x", "translate_y"):              # +-0.33*lv of the width / height
            d = self._sign() * self.TRANSLATE * lv
            m = torch.tensor([[1.0, 0.0, d * w], [0.0, 1.0, 0.0]]) if name == "translate_x" else \
                torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, d * h]])
            return _affine(x, m, self.fill)
        if name == "cutout":                                    # one grey square, centre uniform over the image
            side = max(1, int(round(min(self.CUTOUT * lv, self.CUTOUT) * h)))
            cy, cx = _uniform(0, h), _uniform(0, w)
            t, l = max(0, int(cy - side / 2)), max(0, int(cx - side / 2))
            x = x.clone()
            x[..., t:int(cy + side / 2), l:int(cx + side / 2)] = self.fill
            return x
        if name == "blur":
            return _conv_same(x, _BLUR)
        if name == "smooth":
            return _conv_same(x, _SMOOTH)
        raise ValueError(f"unknown RandAugment op {name!r}")


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageOps.equalize per frame and channel of (T, 3, H, W) floats in [0, 1]."""
    t, c, h, w = x.shape
    v = (x * 255).round().long().reshape(t * c, h * w)                       # (T*3, H*W) levels
    hist = torch.zeros(t * c, 256, dtype=torch.long).scatter_add_(1, v, torch.ones_like(v))
    # PIL: step = (pixels - count of the last non-empty level) // 255; identity if 0.
    last = 255 - torch.argmax((hist.flip(1) > 0).long(), dim=1)              # last non-empty level
    step = (h * w - hist.gather(1, last[:, None])[:, 0]) // 255              # (T*3,)
    cum = torch.cumsum(hist, 1) - hist                                        # pixels below each level
    lut = ((step[:, None] // 2 + cum) // step.clamp_min(1)[:, None]).clamp(max=255)
    lut = torch.where(step[:, None] > 0, lut, torch.arange(256).expand(t * c, 256))
    return (lut.gather(1, v).float() / 255).reshape(t, c, h, w)


# ---- The finetuning clip transform, config and loader (finetune.py)


class FinetuneClipTransform:
    """Finetuning clip transforms of the released K400 / SSv2 configs.

    mode "train": Resize(short 256) -> RandomResizedCrop -> Resize(224x224) ->
        Flip(p) -> [RandAugment(n, m)] -> Normalize -> [RandomErasing(p)]
    mode "val":   Resize(short 256) -> CenterCrop(224)          -> (3, T, 224, 224)
    mode "test":  Resize(short 224) -> ThreeCrop(224) (or 1 centre crop) per clip
                  -> (clips*crops, 3, T, 224, 224), crop-major as the released FormatShape

    Differs from the released code: training resizes once, from the decoded
    frame straight to 224 x 224 (the random-resized-crop box is drawn in the
    256-short-side frame and mapped back), instead of resizing to 256 and
    then resizing the crop; for 256-px Kinetics re-encodes both are the same.
    """

    def __init__(self, mode: str, crop: int = CROP, short_side: int = FINETUNE_SHORT_SIDE,
                 test_short_side: int = TEST_SHORT_SIDE, test_crops: int = TEST_CROPS,
                 rrc_scale=RRC_SCALE, rrc_ratio=RRC_RATIO, flip: float = FLIP_P,
                 randaug: Optional[RandAugment] = None, erase: float = 0.0):
        if mode not in ("train", "val", "test"):
            raise ValueError(f"mode must be train, val or test, got {mode!r}")
        if test_crops not in (1, 3):
            raise ValueError(f"test_crops must be 1 (centre) or 3 (three-crop), got {test_crops}")
        self.mode, self.crop, self.short_side, self.test_short_side = mode, crop, short_side, test_short_side
        self.test_crops, self.rrc_scale, self.rrc_ratio = test_crops, tuple(rrc_scale), tuple(rrc_ratio)
        self.flip, self.randaug, self.erase = flip, randaug, erase

    def __call__(self, frames: np.ndarray) -> dict:
        """frames (clips, T, H, W, 3) uint8 -> {"video": ...} (shapes in the class docstring)."""
        clips, T = frames.shape[:2]
        x = frames_to_tensor(frames.reshape(clips * T, *frames.shape[2:]))   # (clips*T, 3, H, W) uint8
        H, W = x.shape[-2:]
        c = self.crop
        if self.mode == "train":
            assert clips == 1, "training takes one clip"
            nh, nw = short_side_size(H, W, self.short_side)
            top, left, ch, cw = random_resized_crop_box(nh, nw, self.rrc_scale, self.rrc_ratio)
            sy, sx = H / nh, W / nw                                          # 256-short-side -> decoded pixels
            t0, l0 = int(round(top * sy)), int(round(left * sx))
            t1, l1 = max(t0 + 1, int(round((top + ch) * sy))), max(l0 + 1, int(round((left + cw) * sx)))
            x = resize(x[..., t0:t1, l0:l1], (c, c), "bilinear")             # (T, 3, c, c) uint8
            if _uniform(0, 1) < self.flip:
                x = hflip(x)
            x = to_float(x)
            if self.randaug is not None:
                x = self.randaug(x)
            x = normalize(x, channels_first=True)                            # (3, T, c, c)
            if self.erase > 0:
                x = random_erasing(x, self.erase)                            # same rectangle in every frame
            return {"video": x}
        if self.mode == "val":
            x = resize(x, short_side_size(H, W, self.short_side), "bilinear")
            top, left = center_crop_box(*x.shape[-2:], c)
            x = normalize(to_float(x[..., top:top + c, left:left + c]))     # (clips*T, 3, c, c)
            x = x.view(clips, T, 3, c, c).transpose(1, 2)                    # (clips, 3, T, c, c)
            return {"video": (x[0] if clips == 1 else x).contiguous()}
        # test: every clip x every crop
        x = resize(x, short_side_size(H, W, self.test_short_side), "bilinear")
        h, w = x.shape[-2:]
        boxes = three_crop_boxes(h, w, c) if self.test_crops == 3 else [center_crop_box(h, w, c)]
        views = [normalize(to_float(x[..., t:t + c, l:l + c])).view(clips, T, 3, c, c) for t, l in boxes]
        x = torch.cat(views).transpose(1, 2)                                 # (crops*clips, 3, T, c, c)
        return {"video": x.contiguous()}


@dataclass
class FinetuneDataConfig:
    """Finetuning data (paper §4.1-4.2). Defaults: the released K400 config; the recipes of every
    data set are finetune.py's RECIPES (finetune.data_config makes this config from them)."""
    sampling: str = "dense"                    # "dense" (K400) or "uniform" (SSv2 segments)
    frames: int = K400_FRAMES                  # 32 frames
    interval: int = K400_INTERVAL              # x 2 (dense only)
    crop: int = CROP
    short_side: int = FINETUNE_SHORT_SIDE      # train / val resize
    test_short_side: int = TEST_SHORT_SIDE     # test resize before ThreeCrop
    test_clips: int = K400_TEST_CLIPS          # K400: 4 clips x 3 crops
    test_crops: int = TEST_CROPS
    rrc_scale: tuple = RRC_SCALE
    rrc_ratio: tuple = RRC_RATIO
    flip: float = FLIP_P                       # K400 0.5; SSv2 0 (left/right matters)
    randaug_n: int = 0                         # 0 = off; SSv2: RandAugment(n=4, m=7)
    randaug_m: int = RANDAUG_M
    erase: float = 0.0                         # SSv2: random erasing 0.25
    batch_size: int = FINETUNE_BATCH           # per GPU, training
    eval_batch_size: int = EVAL_BATCH          # val / test
    num_workers: int = WORKERS
    decode_threads: Optional[int] = None
    seed: int = 0


def build_finetune_loader(mode: str, cfg: FinetuneDataConfig, *, ann: PathLike, root: PathLike,
                          rank: int = 0, world_size: int = 1, accum: int = 1,
                          verbose: Optional[bool] = None) -> EpochLoader:
    """Finetuning loader: "train" (shuffled global batches of world_size x accum x batch_size, this
    process's share as `accum` micro-batches each), "val" (1 centre clip) or "test" (clips x crops).

    val/test keep every sample (DistributedSampler pads the last shard with
    repeats; drop them by `index` for exact numbers).
    """
    if mode not in ("train", "val", "test"):
        raise ValueError(f"mode must be train, val or test, got {mode!r}")
    train = mode == "train"
    sampling = FrameSampling(cfg.frames, cfg.interval if cfg.sampling == "dense" else 1, cfg.sampling,
                             num_clips=cfg.test_clips if mode == "test" else 1, test_mode=not train)
    randaug = RandAugment(cfg.randaug_n, cfg.randaug_m) if (train and cfg.randaug_n > 0) else None
    transform = FinetuneClipTransform(mode, cfg.crop, cfg.short_side, cfg.test_short_side, cfg.test_crops,
                                      cfg.rrc_scale, cfg.rrc_ratio, cfg.flip, randaug, cfg.erase)
    threads = cfg.decode_threads or auto_decode_threads(cfg.num_workers)
    if train and (verbose or (verbose is None and rank == 0)):
        print(loading_plan(cfg.num_workers, threads), flush=True)
    ds = VideoDataset(ann, root, sampling, transform, threads)
    return EpochLoader(ds, cfg.batch_size if train else cfg.eval_batch_size, shuffle=train, drop_last=train,
                       num_workers=cfg.num_workers, rank=rank, world_size=world_size, seed=cfg.seed,
                       name=f"finetune-{mode}", verbose=verbose, accum=accum if train else 1)


# -----------------------------------------------------------------------------
# Table 2's temporal probes (paper §4.1-4.2): does a model need time?


def single_frame(video: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(..., 3, T, H, W) -> one random frame (per call) repeated T times."""
    T = video.shape[-3]
    t = int(torch.randint(T, (), generator=generator))
    return video[..., t:t + 1, :, :].expand_as(video).contiguous()


def shuffle_frames(video: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(..., 3, T, H, W) -> the frames in a random order (one permutation per call)."""
    perm = torch.randperm(video.shape[-3], generator=generator)
    return video[..., perm, :, :]


# =============================================================================
# Tools. The method ends above; below are the tools around it, one subcommand each:
#
#     lists    official annotations -> `relative/path label` list + class-name file
#              (Kinetics-400 CSV, Something-Something-v2 JSON, Diving48 JSON)
#     resize   a video tree -> the same tree at a given short side, H.264 mp4, video only
#              (PyAV decode + encode, parallel processes, resumable, failures listed)
#     check    a list -> the files that are missing, unreadable, or on the slow decoding
#              path, and the count against the official split size
#     make-synthetic
#              the synthetic data set (labels that need appearance vs labels that need time)
#
# The first three take a real data set from what the common downloaders leave
# on disk to what the loaders above read; the command line (`main`) is last.
#
# ---- Conventions: how the downloaders name the files, and what the lists say
#
# Kinetics-400. The annotations are the CSVs of the CVDF mirror
# (s3.amazonaws.com/kinetics/400/annotations/{train,val,test}.csv) or of
# ActivityNet's crawler, header `label,youtube_id,time_start,time_end,split`
# (older files add `is_cc`; an unlabelled test CSV has no `label`). Columns
# are found by their header names, in any order. ActivityNet's download.py (trim
# format `%06d`) and the CVDF tarballs name a clip
#     <youtube_id>_<time_start:06d>_<time_end:06d>.mp4      e.g. ---QUuC4vJs_000084_000094.mp4
# and put it in one of these folder layouts (--layout):
#     flat              <name>             the CVDF tarballs extracted (k400/train/<name>); mmaction2 "level 1"
#     class             <label>/<name>     ActivityNet download.py and CVDF arrange_by_classes.py (the label
#                                          as the CSV writes it, spaces kept)
#     class-underscore  <label_>/<name>    mmaction2's "level 2" lists (spaces in the label become '_')
# --prefix puts a folder in front of every path (e.g. `train/`). The classes are
# the sorted unique labels, sorted with spaces read as '_' (mmaction2's
# parse_kinetics_splits; the label_map_k400.txt order: 0 = abseiling, 399 =
# zumba). Validation and test lists must use the training classes, so the
# class file (--classes) is read back when it exists: make the training list first.
#
# Something-Something v2 (20BN). something-something-v2-{train,validation,test}.json
# are lists of {"id", "label", "template", "placeholders"} (the test file: ids
# only); something-something-v2-labels.json maps each template with its
# brackets removed ("Putting something on a surface") to the class index, a
# string. A video is `<id>.webm`, all in one folder. An entry's class is
# labels[template without '[' and ']'] (mmaction2's parse_sthv2_splits); the
# class file lists the templates in index order. VideoMAE and others convert
# the webm files to mp4 first (`resize` writes mp4): pass --ext .mp4 then.
#
# Diving48, V2 annotations. Diving48_V2_{train,test}.json are lists of
# {"vid_name", "label", "start_frame", "end_frame"} (start and end are not
# used: the whole clip is the sample); Diving48_vocab.json holds the 48 classes as 4 words
# each (take-off, somersaults, twists, flight position), joined by spaces as
# the class name. A video is `<vid_name>.mp4` in the folder `rgb/` of
# Diving48_rgb.tar.gz.
#
# An entry without a label (the K400 and SSv2 test files) is written with
# label -1, and the summary says how many.
#
# Official split sizes (rows of the annotation files; `check --official NAME`):
#     Kinetics-400  train 246,534  val 19,906  test 39,805   rows of the CVDF CSVs, as CVDF's
#                   arrange_by_classes.py counts them. Downloads hold fewer: CVDF has
#                   240,258 (+1,392 replacements) / 19,881 / 38,685 videos, and YouTube
#                   loses more every year. (Some write-ups give 246,535 / 19,907: one
#                   more each, what `wc -l` counts with the header line.)
#     SSv2          train 168,913  val 24,777  test 27,157   (220,847 videos in all)
#     Diving48 V2   train 15,027   test 1,970

OFFICIAL_SIZES = {
    "k400-train": 246_534, "k400-val": 19_906, "k400-test": 39_805,
    "ssv2-train": 168_913, "ssv2-val": 24_777, "ssv2-test": 27_157,
    "diving48-train": 15_027, "diving48-test": 1_970,
}
K400_NAME = "{youtube_id}_{time_start:06d}_{time_end:06d}"         # + the extension
K400_LAYOUTS = {"flat": "{name}", "class": "{label}/{name}", "class-underscore": "{label_}/{name}"}
LIST_EXTS = {"k400": ".mp4", "ssv2": ".webm", "diving48": ".mp4"}   # as downloaded
UNLABELLED = -1                                                     # the label of an entry that has none


# ---- lists: official annotations -> `relative/path label` + class names


def _k400_class_order(label: str) -> str:
    return label.replace(" ", "_")              # mmaction2 sorts the folder names, where spaces are '_'


def read_kinetics_csv(path: PathLike) -> list[tuple[str, int, int, Optional[str]]]:
    """An official Kinetics CSV -> rows (youtube_id, time_start, time_end, label or None).

    Columns are found by their names in the header, so any order (and extra
    columns such as `split`, `is_cc`) is fine; times are whole seconds
    (written `10` or `10.0`). Blank lines are skipped.
    """
    import csv
    path = _check_exists(Path(path), "Kinetics CSV")
    need = ("youtube_id", "time_start", "time_end")
    rows = []
    with open(path, newline="", encoding="utf-8", errors="strict") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader, [])]
            if not all(c in header for c in need):
                raise ValueError(f"{path}: expected a Kinetics CSV whose header names {', '.join(need)} "
                                 f"(and label), got {','.join(header)[:120]!r}")
            col = [header.index(c) for c in need]
            lab = header.index("label") if "label" in header else None
            for fields in reader:
                if not "".join(fields).strip():
                    continue
                try:
                    yid = fields[col[0]].strip()
                    t0, t1 = int(float(fields[col[1]])), int(float(fields[col[2]]))
                    if not yid:
                        raise ValueError
                except (IndexError, ValueError, OverflowError):
                    raise ValueError(f"{path}:{reader.line_num}: expected a youtube_id and whole-second times, "
                                     f"got {','.join(fields)[:120]!r}") from None
                label = fields[lab].strip() if lab is not None and lab < len(fields) else ""
                rows.append((yid, t0, t1, label or None))
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: expected CSV, got {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: expected a UTF-8 text CSV, got bytes that are not ({e.reason})") from None
    if not rows:
        raise ValueError(f"{path}: expected Kinetics rows after the header, got none")
    return rows


def read_class_names(path: PathLike) -> list[str]:
    """A class-name file (line i = the name of class i; blank lines skipped) -> names."""
    path = _check_exists(Path(path), "class-name file")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    dup = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if not names or dup:
        raise ValueError(f"{path}: expected one distinct class name per line, got "
                         + (f"{dup[0]!r} twice" if dup else "no names"))
    return names


def _read_json(path: PathLike, kind: type, what: str):
    """The JSON value in `path`, which must be a `kind` (list or dict); `what` names the file expected."""
    path = _check_exists(Path(path), what.split(":")[0])
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except ValueError as e:                                      # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}: expected {what}, got text that is not JSON ({str(e)[:80]})") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: expected {what}, got a JSON {type(value).__name__}")
    return value


def kinetics_list(ann: PathLike, classes: PathLike, layout: str = "flat", ext: str = ".mp4",
                  prefix: str = "") -> tuple[list, list, bool]:
    """A Kinetics CSV -> (rows [(relative path, label)], class names, whether the names are new).

    The names are read from `classes` when that file exists (the training
    list's classes, for val/test), else made from this CSV: sorted unique
    labels (see the conventions above); an unlabelled CSV makes none. A row
    without a label gets -1 and needs the flat layout (it has no class folder).
    """
    if layout not in K400_LAYOUTS:
        raise ValueError(f"expected a layout in {', '.join(K400_LAYOUTS)}, got {layout!r}")
    rows = read_kinetics_csv(ann)
    classes = Path(classes)
    new = not classes.exists()
    if new:
        names = sorted({r[3] for r in rows if r[3] is not None}, key=_k400_class_order)
    else:
        names = read_class_names(classes)
    index = {name: i for i, name in enumerate(names)}
    template, out = K400_LAYOUTS[layout], []
    for yid, t0, t1, label in rows:
        name = K400_NAME.format(youtube_id=yid, time_start=t0, time_end=t1) + ext
        if label is None:
            if layout != "flat":
                raise ValueError(f"{ann}: {yid} has no label, so no class folder: expected --layout flat "
                                 f"for an unlabelled (test) CSV, got --layout {layout}")
            out.append((prefix + name, UNLABELLED))
            continue
        if label not in index:
            raise ValueError(f"{ann}: the label {label!r} ({yid}) is not one of the {len(names)} classes in "
                             f"{classes}: expected the class file made from the training CSV")
        out.append((prefix + template.format(name=name, label=label, label_=label.replace(" ", "_")), index[label]))
    return out, names, new


def ssv2_list(ann: PathLike, labels: PathLike, ext: str = ".webm", prefix: str = "") -> tuple[list, list]:
    """Something-Something-v2 JSON + labels JSON -> (rows [(relative path, label)], class names in index order)."""
    entries = _read_json(ann, list, 'an SSv2 annotation file: a JSON list of {"id", "template", ...}')
    table = _read_json(labels, dict, "something-something-v2-labels.json: a JSON object, template -> class index")
    try:
        by_index = {int(v): k for k, v in table.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{labels}: expected class indices as the values, got "
                         f"{next(v for v in table.values() if not str(v).strip().isdigit())!r}") from None
    if sorted(by_index) != list(range(len(table))):
        raise ValueError(f"{labels}: expected the class indices 0..{len(table) - 1} once each, "
                         f"got {len(by_index)} distinct from {min(by_index, default=0)} to {max(by_index, default=0)}")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "id" not in e:
            raise ValueError(f'{ann}: entry {i}: expected an object with an "id", got {json.dumps(e)[:80]}')
        rel = f"{prefix}{e['id']}{ext}"
        if e.get("template") is None:                              # the test file: ids only
            out.append((rel, UNLABELLED))
            continue
        key = str(e["template"]).replace("[", "").replace("]", "")
        if key not in table:
            raise ValueError(f"{ann}: entry {i} (id {e['id']}): expected its template in {labels}, got {key!r}")
        out.append((rel, int(table[key])))
    return out, [by_index[i] for i in range(len(table))]


def diving48_list(ann: PathLike, vocab: PathLike, ext: str = ".mp4", prefix: str = "") -> tuple[list, list]:
    """Diving48 V2 JSON + Diving48_vocab.json -> (rows [(relative path, label)], class names)."""
    entries = _read_json(ann, list, 'a Diving48 annotation file: a JSON list of {"vid_name", "label", ...}')
    words = _read_json(vocab, list, "Diving48_vocab.json: a JSON list of [take-off, somersaults, twists, flight]")
    names = [" ".join(map(str, w)) if isinstance(w, list) else str(w) for w in words]
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "vid_name" not in e:
            raise ValueError(f'{ann}: entry {i}: expected an object with a "vid_name", got {json.dumps(e)[:80]}')
        label = e.get("label")
        if label is None:
            label = UNLABELLED
        elif isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(names):
            raise ValueError(f"{ann}: entry {i} ({e['vid_name']}): expected a class index in 0..{len(names) - 1} "
                             f"({vocab} has {len(names)} classes), got {label!r}")
        out.append((f"{prefix}{e['vid_name']}{ext}", label))
    return out, names


def _list_bytes(rows) -> bytes:
    return b"".join(os.fsencode(rel) + b" %d\n" % label for rel, label in rows)


def write_list(rows: list, out: PathLike, root: Optional[PathLike] = None) -> tuple[list, list]:
    """Write rows as a `relative/path label` list, atomically -> (rows written, rows left out).

    With `root`, a row whose file is not under root is left out of `out` and
    written to `<out>.missing.txt` instead (same format), so that a list made
    for a partial download names only files that are there. A name the list
    format cannot hold (a line break, or white space in front) is an error.
    """
    from tqdm import tqdm
    out = Path(out)
    for rel, _ in rows:
        if "\n" in rel or "\r" in rel or rel[:1].isspace():
            raise ValueError(f"expected file names a list line can hold, got {rel!r}")
    kept, missing = list(rows), []
    if root is not None:
        root = _check_exists(Path(root), "video root")
        kept = []
        for rel, label in tqdm(rows, desc="looking for the files", unit="file", leave=False):
            (kept if (root / rel).is_file() else missing).append((rel, label))
        if not kept:
            raise ValueError(f"expected the listed videos under {root} (e.g. {root / rows[0][0]}), got none of "
                             f"the {len(rows):,}: check --root, --layout, --prefix and --ext")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic_bytes(out, _list_bytes(kept))
    left_out = out.with_name(out.name + ".missing.txt")
    if missing:
        _write_atomic_bytes(left_out, _list_bytes(missing))
    elif root is not None:
        left_out.unlink(missing_ok=True)                  # a previous run's: nothing is missing now
    return kept, missing


def make_lists(dataset: str, ann: PathLike, out: PathLike, classes: Optional[PathLike] = None,
               ext: Optional[str] = None, prefix: str = "", root: Optional[PathLike] = None,
               layout: str = "flat", labels: Optional[PathLike] = None, vocab: Optional[PathLike] = None) -> str:
    """`python data.py lists DATASET ...`: write the list (and the class-name file) -> a one-line summary."""
    out = Path(out)
    classes = Path(classes) if classes else out.parent / f"{dataset}_classes.txt"
    ext = LIST_EXTS[dataset] if ext is None else ext
    if not ext.startswith(".") or "/" in ext:
        raise ValueError(f"--ext: expected a file extension such as .mp4, got {ext!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if dataset == "k400":
        rows, names, new = kinetics_list(ann, classes, layout, ext, prefix)
    elif dataset == "ssv2":
        rows, names = ssv2_list(ann, labels, ext, prefix)
        new = True                                         # from the official labels file: always (re)written
    else:
        rows, names = diving48_list(ann, vocab, ext, prefix)
        new = True
    kept, missing = write_list(rows, out, root)
    if new and names:
        _write_atomic_bytes(classes, "".join(f"{n}\n" for n in names).encode("utf-8"))
    said = [f"{dataset}: {len(kept):,} rows -> {out}"]
    if names:
        said.append(f"{len(names)} classes {'->' if new else 'from'} {classes}")
    if missing:
        said.append(f"{len(missing):,} of {len(rows):,} not under {root}, left out -> {out}.missing.txt")
    unlabelled = sum(label == UNLABELLED for _, label in kept)
    if unlabelled:
        said.append(f"{unlabelled:,} without a label (written as {UNLABELLED})")
    return "; ".join(said)


# ---- resize: a video tree -> the same tree at short side N (PyAV, parallel processes)
#
# Every video under --src (or every file of --ann) is decoded and encoded again
# with libx264 (CRF 23, preset medium: FFmpeg's defaults, which the common
# resize scripts run, e.g. mmaction2's tools/data/resize_videos.py) into
# <dst>/<same relative path>.mp4, video only. The short side becomes N and the
# long side keeps the aspect ratio, rounded to the nearest even number
# (FFmpeg's scale=-2:N; yuv420p needs even sizes), bicubic (FFmpeg's default).
# Frame rate, time base and timestamps are kept, so frame i of the output is
# frame i of the source, at the same instant (FFmpeg's mp4 muxer multiplies a
# time base coarser than 1/10000 by a power of two: 1/16 -> 1/16384). A video whose short side is already N or less is
# kept (--small):
#     keep     its video stream copied unchanged into the output container (no loss,
#              audio dropped), and re-encoded at its own size where the container cannot
#              hold that codec (VP8 in mp4, ...). Default.
#     encode   re-encoded at its own size (made even).
#     upscale  scaled up to N like the others (mmaction2's resize_videos.py does this).
# Each output is written under a hidden temporary name and renamed when
# complete; an existing output is skipped if it opens and its first frame
# decodes (so a killed run resumes), and done again otherwise. A source that
# fails is listed in <dst>/resize_failures.txt (`relative path<TAB>reason`).

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts", ".3gp")
RESIZE_FAILURES = "resize_failures.txt"
RESIZE_SMALL = ("keep", "encode", "upscale")
RESIZE_STATUS = ("resized", "kept", "encoded", "skipped", "failed")


def short_side_scaled(w: int, h: int, short: int) -> tuple[int, int]:
    """(w, h) scaled so that the short side is `short`; the other side keeps the aspect ratio,
    rounded to the nearest even number as FFmpeg's scale=-2:short does. Square: (short, short)."""
    if w <= h:
        return short, max(2, 2 * ((h * short + w) // (2 * w)))
    return max(2, 2 * ((w * short + h) // (2 * h))), short


@dataclass(frozen=True)
class ResizeJob:
    """One source video and what to do with it (picklable: it travels to a worker process)."""
    src: str
    dst: str
    rel: str                 # the source's path relative to --src (what the failure list names)
    short: int
    small: str = "keep"
    crf: int = 23
    preset: str = "medium"
    gop: int = 0             # 0: the encoder's default (x264: 250); mmaction2's --dense uses 16
    threads: int = 1         # decoder and encoder threads per worker


def _output_problem(path: Path) -> Optional[str]:
    """None if an existing output opens, counts frames and decodes its first frame, else why not."""
    try:
        container, stream = _open_video(path, 1)
        with container:
            if _count_frames(container, stream) < 1:
                return "no frames"
            next(container.decode(stream))
        return None
    except StopIteration:
        return "no frame decodes"
    except Exception as e:                                           # anything FFmpeg throws: redo it
        return f"{type(e).__name__}: {e}"


def _copy_video_stream(src: Path, tmp: Path) -> None:
    """The first video stream of src, packets copied unchanged, into tmp (audio and the rest left out).

    Each packet is decoded too, as a check: a source that does not decode fails here.
    """
    with av.open(str(src), metadata_errors="ignore") as inp:
        ist = inp.streams.video[0]
        ist.codec_context.thread_count = 1
        frames = 0
        with av.open(str(tmp), "w") as out:
            ost = out.add_stream_from_template(ist)
            for packet in inp.demux(ist):
                if packet.dts is None:                               # the demuxer's end-of-stream packet
                    continue
                frames += len(ist.decode(packet))
                packet.stream = ost
                out.mux(packet)
            frames += len(ist.decode(None))                          # flush the decoder
    if frames == 0:
        raise BadMedia(src, "no frame decodes")


def _encode_video(src: Path, tmp: Path, size: tuple[int, int], job: ResizeJob) -> None:
    """Decode src and encode it into tmp at `size` with libx264 (yuv420p), keeping fps, time base and timestamps.

    A frame without a timestamp, or with one not after the previous frame's
    (damaged files), gets the previous one plus one frame duration, so the
    encoder always sees increasing timestamps.
    """
    with av.open(str(src), metadata_errors="ignore") as inp:
        ist = inp.streams.video[0]
        ist.thread_type = "AUTO"
        ist.codec_context.thread_count = job.threads
        rate = _frame_rate(ist) or Fraction(25)
        tb = ist.time_base or 1 / rate
        step = max(1, round(1 / (rate * tb)))                        # one frame, in time-base ticks
        options = {"crf": str(job.crf), "preset": job.preset, "threads": str(job.threads)}
        frames = 0
        with av.open(str(tmp), "w") as out:
            ost = out.add_stream("libx264", rate=rate, options=options)
            ost.width, ost.height, ost.pix_fmt = size[0], size[1], "yuv420p"
            ost.codec_context.time_base = tb                         # the source's: its timestamps go through as they are
            ost.time_base = tb
            if job.gop:
                ost.codec_context.gop_size = job.gop
            last = None
            for frame in inp.decode(ist):
                pts = frame.pts
                if pts is None or (last is not None and pts <= last):
                    pts = 0 if last is None else last + step
                last = pts
                frame = frame.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="BICUBIC")
                frame.pts, frame.time_base = pts, tb
                for packet in ost.encode(frame):
                    out.mux(packet)
                frames += 1
            for packet in ost.encode():                              # flush the encoder
                out.mux(packet)
    if frames == 0:
        raise BadMedia(src, "no frame decodes")


def _resize_file(src: Path, tmp: Path, job: ResizeJob) -> str:
    """Write the resized (or kept) video to tmp -> its status: resized | kept | encoded."""
    container, stream = _open_video(src, 1)
    with container:
        w, h = stream.codec_context.width, stream.codec_context.height
    if w < 1 or h < 1:
        raise BadMedia(src, f"no picture size ({w}x{h})")
    if min(w, h) > job.short or job.small == "upscale":
        _encode_video(src, tmp, short_side_scaled(w, h, job.short), job)
        return "resized"
    if job.small == "keep":
        try:
            _copy_video_stream(src, tmp)
            return "kept"
        except Exception:              # the codec cannot go in this container, or the source is damaged:
            pass                       # re-encode (a damaged source fails there too, and is reported)
    _encode_video(src, tmp, (max(2, w - w % 2), max(2, h - h % 2)), job)
    return "encoded"


def _resize_one(job: ResizeJob) -> tuple[str, str, str]:
    """One video, in a worker -> (status, its relative path, reason if it failed). Never raises."""
    dst = Path(job.dst)
    try:
        if not Path(job.src).is_file():
            return "failed", job.rel, "missing"
        if dst.exists():
            if _output_problem(dst) is None:
                return "skipped", job.rel, ""
            dst.unlink()                                   # unreadable: done again (and never left looking done)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.stem}.tmp-{os.getpid()}{dst.suffix}")   # hidden; the suffix picks the container
        try:
            status = _resize_file(Path(job.src), tmp, job)
            os.replace(tmp, dst)                            # complete, or absent
        finally:
            tmp.unlink(missing_ok=True)
        return status, job.rel, ""
    except Exception as e:                                  # a bad source (or a full disk): listed, the rest goes on
        reason = e.reason if isinstance(e, BadMedia) else f"{type(e).__name__}: {e}"
        return "failed", job.rel, " ".join(str(reason).split())


def _resize_worker_init() -> None:
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)            # Ctrl-C reaches the parent, which ends the pool


def _video_files(src: Path, skip: Optional[Path] = None) -> list[str]:
    """Relative paths of the video files under src (VIDEO_EXTS), sorted; hidden names and `skip` left out.
    Symlinked files count (CVDF's arrange_by_classes.py makes them); symlinked folders are not entered."""
    found = []
    for folder, subfolders, files in os.walk(src):
        subfolders[:] = sorted(d for d in subfolders
                               if not d.startswith(".") and (skip is None or Path(folder, d).resolve() != skip))
        found += [os.path.relpath(os.path.join(folder, f), src) for f in sorted(files)
                  if not f.startswith(".") and _suffix(f).lower() in VIDEO_EXTS]
    return found


def resize_videos(src: PathLike, dst: PathLike, short: int, workers: int = 1, ann: Optional[PathLike] = None,
                  small: str = "keep", ext: str = ".mp4", crf: int = 23, preset: str = "medium", gop: int = 0,
                  threads: int = 1, failures: Optional[PathLike] = None,
                  progress: bool = True) -> tuple[dict, list, Path]:
    """Resize every video under src (or listed in `ann`, relative to src) into dst -> (counts, failed, failure list).

    counts: how many were resized / kept / encoded / skipped / failed;
    failed: [(relative path, reason)], also written to `failures`
    (default <dst>/resize_failures.txt; removed when nothing failed).
    `workers` processes (1: this process).
    """
    from tqdm import tqdm
    src = _check_exists(Path(src), "source folder").resolve()
    dst = Path(dst).resolve()
    if short < 2 or short % 2:
        raise ValueError(f"--short-side: expected an even number of pixels (yuv420p halves the chroma), got {short}")
    if small not in RESIZE_SMALL:
        raise ValueError(f"--small: expected one of {', '.join(RESIZE_SMALL)}, got {small!r}")
    if ext not in (".mp4", ".mkv", ".mov"):
        raise ValueError(f"--ext: expected .mp4, .mkv or .mov (containers that hold H.264), got {ext!r}")
    if workers < 1:
        raise ValueError(f"--workers: expected 1 or more, got {workers}")
    if dst == src:
        raise ValueError(f"expected an output folder other than the source folder, got {dst} for both")
    if ann is not None:
        listed = read_annotations(ann, src)
        rels = list(dict.fromkeys(os.fsdecode(listed.relpath_bytes(i)) for i in range(len(listed))))
    else:
        rels = _video_files(src, skip=dst if src in dst.parents else None)
    if not rels:
        raise ValueError(f"{src}: expected video files ({' '.join(VIDEO_EXTS)}) under it, found none")
    jobs, taken = [], {}
    for rel in rels:
        out_rel = os.path.splitext(rel)[0] + ext
        if out_rel in taken:
            raise ValueError(f"expected one source per output name, got {taken[out_rel]} and {rel} "
                             f"both for {dst / out_rel}")
        taken[out_rel] = rel
        jobs.append(ResizeJob(str(src / rel), str(dst / out_rel), rel, short, small, crf, preset, gop, threads))
    dst.mkdir(parents=True, exist_ok=True)
    counts, failed = dict.fromkeys(RESIZE_STATUS, 0), []
    bar = functools.partial(tqdm, total=len(jobs), desc=f"short side {short}", unit="video", disable=not progress)
    if workers == 1:
        results = bar(map(_resize_one, jobs))
        for status, rel, reason in results:
            counts[status] += 1
            if status == "failed":
                failed.append((rel, reason))
    else:
        import multiprocessing as mp
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
        with ctx.Pool(min(workers, len(jobs)), initializer=_resize_worker_init) as pool:
            for status, rel, reason in bar(pool.imap_unordered(_resize_one, jobs)):
                counts[status] += 1
                if status == "failed":
                    failed.append((rel, reason))
    failed.sort()
    failures = Path(failures) if failures else dst / RESIZE_FAILURES
    if failed:
        _write_atomic_bytes(failures, "".join(f"{rel}\t{why}\n" for rel, why in failed).encode("utf-8"))
    else:
        failures.unlink(missing_ok=True)                    # a previous run's list: nothing failed now
    return counts, failed, failures


# ---- check: the files of a list (missing, unreadable, slow path) and its size


@dataclass
class CheckReport:
    listed: int              # rows of the list
    missing: list            # paths of listed files that are not there
    bad: list                # (path, reason): there, but not usable
    slow: list               # (path, reason): usable; decoded from the start (see "Decoding with PyAV")


def check_files(ann: PathLike, root: PathLike, threads: int = 0, quick: bool = False) -> CheckReport:
    """Every file of a list: missing, or decoded and checked (below); `quick` only opens and counts.

    bad: files read_video cannot use: unreadable, no frames, a frame count
    that disagrees with what decodes from the start, or a seek that returns
    another frame than decoding from the start gives (probed at a third, two
    thirds and the last frame; read_video's seek check should make this
    impossible, so such a file names a bug here). slow: files whose frames
    cannot be placed exactly after a seek, which read_video decodes from the
    start (exact, but slower on long videos); the reason says why. With
    `quick`, a file is bad only if it does not open or counts no frames (no
    decode: minutes instead of hours for Kinetics), and slow only where the
    count already shows it.
    """
    from tqdm import tqdm
    samples = read_annotations(ann, root)
    missing, bad, slow = [], [], []
    was_disabled, logger.disabled = logger.disabled, True              # the report lists the slow-path files itself
    try:
        for path, _ in tqdm(samples, desc="opening" if quick else "decoding", unit="video"):
            if not path.is_file():
                missing.append(str(path))
                continue
            try:
                n = count_frames(path)
                if quick:
                    if n < 1:
                        bad.append((str(path), "zero frames"))
                    continue
                probe = sorted({n // 3, 2 * n // 3, n - 1}) if n > 0 else []
                container, stream = _open_video(path, threads)
                with container:
                    ref, decoded = {}, 0
                    for i, frame in enumerate(container.decode(stream)):
                        if i in probe:
                            ref[i] = frame.to_ndarray(format="rgb24")
                        decoded += 1
                if decoded == 0:
                    bad.append((str(path), "zero frames"))
                elif decoded != n:
                    bad.append((str(path), f"counted {n} frames but {decoded} decode"))
                else:
                    for i in probe:                                  # each read seeks (unless slow)
                        frames, _, _ = read_video(path, lambda m, i=i: np.array([i]), threads, n)
                        if not np.array_equal(frames[0], ref[i]):
                            bad.append((str(path), f"frame {i} after a seek is not frame {i} from the start"))
                            break
            except Exception as e:
                bad.append((str(path), f"{type(e).__name__}: {e}"))
            finally:
                if str(path) in _SLOW:
                    slow.append((str(path), _SLOW[str(path)]))
    finally:
        logger.disabled = was_disabled
    return CheckReport(len(samples), missing, bad, slow)


def check_videos(ann: PathLike, root: PathLike, threads: int = 0) -> tuple[list, list]:
    """Decode every listed video -> (bad, slow), each a list of (path, reason); a missing file is bad
    with the reason "missing". See check_files, which keeps missing files apart."""
    r = check_files(ann, root, threads)
    return [(p, "missing") for p in r.missing] + r.bad, r.slow


def count_line(report: CheckReport, expected: int, name: Optional[str] = None) -> str:
    """One line comparing a list with the size it should have (an official split, or --expect)."""
    usable = report.listed - len(report.missing) - len(report.bad)
    what = f"official size of {name}" if name else "expected size"
    diff = report.listed - expected
    return (f"count: {what} {expected:,}; the list has {report.listed:,} rows"
            f"{f' ({diff:+,})' if diff else ' (all)'}, {usable:,} usable ({usable / max(expected, 1):.1%} of {expected:,})")


# ---- make-synthetic: the synthetic data set, appearance labels vs labels that need time
#
# Each video is a smooth, weakly tinted grey texture with one saturated object
# (3 shapes x 6 colours). The whole scene drifts right or left: the
# background pans at 1-2 px per frame and the object moves, faster (2-3.5 px
# per frame), the same way. Both live on a torus (the texture is periodic and
# the object wraps around the edges). Every video carries two labels,
# independent of each other:
#   appearance (6 classes, the object's colour, drawn at random; its shape is
#     a nuisance): one frame tells it (a K400 stand-in);
#   motion (2 classes, right or left; even-numbered videos move right and odd
#     ones left, so every split is balanced and the majority class is chance):
#     only the order of the frames tells it (an SSv2 stand-in: SSv2 has such
#     pairs, e.g. "pushing something from left to right" and "... from right
#     to left"). One frame cannot, because the start position of the object
#     and the texture phase are uniform, so at every time step a frame has the
#     same law whatever the direction; and a shuffled clip moving right has
#     the same law as a shuffled clip moving left, so shuffling destroys the
#     label completely (paper Table 2). Flipping a clip left-right swaps the
#     two classes: use flip=0 for motion labels, as SSv2 does.
# Images are single frames of the same kind of scene, in a folder tree by
# appearance class, for the image stream and for fitting the offline tokenizer.
#
# Why these sizes (version 2): with a 10-15 px object, 3 shapes x 2 colours
# as the appearance classes and a static background (version 1), the CPU
# Swin from scratch had learnt only the colour after 500 finetuning steps and
# nothing of the direction after 600 (its one moving object covered ~2% of
# the tokens). Colour on a 18-26 px object, and a drift every token sees, are
# learnt in a few hundred steps (README, "Finetuning"), which the 10-minute
# CPU demo can afford.
# Why two directions (version 3): version 2 had four (right, left, down, up).
# A shuffled clip still shows its axis (the frames' positions spread along x
# or along y), so shuffled frames told "right or left" from "down or up" and a
# model could score 50% on them with no temporal order at all (seeds of the
# demo gave 33-45% against a 25% chance). Any set of straight motions has that
# leak unless all of them share one axis; with one axis, the only classes that
# shuffling cannot separate are a motion and its reverse.
SYNTHETIC_VERSION = 3
SYN_FRAMES = 32                       # frames per video (2 s at 16 fps)
SYN_HEIGHT, SYN_WIDTH = 128, 160      # short side 128: the CPU demo rescales to [128, 160] and crops 112
SYN_FPS = 16
SYN_GOP = 16                          # a keyframe every 16 frames, so seeking has something to do
SYN_CRF = 26                          # x264 quality: ~10 KB per video
# One thread and no assembly: with either, this x264 build (PyAV's) wrote different bytes for the
# same frames in about 1 run in 20 (measured); without both, 0 in 400. Encoding costs ~50% more
# (48 vs 31 ms per 32-frame video), and the data set is byte-reproducible from its seed.
SYN_X264 = {"crf": str(SYN_CRF), "preset": "veryfast", "threads": "1", "x264-params": "asm=0"}
SYN_TRAIN, SYN_VAL = 200, 60          # videos per split (each video is listed in both label sets)
SYN_IMAGES_TRAIN, SYN_IMAGES_VAL = 80, 10     # images per appearance class
SYN_PNG_EVERY = 8                     # every 8th image is PNG, the rest JPEG (quality 90)
SHAPES = ("circle", "square", "triangle")
COLOURS = {"blue": (40, 80, 225), "cyan": (40, 205, 220), "green": (40, 185, 60),
           "magenta": (215, 50, 200), "red": (220, 45, 40), "yellow": (235, 210, 40)}   # saturation >= 145
APPEARANCE_CLASSES = tuple(sorted(COLOURS))                                          # sorted = label order
MOTION_CLASSES = ("right", "left")
MOTION_VECTORS = {"right": (1, 0), "left": (-1, 0)}                 # (dx, dy) per unit of speed
RADIUS_FRAC = (0.14, 0.20)            # object radius as a fraction of the frame height (18-26 px at 128)
SPEED_FRAC = (0.0125, 0.022)          # object: pixels per frame as a fraction of the width (2-3.5 px at 160)
PAN_FRAC = (0.006, 0.0125)            # background: pixels per frame as a fraction of the width (1-2 px at 160)
DONE_NAME = "DONE"


def _syn_params(seed: int, split: str, k: int, height: int, width: int) -> dict:
    """The random draws of one video: its own stream, so sizes never change other videos."""
    rng = np.random.default_rng([seed, {"train": 0, "val": 1, "img-train": 2, "img-val": 3}[split], k])
    return {
        "shape": int(rng.integers(len(SHAPES))), "colour": int(rng.integers(len(COLOURS))),
        "direction": k % len(MOTION_CLASSES),                           # balanced splits
        "radius": rng.uniform(*RADIUS_FRAC) * height, "speed": rng.uniform(*SPEED_FRAC) * width,
        "pan": rng.uniform(*PAN_FRAC) * width,
        "x0": rng.uniform(0, width), "y0": rng.uniform(0, height),
        "colour_jitter": rng.normal(0, 12, 3), "bg_seed": int(rng.integers(2 ** 31)),
    }


def _periodic_noise(rng: np.random.Generator, height: int, width: int, sigma: float) -> np.ndarray:
    """(H, W) smooth noise that tiles the torus: white noise low-passed with a Gaussian of
    `sigma` px in the Fourier domain, scaled to unit standard deviation."""
    fy = np.fft.fftfreq(height)[:, None]                         # cycles per pixel, (H, 1)
    fx = np.fft.rfftfreq(width)[None, :]                         # (1, W//2+1)
    spectrum = np.fft.rfft2(rng.standard_normal((height, width)))
    z = np.fft.irfft2(spectrum * np.exp(-2 * (np.pi * sigma) ** 2 * (fx ** 2 + fy ** 2)), s=(height, width))
    return z / max(z.std(), 1e-8)


def _syn_background(seed: int, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float64: a smooth grey texture with a weak tint (low saturation, so the object
    stands out), periodic in both axes so that it can pan forever. Not yet clipped to [0, 255].

    Numpy only: torch's OpenMP threads would spin between calls and steal the
    two cores from the x264 encoder threads.
    """
    rng = np.random.default_rng(seed)
    base = rng.uniform(70, 180)                                  # mean grey level
    lum = base + 28 * _periodic_noise(rng, height, width, 8.0) + 8 * _periodic_noise(rng, height, width, 2.0)
    tint = 10 * rng.standard_normal(3) + 6 * np.stack([_periodic_noise(rng, height, width, 16.0) for _ in range(3)], -1)
    return lum[..., None] + tint


def _pan(background: np.ndarray, shifts) -> np.ndarray:
    """background (H, W, 3) periodic -> (n, H, W, 3): copies translated by (dx, dy) px each
    (sub-pixel, exact on the torus: a phase ramp in the Fourier domain), clipped to [0, 255]."""
    H, W = background.shape[:2]
    fy = np.fft.fftfreq(H)[:, None, None]                        # (H, 1, 1)
    fx = np.fft.rfftfreq(W)[None, :, None]                       # (1, W//2+1, 1)
    spectrum = np.fft.rfft2(background, axes=(0, 1))             # (H, W//2+1, 3)
    d = np.asarray(shifts, np.float64).reshape(-1, 2)[:, :, None, None, None]   # (n, 2, 1, 1, 1)
    ramp = np.exp(-2j * np.pi * (fx * d[:, 0] + fy * d[:, 1]))   # (n, H, W//2+1, 1)
    return np.clip(np.fft.irfft2(spectrum * ramp, s=(H, W), axes=(1, 2)), 0, 255)


def render_synthetic(p: dict, times, height: int, width: int) -> np.ndarray:
    """Frames at `times` of the video with parameters p -> (len(times), H, W, 3) uint8.

    Frame t: the background translated by pan·t and the object centred at
    (x0, y0) + speed·t, both along the video's direction; rendering any subset
    of times gives the same frames as rendering them all.
    """
    dx, dy = MOTION_VECTORS[MOTION_CLASSES[p["direction"]]]
    bg = _pan(_syn_background(p["bg_seed"], height, width),
              [(dx * p["pan"] * t, dy * p["pan"] * t) for t in times]).astype(np.float32)   # (n, H, W, 3)
    t = np.asarray(times, np.float32)[:, None, None]             # (n, 1, 1)
    cx = p["x0"] + dx * p["speed"] * t                           # object centre at each time
    cy = p["y0"] + dy * p["speed"] * t
    xs = np.arange(width, dtype=np.float32)[None, None, :] + 0.5     # pixel centres, (1, 1, W)
    ys = np.arange(height, dtype=np.float32)[None, :, None] + 0.5    # (1, H, 1)
    # Offsets to the centre on the torus (the object wraps around the edges);
    # separable, (n, 1, W) and (n, H, 1), broadcast to (n, H, W) only below.
    ox = (xs - cx + width / 2) % width - width / 2
    oy = (ys - cy + height / 2) % height - height / 2
    r = p["radius"]
    shape = SHAPES[p["shape"]]
    if shape == "circle":                                        # signed distance to the outline, px
        sd = np.sqrt(ox ** 2 + oy ** 2) - r
    elif shape == "square":                                      # same area as the circle: side r*sqrt(pi)
        half = r * math.sqrt(math.pi) / 2
        sd = np.maximum(np.abs(ox), np.abs(oy)) - half
    else:                                                        # equilateral, apex up, circumradius 1.3 r
        R = 1.3 * r
        c30 = math.cos(math.pi / 6)
        sd = np.maximum(np.maximum(oy, -c30 * ox - 0.5 * oy), c30 * ox - 0.5 * oy) - R / 2
    alpha = np.clip(0.5 - sd, 0.0, 1.0)[..., None]               # 1-px antialiased edge, (n, H, W, 1)
    colour = (np.array(COLOURS[APPEARANCE_CLASSES[p["colour"]]]) + p["colour_jitter"]).astype(np.float32)
    return np.clip(bg + alpha * (colour - bg) + 0.5, 0, 255).astype(np.uint8)


def write_video(path: PathLike, frames: np.ndarray, fps: int = SYN_FPS, codec: str = "libx264",
                gop: int = SYN_GOP, options: Optional[dict] = None) -> None:
    """(T, H, W, 3) uint8 RGB -> a yuv420p video file with PyAV (H.264 mp4, VP9 webm, ...).

    Every frame gets its pts (frame number, time base 1/fps), so the encoder
    never sees undefined timestamps.
    """
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=dict(options or {}))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.time_base = Fraction(1, fps)
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():                              # flush the encoder
            container.mux(packet)


def make_synthetic(out: PathLike, seed: int = 0, n_train: int = SYN_TRAIN, n_val: int = SYN_VAL,
                   images_train: int = SYN_IMAGES_TRAIN, images_val: int = SYN_IMAGES_VAL,
                   frames: int = SYN_FRAMES, height: int = SYN_HEIGHT, width: int = SYN_WIDTH,
                   verbose: bool = False) -> Path:
    """Write the synthetic data set into `out` (which must not hold one yet); DONE last.

    Layout (paths in the lists are relative to videos/ and images/):
        videos/{train,val}/NNNNNN.mp4
        videos/{train,val}_{appearance,motion}.txt, videos/classes_{appearance,motion}.txt
        images/{train,val}/<appearance class>/NNNNN.{png,jpg}, images/{train,val}_list.txt
        info.json, DONE
    Deterministic: the same arguments give byte-identical files.
    """
    out = Path(out)
    if (out / DONE_NAME).exists():
        raise FileExistsError(f"{out} already holds a synthetic data set")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for split, n in (("train", n_train), ("val", n_val)):
        (out / "videos" / split).mkdir(exist_ok=True)
        rows = {"appearance": [], "motion": []}
        for k in range(n):
            p = _syn_params(seed, split, k, height, width)
            rel = f"{split}/{k:06d}.mp4"
            write_video(out / "videos" / rel, render_synthetic(p, range(frames), height, width),
                        options=SYN_X264)
            rows["appearance"].append(f"{rel} {p['colour']}")
            rows["motion"].append(f"{rel} {p['direction']}")
        for task, lines in rows.items():
            (out / "videos" / f"{split}_{task}.txt").write_text("\n".join(lines) + "\n")
    (out / "videos" / "classes_appearance.txt").write_text("\n".join(APPEARANCE_CLASSES) + "\n")
    (out / "videos" / "classes_motion.txt").write_text("\n".join(MOTION_CLASSES) + "\n")
    for split, per_class in (("train", images_train), ("val", images_val)):
        lines = []
        for label, name in enumerate(APPEARANCE_CLASSES):
            (out / "images" / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                p = _syn_params(seed, f"img-{split}", label * 100_000 + k, height, width)
                p["colour"] = label                                     # the class fixes the colour
                t = int(np.random.default_rng([seed, 7, label, k]).integers(frames))
                img = Image.fromarray(render_synthetic(p, [t], height, width)[0])
                ext = "png" if k % SYN_PNG_EVERY == 0 else "jpg"
                rel = f"{split}/{name}/{k:05d}.{ext}"
                if ext == "png":
                    img.save(out / "images" / rel, "PNG")
                else:
                    img.save(out / "images" / rel, "JPEG", quality=90)
                lines.append(f"{rel} {label}")
        (out / "images" / f"{split}_list.txt").write_text("\n".join(lines) + "\n")
    info = {"version": SYNTHETIC_VERSION, "seed": seed, "frames": frames, "height": height, "width": width,
            "fps": SYN_FPS, "videos": {"train": n_train, "val": n_val},
            "images_per_class": {"train": images_train, "val": images_val},
            "classes": {"appearance": list(APPEARANCE_CLASSES), "motion": list(MOTION_CLASSES)},
            "notes": {"appearance": "one frame suffices (K400-like); any recipe",
                      "motion": "needs time (SSv2-like); finetune with flip=0: a flip swaps left/right"}}
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / DONE_NAME).write_text(json.dumps(_syn_key(seed, n_train, n_val, images_train, images_val,
                                                     frames, height, width)) + "\n")
    if verbose:
        mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
        print(f"synthetic data set: {n_train}+{n_val} videos, {len(APPEARANCE_CLASSES)}x"
              f"({images_train}+{images_val}) images, {mb:.1f} MB in {time.time() - t0:.1f} s")
    return out


def _syn_key(seed, n_train, n_val, images_train, images_val, frames, height, width) -> dict:
    return {"version": SYNTHETIC_VERSION, "seed": seed, "n_train": n_train, "n_val": n_val,
            "images_train": images_train, "images_val": images_val, "frames": frames,
            "height": height, "width": width}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)                                   # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:                               # exists, owned by someone else
        return True
    return True


class FileLock:
    """One writer per folder: a lock file created exclusively, holding "host pid [job]".

    `acquire()` returns None when the lock is ours, or a description of the
    holder. A holder that died without cleaning up (SIGKILL, a closed terminal)
    leaves its file behind; on the same host a dead pid is detected and its
    lock taken over. A holder on another host cannot be checked and counts as
    live, unless it names the same `job` as ours: a cluster job that is
    requeued or restarted (train.py passes its SLURM job id) runs again only
    once its earlier processes are gone, on whatever nodes, so their lock is
    stale and taken over.
    """

    def __init__(self, path: PathLike, job: Optional[str] = None):
        self.path, self.job, self.held = Path(path), job, False

    def holder(self) -> Optional[tuple]:
        """(host, pid, job or None) of the lock file, or None if there is none or it cannot be read."""
        try:
            host, pid, *job = self.path.read_text().split()
            if len(job) > 1:
                return None
            return host, int(pid), (job[0] if job else None)
        except (OSError, ValueError):
            return None

    def acquire(self) -> Optional[str]:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                h = self.holder()
                if h is None:                             # being written this instant, or garbage
                    time.sleep(0.05)
                    h = self.holder()
                    if h is None:
                        return f"an unreadable lock file {self.path}"
                host, pid, job = h
                if host == socket.gethostname() and not _pid_alive(pid):
                    logger.warning("taking over %s: its holder (pid %d) is dead", self.path, pid)
                    self.path.unlink(missing_ok=True)
                    continue
                if self.job is not None and job == self.job:
                    logger.warning("taking over %s: its holder (pid %d on %s) was an earlier run of job %s",
                                self.path, pid, host, job)
                    self.path.unlink(missing_ok=True)
                    continue
                return f"pid {pid} on {host}{f' (job {job})' if job else ''} (lock file {self.path})"
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}{f' {self.job}' if self.job else ''}\n")
            self.held = True
            return None
        return f"a lock file {self.path} that keeps coming back"

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def ensure_synthetic(root: PathLike, seed: int = 0, timeout: float = 900.0, verbose: bool = True,
                     **sizes) -> Path:
    """The synthetic data set at `root`, generated first if it is not there. Safe for concurrent ranks.

    Whoever creates the lock file `.<root>.lock` beside root generates into a
    temporary folder and renames it to root (so a half-written set is never
    seen); everyone else waits for root/DONE. An existing complete set made
    with other arguments is an error (delete it to regenerate); so is a
    non-empty root without DONE (not ours). `sizes`: make_synthetic's size
    arguments (n_train, n_val, images_train, images_val, frames, height, width).
    """
    root = Path(root)
    key = _syn_key(seed, *(sizes.get(k, d) for k, d in (
        ("n_train", SYN_TRAIN), ("n_val", SYN_VAL), ("images_train", SYN_IMAGES_TRAIN),
        ("images_val", SYN_IMAGES_VAL), ("frames", SYN_FRAMES), ("height", SYN_HEIGHT), ("width", SYN_WIDTH))))
    done = root / DONE_NAME
    lock = FileLock(root.parent / f".{root.name}.lock")
    deadline, told = time.time() + timeout, False
    while True:
        if done.exists():
            found = json.loads(done.read_text())
            if found != key:
                raise ValueError(f"{root} holds a synthetic data set made with {found}, not {key}; "
                                 f"delete it to regenerate, or pass another path")
            return root
        if root.exists() and any(root.iterdir()):
            raise FileExistsError(f"{root} exists and is not a complete synthetic data set (no {DONE_NAME}); "
                                  f"delete it or choose another path")
        root.parent.mkdir(parents=True, exist_ok=True)
        busy = lock.acquire()
        if busy is not None:                                     # someone else is generating: wait
            if verbose and not told:
                print(f"waiting for {busy}, which is generating {root} ...", flush=True)
                told = True
            if time.time() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {done} from {busy}; if that process is "
                                   f"gone, delete {lock.path}")
            time.sleep(0.2)
            continue
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        # Temporary folders of generators that died (their pid is gone) are removed.
        for old in root.parent.glob(f".{root.name}.tmp-*"):
            pid = old.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            if verbose:
                print(f"generating the synthetic data set (seed {seed}) in {root} ...", flush=True)
            make_synthetic(tmp, seed=seed, verbose=verbose, **sizes)
            if root.exists():
                root.rmdir()                                     # empty (checked above)
            os.rename(tmp, root)                                 # atomic: complete or absent
            if verbose:
                print(f"-> {root}", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            lock.release()


# ---- main

_PREP_EPILOG = """\
file naming (see the conventions comment in data.py):
  k400      <youtube_id>_<time_start:06d>_<time_end:06d>.mp4; --layout flat (CVDF tarballs),
            class (<label>/..., ActivityNet download.py) or class-underscore (mmaction2)
  ssv2      <id>.webm (20BN archive); --ext .mp4 after converting
  diving48  <vid_name>.mp4 (rgb/ of Diving48_rgb.tar.gz)
examples:
  python data.py lists k400 --ann k400/annotations/train.csv --out lists/k400_train.txt --prefix train
  python data.py lists k400 --ann k400/annotations/val.csv --out lists/k400_val.txt --prefix val
  python data.py lists ssv2 --ann ssv2/something-something-v2-train.json \\
      --labels ssv2/something-something-v2-labels.json --out lists/ssv2_train.txt
  python data.py resize --src k400 --dst k400_256 --short-side 256 --workers 16
  python data.py check --ann lists/k400_val.txt --root k400_256 --official k400-val --quick
"""


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=_PREP_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-synthetic", help="write the synthetic data set (skipped if already there)")
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--train", type=int, default=SYN_TRAIN, help="training videos")
    m.add_argument("--val", type=int, default=SYN_VAL, help="validation videos")
    m.add_argument("--images-train", type=int, default=SYN_IMAGES_TRAIN, help="training images per class")
    m.add_argument("--images-val", type=int, default=SYN_IMAGES_VAL, help="validation images per class")
    m.add_argument("--frames", type=int, default=SYN_FRAMES)
    m.add_argument("--height", type=int, default=SYN_HEIGHT)
    m.add_argument("--width", type=int, default=SYN_WIDTH)

    c = sub.add_parser("check", help="every file of an annotation list: missing, unreadable, decoded from the "
                                     "start (slow path); the count against an official split size",
                       epilog="official sizes: " + ", ".join(f"{k} {v:,}" for k, v in OFFICIAL_SIZES.items()))
    c.add_argument("--ann", required=True, help="the list (`relative/path label` per line)")
    c.add_argument("--root", required=True, help="the folder the list's paths are relative to")
    size = c.add_mutually_exclusive_group()
    size.add_argument("--official", choices=sorted(OFFICIAL_SIZES), help="compare the count with this split's size")
    size.add_argument("--expect", type=int, help="compare the count with this number")
    c.add_argument("--quick", action="store_true", help="only open each file and count its frames (no decode)")

    lists = sub.add_parser("lists", help="official annotations (K400 CSV, SSv2 JSON, Diving48 JSON) -> "
                                         "a `path label` list and a class-name file",
                           epilog=_PREP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = lists.add_subparsers(dest="dataset", required=True)
    sets = {
        "k400": which.add_parser("k400", help="a Kinetics-400 CSV (train/val/test)"),
        "ssv2": which.add_parser("ssv2", help="a Something-Something-v2 JSON (train/validation/test)"),
        "diving48": which.add_parser("diving48", help="a Diving48 V2 JSON (train/test)"),
    }
    for name, p in sets.items():
        p.add_argument("--ann", required=True, help="the official annotation file")
        p.add_argument("--out", required=True, help="the list to write")
        p.add_argument("--classes", help=f"the class-name file (default: <out folder>/{name}_classes.txt)"
                       + ("; read if it exists (make the training list first), else written" if name == "k400" else ""))
        p.add_argument("--ext", help=f"the videos' extension (default {LIST_EXTS[name]})")
        p.add_argument("--prefix", default="", help="a folder in front of every path (e.g. train)")
        p.add_argument("--root", help="keep only the rows whose file is under this folder; the others go to "
                                      "<out>.missing.txt")
    sets["k400"].add_argument("--layout", choices=list(K400_LAYOUTS), default="flat",
                              help="flat: <name> (CVDF); class: <label>/<name> (ActivityNet download.py); "
                                   "class-underscore: <label_with_underscores>/<name> (mmaction2)")
    sets["ssv2"].add_argument("--labels", required=True, help="something-something-v2-labels.json")
    sets["diving48"].add_argument("--vocab", required=True, help="Diving48_vocab.json")

    r = sub.add_parser("resize", help="re-encode videos to a short side (H.264 mp4, video only; parallel; "
                                      "resumable; failures listed)")
    r.add_argument("--src", required=True, help="the folder of source videos")
    r.add_argument("--dst", required=True, help="the output folder (the same tree, .mp4)")
    r.add_argument("--short-side", type=int, required=True, help="pixels; K400 practice: 256 or 320")
    r.add_argument("--workers", type=int, default=1, help="processes (each encodes one video at a time)")
    r.add_argument("--ann", help="only the files of this list (paths relative to --src)")
    r.add_argument("--small", choices=RESIZE_SMALL, default="keep",
                   help="videos whose short side is already <= N: keep (copy the video stream), encode "
                        "(at their own size) or upscale")
    r.add_argument("--ext", default=".mp4", help="output container: .mp4, .mkv or .mov")
    r.add_argument("--crf", type=int, default=23, help="x264 quality (FFmpeg's default 23)")
    r.add_argument("--preset", default="medium", help="x264 preset (FFmpeg's default medium)")
    r.add_argument("--gop", type=int, default=0, help="keyframe interval (0: x264's 250; 16 seeks faster)")
    r.add_argument("--threads", type=int, default=1, help="decoder/encoder threads per worker")
    r.add_argument("--failures", help=f"where to list the failures (default <dst>/{RESIZE_FAILURES})")
    args = ap.parse_args(argv)

    if args.cmd == "make-synthetic":
        root = ensure_synthetic(args.out, seed=args.seed, n_train=args.train, n_val=args.val,
                                images_train=args.images_train, images_val=args.images_val,
                                frames=args.frames, height=args.height, width=args.width)
        print(json.dumps(json.loads((root / "info.json").read_text())["classes"]))
        print(f"ready: {root}")
    elif args.cmd == "lists":
        print(make_lists(args.dataset, args.ann, args.out, classes=args.classes, ext=args.ext, prefix=args.prefix,
                         root=args.root, layout=getattr(args, "layout", "flat"),
                         labels=getattr(args, "labels", None), vocab=getattr(args, "vocab", None)))
    elif args.cmd == "resize":
        counts, failed, where = resize_videos(args.src, args.dst, args.short_side, workers=args.workers,
                                              ann=args.ann, small=args.small, ext=args.ext, crf=args.crf,
                                              preset=args.preset, gop=args.gop, threads=args.threads,
                                              failures=args.failures)
        for rel, why in failed[:20]:
            print(f"FAILED {rel}: {why}")
        print(f"{counts['resized']} resized to a {args.short_side}-px short side, {counts['kept']} kept as they "
              f"were and {counts['encoded']} re-encoded at their own size (short side <= {args.short_side}), "
              f"{counts['skipped']} already done; {counts['failed']} failed"
              + (f" -> {where}" if failed else ""))
        sys.exit(1 if failed else 0)
    else:
        report = check_files(args.ann, args.root, quick=args.quick)
        for path in report.missing:
            print(f"MISSING {path}")
        for path, reason in report.bad:
            print(f"BAD {path}: {reason}")
        for path, reason in report.slow:                             # usable and exact, decoded from the start
            print(f"SLOW {path}: {reason}")
        if args.official or args.expect is not None:
            print(count_line(report, OFFICIAL_SIZES[args.official] if args.official else args.expect, args.official))
        print(f"{len(report.bad)} bad file(s); {len(report.slow)} whose frames cannot be placed after a seek "
              f"(slow path); {len(report.missing)} missing of {report.listed} listed")
        sys.exit(1 if report.bad or report.missing else 0)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:          # a user error: one line naming it, exit 2 (tracebacks are for bugs)
        print(f"data.py: error: {e}", file=sys.stderr)
        sys.exit(2)
