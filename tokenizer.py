"""Visual tokenizers: what turns images and clip frames into BEVT's discrete targets.

Implements paper §3 "Tokenizer" and appendix A ("Details on Pretrained
Tokenizer"), reading the published DALL-E weights and released BEVT
checkpoints safely.

The pipeline, for a crop `(N, 3, H, W)` of floats in [0, 1] (not mean/std
normalised), H and W multiples of 16:

    images (N, 3, H, W) --Lanczos 1/2--> (N, 3, H/2, W/2)      §3: "downsample by 1/2"
                        --x' = (1-2ε)x + ε, ε = 0.1-->           DALL-E's map_pixels
                        --dVAE encoder--> logits (N, 8192, H/16, W/16)
                        --argmax--> codes (N, H/16, W/16) int64  one code per 16x16 px

    clips (B, 3, T, H, W) -> frames (B*T, 3, H, W), in chunks -> codes (B, T, H/16, W/16)

The 1/2 resize is PIL's antialiased Lanczos-3 by default (`resample="pil"`, as
in BEiT's pipeline) or the released BEVT pipeline's OpenCV Lanczos-4
(`resample="cv2"`); see `lanczos_resize`.

Two tokenizers with one interface (`Tokenizer`: `vocab_size`, `tokenize`,
`tokenize_clip`), chosen by the file given to `load_tokenizer`:

* `DalleTokenizer`: the DALL-E dVAE encoder the paper uses (8192 codes, one
  per 8x8 pixels of its input). Its published weights (`encoder.pkl`) are a
  pickled whole module of the `dall_e` package in the old torch format; we read
  it without that package through a restricted unpickler that maps the three
  `dall_e` classes to inert stand-ins, allows only the torch/collections
  globals such a file needs and refuses every other global before anything
  runs. The tensors are then copied into our own `DalleEncoder`, whose
  parameter names and shapes equal the published ones (74 tensors).
* `OfflineTokenizer`: a k-means codebook over the same 8x8 patches of the
  half-size image, fitted with torch on your own images. For machines that
  cannot download DALL-E's weights (no machine of this project can). Same
  grid, same code dtype; its vocabulary is yours to choose (8192 for
  paper-sized runs, smaller for the CPU demo). It is not DALL-E: see
  `OfflineTokenizer` for what that changes.

For pictures (`bevt.py show`), codes go back to pixels: the offline
tokenizer through its codebook (`OfflineTokenizer.decode_half`), DALL-E
through its dVAE decoder (`DalleDecoder`, read from the published
`decoder.pkl` by the same restricted unpickler, with its own allow-list, or
from its converted state dict: `load_dalle_decoder`).

Both are frozen: parameters never require grad, `train()` keeps eval mode,
everything runs under `torch.no_grad()` in fp32 (autocast is switched off
inside), and neither is a submodule of the trained model, so it never lands in
a training checkpoint.

Usage:

    tok = load_tokenizer("encoder.pkl")            # or dalle_encoder.pt, a BEVT
                                                   # checkpoint, or tok.pt (offline)
    check_vocab(tok, head_classes=8192)            # before building/loading the head
    codes = tok.tokenize(images)                   # (N, H/16, W/16) int64
    codes = tok.tokenize_clip(clips)               # (B, T, H/16, W/16) int64

Commands:

    python tokenizer.py convert --pkl encoder.pkl --out dalle_encoder.pt
        # once: the published pickle -> a plain state dict (weights_only=True loadable);
        # the same for decoder.pkl -> dalle_decoder.pt (bevt.py show --decoder)
    python tokenizer.py fit --data DIR --vocab 8192 --out tok.pt [--size 224 --seed 0
                            --iters 20 --max-patches 200000 --init kmeans++ --device cpu]
        # the offline tokenizer, from the png/jpg images under DIR (recursively)
    python tokenizer.py info PATH
        # what a tokenizer file is and its vocabulary

Speed: `python tests/bench_tokenizer.py`.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pickle
import sys
import types
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Constants (paper §3 "Tokenizer", appendix A; paper §3 "Tokenizer")

VOCAB_SIZE = 8192            # appendix A: "The vocabulary size of the visual tokens is 8192"
LOGIT_LAPLACE_EPS = 0.1      # ε of DALL-E's map_pixels x' = (1-2ε)x + ε (dall_e/utils.py)
DOWNSAMPLE = 2               # §3: images/frames are downsampled by 1/2 before the tokenizer
DVAE_PATCH = 8               # the dVAE gives one code per 8x8 pixels of its input
PATCH = DOWNSAMPLE * DVAE_PATCH   # = 16: one code per 16x16 pixels of the encoder's input
RESAMPLE_KINDS = ("pil", "cv2")   # see lanczos_resize
TOKENIZER_PRECISIONS = ("fp32", "bf16", "fp16")   # see Tokenizer.set_precision
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

PathLike = Union[str, os.PathLike]

# -----------------------------------------------------------------------------
# Preprocessing: Lanczos resize by 1/2 and DALL-E's pixel map


def _lanczos_kernel(x: torch.Tensor, a: int) -> torch.Tensor:
    """sinc(x) * sinc(x/a) on [-a, a), 0 outside (PIL's `lanczos_filter` for a = 3)."""
    inside = (x >= -a) & (x < a)
    return torch.where(inside, torch.sinc(x) * torch.sinc(x / a), torch.zeros_like(x))


@functools.lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int, kind: str) -> torch.Tensor:
    """(n_out, n_in) float64 matrix M with resized = M @ signal, for one axis.

    kind "pil": PIL's `Image.resize(..., Image.LANCZOS)` (LibImaging/Resample.c,
        precompute_coeffs): an antialiased Lanczos-3 whose support is stretched
        by the scale, i.e. 3 * 2 = 6 input pixels on each side of the output
        centre for a x1/2 downscale; taps outside the image are dropped and the
        rest renormalised. This is the filter of BEiT's torchvision pipeline.
    kind "cv2": OpenCV's INTER_LANCZOS4 (imgproc/resize.cpp): 8 taps of a
        Lanczos-4 at the source position (i + 0.5) * scale - 0.5, *not*
        stretched when downscaling (so it aliases), edge pixels replicated.
        This is what the released BEVT pipeline runs: `CopyResize(scale=(112,
        112), interpolation="lanczos")` calls `mmcv.imresize`, whose default
        backend is cv2.
    """
    scale = n_in / n_out
    M = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        if kind == "pil":
            fs = max(scale, 1.0)                          # filter scale: antialias when downscaling
            support = 3.0 * fs
            center = (i + 0.5) * scale                    # PIL's continuous coordinate (pixel edges at integers)
            lo = max(int(center - support + 0.5), 0)      # int() truncates toward 0, as C's (int) does
            hi = min(int(center + support + 0.5), n_in)
            xs = torch.arange(lo, hi, dtype=torch.float64)
            w = _lanczos_kernel((xs - center + 0.5) / fs, 3)
            M[i, lo:hi] = w / w.sum()
        elif kind == "cv2":
            fx = (i + 0.5) * scale - 0.5                  # source position in pixel-centre coordinates
            sx = math.floor(fx)
            taps = torch.arange(sx - 3, sx + 5)           # 8 taps
            w = _lanczos_kernel(taps.double() - fx, 4)
            w = w / w.sum()
            M[i].index_add_(0, taps.clamp(0, n_in - 1), w)   # BORDER_REPLICATE-like clamping
        else:
            raise ValueError(f"unknown resample kind {kind!r}; expected one of {RESAMPLE_KINDS}")
    return M


def lanczos_resize(x: torch.Tensor, size: tuple[int, int], kind: str = "pil") -> torch.Tensor:
    """Separable Lanczos resize of `(..., H, W)` floats in [0, 1] to `size` = (h, w).

    Width first, then height, as PIL does. The output is clamped to [0, 1]: the
    reference pipelines resize 8-bit images, which saturate (PIL also after the
    first pass, since it stores the intermediate image as 8 bits). Without 8-bit
    rounding the result differs from PIL's by at most about 1/255.
    """
    if kind not in RESAMPLE_KINDS:
        raise ValueError(f"unknown resample kind {kind!r}; expected one of {RESAMPLE_KINDS}")
    h, w = size
    Mw = _resize_matrix(x.shape[-1], w, kind).to(x.device, x.dtype)   # (w, W)
    Mh = _resize_matrix(x.shape[-2], h, kind).to(x.device, x.dtype)   # (h, H)
    x = x @ Mw.T                                                      # (..., H, w)
    if kind == "pil":
        x = x.clamp(0.0, 1.0)
    x = Mh @ x                                                        # (..., h, w)
    return x.clamp(0.0, 1.0)


def half_copy(x: torch.Tensor, kind: str = "pil") -> torch.Tensor:
    """(..., H, W) floats in [0, 1] -> (..., H/2, W/2): the copy of a crop the tokenizer reads
    (§3 "Tokenizer": a 224² crop is tokenized at 112²). data.py makes it in the loader
    (data.PretrainTransform), `Tokenizer.tokenize` here; both through this function."""
    return lanczos_resize(x, (x.shape[-2] // DOWNSAMPLE, x.shape[-1] // DOWNSAMPLE), kind)


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """DALL-E's input map: [0, 1] -> [ε, 1-ε] (the dVAE's logit-Laplace range)."""
    return (1 - 2 * eps) * x + eps


def _check_images(images: torch.Tensor, what: str = "images") -> None:
    """One-line ValueErrors for inputs the tokenizers cannot take."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor (N, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what}: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{what}: expected floats in [0, 1], got dtype {images.dtype} (divide uint8 pixels by 255)")
    H, W = images.shape[-2:]
    if H % PATCH or W % PATCH:
        raise ValueError(f"{what}: image size {H}x{W} is not a multiple of {PATCH} (one code per "
                         f"{PATCH}x{PATCH} pixels); crop or resize to e.g. {H // PATCH * PATCH or PATCH}x"
                         f"{W // PATCH * PATCH or PATCH}")
    if images.numel():
        lo, hi = images.min().item(), images.max().item()
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"{what}: expected un-normalised pixels in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                             f"(the tokenizer takes the crop before mean/std normalisation, paper §4.1)")


# -----------------------------------------------------------------------------
# The DALL-E dVAE encoder (paper §3 "Tokenizer"; openai/DALL-E dall_e/encoder.py, utils.py)
#
#   input (N, 3, h, w) in [ε, 1-ε]
#   blocks.input   conv 7x7 3 -> 256                       (N, 256,  h,    w)
#   blocks.group_1 2 x block(256)        + maxpool 2       (N, 256,  h/2,  w/2)
#   blocks.group_2 2 x block(-> 512)     + maxpool 2       (N, 512,  h/4,  w/4)
#   blocks.group_3 2 x block(-> 1024)    + maxpool 2       (N, 1024, h/8,  w/8)
#   blocks.group_4 2 x block(-> 2048)                      (N, 2048, h/8,  w/8)
#   blocks.output  ReLU, conv 1x1 2048 -> 8192             (N, 8192, h/8,  w/8) logits
#
# Parameter names equal the published file's: convs keep `w` and `b`.


class DalleConv2d(nn.Module):
    """dall_e.utils.Conv2d: weights `w` (n_out, n_in, kw, kw), bias `b`, "same" padding."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        # dall_e's init (only matters for random-weight runs: the benchmark, smoke tests).
        w = torch.empty(n_out, n_in, kw, kw).normal_(std=1 / math.sqrt(n_in * kw ** 2))
        self.w = nn.Parameter(w, requires_grad=False)             # frozen from birth
        self.b = nn.Parameter(torch.zeros(n_out), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Differs from the released code: dall_e's Conv2d runs in fp16 on CUDA
        # (use_float16=True for every conv but the output one); we run fp32
        # everywhere (paper §3 "Tokenizer"), so near-tie argmaxes can differ from fp16 ones.
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class DalleEncoderBlock(nn.Module):
    """x -> id_path(x) + (1 / n_layers²) · res_path(x); res_path is 4 convs, width n_out/4.

    The encoder's convs are 3x3, 3x3, 3x3, 1x1 (`KERNELS`); the decoder's block
    (DalleDecoderBlock) is the same with 1x1, 3x3, 3x3, 3x3.
    """

    KERNELS = (3, 3, 3, 1)          # kernel widths of res_path.conv_1 .. conv_4

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        self.n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        k1, k2, k3, k4 = self.KERNELS
        # A 1x1 conv only where the channel count changes (first block of groups 2-4).
        self.id_path = DalleConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", DalleConv2d(n_in, self.n_hid, k1)),
            ("relu_2", nn.ReLU()), ("conv_2", DalleConv2d(self.n_hid, self.n_hid, k2)),
            ("relu_3", nn.ReLU()), ("conv_3", DalleConv2d(self.n_hid, self.n_hid, k3)),
            ("relu_4", nn.ReLU()), ("conv_4", DalleConv2d(self.n_hid, n_out, k4)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """The DALL-E dVAE encoder: (N, 3, h, w) mapped pixels -> (N, vocab, h/8, w/8) logits."""

    group_count = 4

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3,
                 vocab_size: int = VOCAB_SIZE):
        super().__init__()
        self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = self.group_count * n_blk_per_group         # 8: sets post_gain = 1/64

        def group(n_in, n_out, pool):
            layers = [(f"block_{i + 1}", DalleEncoderBlock(n_in if i == 0 else n_out, n_out, n_layers))
                      for i in range(n_blk_per_group)]
            if pool:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            return nn.Sequential(OrderedDict(layers))

        self.blocks = nn.Sequential(OrderedDict([
            ("input", DalleConv2d(input_channels, n_hid, 7)),
            ("group_1", group(1 * n_hid, 1 * n_hid, pool=True)),
            ("group_2", group(1 * n_hid, 2 * n_hid, pool=True)),
            ("group_3", group(2 * n_hid, 4 * n_hid, pool=True)),
            ("group_4", group(4 * n_hid, 8 * n_hid, pool=False)),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()),
                ("conv", DalleConv2d(8 * n_hid, vocab_size, 1)),
            ]))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"DalleEncoder: expected (N, {self.input_channels}, h, w), got {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise ValueError(f"DalleEncoder: expected float32 input, got {x.dtype}")
        return self.blocks(x)


def _dalle_config(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Read DalleEncoder's constructor arguments off a state dict's shapes."""
    for key in ("blocks.input.w", "blocks.output.conv.w"):
        if key not in state:
            raise ValueError(f"not a DALL-E encoder state dict: no {key!r} (keys start {sorted(state)[:3]})")
    if tuple(state["blocks.input.w"].shape[2:]) == (1, 1):
        raise ValueError(f"this is a DALL-E decoder state dict (input conv {tuple(state['blocks.input.w'].shape)} "
                         f"takes one-hot codes); the tokenizer needs the encoder (encoder.pkl)")
    n_hid, c_in = state["blocks.input.w"].shape[:2]
    n_blk = len({k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")})
    return dict(n_hid=int(n_hid), n_blk_per_group=n_blk, input_channels=int(c_in),
                vocab_size=int(state["blocks.output.conv.w"].shape[0]))


def _load_exact(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Copy `state` into `module` (built on the meta device) as fp32, after checking that the
    names and shapes are exactly the module's: one-line errors naming the first differences."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"DALL-E {what} state dict does not match the architecture: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in expected.items():
        if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape):
            got = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
            raise ValueError(f"DALL-E {what} tensor {k!r}: expected shape {tuple(v.shape)}, got {got}")
    fp32 = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    module.load_state_dict(fp32, strict=True, assign=True)     # assign: the meta tensors are replaced
    return module.requires_grad_(False)


# -----------------------------------------------------------------------------
# The DALL-E dVAE decoder (openai/DALL-E dall_e/decoder.py, utils.py): codes back to pixels
#
# Not part of the method (BEVT only needs the codes); `bevt.py show` uses it to
# draw what target and predicted codes stand for. The published decoder.pkl is
# read like encoder.pkl (restricted unpickler, below) or converted once with
# `python tokenizer.py convert --pkl decoder.pkl --out dalle_decoder.pt`.
#
#   codes (N, h, w) int64 -> one-hot (N, 8192, h, w) float32
#   blocks.input   conv 1x1 8192 -> 128 (n_init)               (N, 128,  h,   w)
#   blocks.group_1 2 x block(-> 2048)  + upsample x2 nearest   (N, 2048, 2h,  2w)
#   blocks.group_2 2 x block(-> 1024)  + upsample x2           (N, 1024, 4h,  4w)
#   blocks.group_3 2 x block(-> 512)   + upsample x2           (N, 512,  8h,  8w)
#   blocks.group_4 2 x block(-> 256)                           (N, 256,  8h,  8w)
#   blocks.output  ReLU, conv 1x1 256 -> 6                     (N, 6,    8h,  8w) logit-Laplace statistics
#   pixels = unmap_pixels(sigmoid(stats[:, :3]))               (N, 3,    8h,  8w) in [0, 1]
#
# Parameter names equal the published file's (76 tensors).


class DalleDecoderBlock(DalleEncoderBlock):
    """The decoder's residual block: the encoder's with res_path kernels 1x1, 3x3, 3x3, 3x3."""

    KERNELS = (1, 3, 3, 3)


class DalleDecoder(nn.Module):
    """The DALL-E dVAE decoder: one-hot codes (N, vocab, h, w) -> statistics (N, 2·3, 8h, 8w)."""

    group_count = 4

    def __init__(self, n_init: int = 128, n_hid: int = 256, n_blk_per_group: int = 2, output_channels: int = 3,
                 vocab_size: int = VOCAB_SIZE):
        super().__init__()
        self.n_init, self.n_hid, self.n_blk_per_group = n_init, n_hid, n_blk_per_group
        self.output_channels, self.vocab_size = output_channels, vocab_size
        n_layers = self.group_count * n_blk_per_group         # 8: post_gain = 1/64, as in the encoder

        def group(n_in, n_out, upsample):
            layers = [(f"block_{i + 1}", DalleDecoderBlock(n_in if i == 0 else n_out, n_out, n_layers))
                      for i in range(n_blk_per_group)]
            if upsample:
                layers.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            return nn.Sequential(OrderedDict(layers))

        self.blocks = nn.Sequential(OrderedDict([
            ("input", DalleConv2d(vocab_size, n_init, 1)),
            ("group_1", group(n_init, 8 * n_hid, upsample=True)),
            ("group_2", group(8 * n_hid, 4 * n_hid, upsample=True)),
            ("group_3", group(4 * n_hid, 2 * n_hid, upsample=True)),
            ("group_4", group(2 * n_hid, 1 * n_hid, upsample=False)),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()),
                ("conv", DalleConv2d(1 * n_hid, 2 * output_channels, 1)),
            ]))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The published interface: one-hot (N, vocab, h, w) float32 -> (N, 2·channels, 8h, 8w)."""
        if x.dim() != 4 or x.shape[1] != self.vocab_size:
            raise ValueError(f"DalleDecoder: expected one-hot codes (N, {self.vocab_size}, h, w), got {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise ValueError(f"DalleDecoder: expected float32 input, got {x.dtype}")
        return self.blocks(x)

    @torch.no_grad()
    def decode_half(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, h, w) int64 -> the half-size image they stand for, (N, 3, 8h, 8w) in [0, 1].

        The input conv is 1x1 on a one-hot vector, i.e. a lookup of one column of
        its weight per code: done as that lookup (F.embedding), which equals
        forward(one_hot(codes)) without the (N, 8192, h, w) one-hot tensor.
        Then sigmoid of the first 3 statistics (the logit-Laplace means) and the
        inverse of the encoder's pixel map (dall_e.utils.unmap_pixels).
        """
        if codes.dim() != 3 or codes.dtype != torch.long:
            raise ValueError(f"DalleDecoder.decode_half: expected int64 codes (N, h, w), got "
                             f"{codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.vocab_size):
            raise ValueError(f"DalleDecoder.decode_half: codes must lie in [0, {self.vocab_size}), got "
                             f"[{codes.min().item()}, {codes.max().item()}]")
        conv = self.blocks.input
        table = conv.w[:, :, 0, 0].T                                    # (vocab, n_init): column c = code c
        x = F.embedding(codes.to(conv.w.device), table) + conv.b        # (N, h, w, n_init)
        x = x.permute(0, 3, 1, 2)                                       # (N, n_init, h, w)
        for name, module in self.blocks.named_children():
            if name != "input":
                x = module(x)                                           # ... -> (N, 6, 8h, 8w)
        return unmap_pixels(torch.sigmoid(x[:, :self.output_channels]))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "DalleDecoder":
        """Build from the published tensors (names as in decoder.pkl), checking every key and shape."""
        with torch.device("meta"):                                  # no 45M-value random init to throw away
            dec = cls(**_dalle_decoder_config(state))
        return _load_exact(dec, state, "decoder").eval()


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of map_pixels: [ε, 1-ε] -> [0, 1], clamped (dall_e.utils.unmap_pixels)."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0.0, 1.0)


def _dalle_decoder_config(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Read DalleDecoder's constructor arguments off a state dict's shapes; a one-line error
    for an encoder's state dict (its input conv takes 3 channels at 7x7, not one-hot codes)."""
    for key in ("blocks.input.w", "blocks.output.conv.w"):
        if key not in state or not isinstance(state[key], torch.Tensor):
            raise ValueError(f"not a DALL-E decoder state dict: no {key!r} (keys start {sorted(state)[:3]})")
    w_in, w_out = state["blocks.input.w"], state["blocks.output.conv.w"]
    if w_in.dim() != 4 or tuple(w_in.shape[2:]) != (1, 1):
        raise ValueError(f"not a DALL-E decoder: its input conv has shape {tuple(w_in.shape)}, expected "
                         f"(n_init, vocab, 1, 1) (a (256, 3, 7, 7) input conv is the encoder's: pass decoder.pkl)")
    n_blk = len({k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")})
    return dict(n_init=int(w_in.shape[0]), n_hid=int(w_out.shape[1]), n_blk_per_group=n_blk,
                output_channels=int(w_out.shape[0]) // 2, vocab_size=int(w_in.shape[1]))


# -----------------------------------------------------------------------------
# The common tokenizer interface


class Tokenizer(nn.Module):
    """Frozen image -> code map on the H/16 x W/16 grid. Subclasses define
    `vocab_size` and `codes_from_half` (the codes of an already half-size image).

    `resample` picks the 1/2 downscale filter ("pil" or "cv2", see
    `lanczos_resize`); `chunk_size` is how many frames `tokenize_clip` sends
    through at once (memory vs speed; the codes do not depend on it).
    """

    kind = "base"

    def __init__(self, resample: str = "pil", chunk_size: int = 64):
        super().__init__()
        if resample not in RESAMPLE_KINDS:
            raise ValueError(f"unknown resample kind {resample!r}; expected one of {RESAMPLE_KINDS}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        # Differs from the released code: its data pipeline halves the 8-bit crop
        # with mmcv.imresize, i.e. OpenCV's INTER_LANCZOS4 (not antialiased), and
        # rounds to 8 bits. Our default is PIL's antialiased Lanczos-3 (BEiT's
        # torchvision pipeline) on the float crop; resample="cv2" gives the
        # released filter (without the 8-bit rounding).
        self.resample, self.chunk_size = resample, chunk_size
        self.precision = "fp32"

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def set_precision(self, precision: str) -> "Tokenizer":
        """"fp32" (default): the argmax of fp32 logits. "bf16" / "fp16": autocast the DALL-E encoder
        (channels-last), which on GPUs costs a fraction of fp32 but can flip near-tie argmaxes.

        Only the DALL-E encoder is affected: it is as costly as the training step
        itself (52 GFLOP per 112² frame). The offline tokenizer always runs in fp32.
        """
        if precision not in TOKENIZER_PRECISIONS:
            raise ValueError(f"tokenizer precision must be one of {TOKENIZER_PRECISIONS}, got {precision!r}")
        self.precision = precision
        return self

    @property
    def device(self) -> torch.device:
        t = next(self.parameters(), None)
        if t is None:
            t = next(self.buffers(), None)
        return t.device if t is not None else torch.device("cpu")

    def codes_from_half(self, x_half: torch.Tensor) -> torch.Tensor:
        """(N, 3, H/2, W/2) fp32 in [0, 1] -> (N, H/16, W/16) int64."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> "Tokenizer":
        # Frozen: stays in eval mode whatever the caller (or a parent module's
        # .train()) asks, as the released head's train() override does.
        return super().train(False)

    # The one path from pixels to targets: crop -> half_copy (in the data loader:
    # data.PretrainTransform, shipped as uint8) -> codes_of_copy (in the training
    # step: train.model_inputs). `tokenize` / `tokenize_clip` run both halves in
    # one call, with input checks, for crops you hold yourself.

    @torch.no_grad()
    def codes_of_copy(self, x_half: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """The training step's entry: codes of the half-size tokenizer copy the data loader made.

        image (N, 3, H/2, W/2) -> (N, H/16, W/16); clip (B, 3, T, H/2, W/2) ->
        (B, T, H/16, W/16), frame by frame (§3: Z_vid in V^{T x H/16 x W/16}) in
        chunks of `chunk_size` frames per encoder call (memory vs speed; the codes
        do not depend on it). uint8 (as data.py ships it) or floats in [0, 1].
        Nothing here reads a value back to the host (no input checks on values),
        so it never stalls a GPU step.
        """
        x = x_half.to(self.device, non_blocking=True)
        x = x.float().mul_(1.0 / 255.0) if x.dtype == torch.uint8 else x.float()
        clip = x.dim() == 5
        if clip:
            B, _, T, h, w = x.shape
            x = x.transpose(1, 2).reshape(B * T, 3, h, w)                  # (B*T, 3, H/2, W/2), b-major
        n = chunk_size or self.chunk_size
        if len(x) == 0:
            codes = torch.zeros(0, x.shape[-2] // DVAE_PATCH, x.shape[-1] // DVAE_PATCH, dtype=torch.long,
                                device=self.device)
        else:
            # fp32 whatever the training step's autocast (a bf16/fp16 precision re-enables it inside).
            with torch.autocast(device_type=x.device.type, enabled=False):
                codes = torch.cat([self.codes_from_half(x[i:i + n]) for i in range(0, len(x), n)])
        return codes.view(B, T, *codes.shape[1:]) if clip else codes      # (B, T, H/16, W/16) | (N, H/16, W/16)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) floats in [0, 1] -> codes (N, H/16, W/16) int64,
        on the tokenizer's device. Never builds an autograd graph."""
        _check_images(images)
        x = images.to(self.device, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):     # fp32 Lanczos in any autocast
            return self.codes_of_copy(half_copy(x, self.resample))        # (N, 3, H/2, W/2) -> (N, H/16, W/16)

    @torch.no_grad()
    def tokenize_clip(self, clips: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """clips (B, 3, T, H, W) floats in [0, 1] -> codes (B, T, H/16, W/16), every frame on its own."""
        if not isinstance(clips, torch.Tensor) or clips.dim() != 5 or clips.shape[1] != 3:
            shape = tuple(clips.shape) if isinstance(clips, torch.Tensor) else type(clips).__name__
            raise ValueError(f"clips: expected shape (B, 3, T, H, W), got {shape}")
        B, _, T, H, W = clips.shape
        _check_images(clips.transpose(1, 2).reshape(B * T, 3, H, W), "clips")   # (B*T, 3, H, W): the same checks
        x = clips.to(self.device, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.codes_of_copy(half_copy(x, self.resample), chunk_size)   # (B, 3, T, H/2, W/2) -> codes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokenize(images)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, vocab_size={self.vocab_size}, resample={self.resample}"


class DalleTokenizer(Tokenizer):
    """The paper's tokenizer: argmax of the DALL-E dVAE encoder's logits."""

    kind = "dalle"

    def __init__(self, encoder: Optional[DalleEncoder] = None, resample: str = "pil", chunk_size: int = 32):
        super().__init__(resample, chunk_size)
        self.encoder = encoder if encoder is not None else DalleEncoder()
        self.encoder.requires_grad_(False)
        self.eval()

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    def codes_from_half(self, x_half: torch.Tensor) -> torch.Tensor:
        x = map_pixels(x_half)
        if self.precision == "fp32":
            logits = self.encoder(x)                               # (N, vocab, H/16, W/16)
        else:
            # Reduced precision as the released apex run (fp16): channels-last is
            # the layout the GPU's tensor-core convolutions want.
            with torch.autocast(x.device.type, dtype=_DTYPES[self.precision]):
                logits = self.encoder(x.contiguous(memory_format=torch.channels_last))
        return logits.argmax(dim=1)                                # (N, H/16, W/16) int64

    def set_precision(self, precision: str) -> "DalleTokenizer":
        super().set_precision(precision)
        fmt = torch.contiguous_format if precision == "fp32" else torch.channels_last
        self.encoder.to(memory_format=fmt)
        return self

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], **kw) -> "DalleTokenizer":
        """Build from the published tensors (names as in encoder.pkl), checking every key and shape."""
        state = {k: v for k, v in state.items()}
        cfg = _dalle_config(state)
        with torch.device("meta"):                                  # no 50M-value random init to throw away
            enc = DalleEncoder(**cfg)
        return cls(_load_exact(enc, state, "encoder"), **kw)


# -----------------------------------------------------------------------------
# The offline tokenizer: k-means over 8x8 patches of the half-size image


def half_patches(x_half: torch.Tensor, p: int = DVAE_PATCH) -> torch.Tensor:
    """(N, 3, h*p, w*p) -> (N, h, w, 3*p*p): each p x p patch flattened in (c, y, x) order."""
    N, C, H, W = x_half.shape
    x = x_half.reshape(N, C, H // p, p, W // p, p)                 # (N, C, h, p, w, p)
    x = x.permute(0, 2, 4, 1, 3, 5)                                # (N, h, w, C, p, p)
    return x.reshape(N, H // p, W // p, C * p * p)


def unpatch(feats: torch.Tensor, p: int = DVAE_PATCH) -> torch.Tensor:
    """Inverse of half_patches: (N, h, w, 3*p*p) -> (N, 3, h*p, w*p)."""
    N, h, w, D = feats.shape
    C = D // (p * p)
    x = feats.reshape(N, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5)  # (N, C, h, p, w, p)
    return x.reshape(N, C, h * p, w * p)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, codebook_sq: Optional[torch.Tensor] = None,
                 chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows x (M, D): index of the nearest codebook row (K, D) and the squared distance.

    ||x - c||² = ||x||² - 2 x·c + ||c||², in chunks of rows so that the (chunk, K)
    distance matrix stays small (8192 x 8192 fp32 = 256 MB).
    """
    if codebook_sq is None:
        codebook_sq = codebook.pow(2).sum(1)
    idx, dist = [], []
    for i in range(0, x.shape[0], chunk):
        xc = x[i:i + chunk]
        d = torch.addmm(codebook_sq[None], xc, codebook.T, alpha=-2.0)    # (chunk, K) = ||c||² - 2 x·c
        m, j = d.min(dim=1)
        idx.append(j)
        dist.append((m + xc.pow(2).sum(1)).clamp_min(0.0))
    if not idx:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0)
    return torch.cat(idx), torch.cat(dist)


def kmeans(x: torch.Tensor, k: int, *, iters: int = 20, seed: int = 0, init: str = "kmeans++",
           verbose: bool = False) -> tuple[torch.Tensor, float]:
    """Lloyd's k-means of rows x (M, D) into k centroids; returns (centroids (k, D), mean squared error per value).

    Deterministic given `seed` (a torch.Generator drives the initialisation;
    Lloyd's steps are deterministic): "kmeans++" (Arthur & Vassilvitskii,
    O(k·M·D), fine up to a few thousand codes on a CPU) or "random" (k distinct
    rows). A cluster that empties is re-seeded with the row farthest from its
    centroid. Stops early when no assignment changes.
    """
    M, D = x.shape
    if M < k:
        raise ValueError(f"k-means needs at least as many patches as codes: {M} patches for vocabulary {k}")
    if init not in ("kmeans++", "random"):
        raise ValueError(f"unknown k-means init {init!r}; expected 'kmeans++' or 'random'")
    g = torch.Generator(device=x.device).manual_seed(seed)
    if init == "random":
        C = x[torch.randperm(M, generator=g, device=x.device)[:k]].clone()
    else:
        C = torch.empty(k, D, dtype=x.dtype, device=x.device)
        C[0] = x[torch.randint(M, (1,), generator=g, device=x.device)]
        d2 = (x - C[0]).pow(2).sum(1)                              # squared distance to the nearest chosen centre
        for i in range(1, k):
            total = d2.sum()
            if total > 0:
                j = torch.multinomial(d2 / total, 1, generator=g)  # D² sampling
            else:                                                  # fewer distinct rows than codes
                j = torch.randint(M, (1,), generator=g, device=x.device)
            C[i] = x[j]
            d2 = torch.minimum(d2, (x - C[i]).pow(2).sum(1))
    assign = None
    for it in range(iters):
        new_assign, dist = nearest_code(x, C)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(C).index_add_(0, assign, x)        # (k, D)
        counts = torch.bincount(assign, minlength=k)               # (k,)
        full = counts > 0
        C[full] = sums[full] / counts[full, None].to(x.dtype)
        empty = (~full).nonzero().flatten()
        if len(empty):                                             # re-seed with the worst-fitted rows
            C[empty] = x[dist.argsort(descending=True)[:len(empty)]]
        if verbose:
            print(f"k-means iter {it + 1}/{iters}: mse {dist.mean().item() / D:.5f}, {len(empty)} empty")
    _, dist = nearest_code(x, C)
    return C, dist.mean().item() / D


class OfflineTokenizer(Tokenizer):
    """A vector-quantising tokenizer you can fit offline: k-means codes of 8x8 patches.

    Same grid and interface as DALL-E: the crop is halved with the same Lanczos
    filter, cut into 8x8 patches (one per 16x16 pixels of the crop), and each
    patch gets the index of its nearest codebook row. Features are the raw
    8x8x3 RGB values in [0, 1], not mean-centred, so a code stands for a
    patch's colour and structure together (as a dVAE code does, since the
    decoder reconstructs both) and the quantisation error is the mean squared
    reconstruction error of the half-size image.

    What changes against DALL-E: the codes are clusters of pixels learnt from
    your images, not the codes of a dVAE trained on DALL-E's web-scale image
    set; each code sees only its own 8x8 patch (the dVAE's receptive field is
    wider), so the targets are lower-level and BEVT's masked prediction moves
    towards predicting local colour/texture. Results are not comparable with the
    paper's numbers; use it to run the method end to end, or with a vocabulary
    other than 8192.
    """

    kind = "offline-kmeans"

    def __init__(self, codebook: torch.Tensor, config: Optional[dict] = None, resample: Optional[str] = None,
                 chunk_size: int = 64):
        config = dict(config or {})
        resample = resample or config.get("resample", "pil")
        super().__init__(resample, chunk_size)
        D = 3 * DVAE_PATCH * DVAE_PATCH
        if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2 or codebook.shape[1] != D:
            got = tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__
            raise ValueError(f"offline tokenizer codebook: expected shape (vocab, {D}), got {got}")
        if config.get("vocab_size", codebook.shape[0]) != codebook.shape[0]:
            raise ValueError(f"offline tokenizer: config says {config['vocab_size']} codes, "
                             f"the codebook has {codebook.shape[0]}")
        codebook = codebook.detach().to(torch.float32).contiguous()
        self.register_buffer("codebook", codebook)                                  # (K, 192)
        self.register_buffer("codebook_sq", codebook.pow(2).sum(1), persistent=False)   # (K,)
        config.update(vocab_size=codebook.shape[0], resample=self.resample, patch=DVAE_PATCH, downsample=DOWNSAMPLE)
        self.config = config
        self.eval()

    @property
    def vocab_size(self) -> int:
        return self.codebook.shape[0]

    def codes_from_half(self, x_half: torch.Tensor) -> torch.Tensor:
        f = half_patches(x_half)                                   # (N, h, w, 192)
        idx, _ = nearest_code(f.reshape(-1, f.shape[-1]), self.codebook, self.codebook_sq)
        return idx.view(f.shape[:3])                               # (N, h, w) int64

    @torch.no_grad()
    def decode_half(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, h, w) -> the half-size image they stand for, (N, 3, 8h, 8w) in [0, 1]."""
        return unpatch(self.codebook[codes])

    @torch.no_grad()
    def quantization_error(self, images: torch.Tensor) -> float:
        """Mean squared error per value between the half-size images and their decoded codes."""
        _check_images(images)
        x_half = half_copy(images.to(self.device, torch.float32), self.resample)
        return F.mse_loss(self.decode_half(self.codes_from_half(x_half)), x_half).item()

    def save(self, path: PathLike) -> None:
        """{'kind': 'offline-kmeans', 'config': {...}, 'codebook': (K, 192)}; loads with weights_only=True."""
        obj = {"kind": self.kind, "config": dict(self.config), "codebook": self.codebook.detach().cpu().clone()}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, path)                                      # never a half-written file

    @classmethod
    def fit(cls, images: Union[torch.Tensor, Iterable[torch.Tensor]], vocab_size: int, *, seed: int = 0,
            iters: int = 20, max_patches: int = 200_000, init: str = "kmeans++", resample: str = "pil",
            device: Union[str, torch.device] = "cpu", verbose: bool = False, **config) -> "OfflineTokenizer":
        """Fit on images (N, 3, H, W) in [0, 1], or an iterable of such batches.

        At most `max_patches` patches are used, drawn uniformly at random (seeded)
        when there are more; `config` entries are stored with the codebook.
        """
        g = torch.Generator().manual_seed(seed)
        batches = [images] if isinstance(images, torch.Tensor) else images
        feats = torch.cat([extract_patches(b, resample=resample) for b in batches])   # (M, 192)
        if feats.shape[0] > max_patches:
            feats = feats[torch.randperm(feats.shape[0], generator=g)[:max_patches]]
        return cls._fit_patches(feats, vocab_size, seed=seed, iters=iters, init=init, resample=resample,
                                device=device, verbose=verbose, **config)

    @classmethod
    def _fit_patches(cls, feats, vocab_size, *, seed, iters, init, resample, device, verbose, **config):
        C, mse = kmeans(feats.to(device, torch.float32), vocab_size, iters=iters, seed=seed, init=init,
                        verbose=verbose)
        config.update(seed=seed, iters=iters, init=init, n_patches=int(feats.shape[0]), fit_mse=mse,
                      feature="raw RGB of 8x8 patches of the half-size image, [0, 1]")
        return cls(C.cpu(), config, resample=resample)


def extract_patches(images: torch.Tensor, resample: str = "pil") -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] -> the offline tokenizer's features (N*H/16*W/16, 192)."""
    _check_images(images)
    f = half_patches(half_copy(images.to(torch.float32), resample))
    return f.reshape(-1, f.shape[-1])


# -----------------------------------------------------------------------------
# Reading encoder.pkl (and decoder.pkl) without the dall_e package (paper §3 "Tokenizer")
#
# encoder.pkl is `torch.save(encoder)` in the old (non-zip) format: a few header
# pickles, then a pickle of the whole module naming dall_e.encoder.Encoder,
# dall_e.encoder.EncoderBlock, dall_e.utils.Conv2d, torch's nn containers and
# tensor-rebuild functions, then the raw storages. `torch.load(weights_only=True)`
# refuses old-format module pickles; `weights_only=False` would import dall_e
# and run any callable the file names. We pass torch.load a pickle "module"
# whose Unpickler *and* load() resolve globals only from the allow-list below:
# torch's legacy loader reads the header objects with `pickle_module.load`, so a
# shim whose load() were plain pickle.load would run a hostile header's payload
# before the restricted find_class was ever asked.
#
# decoder.pkl is made the same way from dall_e.decoder.Decoder / DecoderBlock
# (plus nn.Upsample). It gets its own allow-list and shim: each file is read
# with only the globals its own kind needs, so an encoder path never accepts
# decoder classes and the reverse.


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list; nothing from it was run."""


class _PickledDalleModule(nn.Module):
    """Inert stand-in for a dall_e class: unpickling restores its __dict__
    (nn.Module.__setstate__); we only read tensors off it, it never runs."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("stand-in for a pickled dall_e module: copy its tensors into DalleEncoder "
                           "or DalleDecoder instead")


class _PickledEncoder(_PickledDalleModule):          # dall_e.encoder.Encoder
    pass


class _PickledEncoderBlock(_PickledDalleModule):     # dall_e.encoder.EncoderBlock
    pass


class _PickledConv2d(_PickledDalleModule):           # dall_e.utils.Conv2d
    pass


class _PickledDecoder(_PickledDalleModule):          # dall_e.decoder.Decoder
    pass


class _PickledDecoderBlock(_PickledDalleModule):     # dall_e.decoder.DecoderBlock
    pass


def _allowed_globals(kind: str = "encoder") -> dict[tuple[str, str], object]:
    """The globals a DALL-E `kind` ("encoder" or "decoder") pickle may name, mapped to what they become."""
    allowed = {
        ("dall_e.utils", "Conv2d"): _PickledConv2d,
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set, ("__builtin__", "set"): set,     # nn.Module._non_persistent_buffers_set
        ("torch", "device"): torch.device,                         # dall_e modules keep a `device` attribute
        ("torch.nn.modules.container", "Sequential"): nn.Sequential,
        ("torch.nn.modules.activation", "ReLU"): nn.ReLU,
        ("torch.nn.modules.linear", "Identity"): nn.Identity,
    }
    if kind == "encoder":
        allowed.update({
            ("dall_e.encoder", "Encoder"): _PickledEncoder,
            ("dall_e.encoder", "EncoderBlock"): _PickledEncoderBlock,
            ("torch.nn.modules.pooling", "MaxPool2d"): nn.MaxPool2d,
        })
    elif kind == "decoder":
        allowed.update({
            ("dall_e.decoder", "Decoder"): _PickledDecoder,
            ("dall_e.decoder", "DecoderBlock"): _PickledDecoderBlock,
            ("torch.nn.modules.upsampling", "Upsample"): nn.Upsample,
        })
    else:
        raise ValueError(f"unknown DALL-E pickle kind {kind!r}; expected 'encoder' or 'decoder'")
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    # Legacy typed storages (torch's legacy loader resolves these names itself
    # before asking us; listed for a direct RestrictedUnpickler too).
    for t in ("Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char", "Byte", "Bool"):
        if hasattr(torch, f"{t}Storage"):
            allowed[("torch", f"{t}Storage")] = getattr(torch, f"{t}Storage")
    return allowed


_ALLOWED_GLOBALS = _allowed_globals("encoder")
_DECODER_GLOBALS = _allowed_globals("decoder")


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals a DALL-E encoder pickle needs."""

    allowed = _ALLOWED_GLOBALS
    names = "dall_e's Encoder/EncoderBlock/Conv2d"
    what = "a DALL-E encoder pickle"

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing global '{module}.{name}': not on the allow-list for {self.what} "
                f"({self.names}, torch tensor rebuilds, nn containers, OrderedDict); "
                f"nothing from the file was run") from None


class DecoderUnpickler(RestrictedUnpickler):
    """The same for a DALL-E decoder pickle (decoder.pkl): its own three classes and nn.Upsample."""

    allowed = _DECODER_GLOBALS
    names = "dall_e's Decoder/DecoderBlock/Conv2d"
    what = "a DALL-E decoder pickle"


def _pickle_shim(unpickler: type, name: str) -> types.ModuleType:
    """The pickle "module" handed to torch.load: every object it reads, headers
    included, goes through `unpickler` (its Unpickler *and* its load/loads)."""
    import io
    shim = types.ModuleType(name)
    shim.Unpickler = unpickler
    shim.load = lambda file, **kwargs: unpickler(file, **kwargs).load()
    shim.loads = lambda data, **kwargs: unpickler(io.BytesIO(data), **kwargs).load()
    shim.UnpicklingError = pickle.UnpicklingError
    shim.__doc__ = f"pickle shim whose Unpickler and load() refuse globals outside {unpickler.__name__}'s allow-list"
    return shim


restricted_pickle = _pickle_shim(RestrictedUnpickler, "bevt_restricted_pickle")
restricted_decoder_pickle = _pickle_shim(DecoderUnpickler, "bevt_restricted_decoder_pickle")


def restricted_torch_load(path: PathLike, pickle_module: types.ModuleType = restricted_pickle):
    """torch.load of an old-format (non-zip) torch file through a restricted unpickler, on CPU."""
    path = Path(path)
    with open(path, "rb") as f:
        if zipfile.is_zipfile(f):
            # Zip files never take this path: torch.load would hand a TorchScript
            # zip to torch.jit.load. They are read with weights_only=True instead.
            raise ValueError(f"{path} is a zip-format torch file; it is read with weights_only=True, "
                             f"not the restricted legacy unpickler")
        f.seek(0)
        with warnings.catch_warnings():
            # The file stores dall_e's class sources; ours differ by design.
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            try:
                return torch.load(f, map_location="cpu", pickle_module=pickle_module, weights_only=False)
            except UnsafePickleError as e:
                raise UnsafePickleError(f"{path}: {e}") from None
            except Exception as e:      # corrupt or not a pickle at all
                raise ValueError(f"{path} is not a readable torch/pickle file ({type(e).__name__}: {e}); "
                                 f"expected encoder.pkl, decoder.pkl, a state dict or a tokenizer file") from None


def _module_tensors(module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and buffers of an unpickled module tree, by walking its
    _parameters/_buffers/_modules dicts (no hooks, no forward, no state_dict())."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"unexpected object {type(module).__name__} at {prefix or 'the root'} of the pickle")
    out = {}
    d = module.__dict__
    for table in ("_parameters", "_buffers"):
        for name, t in (d.get(table) or {}).items():
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"pickled module entry {prefix + name!r} is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t.detach()
    for name, child in (d.get("_modules") or {}).items():
        if child is not None:
            out.update(_module_tensors(child, prefix + name + "."))
    return out


def load_dalle_pickle(path: PathLike) -> dict[str, torch.Tensor]:
    """The 74 tensors of the published encoder.pkl (or a file made the same way), by name."""
    obj = restricted_torch_load(path)
    if not isinstance(obj, _PickledEncoder):
        raise ValueError(f"{path}: expected a pickled dall_e.encoder.Encoder, got {type(obj).__name__}")
    return _module_tensors(obj)


def load_dalle_decoder_pickle(path: PathLike) -> dict[str, torch.Tensor]:
    """The 76 tensors of the published decoder.pkl (or a file made the same way), by name."""
    obj = restricted_torch_load(path, restricted_decoder_pickle)
    if not isinstance(obj, _PickledDecoder):
        raise ValueError(f"{path}: expected a pickled dall_e.decoder.Decoder, got {type(obj).__name__}")
    return _module_tensors(obj)


def read_dalle_pickle(path: PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """("encoder" | "decoder", tensors) of a published DALL-E pickle, whichever it is.

    Read as an encoder first; only a refusal that names a dall_e.decoder class
    (raised by find_class before anything of the file ran) makes it try the
    decoder's allow-list. Any other global is refused by both.
    """
    try:
        return "encoder", load_dalle_pickle(path)
    except UnsafePickleError as e:
        if "'dall_e.decoder." not in str(e):
            raise
    return "decoder", load_dalle_decoder_pickle(path)


def load_dalle_decoder(spec: PathLike, device: Union[str, torch.device] = "cpu") -> DalleDecoder:
    """The DALL-E decoder from `decoder.pkl` (restricted unpickler), a directory holding one, or the
    plain state dict `tokenizer.py convert --pkl decoder.pkl` writes (weights_only=True)."""
    path = Path(spec)
    if path.is_dir() and (path / "decoder.pkl").is_file():
        path = path / "decoder.pkl"
    if not path.is_file():
        raise FileNotFoundError(f"DALL-E decoder file not found: {path} (expected decoder.pkl or its "
                                f"converted .pt from `python tokenizer.py convert --pkl decoder.pkl`)")
    with open(path, "rb") as f:
        is_zip = zipfile.is_zipfile(f)
    if not is_zip:
        state = load_dalle_decoder_pickle(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path} is a torch zip file that weights_only=True refuses ({first}); "
                             f"expected a DALL-E decoder state dict") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a DALL-E decoder state dict, got a {type(state).__name__}")
        state = {_strip(k, "module."): v for k, v in state.items() if isinstance(k, str)}
    try:
        return DalleDecoder.from_state_dict(state).to(device)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# -----------------------------------------------------------------------------
# Loading any tokenizer file


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


def _read_torch_file(path: Path):
    """Zip files (every torch.save since 1.6) with weights_only=True; old-format
    files through the restricted unpickler."""
    with open(path, "rb") as f:
        is_zip = zipfile.is_zipfile(f)
    if not is_zip:
        return restricted_torch_load(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is a torch zip file that weights_only=True refuses ({first}); expected a "
                         f"state dict, a BEVT checkpoint or an offline tokenizer file") from None


def _tokenizer_from_object(obj, source: str, **kw) -> Tokenizer:
    if isinstance(obj, _PickledEncoder):                              # encoder.pkl
        return DalleTokenizer.from_state_dict(_module_tensors(obj), **kw)
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a DALL-E encoder, a state dict, a BEVT checkpoint or an offline "
                         f"tokenizer file, got a {type(obj).__name__}")
    if obj.get("kind") == OfflineTokenizer.kind:                      # python tokenizer.py fit
        if "codebook" not in obj:
            raise ValueError(f"{source}: offline tokenizer file without a 'codebook'")
        return OfflineTokenizer(obj["codebook"], obj.get("config"), **kw)
    if "kind" in obj and isinstance(obj["kind"], str):
        raise ValueError(f"{source}: unknown tokenizer kind {obj['kind']!r}; expected {OfflineTokenizer.kind!r}")
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    state = {_strip(k, "module."): v for k, v in state.items() if isinstance(k, str)}
    vae = "cls_head.vae_encoder."                                     # released BEVT pretraining checkpoint
    if any(k.startswith(vae) for k in state):
        return DalleTokenizer.from_state_dict({k[len(vae):]: v for k, v in state.items() if k.startswith(vae)}, **kw)
    if "blocks.input.w" in state:                                     # tokenizer.py convert / a state dict
        return DalleTokenizer.from_state_dict(state, **kw)
    if "state_dict" in obj or any(k.startswith(("backbone.", "cls_head.")) for k in state):
        raise ValueError(f"{source}: this checkpoint carries no tokenizer (no keys under '{vae}'); "
                         f"pass encoder.pkl or an offline tokenizer file")
    raise ValueError(f"{source}: not a tokenizer file: expected DALL-E keys ('blocks.input.w', ...), "
                     f"'{vae}...' or an offline tokenizer, got keys {sorted(map(str, state))[:4]}")


def load_tokenizer(spec: Union[PathLike, Tokenizer], *, device: Union[str, torch.device] = "cpu",
                   **kw) -> Tokenizer:
    """A tokenizer from a file, dispatching on what the file holds:

    * the published `encoder.pkl` (old-format pickle of dall_e's Encoder, read
      through the restricted unpickler), or a directory holding one (the
      released config's `vae_weight_path`);
    * a plain DALL-E state dict (`tokenizer.py convert`), weights_only=True;
    * a released BEVT pretraining checkpoint: the tensors under
      `cls_head.vae_encoder.` (with or without a `module.` prefix);
    * an offline tokenizer file (`tokenizer.py fit`), weights_only=True;
    * "dalle-random": the DALL-E architecture with random weights (for speed
      and smoke tests only: its codes mean nothing).

    `kw` goes to the tokenizer (`resample`, `chunk_size`).
    """
    if isinstance(spec, Tokenizer):
        return spec.to(device)
    if isinstance(spec, str) and spec == "dalle-random":
        warnings.warn("dalle-random: DALL-E architecture with random weights; its codes are meaningless")
        return DalleTokenizer(**kw).to(device)
    path = Path(spec)
    if path.is_dir() and (path / "encoder.pkl").is_file():
        path = path / "encoder.pkl"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} (expected encoder.pkl, a converted DALL-E "
                                f"state dict, a BEVT pretraining checkpoint, a `tokenizer.py fit` file or 'dalle-random')")
    return _tokenizer_from_object(_read_torch_file(path), str(path), **kw).to(device)


def check_vocab(tokenizer: Union[Tokenizer, int], head_classes: int) -> None:
    """Raise if the tokenizer's vocabulary and the prediction head's class count differ."""
    v = tokenizer if isinstance(tokenizer, int) else tokenizer.vocab_size
    kind = "" if isinstance(tokenizer, int) else f" ({tokenizer.kind})"
    if v != head_classes:
        raise ValueError(f"tokenizer vocabulary{kind} has {v} codes but the prediction head has {head_classes} "
                         f"classes; build the head with {v} classes or load the matching tokenizer")


# =============================================================================
# Tools. The method ends above; below are the tools around it.
#
# -----------------------------------------------------------------------------
# Tools: the command line (convert, fit, info)

def list_images(root: PathLike) -> list[Path]:
    """Every image under `root` (the extensions the image stream reads, data.IMAGE_EXTS), sorted."""
    from data import IMAGE_EXTS                       # imported here, not at the top: data.py imports this module
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image directory not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    return files


def read_square_image(path: Path, size: int) -> torch.Tensor:
    """An image file -> (3, size, size) in [0, 1]: short side to `size` (bicubic), centre crop."""
    from PIL import Image
    import numpy as np
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def fit_from_dir(data: PathLike, vocab_size: int, *, size: int = 224, seed: int = 0, iters: int = 20,
                 max_patches: int = 200_000, init: str = "kmeans++", resample: str = "pil",
                 device: str = "cpu", batch: int = 32, verbose: bool = True) -> OfflineTokenizer:
    """Fit the offline tokenizer on the images under `data`: each image gives an
    equal, seeded random share of the `max_patches` patches."""
    if size % PATCH:
        raise ValueError(f"--size {size} is not a multiple of {PATCH}")
    files = list_images(data)
    per_image = max(1, math.ceil(max_patches / len(files)))
    g = torch.Generator().manual_seed(seed)
    feats = []
    it = range(0, len(files), batch)
    if verbose:
        try:
            from tqdm import tqdm
            it = tqdm(it, desc="patches", unit="batch")
        except ImportError:
            pass
    for i in it:
        x = torch.stack([read_square_image(p, size) for p in files[i:i + batch]])   # (b, 3, size, size)
        f = extract_patches(x, resample).view(x.shape[0], -1, 3 * DVAE_PATCH ** 2)   # (b, P, 192)
        for fi in f:
            keep = torch.randperm(fi.shape[0], generator=g)[:per_image]
            feats.append(fi[keep])
    feats = torch.cat(feats)
    if feats.shape[0] > max_patches:
        feats = feats[torch.randperm(feats.shape[0], generator=g)[:max_patches]]
    if verbose:
        print(f"{len(files)} images -> {feats.shape[0]} patches of {feats.shape[1]} values; "
              f"k-means with {vocab_size} codes, {iters} iterations, init {init}, seed {seed}")
    return OfflineTokenizer._fit_patches(feats, vocab_size, seed=seed, iters=iters, init=init, resample=resample,
                                         device=device, verbose=verbose, size=size, source=str(data),
                                         n_images=len(files))


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="encoder.pkl or decoder.pkl -> plain state dict (loads with weights_only=True)")
    c.add_argument("--pkl", required=True, help="the published DALL-E encoder.pkl (or decoder.pkl, for bevt.py show)")
    c.add_argument("--out", required=True, help="output .pt file")
    f = sub.add_parser("fit", help="fit the offline k-means tokenizer on a directory of images")
    f.add_argument("--data", required=True, help="directory searched recursively for png/jpg images")
    f.add_argument("--vocab", type=int, required=True, help="number of codes (8192 = DALL-E's)")
    f.add_argument("--out", required=True, help="output .pt file")
    f.add_argument("--size", type=int, default=224, help="crop size in pixels (multiple of 16)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--iters", type=int, default=20, help="Lloyd iterations")
    f.add_argument("--max-patches", type=int, default=200_000, help="patches sampled for the fit")
    f.add_argument("--init", choices=("kmeans++", "random"), default="kmeans++")
    f.add_argument("--resample", choices=RESAMPLE_KINDS, default="pil", help="Lanczos flavour for the 1/2 resize")
    f.add_argument("--device", default="cpu", help="where k-means runs (cuda for large vocabularies)")
    f.add_argument("--quiet", action="store_true")
    i = sub.add_parser("info", help="what a tokenizer file holds")
    i.add_argument("path")
    args = ap.parse_args(argv)

    if args.cmd == "convert":
        kind, state = read_dalle_pickle(args.pkl)                # encoder.pkl or decoder.pkl
        # Check names and shapes before writing anything.
        DalleTokenizer.from_state_dict(state) if kind == "encoder" else DalleDecoder.from_state_dict(state)
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
        os.replace(tmp, out)
        n = sum(v.numel() for v in state.values())
        print(f"wrote {out}: DALL-E {kind}, {len(state)} tensors, {n / 1e6:.1f}M values (load with weights_only=True)")
    elif args.cmd == "fit":
        tok = fit_from_dir(args.data, args.vocab, size=args.size, seed=args.seed, iters=args.iters,
                           max_patches=args.max_patches, init=args.init, resample=args.resample,
                           device=args.device, verbose=not args.quiet)
        tok.save(args.out)
        print(f"wrote {args.out}: offline tokenizer, {tok.vocab_size} codes, "
              f"fit mse {tok.config['fit_mse']:.5f} per value")
    elif args.cmd == "info":
        tok = load_tokenizer(args.path)
        print(f"{args.path}: {tok.kind} tokenizer, vocabulary {tok.vocab_size}, resample {tok.resample}")
        if isinstance(tok, OfflineTokenizer):
            print(f"config: {tok.config}")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, pickle.UnpicklingError) as e:   # a user error: one line, exit 2
        print(f"tokenizer.py: error: {e}", file=sys.stderr)
        sys.exit(2)
