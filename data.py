"""Data: video clips and images on disk -> augmented, masked batches for BEVT.

Implements the data side of the paper's §4.1 "Implementation details": the
pretraining recipe and its augmentation, the masks of §3 drawn per sample
(masking.py), the finetuning data of §4.1-4.2 and Table 2's temporal probes.
The released BEVT configs (`swin_base_patch244_window877_bevt_in1k_k400.py`,
`..._finetune_k400.py`, `..._window1677_bevt_finetune_ssv2.py`) settle what
the paper leaves out; every difference is marked `# Differs from the released code:`.

The file follows a pretraining sample: frame sampling -> decoding -> the one
clip/image transform (rescale, [jitter], crop, flip, tokenizer copy) -> masks
-> batches; then what finetuning adds (random-resized crop, RandAugment, random
erasing, evaluation crops) and the Table 2 probes. Behind the banner: sample
lists, robust decoding, bad files replaced, the keyed samplers and epoch
loaders, a file lock.

Sample layouts (one dict per sample; the default collate adds a leading B axis):

    pretraining clip      video         (3, T, H, W)        uint8 crop; normalised on the training
                                                            device by `normalize_batch`
                          video_half    (3, T, H/2, W/2)    uint8: the same crop at half size, the
                                                            tokenizer's input (tokenizer.half_copy)
                          video_mask    (T/2, H/16, W/16)   bool input mask, True = masked (masking.py;
                                                            the target mask is masking.target_mask of it)
                          label, index  int                 annotation label; row of the list
    pretraining image     image (3, H, W), image_half (3, H/2, W/2), image_mask (H/16, W/16), label, index
    finetuning clip       video (3, T, H, W) float32 normalised, label, index      (train / val)
                          video (V, 3, T, H, W), V = clips x crops, crop-major     (test)
    joint batch           the video keys and the image keys in one dict, with `video_label`,
                          `video_index`, `image_label`, `image_index` instead of label / index

Pretraining samples ship as uint8 (a quarter of float32's bytes through shared memory and the
host-to-device copy); finetuning samples as float32, RandAugment and random erasing running in the
workers. `index` is the row actually returned (a replaced bad file gives its replacement's row), so
evaluation can drop the duplicates DistributedSampler pads in.

Usage (train.py; finetune.py's `build_finetune_loader("train", FinetuneDataConfig(...), ann=..., root=...)`
is the same; data sets come from `python tools/synthetic.py` or `python tools/prepare_data.py`):

    loader = build_pretrain_loader("joint", PretrainDataConfig(), video_ann=..., video_root=..., image_root=...,
                                   rank=rank, world_size=world_size, accum=accum)
    for epoch in range(epochs):
        loader.set_epoch(epoch)              # the epoch's global order; keys every sample's crops and masks
        for batch in loader: ...             # this rank's `accum` micro-batches of each global batch
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import socket
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from masking import KEY_ORDER, KEY_PIXELS, KEY_REPLACE, MASK_RATIO, MaskGenerator, derive_seed, sample_seed
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
    """`clip_len` frames `interval` apart, per clip; `num_clips` clips in test mode, one in training.

    Training: one random start in [0, num_frames - clip_len*interval]; test:
    N clips evenly spaced, each centred in its share of the valid starts (the
    released _get_test_clips). A video shorter than clip_len*interval starts
    at 0 and loops: indices are taken mod num_frames (out_of_bound_opt='loop').
    """
    span = clip_len * interval                                  # frames one clip covers
    if test_mode:
        avg = (num_frames - span + 1) / num_clips
        if num_frames > span - 1:
            offsets = (np.arange(num_clips) * avg + avg / 2.0).astype(np.int64)
        else:
            offsets = np.zeros(num_clips, np.int64)
    else:                                                       # (too short: start at 0 and loop)
        offsets = np.array([_randint(0, num_frames - span) if num_frames >= span else 0])
    idx = offsets[:, None] + np.arange(clip_len)[None, :] * interval     # (num_clips, clip_len)
    return np.mod(idx, num_frames).astype(np.int64)


def sample_uniform(num_frames: int, clip_len: int, test_mode: bool = False) -> np.ndarray:
    """One frame from each of `clip_len` equal segments of the whole video (SSv2).

    The released `get_seq_frames` (from SlowFast's ssv2.py): segment i spans
    [round(s*i), round(s*(i+1))] with s = (num_frames-1)/clip_len; training
    takes a random frame of it, testing the middle. Returns (1, clip_len).
    """
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

    def __post_init__(self):                   # (the trainers check the mode's name and the sizes)
        if self.num_clips != 1 and (self.mode == "uniform" or not self.test_mode):
            raise ValueError("several clips are dense test sampling only (SSv2's one clip spans the video)")

    def __call__(self, num_frames: int) -> np.ndarray:
        if self.mode == "uniform":
            return sample_uniform(num_frames, self.clip_len, self.test_mode)
        return sample_dense(num_frames, self.clip_len, self.interval, self.num_clips, self.test_mode)


# -----------------------------------------------------------------------------
# Decoding with PyAV
#
# What "frame i" means, in every container: the i-th picture, counting from 0, that decoding the
# stream from its first packet outputs (presentation order). A clip is decoded the same way, from the
# first packet up to the last frame it needs, so no timestamp has to be trusted; the frame count
# (counted before a clip is sampled, behind the banner) is the number of those pictures.


class BadMedia(Exception):
    """A file that cannot be decoded (unreadable, corrupt, truncated, no frames)."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), str(reason)


def read_video(path: PathLike, sample: Optional[Callable[[int], np.ndarray]] = None, threads: int = 1,
               num_frames: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode the frames a clip needs -> (frames, idx, num_frames).

    frames: uint8 (*idx.shape, H, W, 3) RGB; idx = sample(num_frames), the frame indices (any
    shape, e.g. (clips, T)); sample None takes every frame. Frames 0 .. max(idx) are decoded
    (`threads` decoder threads, 0: one per core). Raises BadMedia if the file cannot be opened, has
    no frames, or a needed frame never arrives. A known `num_frames` skips the count.
    """
    try:
        n = count_frames(path) if num_frames is None else num_frames
        if n < 1:
            raise BadMedia(path, "zero frames")
        idx = np.arange(n) if sample is None else np.asarray(sample(n))
        wanted = set(int(i) for i in idx.flat)
        last, got = max(wanted), {}
        container, stream = _open_video(path, threads)
        with container:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:           # RGB for needed frames only; threads=1: FFmpeg's automatic pool,
                    got[i] = frame.to_ndarray(format="rgb24", threads=1)   # made before workers fork, deadlocks them
                if i >= last:
                    break
    except BadMedia:
        raise
    except Exception as e:                                       # anything the demuxer/decoder throws: bad file
        raise BadMedia(path, f"{type(e).__name__}: {e}") from e
    missing = sorted(wanted - got.keys())
    if missing:
        raise BadMedia(path, f"decoded {len(got)} of the {len(wanted)} needed frames of {n} "
                             f"(first missing: {missing[0]}; truncated?)")
    frames = np.stack([got[int(i)] for i in idx.reshape(-1)])           # (numel(idx), H, W, 3)
    return frames.reshape(*idx.shape, *frames.shape[1:]), idx, n


# The most pixels an image may have (ImageNet's largest are a few thousand a side). A bigger one is
# bad media, refused from its header: Pillow's own bomb check only warns up to 179M pixels.
MAX_IMAGE_PIXELS = 8192 * 8192


def read_image(path: PathLike) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB, decoded completely (a truncated file is bad media)."""
    try:
        with Image.open(path) as im:                             # lazy: reads the header only
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise BadMedia(path, f"{im.width} x {im.height} pixels, more than MAX_IMAGE_PIXELS")
            if im.mode.startswith("I"):                # 16-bit grey (PNG): convert("RGB") would clip it to white
                im = Image.fromarray(np.clip(np.rint(np.asarray(im) / 257.0), 0, 255).astype(np.uint8))
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except BadMedia:
        raise
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
    return _randint(0, h - size), _randint(0, w - size)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] -> uint8, rounded to the nearest level (what a sample ships as)."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


_MEAN = torch.tensor(IMAGENET_MEAN) / 255.0
_STD = torch.tensor(IMAGENET_STD) / 255.0
_NORM: dict = {}          # device -> (1/std, -mean/std), (3,) fp32: copied to each device once, not per call


def _norm_consts(x: torch.Tensor, channel_dim: int):
    """(scale, shift) = (1/std, -mean/std) on x's device, shaped to broadcast with channels at channel_dim."""
    if x.device not in _NORM:
        _NORM[x.device] = ((1.0 / _STD).to(x.device), (-_MEAN / _STD).to(x.device))
    shape = [1] * x.dim()
    shape[channel_dim] = 3
    return (t.view(shape) for t in _NORM[x.device])


def normalize(x: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (x - mean) / std with the ImageNet RGB statistics (paper §4.1);
    channels_first=True returns (3, N, H, W), the clip layout (3, T, H, W), in the same one pass."""
    if channels_first:
        x = x.transpose(0, 1)                                             # (3, N, H, W) view
    scale, shift = _norm_consts(x, 0 if channels_first else -3)
    return torch.addcmul(shift, x, scale)


def normalize_batch(x: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """A uint8 pretraining batch on the training device, (B, 3, T, H, W) or (B, 3, H, W) with channels
    at `channel_dim` -> float32: `normalize(to_float(x))` bit for bit, with 4x fewer bytes to travel."""
    if x.dtype != torch.uint8:
        raise ValueError(f"normalize_batch: expected a uint8 batch, got {x.dtype}")
    scale, shift = _norm_consts(x, channel_dim)
    return torch.addcmul(shift, x.float().mul_(1.0 / 255.0), scale)


class PretrainTransform:
    """A pretraining sample, clip or image: rescale the short side, [colour jitter], random crop, flip,
    tokenizer copy, masks.

    The released video_train_pipeline: RandomRescale(256, 320) bicubic -> RandomCrop(224) ->
    Flip(0.5) -> CopyResize(112, lanczos) -> Normalize, then MaskedPositionGenerate (tube). Its
    image_train_pipeline adds ColorJitter(0.4, 0.4, 0.4, hue 0) after the rescale and takes the
    blockwise mask: an image is the one-frame case of a clip. One scale, crop and flip for all
    frames of a clip, drawn in this order: short side, [jitter factors and order], crop offsets,
    flip. Normalize runs on the training device (`normalize_batch`): samples ship as uint8.

    stream "video": frames (1, T, H, W, 3) uint8 -> {video, video_half, video_mask};
    stream "image": an image (H, W, 3) uint8 -> {image, image_half, image_mask}
    (shapes in the module docstring; no mask without a mask_gen). Jitter: JITTER for images, none for clips.
    """

    def __init__(self, stream: str, crop: int = CROP, short_side=RESCALE_RANGE, flip: float = FLIP_P,
                 jitter: Optional[float] = None, mask_gen: Optional[MaskGenerator] = None):
        if min(short_side) < crop:
            raise ValueError(f"short side range {short_side} must be >= the crop {crop}")
        self.stream, self.crop, self.short_side, self.flip = stream, crop, tuple(short_side), flip
        self.jitter = (JITTER if stream == "image" else 0.0) if jitter is None else jitter
        self.mask_gen = mask_gen

    def __call__(self, pixels: np.ndarray) -> dict:
        if self.stream == "video":
            x = frames_to_tensor(pixels[0])                                  # (T, 3, H, W) uint8: the one clip
        else:
            x = frames_to_tensor(pixels[None])                               # (1, 3, H, W) uint8: T = 1
        size = short_side_size(*x.shape[-2:], _randint(*self.short_side))
        x = resize(x, size, "bicubic")                                       # (T, 3, h', w') uint8
        if self.jitter > 0:                        # the whole frame (contrast: its mean grey), back to 8 bits
            x = to_uint8(color_jitter(to_float(x), self.jitter, self.jitter, self.jitter))   # (T, 3, h', w')
        top, left = random_crop_box(*size, self.crop)
        x = x[..., top:top + self.crop, left:left + self.crop]               # (T, 3, crop, crop) uint8 view
        if _uniform(0, 1) < self.flip:
            x = x.flip(-1)                                                     # flipped while still 1 byte/px
        half = half_copy(to_float(x))                                        # (T, 3, crop/2, crop/2) in [0, 1]
        x = x.transpose(0, 1).contiguous()                                   # (3, T, crop, crop) uint8
        half = to_uint8(half).transpose(0, 1).contiguous()                   # (3, T, crop/2, crop/2) uint8
        if self.stream == "image":
            x, half = x[:, 0], half[:, 0]                                    # (3, crop, crop), (3, crop/2, crop/2)
        out = {self.stream: x, f"{self.stream}_half": half}
        if self.mask_gen is not None:                  # the input mask: video (T/2, h, w), image (h, w)
            out[f"{self.stream}_mask"] = torch.from_numpy(self.mask_gen()[0])
        return out


# -----------------------------------------------------------------------------
# Masks and batches: the pretraining data config and loader (train.py)
#
# Each sample draws its own input mask (masking.MaskGenerator: blockwise for
# images, tube for clips, §3) inside its transform, so a batch carries pixels,
# the tokenizer's half-size copy and the mask together. Every random choice of
# a sample (frames, rescale, crop, flip, jitter, mask) is seeded from (seed,
# epoch, row index) alone, and an epoch's order from (seed, epoch): a batch is
# the same whichever process, worker or batch position draws it.


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
    decode_threads: Optional[int] = None       # None: cores // workers (decode_threads)
    seed: int = 0                              # base seed of the masks, the pixels' draws and the order


def build_pretrain_loader(stage: str, cfg: PretrainDataConfig, *, video_ann: Optional[PathLike] = None,
                          video_root: Optional[PathLike] = None, image_root: Optional[PathLike] = None,
                          image_ann: Optional[PathLike] = None, rank: int = 0, world_size: int = 1,
                          accum: int = 1, verbose: Optional[bool] = None) -> Union[EpochLoader, JointLoader]:
    """The training loader of a pretraining stage: "image" (BEVT-I), "video" (BEVT-V) or "joint" (BEVT).

    Videos: `video_ann` list under `video_root`; images: the folder tree `image_root` or the list
    `image_ann` under it. Yields this process's `accum` micro-batches of every global batch (module
    docstring); set_epoch(epoch, start_step). Seeds: images cfg.seed, clips cfg.seed + 1.
    """
    loaders = 2 if stage == "joint" else 1                        # the joint stage runs two loaders
    say = verbose or (verbose is None and rank == 0)              # the plan, on rank 0 by default
    threads = decode_threads(cfg.num_workers, loaders, cfg.decode_threads, say=say)
    common = dict(shuffle=True, drop_last=True, num_workers=cfg.num_workers, rank=rank,
                  world_size=world_size, accum=accum, verbose=verbose)
    videos = images = None
    if stage in ("video", "joint"):
        if video_ann is None or video_root is None:
            raise ValueError(f"stage {stage!r} needs video_ann and video_root")
        gen = MaskGenerator(cfg.video_mask, (cfg.frames, cfg.crop, cfg.crop), mask_ratio=cfg.mask_ratio,
                            seed=cfg.seed + 1)
        transform = PretrainTransform("video", cfg.crop, cfg.short_side, cfg.flip, 0.0, gen)
        ds = VideoDataset(video_ann, video_root, FrameSampling(cfg.frames, cfg.interval), transform, threads)
        videos = EpochLoader(ds, cfg.video_batch, name="videos", seed=cfg.seed + 1, **common)
    if stage in ("image", "joint"):
        if image_root is None:
            raise ValueError(f"stage {stage!r} needs image_root (a folder tree, or the root of image_ann)")
        gen = MaskGenerator("block", (cfg.crop, cfg.crop), mask_ratio=cfg.mask_ratio, seed=cfg.seed)
        transform = PretrainTransform("image", cfg.crop, cfg.short_side, cfg.flip, cfg.jitter, gen)
        ds = ImageDataset(image_root, image_ann, transform)
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
_SMOOTH = torch.tensor([[1., 1, 1], [1, 5, 1], [1, 1, 1]]) / 13             # PIL ImageFilter.SMOOTH
_BLUR = torch.tensor([[1., 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1],
                      [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]) / 16               # PIL ImageFilter.BLUR


def _conv_same(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 2D filter of (N, 3, H, W) with edge replication (PIL filters keep the border)."""
    k = kernel.shape[-1]
    return F.conv2d(F.pad(x, (k // 2,) * 4, mode="replicate"), kernel.to(x.dtype).expand(3, 1, k, k), groups=3)


def _affine(x: torch.Tensor, m: list, fill: float) -> torch.Tensor:
    """Warp (N, 3, H, W) with m: 2x3 map from output to input pixel coordinates; outside -> fill."""
    n, _, h, w = x.shape
    m = torch.tensor(m, dtype=x.dtype)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    src_x = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]               # (H, W) input x of every output pixel
    src_y = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    grid = torch.stack([(2 * src_x + 1) / w - 1, (2 * src_y + 1) / h - 1], -1)   # align_corners=False
    out, inside = (F.grid_sample(t, grid.expand(n, h, w, 2), mode="bilinear", padding_mode="zeros",
                                 align_corners=False) for t in (x, torch.ones_like(x[:, :1])))
    return out + fill * (1 - inside)                           # blend the fill in where samples fell outside


class RandAugment:
    """imgaug's `iaa.RandAugment(n, m)` as the released SSv2 config runs it, on tensors.

    Same ops and magnitudes, m on imgaug's [0, 30] scale: a random crop of up to m/224 of each
    side resized back, then `n` distinct ops of OPS in random order, each at m/30 of imgaug's
    maximum (below); affine ops fill with grey 128 and sample bilinearly. One draw for all frames
    of a clip (the released wrapper's `to_deterministic`); autocontrast, equalize and contrast use
    each frame's own statistics, as imgaug applied per frame does.

    Differs from the released code: imgaug's RandAugment also flips horizontally with p = 0.5,
    although the SSv2 config sets Flip(flip_ratio=0) because left/right matters there ("pushing
    something from left to right"). That flip is left out here.
    """

    OPS = ("identity", "autocontrast", "equalize", "invert", "rotate", "posterize", "solarize", "color",
           "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y",
           "cutout", "blur", "smooth")
    # imgaug's maxima (reached at m = 30), from iaa.RandAugment._create_*_augmenters_list:
    CROP_PX = 224              # initial crop: Uniform(0, m)/224 of each side
    ROTATE_DEG = 30            # rotate about the centre: +-30 degrees
    POSTERIZE_BITS = 6         # posterize: drop up to 6 of the 8 bits
    SOLARIZE = 256             # solarize: invert values >= 256 - int(256 * m/30)
    ENHANCE = 0.9              # colour/contrast/brightness/sharpness factor 1 +- 0.9, clipped to [0.1, 1.9]
    SHEAR_RAD = 0.3            # shear x/y about the top-left corner: +-0.3 rad
    TRANSLATE = 0.33           # translate x/y: +-0.33 of the size
    CUTOUT = 20 / 32           # one grey square: side up to 20/32 of the height

    def __init__(self, n: int = RANDAUG_N, m: int = RANDAUG_M, fill: int = RANDAUG_FILL):
        self.n, self.m, self.fill = n, m, fill / 255.0
        self.level = m / RANDAUG_M_MAX                          # magnitude as a fraction of imgaug's max

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(T, 3, H, W) floats in [0, 1] -> same shape, one random draw for all T frames."""
        h, w = x.shape[-2:]
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
            lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
            return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
        if name == "equalize":
            return _equalize(x)
        if name == "invert":
            return 1.0 - x
        if name == "posterize":                                 # keep the top 8 - int(6*lv) bits
            bits = 8 - min(int(self.POSTERIZE_BITS * lv), self.POSTERIZE_BITS)
            return ((x * 255).round().to(torch.uint8) & (0xFF << (8 - bits) & 0xFF)).float() / 255
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
            c, s, cx, cy = math.cos(a), math.sin(a), (w - 1) / 2, (h - 1) / 2
            return _affine(x, [[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy]], self.fill)
        if name in ("shear_x", "shear_y"):                      # about the top-left corner (imgaug center=(0, 0))
            s = math.tan(self._sign() * self.SHEAR_RAD * lv)    # shear angle +-0.3 rad * m/30
            return _affine(x, [[1, s, 0], [0, 1, 0]] if name == "shear_x" else [[1, 0, 0], [s, 1, 0]], self.fill)
        if name in ("translate_x", "translate_y"):              # +-0.33*lv of the width / height
            d = self._sign() * self.TRANSLATE * lv
            return _affine(x, [[1, 0, d * w], [0, 1, 0]] if name == "translate_x" else [[1, 0, 0], [0, 1, d * h]],
                           self.fill)
        if name == "cutout":                                    # one grey square, centre uniform over the image
            side = max(1, int(round(min(self.CUTOUT * lv, self.CUTOUT) * h)))
            cy, cx = _uniform(0, h), _uniform(0, w)
            t, l = max(0, int(cy - side / 2)), max(0, int(cx - side / 2))
            x = x.clone()
            x[..., t:int(cy + side / 2), l:int(cx + side / 2)] = self.fill
            return x
        if name in ("blur", "smooth"):
            return _conv_same(x, _BLUR if name == "blur" else _SMOOTH)
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
            nh, nw = short_side_size(H, W, self.short_side)
            top, left, ch, cw = random_resized_crop_box(nh, nw, self.rrc_scale, self.rrc_ratio)
            sy, sx = H / nh, W / nw                                          # 256-short-side -> decoded pixels
            t0, l0 = int(round(top * sy)), int(round(left * sx))
            t1, l1 = max(t0 + 1, int(round((top + ch) * sy))), max(l0 + 1, int(round((left + cw) * sx)))
            x = resize(x[..., t0:t1, l0:l1], (c, c), "bilinear")             # (T, 3, c, c) uint8
            if _uniform(0, 1) < self.flip:
                x = x.flip(-1)
            x = to_float(x)
            if self.randaug is not None:
                x = self.randaug(x)
            x = normalize(x, channels_first=True)                            # (3, T, c, c)
            if self.erase > 0:
                x = random_erasing(x, self.erase)                            # same rectangle in every frame
            return {"video": x}
        # val: the centre crop; test: every clip x every crop
        x = resize(x, short_side_size(H, W, self.short_side if self.mode == "val" else self.test_short_side))
        h, w = x.shape[-2:]
        test3 = self.mode == "test" and self.test_crops == 3
        boxes = three_crop_boxes(h, w, c) if test3 else [center_crop_box(h, w, c)]
        views = [normalize(to_float(x[..., t:t + c, l:l + c])).view(clips, T, 3, c, c) for t, l in boxes]
        x = torch.cat(views).transpose(1, 2)                                 # (crops*clips, 3, T, c, c)
        return {"video": (x[0] if self.mode == "val" and clips == 1 else x).contiguous()}


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
    """Finetuning loader: "train" (shuffled global batches, this process's `accum` micro-batches of
    each), "val" (1 centre clip) or "test" (clips x crops; val/test keep every sample, see EpochLoader)."""
    train = mode == "train"
    sampling = FrameSampling(cfg.frames, cfg.interval if cfg.sampling == "dense" else 1, cfg.sampling,
                             num_clips=cfg.test_clips if mode == "test" else 1, test_mode=not train)
    randaug = RandAugment(cfg.randaug_n, cfg.randaug_m) if (train and cfg.randaug_n > 0) else None
    transform = FinetuneClipTransform(mode, cfg.crop, cfg.short_side, cfg.test_short_side, cfg.test_crops,
                                      cfg.rrc_scale, cfg.rrc_ratio, cfg.flip, randaug, cfg.erase)
    say = train and (verbose or (verbose is None and rank == 0))            # the plan, once per training run
    threads = decode_threads(cfg.num_workers, 1, cfg.decode_threads, say=say)
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
# Machinery: what running the method needs (not the method itself).

# -----------------------------------------------------------------------------
# Sample lists: `relative/path label` per line (Kinetics/SSv2), or an image folder tree
#
# Three numpy arrays, not a Python list of (Path, int): a forked DataLoader worker that reads a
# Python object writes its reference count and so un-shares its page (PyTorch issue 13246).

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")   # the image files a folder scan lists


class SampleList:
    """(path, label) rows: `samples[i]` is (root / relative path i, label i), path i being the
    file-system bytes _paths[_offsets[i]:_offsets[i + 1]]."""

    def __init__(self, root: PathLike, paths: bytearray, ends: array, labels: array):
        self.root = Path(root)
        self._paths = np.frombuffer(paths, np.uint8).copy()            # exact-size copies of the growable buffers
        self._offsets = np.concatenate([np.zeros(1, np.int64), np.frombuffer(ends, np.int64)])
        self.labels = np.frombuffer(labels, np.int64).copy()

    def __len__(self) -> int:
        return len(self.labels)

    def relpath_bytes(self, i: int) -> bytes:
        i = range(len(self.labels))[i]        # as a list takes rows (IndexError past the end also ends iteration)
        return self._paths[self._offsets[i]:self._offsets[i + 1]].tobytes()

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(self.relpath_bytes(i))

    def inside_root(self, i: int) -> bool:
        """Whether row i stays under root: an absolute path, or one climbing out with `..`, is bad media."""
        rel = os.path.normpath(os.fsdecode(self.relpath_bytes(i)))
        return not (os.path.isabs(rel) or rel.split(os.sep, 1)[0] == "..")

    def label(self, i: int) -> int:
        return int(self.labels[range(len(self.labels))[i]])

    def __getitem__(self, i: int) -> tuple[Path, int]:
        return self.path(i), self.label(i)


def _check_exists(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def read_annotations(ann_file: PathLike, root: PathLike) -> SampleList:
    """`relative/path label` per line -> SampleList of (root/relative/path, label). The label is the
    last field (paths may hold spaces); blank and '#' lines are skipped. A missing list or root is an
    error; a missing listed file is bad media at load time (big video sets always have a few)."""
    ann_file, root = _check_exists(Path(ann_file), "annotation file"), _check_exists(Path(root), "data root")
    paths, ends, labels = bytearray(), array("q"), array("q")
    with open(ann_file, "rb") as f:                            # bytes: no Python object per row outlives its line
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            parts = line.rsplit(None, 1)
            try:
                labels.append(int(parts[1]))
            except (IndexError, ValueError, OverflowError):
                raise ValueError(f"{ann_file}:{lineno}: expected 'relative/path label', "
                                 f"got {os.fsdecode(line)!r}") from None
            paths += parts[0]
            ends.append(len(paths))
    if not ends:
        raise ValueError(f"annotation file {ann_file} lists no samples")
    return SampleList(root, paths, ends, labels)


def _walk_images(folder: str, rel: str, unreadable: list):
    """Relative paths (rel/...) of the image files under `folder`, in sorted(Path.rglob) order (symlinked
    folders not entered); an unreadable folder is noted in `unreadable` and skipped."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        unreadable.append(f"{folder} ({e.strerror or e})")
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            yield from _walk_images(e.path, f"{rel}/{e.name}", unreadable)
        elif e.name.rfind(".") > 0 and e.name.lower().endswith(IMAGE_EXTS) and e.is_file():
            yield f"{rel}/{e.name}"


def scan_image_folder(root: PathLike) -> tuple[SampleList, list[str]]:
    """ImageNet-style tree root/<class>/**/<image> -> (SampleList of (path, label), classes): labels
    are the sorted class folders' positions (torchvision's ImageFolder). Unreadable folders are logged."""
    root = _check_exists(Path(root), "image folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders (expected root/<class>/<image>)")
    paths, ends, labels = bytearray(), array("q"), array("q")
    unreadable = []
    for label, c in enumerate(classes):
        for rel in _walk_images(str(root / c), c, unreadable):
            paths += os.fsencode(rel)
            ends.append(len(paths))
            labels.append(label)
    if unreadable:
        logger.warning("%s: skipped %d unreadable folder(s), e.g. %r", root, len(unreadable), unreadable[0])
    if not ends:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    return SampleList(root, paths, ends, labels), classes


# -----------------------------------------------------------------------------
# Counting frames
#
# The frame count is the number of packets the decoder turns into pictures: the demuxed (not
# decoded) packets, less the empty ones (AVI's "drop frame" chunks, the end-of-stream packet) and
# those marked discard (frames an MP4 edit list cuts). Containers' own counts are not used
# (Matroska, MPEG-TS/PS and FLV store none; AVI's counts the drop frames, MP4's the cut ones).


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


def count_frames(path: PathLike) -> int:
    """Frames in the first video stream of a file: what decoding it from the start outputs."""
    container, stream = _open_video(path, 1)
    with container:
        return sum(1 for pkt in container.demux(stream) if pkt.size and not pkt.is_discard)


# -----------------------------------------------------------------------------
# Data sets: per-sample keyed randomness, and bad files replaced

MAX_REPLACEMENTS = 50       # replacement samples to try before deciding the data set itself is broken


class AllBadMedia(ValueError):
    """Every file tried in a row was bad: the list or the root is wrong, not one file."""


class _RobustDataset(Dataset):
    """A sample's randomness keyed by (seed, epoch, index), never the rank or worker (a run can be
    re-sharded); a file raising BadMedia is replaced by a row drawn from the same key, each failure
    listed in `skipped` as "path<TAB>reason". Only decoding is guarded: an error in a transform is a bug."""

    def __init__(self, samples: SampleList, transform: Callable):
        self.samples, self.transform = samples, transform
        self.seed, self.epoch = 0, 0                             # the samples' key (set by EpochLoader)
        self._bad = np.zeros(len(samples), np.bool_)             # row -> known bad here (reason logged once)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key) -> dict:
        """key: (index, seed, epoch) as EpochLoader sends it, or a row index (the dataset's seed and epoch)."""
        index, seed, epoch = key if isinstance(key, tuple) else (key, self.seed, self.epoch)
        skipped, i, replacements = [], index, None
        mask_gen = getattr(self.transform, "mask_gen", None)
        for attempt in range(MAX_REPLACEMENTS):
            reason = "known bad"
            if not self._bad[i]:
                try:
                    if not self.samples.inside_root(i):
                        raise BadMedia(self.samples.path(i), "outside the data root; not read")
                    # From the sample's key: torch's CPU generator (restored after; not the GPUs') and the masks.
                    with torch.random.fork_rng(devices=[]):
                        torch.default_generator.manual_seed(sample_seed(seed, KEY_PIXELS, epoch, index, attempt))
                        if mask_gen is not None:
                            mask_gen.reseed_sample(epoch, index, attempt)
                        out = self.load(i)
                    break
                except BadMedia as e:
                    self._bad[i], reason = True, e.reason
            skipped.append(f"{self.samples.path(i)}\t{reason}")
            if replacements is None:                             # drawn only once a file has failed
                rng = np.random.default_rng(sample_seed(seed, KEY_REPLACE, epoch, index))
                replacements = rng.integers(len(self.samples), size=MAX_REPLACEMENTS)
            i = int(replacements[attempt])
        else:
            first = "; ".join(line.replace("\t", " (", 1) + ")" for line in skipped[:3])
            raise AllBadMedia(f"{MAX_REPLACEMENTS} files in a row could not be decoded, e.g. {first}; "
                              f"are the list and the root right?")
        return {**out, "label": self.samples.label(i), "index": i, "skipped": "\n".join(skipped)}


class VideoDataset(_RobustDataset):
    """Clips of an annotation list (`relative/path.mp4 label`) under `root`: `sampling` picks the frames,
    `transform` maps them (clips, T, H, W, 3) uint8 -> dict. Frame counts are cached (0: not counted yet)."""

    def __init__(self, ann_file: PathLike, root: PathLike, sampling: FrameSampling, transform: Callable,
                 decode_threads: int = 1):
        super().__init__(read_annotations(ann_file, root), transform)
        self.sampling, self.decode_threads = sampling, decode_threads
        self._num_frames = np.zeros(len(self.samples), np.int32)

    def load(self, index: int) -> dict:
        frames, _, n = read_video(self.samples.path(index), self.sampling, self.decode_threads,
                                  int(self._num_frames[index]) or None)
        self._num_frames[index] = n
        return self.transform(frames)                        # frames (clips, T, H, W, 3)


class ImageDataset(_RobustDataset):
    """Images of an ImageNet-style tree (root/<class>/<image>; `classes` its folder names) or of a list
    file under root (`classes` None; `tools/prepare_data.py lists images` saves each rank a scan)."""

    def __init__(self, root: PathLike, ann_file: Optional[PathLike] = None, transform: Callable = None):
        samples, self.classes = ((read_annotations(ann_file, root), None) if ann_file is not None
                                 else scan_image_folder(root))
        super().__init__(samples, transform)

    def load(self, index: int) -> dict:
        return self.transform(read_image(self.samples.path(index)))


# -----------------------------------------------------------------------------
# Loaders: global batches for training (the same on any number of processes),
# DistributedSampler shards for evaluation

_LOGGED_BAD: set = set()          # paths already logged by this process ("logged once")


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Process r's `accum` micro-batches of `batch` rows at r*accum*batch of each global batch of
    world x accum x batch rows, cut from a permutation of (seed, epoch): the same micro-batches on any
    number of processes. set_epoch(epoch, start) begins at global step `start`.

        one global batch (8 rows, batch 2):  | 0 1 | 2 3 | 4 5 | 6 7 |
        world 2, accum 2:                      r0 m0 r0 m1 r1 m0 r1 m1
        world 1, accum 4:                      m0    m1    m2    m3
    """

    def __init__(self, n: int, batch: int, accum: int = 1, rank: int = 0, world: int = 1, seed: int = 0):
        self.n, self.batch, self.accum, self.rank, self.world, self.seed = n, batch, accum, rank, world, seed
        self.global_batch = world * accum * batch
        self.steps = n // self.global_batch                     # global batches per epoch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> torch.Tensor:
        """(n,) int64: the rows of epoch `epoch` in the order the global batches take them."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, KEY_ORDER, epoch))
        return torch.randperm(self.n, generator=g)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum             # micro-batches still to come this epoch

    def __iter__(self):
        perm = self.order(self.epoch)
        share = self.accum * self.batch                           # rows of one process per global batch
        for s in range(self.start, self.steps):
            first = s * self.global_batch + self.rank * share
            yield from perm[first:first + share].view(self.accum, self.batch).tolist()    # (accum, batch)


class _KeyedBatches(Sampler):
    """Batches of row indices -> batches of sample keys (index, seed, epoch); EpochLoader sets `epoch`
    (no reference back to the loader: no cycle keeps a finished loader's workers alive)."""

    def __init__(self, batches, seed: int):
        self.batches, self.seed, self.epoch = batches, seed, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        seed, epoch = self.seed, self.epoch
        return ([(i, seed, epoch) for i in batch] for batch in self.batches)


class EpochLoader:
    """A DataLoader with `set_epoch`, yielding dicts: in training (drop_last) this process's `accum`
    micro-batches of every global batch (GlobalBatchSampler), in evaluation DistributedSampler
    shards (padded with repeats: drop them by `index`). Skipped files are logged once per path,
    counted in `skipped` (this epoch) and `skipped_total`, and printed per epoch if `verbose`."""

    def __init__(self, dataset: _RobustDataset, batch_size: int, *, shuffle: bool, drop_last: bool,
                 num_workers: int, rank: int = 0, world_size: int = 1, seed: int = 0, name: str = "data",
                 verbose: Optional[bool] = None, accum: int = 1):
        self.dataset, self.name, self.rank, self.seed = dataset, name, rank, seed
        self.verbose = (rank == 0) if verbose is None else verbose
        if drop_last:                                   # training: always shuffled
            self.sampler = batches = GlobalBatchSampler(len(dataset), batch_size, accum, rank, world_size, seed)
        else:
            self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                              seed=seed, drop_last=False)
            batches = BatchSampler(self.sampler, batch_size, drop_last=False)
        if len(batches) == 0:
            raise ValueError(f"{name}: {len(dataset)} samples give no batch of {batch_size} x {world_size} "
                             f"process(es) x accumulation {accum}; use a smaller batch or more data")
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
        if isinstance(self.sampler, GlobalBatchSampler):
            self.sampler.set_epoch(epoch, start)
        else:
            self.sampler.set_epoch(epoch)
        self.epoch = self.keys.epoch = epoch                        # what every index of the epoch carries
        self.dataset.seed, self.dataset.epoch = self.seed, epoch    # for direct indexing
        # The workers' seeds (which no sample draws from) come from a generator of their own, not the trainer's.
        self.loader.generator = torch.Generator().manual_seed(derive_seed(self.seed, rank=self.rank, epoch=epoch))

    def __iter__(self):
        self.skipped = 0
        try:
            for batch in self.loader:
                for line in "\n".join(batch.pop("skipped", ())).split("\n"):    # "path<TAB>reason" per failure
                    path, _, reason = line.partition("\t")
                    if path:
                        self.skipped += 1
                        self.skipped_total += 1
                        if path not in _LOGGED_BAD:                               # logged once per path
                            _LOGGED_BAD.add(path)
                            logger.warning("skipped unreadable file %s (%s); replaced by another sample", path, reason)
                yield batch
        except AllBadMedia as e:
            # From a worker, the message carries the worker's traceback; keep its last line.
            raise AllBadMedia(str(e).strip().splitlines()[-1].split("AllBadMedia: ")[-1]) from None
        if self.verbose:
            print(f"[data] {self.name} epoch {self.epoch}: {self.skipped} unreadable file(s) skipped "
                  f"({self.skipped_total} in total)", flush=True)


class JointLoader:
    """The joint stage (BEVT, §3 + paper §4.1): every video batch comes with an image batch.

    One epoch is one pass over the videos; each video micro-batch is paired with the next image
    micro-batch. The images cycle in their own epochs: video step s of epoch e pairs with image
    epoch e*P + s // S, step s % S (S image steps per image epoch, P = ceil(video steps / S)), so
    every pass has a fresh image order and a resume finds its place in both streams.

    Differs from the released code: its MultiSourceRunner restarts its cycled ImageNet loader every
    epoch with the sampler at the video epoch, so repeated image passes within an epoch reuse one
    order; here every pass has its own.
    """

    def __init__(self, videos: EpochLoader, images: EpochLoader):
        self.videos, self.images = videos, images
        self.verbose, videos.verbose, images.verbose = videos.verbose, False, False   # reported here, per video epoch
        self.passes = math.ceil(videos.steps_per_epoch / images.steps_per_epoch)
        self.epoch, self.start = 0, 0

    def __len__(self):
        return len(self.videos)

    @property
    def steps_per_epoch(self) -> int:
        return self.videos.steps_per_epoch

    @property
    def skipped_total(self) -> int:
        return self.videos.skipped_total + self.images.skipped_total

    def image_position(self, epoch: int, step: int) -> tuple[int, int]:
        """(image epoch, image step) paired with video step `step` of video epoch `epoch`."""
        per = self.images.steps_per_epoch
        return epoch * self.passes + step // per, step % per

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.videos.set_epoch(epoch, start)
        self.images.set_epoch(*self.image_position(epoch, start))

    def __iter__(self):
        img_epoch, img_start = self.image_position(self.epoch, self.start)
        self.images.set_epoch(img_epoch, img_start)
        images, images_before = iter(self.images), self.images.skipped_total
        for vb in self.videos:
            ib = next(images, None)
            if ib is None:                                            # images exhausted: next image epoch
                img_epoch += 1
                self.images.set_epoch(img_epoch)
                images = iter(self.images)
                ib = next(images)
            yield {**{(f"video_{k}" if k in ("label", "index") else k): v for k, v in vb.items()},
                   **{(f"image_{k}" if k in ("label", "index") else k): v for k, v in ib.items()}}
        if self.verbose:
            print(f"[data] joint epoch {self.epoch}: {self.videos.skipped} unreadable video(s) and "
                  f"{self.images.skipped_total - images_before} image(s) skipped", flush=True)


def decode_threads(num_workers: int, loaders: int = 1, threads: Optional[int] = None, say: bool = False,
                   local_world_size: Optional[int] = None) -> int:
    """PyAV decoder threads per loading process: `threads`, else the CPUs of the affinity mask (the job's, not
    os.cpu_count()) over this node's loading processes, ranks (LOCAL_WORLD_SIZE) x loaders x workers, >= 1.
    `say`: one line on how the node's CPUs are spent on data loading (printed at start)."""
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if local_world_size is None else local_world_size)
    cpus, procs = len(os.sched_getaffinity(0)), ranks * max(1, num_workers * loaders)
    threads = threads or max(1, cpus // procs)
    if say:
        print(f"data loading: {ranks} rank(s) on this node x {loaders} loader(s) x {num_workers} worker(s) = "
              f"{procs} loading process(es), {threads} decoder thread(s) each, on {cpus} CPUs", flush=True)
    return threads


# -----------------------------------------------------------------------------
# One writer per folder (train.py's run folder, tools/tables.py's results file)


class FileLock:
    """A POSIX record lock (`fcntl.lockf`) on a file naming its holder ("pid P on HOST since T"), never deleted.

    Freed by the kernel when its holder dies (any host: a restart reclaims it); not inherited by forked
    DataLoader workers, unlike flock. One per file per process: closing another descriptor frees it.
    """

    def __init__(self, path: PathLike):
        self.path, self._fd = Path(path), None

    def acquire(self) -> Optional[str]:
        """None when the lock is ours, else a one-line description of its holder."""
        if self._fd is not None:
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:                                   # EAGAIN or EACCES: held by another process
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process starting up"
            os.close(fd)
            return f"{holder} (lock file {self.path})"
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)                            # closing frees a POSIX lock
            self._fd = None
