"""Visual tokenizers: what turns images and clip frames into BEVT's discrete targets.

Implements paper §3 "Tokenizer" and appendix A ("Details on Pretrained Tokenizer"). For a
crop `(N, 3, H, W)` of floats in [0, 1] (not mean/std normalised), H and W multiples of 16:

    images (N, 3, H, W) --Lanczos 1/2--> (N, 3, H/2, W/2)      §3: "downsample by 1/2"
                        --x' = (1-2ε)x + ε, ε = 0.1-->           DALL-E's map_pixels
                        --dVAE encoder--> logits (N, 8192, H/16, W/16)
                        --argmax--> codes (N, H/16, W/16) int64  one code per 16x16 px

    clips (B, 3, T, H, W) -> frames (B*T, 3, H, W), in chunks -> codes (B, T, H/16, W/16)

Two tokenizers with one interface (`Tokenizer`: `vocab_size`, `tokenize`, `tokenize_clip`,
`codes_of_copy`), chosen by the file given to `load_tokenizer`:

* `DalleTokenizer`: the DALL-E dVAE encoder the paper uses (8192 codes, one per 8x8 pixels
  of its input), with the published parameter names and shapes.
* `OfflineTokenizer`: a k-means codebook over the same 8x8 patches of the half-size image,
  fitted on your own images, for machines that cannot download DALL-E's weights (no machine
  of this project can). Same grid and code dtype, your vocabulary. It is not DALL-E.

Both are frozen (no grad, eval mode, fp32 under `torch.no_grad()`) and neither is a submodule
of the trained model, so it never lands in a training checkpoint. Behind the banner:
`load_tokenizer`, reading the published `encoder.pkl` without running anything from it.

    tok = load_tokenizer("encoder.pkl")     # or dalle_encoder.pt, a BEVT checkpoint, tok.pt (offline)
    check_vocab(tok, head_classes=8192)     # before building/loading the head
    codes = tok.tokenize(images)            # (N, H/16, W/16) int64
    codes = tok.tokenize_clip(clips)        # (B, T, H/16, W/16) int64

Convert encoder.pkl, fit an offline tokenizer, inspect a file: tools/tokenizer_tool.py.
"""

import functools
import math
import os
import pickle
import tarfile
import types
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Constants (paper §3 "Tokenizer", appendix A)

VOCAB_SIZE = 8192            # appendix A: "The vocabulary size of the visual tokens is 8192"
LOGIT_LAPLACE_EPS = 0.1      # ε of DALL-E's map_pixels x' = (1-2ε)x + ε (dall_e/utils.py)
DOWNSAMPLE = 2               # §3: images/frames are downsampled by 1/2 before the tokenizer
DVAE_PATCH = 8               # the dVAE gives one code per 8x8 pixels of its input
PATCH = DOWNSAMPLE * DVAE_PATCH   # = 16: one code per 16x16 pixels of the encoder's input
RESAMPLE_KINDS = ("pil", "cv2")   # see lanczos_resize
TOKENIZER_PRECISIONS = ("fp32", "bf16", "fp16")   # see Tokenizer.set_precision

# -----------------------------------------------------------------------------
# Preprocessing: Lanczos resize by 1/2 and DALL-E's pixel map


def _lanczos_kernel(x: torch.Tensor, a: int) -> torch.Tensor:
    """sinc(x) * sinc(x/a) on [-a, a), 0 outside (PIL's `lanczos_filter` for a = 3)."""
    inside = (x >= -a) & (x < a)
    return torch.where(inside, torch.sinc(x) * torch.sinc(x / a), torch.zeros_like(x))


@functools.lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int, kind: str) -> torch.Tensor:
    """(n_out, n_in) float64 matrix M with resized = M @ signal, for one axis.

    kind "pil": PIL's `Image.resize(..., Image.LANCZOS)` (Resample.c, precompute_coeffs), BEiT's filter:
        an antialiased Lanczos-3 whose support is stretched by the scale (6 input pixels on each side of
        the output centre for a x1/2 downscale); taps outside the image dropped, the rest renormalised.
    kind "cv2": OpenCV's INTER_LANCZOS4 (resize.cpp): 8 taps of a Lanczos-4 at the source position
        (i + 0.5) * scale - 0.5, *not* stretched when downscaling (so it aliases), edge pixels replicated:
        the released `CopyResize(scale=(112, 112), interpolation="lanczos")` runs it via `mmcv.imresize`.
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
            M[i].index_add_(0, taps.clamp(0, n_in - 1), w / w.sum())   # BORDER_REPLICATE-like clamping
        else:
            raise ValueError(f"unknown resample kind {kind!r}; expected one of {RESAMPLE_KINDS}")
    return M


def lanczos_resize(x: torch.Tensor, size: tuple[int, int], kind: str = "pil") -> torch.Tensor:
    """Separable Lanczos resize of `(..., H, W)` floats in [0, 1] to `size` = (h, w).

    Width first, then height, as PIL does. Clamped to [0, 1] as the reference pipelines' 8-bit images
    saturate (PIL also after the first pass, its intermediate image being 8-bit). Without 8-bit
    rounding the result differs from PIL's by at most about 1/255."""
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
    (§3 "Tokenizer": a 224² crop is tokenized at 112²); the data loader makes it, or `tokenize`."""
    return lanczos_resize(x, (x.shape[-2] // DOWNSAMPLE, x.shape[-1] // DOWNSAMPLE), kind)


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """DALL-E's input map: [0, 1] -> [ε, 1-ε] (the dVAE's logit-Laplace range)."""
    return (1 - 2 * eps) * x + eps


def _check_pixels(x, what: str = "images") -> None:
    """One-line ValueError unless images (N, 3, H, W) / clips (B, 3, T, H, W) are floats in [0, 1], H, W % 16 == 0."""
    shape = "(N, 3, H, W)" if what == "images" else "(B, 3, T, H, W)"
    if not isinstance(x, torch.Tensor) or x.dim() != shape.count(",") + 1 or x.shape[1] != 3:
        raise ValueError(f"{what}: expected a tensor of shape {shape}, got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: expected floats in [0, 1], got dtype {x.dtype} (divide uint8 pixels by 255)")
    if x.shape[-2] % PATCH or x.shape[-1] % PATCH:
        raise ValueError(f"{what}: image size {x.shape[-2]}x{x.shape[-1]} is not a multiple of {PATCH} "
                         f"(one code per {PATCH}x{PATCH} pixels); crop or resize it")
    if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(f"{what}: expected un-normalised pixels in [0, 1], got values in [{x.min():.3g}, "
                         f"{x.max():.3g}] (the tokenizer takes the crop before mean/std normalisation, §4.1)")


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
# Parameter names equal the published file's (74 tensors): convs keep `w` and `b`.


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
        # Differs from the released code: dall_e's Conv2d runs in fp16 on CUDA (use_float16=True for every conv
        # but the output one); we run fp32 (paper §3 "Tokenizer"), so near-tie argmaxes can differ from fp16 ones.
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class DalleEncoderBlock(nn.Module):
    """x -> id_path(x) + (1 / n_layers²) · res_path(x); res_path is 4 convs, width n_out/4."""

    KERNELS = (3, 3, 3, 1)          # res_path.conv_1 .. conv_4 (the decoder's block: 1, 3, 3, 3)

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


def dalle_group(block: type, n_in: int, n_out: int, n_blk: int, n_layers: int, last: Optional[tuple]):
    """`n_blk` residual blocks (the first n_in -> n_out), then `last` = (name, module) if any."""
    layers = [(f"block_{i + 1}", block(n_in if i == 0 else n_out, n_out, n_layers)) for i in range(n_blk)]
    return nn.Sequential(OrderedDict(layers + ([last] if last else [])))


class DalleEncoder(nn.Module):
    """The DALL-E dVAE encoder: (N, 3, h, w) mapped pixels -> (N, vocab, h/8, w/8) logits."""

    group_count = 4

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3,
                 vocab_size: int = VOCAB_SIZE):
        super().__init__()
        self.vocab_size = vocab_size
        n_layers = self.group_count * n_blk_per_group         # 8: sets post_gain = 1/64
        group = functools.partial(dalle_group, DalleEncoderBlock, n_blk=n_blk_per_group, n_layers=n_layers)
        pool = lambda: ("pool", nn.MaxPool2d(kernel_size=2))   # noqa: E731
        self.blocks = nn.Sequential(OrderedDict([
            ("input", DalleConv2d(input_channels, n_hid, 7)),
            ("group_1", group(1 * n_hid, 1 * n_hid, last=pool())),
            ("group_2", group(1 * n_hid, 2 * n_hid, last=pool())),
            ("group_3", group(2 * n_hid, 4 * n_hid, last=pool())),
            ("group_4", group(4 * n_hid, 8 * n_hid, last=None)),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                  ("conv", DalleConv2d(8 * n_hid, vocab_size, 1))]))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


# -----------------------------------------------------------------------------
# Pixels -> codes: the tokenizer interface and the paper's DALL-E tokenizer


class Tokenizer(nn.Module):
    """Frozen image -> code map on the H/16 x W/16 grid. Subclasses define `kind`, `vocab_size`
    and `codes_from_half(x_half)`: (N, 3, H/2, W/2) fp32 in [0, 1] -> (N, H/16, W/16) int64.
    `resample` picks the 1/2 downscale filter ("pil" or "cv2", see `lanczos_resize`); `chunk_size`
    is how many frames one encoder call takes (memory vs speed; the codes do not depend on it)."""

    def __init__(self, resample: str = "pil", chunk_size: int = 64):
        super().__init__()
        # Differs from the released code: its data pipeline halves the 8-bit crop with mmcv.imresize, i.e.
        # OpenCV's INTER_LANCZOS4 (not antialiased), and rounds to 8 bits. Our default is PIL's antialiased
        # Lanczos-3 (BEiT's pipeline) on the float crop; resample="cv2" gives the released filter (unrounded).
        self.resample, self.chunk_size, self.precision = resample, chunk_size, "fp32"

    def set_precision(self, precision: str) -> "Tokenizer":
        """"fp32" (default): the argmax of fp32 logits. "bf16" / "fp16": autocast the DALL-E encoder (52 GFLOP
        per 112² frame) in channels-last, a fraction of fp32's cost on GPUs; near-tie argmaxes can flip."""
        if precision not in TOKENIZER_PRECISIONS:
            raise ValueError(f"tokenizer precision must be one of {TOKENIZER_PRECISIONS}, got {precision!r}")
        self.precision = precision
        for m in self.children():                               # the DALL-E encoder (offline: none)
            m.to(memory_format=torch.contiguous_format if precision == "fp32" else torch.channels_last)
        return self

    @property
    def device(self) -> torch.device:
        return [*self.parameters(), *self.buffers()][0].device

    def train(self, mode: bool = True) -> "Tokenizer":
        return super().train(False)     # frozen: eval mode whatever is asked, as the released head does

    # The one path from pixels to targets: crop -> half_copy (in the data loader, shipped as
    # uint8) -> codes_of_copy (in the training step). `tokenize` / `tokenize_clip` run both
    # halves in one call, with input checks, for crops you hold yourself.

    @torch.no_grad()
    def codes_of_copy(self, x_half: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """The training step's entry: codes of the half-size copy (uint8 as data.py ships it, or
        [0, 1] floats). image (N, 3, H/2, W/2) -> (N, H/16, W/16); clip (B, 3, T, H/2, W/2) ->
        (B, T, H/16, W/16), frame by frame (§3: Z_vid in V^{T x H/16 x W/16}). No host sync."""
        x = x_half.to(self.device, non_blocking=True)
        x = x.float().mul_(1.0 / 255.0) if x.dtype == torch.uint8 else x.float()
        clip = x.dim() == 5
        if clip:
            B, _, T, h, w = x.shape
            x = x.transpose(1, 2).reshape(B * T, 3, h, w)                  # (B*T, 3, H/2, W/2), b-major
        n = chunk_size or self.chunk_size
        # fp32 whatever the training step's autocast (a bf16/fp16 precision re-enables it inside).
        with torch.autocast(device_type=x.device.type, enabled=False):
            codes = [self.codes_from_half(x[i:i + n]) for i in range(0, len(x), n)]
        empty = x.new_zeros(0, x.shape[-2] // DVAE_PATCH, x.shape[-1] // DVAE_PATCH, dtype=torch.long)
        codes = torch.cat(codes) if codes else empty                       # (N or B*T, H/16, W/16)
        return codes.view(B, T, *codes.shape[1:]) if clip else codes      # (B, T, H/16, W/16) | (N, H/16, W/16)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor, chunk_size: Optional[int] = None, what: str = "images") -> torch.Tensor:
        """images (N, 3, H, W) floats in [0, 1] -> codes (N, H/16, W/16) int64 on the tokenizer's device."""
        _check_pixels(images, what)
        x = images.to(self.device, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):     # fp32 Lanczos in any autocast
            return self.codes_of_copy(half_copy(x, self.resample), chunk_size)   # (N, 3, H/2, W/2) -> codes

    def tokenize_clip(self, clips: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """clips (B, 3, T, H, W) floats in [0, 1] -> codes (B, T, H/16, W/16), every frame on its own."""
        return self.tokenize(clips, chunk_size, "clips")


class DalleTokenizer(Tokenizer):
    """The paper's tokenizer: argmax of the DALL-E dVAE encoder's logits."""

    kind = "dalle"

    def __init__(self, encoder: Optional[DalleEncoder] = None, resample: str = "pil", chunk_size: int = 32):
        super().__init__(resample, chunk_size)
        self.encoder = encoder if encoder is not None else DalleEncoder()   # frozen from birth (DalleConv2d)
        self.eval()

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    def codes_from_half(self, x_half: torch.Tensor) -> torch.Tensor:
        x = map_pixels(x_half)
        if self.precision == "fp32":
            logits = self.encoder(x)                               # (N, vocab, H/16, W/16)
        else:
            # Reduced precision as the released apex run (fp16), channels-last for the GPU's tensor cores.
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            with torch.autocast(x.device.type, dtype=dtype):
                logits = self.encoder(x.contiguous(memory_format=torch.channels_last))
        return logits.argmax(dim=1)                                # (N, H/16, W/16) int64

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], **kw) -> "DalleTokenizer":
        """Build from the published tensors (names as in encoder.pkl), checking every key and shape."""
        with torch.device("meta"):                                  # no 50M-value random init to throw away
            enc = DalleEncoder(**_dalle_config(state))
        return cls(load_exact(enc, state, "encoder"), **kw)


# -----------------------------------------------------------------------------
# The offline tokenizer: k-means over 8x8 patches of the half-size image


def half_patches(x_half: torch.Tensor, p: int = DVAE_PATCH) -> torch.Tensor:
    """(N, 3, h*p, w*p) -> (N, h, w, 3*p*p): each p x p patch flattened in (c, y, x) order."""
    N, C, H, W = x_half.shape
    x = x_half.reshape(N, C, H // p, p, W // p, p)                 # (N, C, h, p, w, p)
    x = x.permute(0, 2, 4, 1, 3, 5)                                # (N, h, w, C, p, p)
    return x.reshape(N, H // p, W // p, C * p * p)


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, codebook_sq: Optional[torch.Tensor] = None,
                 chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows x (M, D): index of the nearest codebook row (K, D) and the squared distance.
    ||x - c||² = ||x||² - 2 x·c + ||c||², in chunks of rows so that the (chunk, K) distance
    matrix stays small (8192 x 8192 fp32 = 256 MB)."""
    if codebook_sq is None:
        codebook_sq = codebook.pow(2).sum(1)
    idx, dist = [], []
    for i in range(0, x.shape[0], chunk):
        xc = x[i:i + chunk]
        d = torch.addmm(codebook_sq[None], xc, codebook.T, alpha=-2.0)    # (chunk, K) = ||c||² - 2 x·c
        m, j = d.min(dim=1)
        idx.append(j)
        dist.append((m + xc.pow(2).sum(1)).clamp_min(0.0))
    return torch.cat(idx), torch.cat(dist)


class OfflineTokenizer(Tokenizer):
    """A vector-quantising tokenizer you can fit offline (tools/kmeans_fit.py): k-means codes of 8x8 patches.

    Same grid and interface as DALL-E: the crop is halved with the same Lanczos filter and cut into 8x8 patches
    (one per 16x16 pixels of the crop), each given the index of its nearest codebook row. Features are the raw
    8x8x3 RGB values in [0, 1], not mean-centred: a code stands for a patch's colour and structure together (as
    a dVAE code does), and the quantisation error is the mean squared reconstruction error of the half-size image.

    Unlike DALL-E's, the codes are clusters of your own images' pixels, each seeing only its 8x8 patch
    (the dVAE's receptive field is wider): lower-level targets, masked prediction moving towards local
    colour/texture. Not comparable with the paper's results; it runs the method end to end, any vocabulary.
    """

    kind = "offline-kmeans"

    def __init__(self, codebook: torch.Tensor, config: Optional[dict] = None, resample: Optional[str] = None,
                 chunk_size: int = 64):
        config = dict(config or {})
        super().__init__(resample or config.get("resample", "pil"), chunk_size)
        D = 3 * DVAE_PATCH * DVAE_PATCH
        if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2 or codebook.shape[1] != D:
            raise ValueError(f"offline tokenizer codebook: expected shape (vocab, {D}), got "
                             f"{getattr(codebook, 'shape', type(codebook))}")
        if config.get("vocab_size", len(codebook)) != len(codebook):
            raise ValueError(f"offline tokenizer: config says {config['vocab_size']} codes, codebook {len(codebook)}")
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

    def save(self, path: Union[str, os.PathLike]) -> None:
        """{'kind': 'offline-kmeans', 'config': {...}, 'codebook': (K, 192)}; loads with weights_only=True."""
        obj = {"kind": self.kind, "config": dict(self.config), "codebook": self.codebook.detach().cpu().clone()}
        tmp = f"{path}.tmp"
        torch.save(obj, tmp)
        os.replace(tmp, path)                                      # never a half-written file


# =============================================================================
# Machinery: what running the method needs (not the method itself).

# -----------------------------------------------------------------------------
# Reading encoder.pkl without the dall_e package, and without running the file
#
# encoder.pkl is `torch.save(encoder)` in the old (non-zip) format, which weights_only=True refuses and
# weights_only=False would run (importing dall_e and any callable the file names). So every pickle of the
# file, headers included, goes through an unpickler that resolves only allow-listed globals (classes become
# inert stand-ins) and sets state (BUILD) only on the stand-ins: on an allowed function it would change it
# for the whole process (`_rebuild_tensor_v2.__defaults__` set by a header would negate every later tensor).


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global off the allow-list or set state on a non-stand-in: refused."""


class PickledModule(nn.Module):
    """Inert stand-in for a module class a DALL-E pickle names: no forward, we only read tensors off it."""


class PickledEncoder(PickledModule):        # dall_e.encoder.Encoder, the root of encoder.pkl
    pass


def allowed_globals(own: dict) -> dict:
    """A DALL-E pickle's allow-list, (module, name) -> what it becomes: `own` (its dall_e classes)
    plus what both published pickles name (torch itself resolves the storage types)."""
    allowed = {("collections", "OrderedDict"): OrderedDict, ("torch", "device"): torch.device,
               ("builtins", "set"): set, ("__builtin__", "set"): set}   # nn.Module._non_persistent_buffers_set
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
        allowed[("torch._utils", name)] = getattr(torch._utils, name)
    for module, name in (("dall_e.utils", "Conv2d"), ("torch.nn.modules.container", "Sequential"),
                         ("torch.nn.modules.activation", "ReLU"), ("torch.nn.modules.linear", "Identity")):
        allowed[(module, name)] = PickledModule
    return {**allowed, **own}


class RestrictedUnpickler(pickle._Unpickler):       # the Python Unpickler: the C one has no BUILD hook
    """Resolves only the `allowed` globals; sets state (BUILD) only on PickledModules."""

    allowed = allowed_globals({("dall_e.encoder", "Encoder"): PickledEncoder,
                               ("dall_e.encoder", "EncoderBlock"): PickledModule,
                               ("torch.nn.modules.pooling", "MaxPool2d"): PickledModule})
    what = "a DALL-E encoder pickle"

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise UnsafePickleError(f"refusing global '{module}.{name}': not on the allow-list for {self.what}; "
                                    f"nothing from the file was run")
        return self.allowed[(module, name)]

    def load_build(self):
        target = self.stack[-2]                               # stack: ..., object, state
        if not isinstance(target, PickledModule):
            raise UnsafePickleError(f"refusing to set the state of {type(target).__name__} {target!r:.60}: "
                                    f"{self.what} sets state only on its modules; nothing from the file was run")
        super().load_build()

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}


def restricted_torch_load(path: Union[str, os.PathLike], unpickler: type = RestrictedUnpickler,
                          what: str = "a tokenizer file"):
    """A torch file read on CPU without running anything from it: zip files (every torch.save since
    1.6) with weights_only=True, old-format pickles through `unpickler`; tar archives (torch's oldest
    format, which torch.load extracts unfiltered: links, FIFOs) refused before anything is extracted."""
    path = Path(path)
    with open(path, "rb") as f:
        if zipfile.is_zipfile(f):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                first = (str(e).strip() or type(e).__name__).splitlines()[0]
                raise ValueError(f"{path} is a torch zip file that weights_only=True refuses ({first}); "
                                 f"expected {what}") from None
        f.seek(0)
        if tarfile.is_tarfile(f):
            raise ValueError(f"{path} is a tar archive (torch's oldest format), refused: torch.load would "
                             f"extract it unfiltered; expected {what}")
        f.seek(0)
        shim = types.ModuleType("restricted_pickle")     # every pickle of the file, headers included,
        shim.Unpickler, shim.UnpicklingError = unpickler, pickle.UnpicklingError   # through `unpickler`
        shim.load = lambda file, **kwargs: unpickler(file, **kwargs).load()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)   # stand-ins by design
            try:
                obj = torch.load(f, map_location="cpu", pickle_module=shim, weights_only=False)
            except UnsafePickleError as e:
                raise UnsafePickleError(f"{path}: {e}") from None
            except Exception as e:      # corrupt or not a pickle at all
                raise ValueError(f"{path} is not a readable torch/pickle file ({type(e).__name__}: {e}); "
                                 f"expected {what}") from None
    return obj


def module_tensors(module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and buffers of an unpickled module tree, read off its __dict__ (no hooks, no state_dict())."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"unexpected object {type(module).__name__} at {prefix or 'the root'} of the pickle")
    d = module.__dict__
    tensors = [*(d.get("_parameters") or {}).items(), *(d.get("_buffers") or {}).items()]
    out = {prefix + name: t for name, t in tensors if t is not None}    # load_exact checks that they are tensors
    for name, child in (d.get("_modules") or {}).items():
        out.update(module_tensors(child, prefix + name + ".") if child is not None else {})
    return out


def _dalle_config(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """DalleEncoder's constructor arguments, read off a state dict's shapes."""
    if "blocks.input.w" not in state or "blocks.output.conv.w" not in state:
        raise ValueError(f"not a DALL-E encoder state dict (keys start {sorted(state)[:3]})")
    w_in = state["blocks.input.w"]
    if tuple(w_in.shape[2:]) == (1, 1):
        raise ValueError(f"this is a DALL-E decoder state dict (input conv {tuple(w_in.shape)} takes one-hot "
                         f"codes); the tokenizer needs the encoder (encoder.pkl)")
    n_blk = len({k.split(".")[2] for k in state if k.startswith("blocks.group_1.block_")})
    return dict(n_hid=int(w_in.shape[0]), n_blk_per_group=n_blk, input_channels=int(w_in.shape[1]),
                vocab_size=int(state["blocks.output.conv.w"].shape[0]))


def load_exact(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Copy `state` as fp32 into `module` (built on the meta device); torch's strict check, in one line."""
    try:
        fp32 = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        module.load_state_dict(fp32, strict=True, assign=True)     # assign: the meta tensors are replaced
    except (RuntimeError, AttributeError) as e:                     # AttributeError: not a tensor
        raise ValueError(f"DALL-E {what} state dict does not match the architecture: "
                         f"{' '.join(str(e).split())[:500]}") from None
    return module.requires_grad_(False)


# -----------------------------------------------------------------------------
# Loading any tokenizer file


def load_tokenizer(spec: Union[str, os.PathLike, Tokenizer], *, device: Union[str, torch.device] = "cpu",
                   **kw) -> Tokenizer:
    """A tokenizer from what the file holds: the published `encoder.pkl` (or its folder), a DALL-E state
    dict (tokenizer_tool.py convert), a released BEVT pretraining checkpoint (its `cls_head.vae_encoder.`
    tensors) or an offline tokenizer (tokenizer_tool.py fit). `kw` goes to the tokenizer."""
    if isinstance(spec, Tokenizer):
        return spec.to(device)
    path = Path(spec)
    if path.is_dir() and (path / "encoder.pkl").is_file():
        path = path / "encoder.pkl"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path} (expected encoder.pkl, a converted DALL-E "
                                f"state dict, a BEVT pretraining checkpoint or a `tools/tokenizer_tool.py fit` file)")
    obj = restricted_torch_load(path, what="a state dict, a BEVT checkpoint or an offline tokenizer file")
    if isinstance(obj, PickledEncoder):                               # encoder.pkl
        return DalleTokenizer.from_state_dict(module_tensors(obj), **kw).to(device)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a DALL-E encoder, a state dict, a BEVT checkpoint or an offline "
                         f"tokenizer file, got a {type(obj).__name__}")
    if obj.get("kind") == OfflineTokenizer.kind and "codebook" in obj:   # tools/tokenizer_tool.py fit
        return OfflineTokenizer(obj["codebook"], obj.get("config"), **kw).to(device)
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(k, str)}   # DDP's prefix
    vae = "cls_head.vae_encoder."                                     # released BEVT pretraining checkpoint
    if any(k.startswith(vae) for k in state):
        state = {k[len(vae):]: v for k, v in state.items() if k.startswith(vae)}
    elif "blocks.input.w" not in state:                               # nor a DALL-E state dict (convert's)
        if "state_dict" in obj or any(k.startswith(("backbone.", "cls_head.")) for k in state):
            raise ValueError(f"{path}: this checkpoint carries no tokenizer (no keys under '{vae}'); "
                             f"pass encoder.pkl or an offline tokenizer file")
        raise ValueError(f"{path}: not a tokenizer file: expected DALL-E keys ('blocks.input.w', ...), "
                         f"'{vae}...' or an offline tokenizer, got keys {sorted(map(str, state))[:4]}")
    return DalleTokenizer.from_state_dict(state, **kw).to(device)


def check_vocab(tokenizer: Union[Tokenizer, int], head_classes: int) -> None:
    """Raise if the tokenizer's vocabulary and the prediction head's class count differ."""
    v = getattr(tokenizer, "vocab_size", tokenizer)
    if v != head_classes:
        raise ValueError(f"tokenizer vocabulary ({getattr(tokenizer, 'kind', 'given')}) has {v} codes but the "
                         f"prediction head has {head_classes} classes; build it with {v} or load its tokenizer")
