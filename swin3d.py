"""Video Swin Transformer encoder shared by BEVT's image and video streams.

Implements paper §3 "BEVT encoders" and "Weight sharing between streams" (the Video Swin Transformer of Liu
et al., 2022), with the released checkpoint's key layout.

One encoder, two entry points:

    clip  (B, 3, T, H, W) --3D patch embed--> tokens (B, T/2, H/4, W/4, C)
    image (B, 3, H, W)    --2D patch embed--> tokens (B, 1,   H/4, W/4, C)
                               |
              optional mask token at masked positions
                               |
          4 stages of (shifted) window attention, shared weights
                               |
    EncoderOutput(stages=(F1, F2, F3, F4), f4_norm=LayerNorm(F4))

An image is treated as a clip with one token time step. Every block, merging layer and the final norm
are literally the same code and weights for both streams; with one time step the 3D window shrinks to
(1, Wh, Ww), the temporal shift becomes 0 and the relative-position index of that window picks exactly
the Δt = 0 sub-matrix of the 3D bias table, which is the paper's 2D adaptation. The released code keeps
a separate, drifting image branch instead (see the "Differs from the released code" notes below).

Shape vocabulary used in the comments:
    pixels   (B, 3, T, H, W) or (B, 3, H, W)
    tokens   (B, t, h, w, C)            channels last, t = 1 for images
    windows  (B, nW, N, C)              N = wt*wh*ww tokens per window
    heads    (B, nW, nh, N, hd)         hd = C / nh

A block reads as the paper: torch.roll, window_partition, SDPA with bias + shift mask, window_reverse,
torch.roll back. A faster equivalent of the attention for CPU training stands behind the machinery
banner, selected by SwinConfig.attention (and by the device under "auto"), held equal by a test.
Run it: `python -c "import swin3d; print(swin3d.SwinTransformer3D(swin3d.get_config('tiny')))"`;
`python tools/bench_swin3d.py` measures speed, memory and FLOPs.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

Shape3 = tuple[int, int, int]


# -----------------------------------------------------------------------------
# Configuration and presets (paper §3 "BEVT encoders", paper §4 "Implementation details")


@dataclass
class SwinConfig:
    embed_dim: int = 128                   # C; Swin-B (paper default backbone)
    depths: tuple = (2, 2, 18, 2)          # blocks per stage (Swin-B)
    num_heads: tuple = (4, 8, 16, 32)      # heads per stage (Swin-B)
    window_size: tuple = (8, 7, 7)         # (Wt, Wh, Ww); (16, 7, 7) for SSv2 finetuning
    patch_size: tuple = (2, 4, 4)          # 3D patch, 2x4x4x3 = 96 values per token (§3)
    in_chans: int = 3
    mlp_ratio: float = 4.0                 # MLP hidden = 4C (Swin)
    qkv_bias: bool = True                  # released Video Swin config
    drop_rate: float = 0.0                 # dropout after attention proj / MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.2            # library default; BEVT uses 0.3 (pretrain, K400), 0.4 (SSv2)
    patch_norm: bool = True                # LayerNorm after the patch embedding (released encoder)
    use_checkpoint: bool = False           # gradient checkpointing per block
    attention: str = "auto"                # "auto" | "sdpa" | "explicit" (see WindowAttention3D)


PRESETS: dict[str, SwinConfig] = {
    # paper §3 "BEVT encoders" table: params with a 400-class head 28.16M / 49.82M / 88.05M / 196.95M.
    "tiny": SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": SwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    # CPU-sized preset for the offline demo on the synthetic data set: the architecture of Swin-T with a
    # quarter of its width and one block in the outer stages (1.48M encoder parameters). Window (8, 7, 7) is
    # kept: small inputs simply shrink it, as they do for the paper's models.
    "cpu": SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.1),
}


def get_config(preset: str, **overrides) -> SwinConfig:
    """A copy of a preset with some fields replaced, e.g. get_config('base', window_size=(16, 7, 7))."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Swin preset {preset!r}; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[preset], **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


# -----------------------------------------------------------------------------
# Small pure functions: window clamping, partition, shift mask, relative index
# (torchvision-style; the tests call them directly)


def clamp_window(size: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> tuple[Shape3, Shape3]:
    """Window and shift actually used for a token grid `size` = (t, h, w).

    Along an axis whose extent is <= the window, the window shrinks to the extent and the shift along it
    becomes 0 (Video Swin `get_window_size`). This is what makes an image (t = 1) use a (1, Wh, Ww) window.
    """
    win = tuple(min(s, w) for s, w in zip(size, window))
    sh = tuple(0 if s <= w else k for s, w, k in zip(size, window, shift))
    return win, sh


def window_partition(x: torch.Tensor, window: Shape3) -> torch.Tensor:
    """(B, t, h, w, C) -> (B, nW, N, C), t/h/w divisible by the window, N = wt*wh*ww."""
    B, t, h, w, C = x.shape
    wt, wh, ww = window
    x = x.view(B, t // wt, wt, h // wh, wh, w // ww, ww, C)
    # (B, nt, wt, nh, wh, nw, ww, C) -> (B, nt, nh, nw, wt, wh, ww, C): window index major,
    # token inside the window time-major (t, then h, then w), matching the bias index.
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(B, -1, wt * wh * ww, C)


def window_reverse(windows: torch.Tensor, window: Shape3, size: Shape3) -> torch.Tensor:
    """(B, nW, N, C) -> (B, t, h, w, C); the inverse of window_partition."""
    B, _, _, C = windows.shape
    wt, wh, ww = window
    t, h, w = size
    x = windows.view(B, t // wt, h // wh, w // ww, wt, wh, ww, C)
    # (B, nt, nh, nw, wt, wh, ww, C) -> (B, nt, wt, nh, wh, nw, ww, C)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(B, t, h, w, C)


def shift_mask(size: Shape3, window: Shape3, shift: Shape3, device=None) -> Optional[torch.Tensor]:
    """Additive attention mask (nW, N, N) of a shifted-window block, or None if unshifted.

    `size` is the padded token grid. After the cyclic roll by -shift, a window at the far end
    holds tokens from different regions of the un-rolled map; each axis is cut into
    [0, -w), [-w, -s), [-s, end) and tokens with different region labels must not attend to
    each other: their logit gets -100 (Swin's value; after the softmax ~4e-44 in fp32, which
    _ExplicitAttention flushes to 0).
    """
    if not any(shift):
        return None
    labels = torch.zeros((1, *size, 1), device=device)
    cuts = [
        # An axis that is not shifted is one region.
        [slice(0, None)] if s == 0 else [slice(0, -w), slice(-w, -s), slice(-s, None)]
        for w, s in zip(window, shift)
    ]
    for n, (st, sh, sw) in enumerate(itertools.product(*cuts)):
        labels[:, st, sh, sw, :] = n
    labels = window_partition(labels, window)[0, :, :, 0]        # (nW, N)
    diff = labels[:, None, :] != labels[:, :, None]               # (nW, N, N): query row, key column
    return torch.zeros(diff.shape, device=device).masked_fill_(diff, -100.0)


def relative_position_index(window: Shape3, table_window: Shape3, device=None) -> torch.Tensor:
    """(N, N) index into a bias table of (2Tw-1)(2Th-1)(2Tw-1) rows, for a window `window`.

    The table is laid out for the configured window `table_window` (paper §3 "BEVT encoders"):
    index = (dt+Wt-1)(2Wh-1)(2Ww-1) + (dh+Wh-1)(2Ww-1) + (dw+Ww-1) for the relative offset (dt, dh, dw)
    of query and key, derived from the window actually used, so a shrunk window keeps the correct offsets.

    Differs from the released code: it slices the full-window index as index[:N, :N]. That is identical when
    only the time extent shrinks (time is the slowest axis, so the first N tokens of the full window are
    exactly the ones with t < wt) and for images, but picks wrong offsets when a spatial extent shrinks
    (e.g. the 4x4 stage-4 map of a 112-px input).

    For an image window (1, Wh, Ww), dt = 0 everywhere: this is the Δt = 0 sub-matrix of the 3D index,
    i.e. index3d[:Wh*Ww, :Wh*Ww] (paper §3, "reusing the submatrix ... where the relative temporal
    distance is 0").
    """
    if any(w > tw for w, tw in zip(window, table_window)):
        raise ValueError(f"window {tuple(window)} is larger than the bias table's window {tuple(table_window)}")
    coords = torch.stack(torch.meshgrid(*[torch.arange(w, device=device) for w in window], indexing="ij"))
    coords = coords.flatten(1)                                    # (3, N), time-major order
    rel = coords[:, :, None] - coords[:, None, :]                 # (3, N, N) offset query - key
    Wt, Wh, Ww = table_window
    return (rel[0] + Wt - 1) * (2 * Wh - 1) * (2 * Ww - 1) + (rel[1] + Wh - 1) * (2 * Ww - 1) + (rel[2] + Ww - 1)


class WindowGeometry(NamedTuple):
    """What a block needs to know about its windows, one per stage and shift: window and shift as used
    (clamped to the token grid), the (N, N) relative position index, the (nW, N, N) shift mask or None."""
    window: Shape3
    shift: Shape3
    index: torch.Tensor
    mask: Optional[torch.Tensor]


# -----------------------------------------------------------------------------
# Stochastic depth (Huang et al. 2016; Swin's drop path)

def add_drop_path(x: torch.Tensor, branch: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """x + DropPath(branch): stochastic depth (Huang et al. 2016) drops the residual branch per sample."""
    if p == 0.0 or not training:
        return x + branch
    keep = branch.new_empty((branch.shape[0],) + (1,) * (branch.dim() - 1)).bernoulli_(1.0 - p)
    return torch.addcmul(x, branch, keep.div_(1.0 - p))      # x + branch·keep/(1-p), in one pass


# -----------------------------------------------------------------------------
# Patch embedding (§3 "Image and video patches")


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> linear embedding -> optional LayerNorm.

    Video: Conv3d, kernel = stride = (2, 4, 4): (B, 3, T, H, W) -> (B, T/2, H/4, W/4, C).
    Image: Conv2d, kernel = stride = (4, 4):    (B, 3, H, W)    -> (B, 1,   H/4, W/4, C)
    (a 4x4x3 = 48-value token projected to C, the paper's image tokens). The two streams own separate
    instances (`patch_embed`, `patch_embed_2d`). Inputs are zero-padded at the end to the patch (Video Swin).
    """

    def __init__(self, patch_size: Sequence[int], in_chans: int, embed_dim: int, norm: bool):
        super().__init__()
        self.patch_size = tuple(patch_size)
        conv = nn.Conv3d if len(self.patch_size) == 3 else nn.Conv2d
        self.proj = conv(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.pad takes (last dim first) pairs: pad each spatial/temporal dim at its end.
        pad = []
        for size, p in zip(reversed(x.shape[2:]), reversed(self.patch_size)):
            pad += [0, (p - size % p) % p]
        if any(pad):
            x = F.pad(x, pad)
        x = self.proj(x)                                          # (B, C, [t,] h, w)
        x = x.movedim(1, -1)                                      # (B, [t,] h, w, C)
        if x.dim() == 4:
            x = x.unsqueeze(1)                                    # image: (B, 1, h, w, C)
        if self.norm is not None:
            x = self.norm(x)
        return x


# -----------------------------------------------------------------------------
# Window attention with relative position bias (Swin eq. 4)


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    Attention(Q, K, V) = softmax(Q Kᵀ / sqrt(hd) + B + M) V, where B is gathered from
    `relative_position_bias_table` by the relative index and M is the shifted-window mask. The bias table is
    sized for the configured window; smaller windows (clamped for small inputs, or images) index into it.
    `attention`: "sdpa" = F.scaled_dot_product_attention; "explicit" = the formula with its own backward
    (the faster equivalent on CPUs); "auto" = SDPA except for CPU training (_use_explicit).
    """

    def __init__(self, dim: int, window_size: Shape3, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, attention: str = "auto"):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.window_size = tuple(window_size)
        self.scale = (dim // num_heads) ** -0.5
        rows = math.prod(2 * w - 1 for w in window_size)         # (2Wt-1)(2Wh-1)(2Ww-1): one per offset (dt, dh, dw)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
        # A persistent buffer only so that the state-dict keys equal the released layout: a checkpoint's
        # value is never trusted (_load_from_state_dict); forward uses the index of the window actually used.
        self.register_buffer("relative_position_index", relative_position_index(self.window_size, self.window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attention = attention                                # SwinTransformer3D.set_attention checks it

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Re-derive the index, never load it: a checkpoint's copy may be another window's; nothing is learned.
        state_dict[prefix + "relative_position_index"] = self.relative_position_index
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def bias(self, index: torch.Tensor) -> torch.Tensor:
        """Gather the relative position bias for an (N, N) index -> (nh, N, N)."""
        # From the transposed (nh, rows) table, index_select writes (nh, N, N) in the dense layout the fused
        # kernels want in attn_mask, with no permute copy. With one head a view(1, -1) instead, so that the
        # table's gradient keeps the table's strides, which DDP's gradient buckets expect.
        table = self.relative_position_bias_table                        # (rows, nh)
        t = table.view(1, -1) if table.shape[1] == 1 else table.t()      # (nh, rows)
        return torch.index_select(t, 1, index.reshape(-1)).view(t.shape[0], *index.shape)   # (nh, N, N)

    def forward(self, x: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x: windows (B, nW, N, C); index (N, N); mask (nW, N, N) or None -> (B, nW, N, C)."""
        qkv = self.qkv(x)                                         # (B, nW, N, 3C), channels (3, nh, hd)
        bias = self.bias(index)                                   # (nh, N, N)
        p = self.attn_drop if self.training else 0.0
        if _use_explicit(self.attention, x, bias):                # the faster equivalent, see the machinery
            return self.proj_drop(self.proj(explicit_attention(qkv, bias, mask, self.num_heads, self.scale, p)))
        q, k, v = _split_heads(qkv, self.num_heads)               # each (B, nW, nh, N, hd)
        # softmax(q·kᵀ/sqrt(hd) + B + M)·v as F.scaled_dot_product_attention(q, k, v, attn_mask=B + M)
        out = _sdpa_windows(q, k, v, bias, mask, p)               # (B, nW, nh, N, hd)
        return self.proj_drop(self.proj(_merge_heads(out)))      # (B, nW, N, C)


def _split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, nW, N, 3C) -> q, k, v, each (B, nW, nh, N, hd) (strided views, no copy)."""
    B, nW, N, C3 = qkv.shape
    qkv = qkv.view(B, nW, N, 3, num_heads, C3 // (3 * num_heads))
    return qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)                # (3, B, nW, nh, N, hd) unbound


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, nW, nh, N, hd) -> (B, nW, N, nh*hd): heads back into channels (a copy)."""
    B, nW, nh, N, hd = out.shape
    return out.transpose(2, 3).reshape(B, nW, N, nh * hd)


def attention_reference(q, k, v, bias, mask, dropout_p: float = 0.0, scale: Optional[float] = None):
    """Explicit softmax(q·kᵀ·scale + bias + mask)·v, the reference the fused path must equal.

    q, k, v: (B, nW, nh, N, hd); bias (nh, N, N); mask (nW, N, N) or None.
    Materialises the full (B, nW, nh, N, N) attention matrix, like the released code.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1) + bias               # (B, nW, nh, N, N)
    if mask is not None:
        attn = attn + mask[:, None]                               # (nW, 1, N, N) broadcast over heads
    attn = F.dropout(attn.softmax(dim=-1), dropout_p)
    return attn @ v


def _sdpa_windows(q, k, v, bias, mask, dropout_p: float):
    """attention_reference through F.scaled_dot_product_attention, attn_mask = bias + shift mask.

    q, k, v (B, nW, nh, N, hd) -> (B, nW, nh, N, hd). The fused kernels take 4-D (batch, heads, N, hd)
    inputs and an attn_mask broadcastable to (batch, heads, N, N). The bias is shared by all windows,
    so unshifted blocks fold the windows into the batch: (B*nW, nh, N, hd) with a (1, nh, N, N) mask,
    a free view. Shifted blocks need a mask per window, so windows go next to the heads:
    (B, nW*nh, N, hd) with a (1, nW*nh, N, N) mask that broadcasts over the batch (never copied B times).
    """
    B, nW, nh, N, hd = q.shape
    if mask is None:
        attn_mask = bias.unsqueeze(0).to(q.dtype)                                    # (1, nh, N, N)
        q, k, v = (t.reshape(B * nW, nh, N, hd) for t in (q, k, v))
    else:
        attn_mask = (bias.unsqueeze(0) + mask.unsqueeze(1)).to(q.dtype)             # (nW, nh, N, N)
        attn_mask = attn_mask.reshape(1, nW * nh, N, N)
        q, k, v = (t.reshape(B, nW * nh, N, hd) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return out.view(B, nW, nh, N, hd)


# -----------------------------------------------------------------------------
# Swin block, patch merging and stages


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinBlock3D(nn.Module):
    """x = x + DropPath(W-MSA(LN(x)));  x = x + DropPath(MLP(LN(x)))  (Swin eq. 3).

    The window geometry (window, shift, index and mask) is decided once per stage (it depends only on the
    token grid) and passed in, so every block of every stream runs this one code path.
    """

    def __init__(self, dim: int, num_heads: int, window_size: Shape3, mlp_ratio: float, qkv_bias: bool,
                 drop: float, attn_drop: float, drop_path: float, attention: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, window_size, num_heads, qkv_bias, attn_drop, drop, attention)
        self.drop_path = drop_path
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        """x: tokens (B, t, h, w, C) -> (B, t, h, w, C)."""
        x = add_drop_path(x, self._attention(x, geometry), self.drop_path, self.training)
        return add_drop_path(x, self.mlp(self.norm2(x)), self.drop_path, self.training)

    def _attention(self, x: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        """W-MSA(LN(x)) or SW-MSA(LN(x)) on tokens (B, t, h, w, C) -> (B, t, h, w, C)."""
        B, t, h, w, C = x.shape
        window, shift = geometry.window, geometry.shift
        x = self.norm1(x)
        # Zero-pad (after the norm, as Video Swin does) at the END of each axis to a multiple of the window.
        pt, ph, pw = ((-t) % window[0], (-h) % window[1], (-w) % window[2])
        if pt or ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pt))            # (B, tp, hp, wp, C)
        size = tuple(x.shape[1:4])
        # Cyclic shift by -shift (Swin §3.2, "shifted window partitioning"; shift is 0 in even blocks).
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        windows = window_partition(x, window)                     # (B, nW, N, C)
        windows = self.attn(windows, geometry.index, geometry.mask)
        x = window_reverse(windows, window, size)                 # (B, tp, hp, wp, C)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))   # and back by +shift
        return x[:, :t, :h, :w, :]                                # crop the padding from the end: (B, t, h, w, C)


class PatchMerging(nn.Module):
    """2x2 spatial neighbours -> 4C -> LayerNorm -> Linear(4C -> 2C, no bias). Time is kept.

    Neighbour order (h0,w0), (h1,w0), (h0,w1), (h1,w1), as in the released code
    (the Linear's weights depend on it). Odd h or w is zero-padded.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, t, h, w, C) -> (B, t, ceil(h/2), ceil(w/2), 2C)."""
        if x.shape[2] % 2 or x.shape[3] % 2:
            x = F.pad(x, (0, 0, 0, x.shape[3] % 2, 0, x.shape[2] % 2))
        B, t, h, w, C = x.shape
        # The released code concatenates the four strided slices x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2],
        # x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]; the same tensor as one reshape (neighbour index
        # dh + 2*dw), whose gradient is one copy back (four slices': four zero-filled full-size tensors).
        x = x.reshape(B, t, h // 2, 2, w // 2, 2, C)              # (B, t, h/2, dh, w/2, dw, C)
        x = x.permute(0, 1, 2, 4, 5, 3, 6).reshape(B, t, h // 2, w // 2, 4 * C)   # (B, t, h/2, w/2, (dw, dh, C))
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """One stage (`layers.i` in the released layout): blocks alternating shift 0 and window//2, then merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: Shape3, mlp_ratio: float,
                 qkv_bias: bool, drop: float, attn_drop: float, drop_path: Sequence[float],
                 downsample: bool, use_checkpoint: bool, attention: str):
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = tuple(w // 2 for w in window_size)
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinBlock3D(dim, num_heads, window_size, mlp_ratio, qkv_bias, drop, attn_drop, drop_path[i], attention)
            for i in range(depth)])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, t, h, w, C) -> (stage output before merging, input of the next stage)."""
        window, shift = clamp_window(x.shape[1:4], self.window_size, self.shift_size)
        padded = tuple(math.ceil(s / w) * w for s, w in zip(x.shape[1:4], window))
        index = _cached(relative_position_index, window, self.window_size, device=x.device)
        geometry = [WindowGeometry(window, s, index, _cached(shift_mask, padded, window, s, device=x.device))
                    for s in ((0, 0, 0), shift)]                  # [regular windows, shifted windows]
        for i, blk in enumerate(self.blocks):
            # Even blocks: regular windows; odd blocks: shifted windows (Swin §3.2).
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                # Same code for both streams (differs from the released code, whose checkpointed path
                # drops the image flag and runs images as video).
                x = cp.checkpoint(blk, x, geometry[i % 2], use_reentrant=False)
            else:
                x = blk(x, geometry[i % 2])
        return x, (self.downsample(x) if self.downsample is not None else x)


# -----------------------------------------------------------------------------
# The encoder


class EncoderOutput(NamedTuple):
    """What the encoder returns, channels last.

    stages:  (F1, F2, F3, F4), each stage's output *before* its patch merging.
             Video: (B, T/2, H/4·2^-i, W/4·2^-i, C·2^i); image: (B, H/4·2^-i, W/4·2^-i, C·2^i).
    f4_norm: the final LayerNorm(8C) applied to F4, the feature used for classification (paper §4.1-4.2).
    The decoders take F3 and F4 (paper §3 "Decoders").
    """

    stages: tuple
    f4_norm: torch.Tensor

    @property
    def f3(self) -> torch.Tensor:
        return self.stages[2]

    @property
    def f4(self) -> torch.Tensor:
        return self.stages[3]


class SwinTransformer3D(nn.Module):
    """Video Swin encoder with BEVT's shared image stream (paper §3 "BEVT encoders"; the public interface).

    forward(clip (B, 3, T, H, W) or image (B, 3, H, W), mask=None) -> EncoderOutput.
    `mask` is a bool tensor on the tokenizer grid, True = replaced by the mask token (and later predicted):
    (B, T/2, H/16, W/16) for clips, (B, H/16, W/16) for images. It is upsampled (nearest) x4 in space to the
    token grid inside.
    """

    def __init__(self, config: Optional[SwinConfig] = None):
        super().__init__()
        self.config = c = config if config is not None else SwinConfig()
        if len(c.depths) != len(c.num_heads):
            raise ValueError(f"depths {c.depths} and num_heads {c.num_heads} must have the same length")
        self.num_layers = len(c.depths)
        self.embed_dim = c.embed_dim
        self.num_features = c.embed_dim * 2 ** (self.num_layers - 1)      # 8C
        # --- patch embeddings: one per stream (paper §3, weight sharing (1))
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim, c.patch_norm)
        self.patch_embed_2d = PatchEmbed(c.patch_size[1:], c.in_chans, c.embed_dim, c.patch_norm)
        # --- one mask token shared by both streams, (1, 1, C) as released
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_drop = nn.Dropout(c.drop_rate)
        # --- stochastic depth rising linearly over all blocks (Swin)
        n_blocks = sum(c.depths)
        dpr = [c.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(c.depths, c.num_heads)):
            start = sum(c.depths[:i])
            self.layers.append(SwinStage(
                c.embed_dim * 2 ** i, depth, heads, c.window_size, c.mlp_ratio, c.qkv_bias,
                c.drop_rate, c.attn_drop_rate, dpr[start:start + depth],
                downsample=i < self.num_layers - 1, use_checkpoint=c.use_checkpoint, attention=c.attention))
        self.norm = nn.LayerNorm(self.num_features)               # final norm (also the decoders' norm)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.set_attention(c.attention)

    def set_attention(self, attention: str) -> None:
        """Switch every block between "auto", "sdpa" and "explicit" (see WindowAttention3D)."""
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {attention!r}; expected one of {ATTENTION_IMPLS}")
        for m in self.modules():
            if isinstance(m, WindowAttention3D):
                m.attention = attention

    # -- input checks: one-line errors naming what was expected and what came
    def _check(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        c, pt, B, (H, W) = self.config.in_chans, self.config.patch_size[0], x.shape[0], x.shape[-2:]
        if x.dim() not in (4, 5) or x.shape[1] != c:
            raise ValueError(f"expected a clip (B, {c}, T, H, W) or an image (B, {c}, H, W) with {c} input "
                             f"channels at dim 1, got a tensor of shape {tuple(x.shape)}")
        if mask is None:
            return
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = masked), got dtype {mask.dtype}")
        if H % 16 or W % 16:
            raise ValueError(f"a mask needs H and W divisible by 16 (the tokenizer grid), got {H}x{W}")
        expected = (B, H // 16, W // 16) if x.dim() == 4 else (B, -(-x.shape[2] // pt), H // 16, W // 16)
        if tuple(mask.shape) != expected:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match the input {tuple(x.shape)}: "
                             f"expected {expected} (batch, [T/{pt},] H/16, W/16)")

    def embed(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pixels -> tokens (B, t, h, w, C), masked positions replaced by the mask token."""
        self._check(x, mask)
        tokens = self.patch_embed(x) if x.dim() == 5 else self.patch_embed_2d(x)   # (B, t, h, w, C)
        if mask is not None:
            if mask.dim() == 3:
                mask = mask.unsqueeze(1)                           # image: (B, 1, h/4, w/4)
            # Tokenizer grid -> token grid: each tokenizer cell (16x16 px) covers 4x4 tokens (4x4 px).
            m = mask.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)       # (B, t, h, w)
            # x = x·(1−m) + t·m (BEiT/BEVT), written as a select.
            tokens = torch.where(m.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        return self.pos_drop(tokens)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> EncoderOutput:
        tokens, stages = self.embed(x, mask), []                   # (B, t, h, w, C); t = 1 is the image stream
        for layer in self.layers:
            out, tokens = layer(tokens)
            stages.append(out)
        f4_norm = self.norm(stages[-1])
        if x.dim() == 4:
            # Images come back without the (length-1) time axis: (B, h, w, C).
            stages, f4_norm = [s.squeeze(1) for s in stages], f4_norm.squeeze(1)
        return EncoderOutput(tuple(stages), f4_norm)


def _init_weights(m: nn.Module) -> None:
    """Paper §3 "BEVT encoders" "Init": Linear trunc-normal(0.02), bias 0; LayerNorm 1/0; tables trunc-normal(0.02)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, WindowAttention3D):
        nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)


# =============================================================================
# Machinery: what running the method needs (not the method itself).

# -----------------------------------------------------------------------------
# A faster equivalent of the attention for CPU training: the same formula with its own
# backward (tests/test_swin3d.py holds it equal to SDPA, forward and gradients).

ATTENTION_IMPLS = ("auto", "sdpa", "explicit")


def _use_explicit(attention: str, x: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether WindowAttention3D runs explicit_attention. "auto": for CPU training, where SDPA's flash
    kernel has no gradient for attn_mask and falls back to its math kernel (CUDA's kernels have one)."""
    return attention == "explicit" or (attention == "auto" and x.device.type == "cpu" and torch.is_grad_enabled()
                                       and bias.requires_grad)


def explicit_attention(qkv, bias, mask, num_heads: int, scale: float, dropout_p: float) -> torch.Tensor:
    """qkv (B, nW, N, 3C) -> (B, nW, N, C): _ExplicitAttention, or the plain formula with attention
    dropout, under torch.compile (which fuses it) or autocast (whose per-op casts it gets)."""
    if dropout_p == 0.0 and not torch.compiler.is_compiling() and not torch.is_autocast_enabled(qkv.device.type):
        return _ExplicitAttention.apply(qkv, bias, mask, num_heads, scale)
    q, k, v = _split_heads(qkv, num_heads)
    return _merge_heads(attention_reference(q, k, v, bias, mask, dropout_p, scale))


class _ExplicitAttention(torch.autograd.Function):
    """qkv (B, nW, N, 3C) -> attention_reference (no dropout) with heads merged, (B, nW, N, C).

    A hand-written backward that works in place: of the (B, nW, nh, N, N) logits, the model's largest
    tensors, autograd allocates six per shifted block (logits, +bias, +mask, softmax; dP, dS), this two.

    Backward, with S = q·kᵀ·scale + B + M, P = softmax(S), O = P·v:
        dv = Pᵀ·dO,  dP = dO·vᵀ,
        dS = P ∘ (dP − D),  D_i = Σ_j P_ij dP_ij = dO_i · O_i   (FlashAttention's identity:
                                                                 D needs no N×N product)
        dB = Σ over batch and windows of dS,  dq = dS·k·scale,  dk = dSᵀ·(q·scale).
    """

    @staticmethod
    def forward(ctx, qkv, bias, mask, num_heads, scale):
        B, nW, N, C3 = qkv.shape
        heads = qkv.view(B, nW, N, 3, num_heads, C3 // (3 * num_heads))
        heads = heads.permute(3, 0, 1, 4, 2, 5).contiguous()     # (3, B, nW, nh, N, hd): q, k, v, one copy
        heads[0] *= scale                                         # q·scale
        qs, k, v = heads                                          # each (B, nW, nh, N, hd), contiguous
        attn = qs @ k.transpose(-2, -1)                           # (B, nW, nh, N, N) logits
        attn += bias                                              # (nh, N, N), broadcast over B, nW
        if mask is not None:
            attn += mask[:, None]                                 # (nW, 1, N, N), broadcast over B, heads
        torch.softmax(attn, dim=-1, out=attn)                     # P, in place (softmax works row by row)
        if mask is not None:
            # exp(-100 + ...) ~ 1e-44 is an fp32 denormal, a slow path on x86 CPUs: flush it to 0
            # (P changes by < 1e-38, below fp32 resolution).
            F.threshold(attn, torch.finfo(attn.dtype).tiny, 0.0, inplace=True)
        out = attn @ v                                            # (B, nW, nh, N, hd)
        ctx.save_for_backward(heads, attn, out)
        ctx.scale = scale
        return _merge_heads(out)                                  # (B, nW, N, C)

    @staticmethod
    def backward(ctx, dout):
        heads, p, out = ctx.saved_tensors
        qs, k, v = heads
        B, nW, nh, N, hd = out.shape
        dout = dout.reshape(B, nW, N, nh, hd).transpose(2, 3).contiguous()   # (B, nW, nh, N, hd)
        dheads = torch.empty_like(heads)                          # (3, B, nW, nh, N, hd): dq, dk, dv
        torch.matmul(p.transpose(-2, -1), dout, out=dheads[2])    # dv = Pᵀ·dO
        ds = dout @ v.transpose(-2, -1)                           # dP (B, nW, nh, N, N)
        ds -= (dout * out).sum(-1, keepdim=True)                  # dP - D
        ds *= p                                                   # dS
        dbias = ds.sum((0, 1)) if ctx.needs_input_grad[1] else None          # (nh, N, N)
        torch.matmul(ds, k, out=dheads[0])
        dheads[0] *= ctx.scale                                    # dq = dS·k·scale
        torch.matmul(ds.transpose(-2, -1), qs, out=dheads[1])     # dk = dSᵀ·(q·scale)
        # Back to the layout of the qkv Linear's output, (B, nW, N, (3, nh, hd)): one copy.
        return dheads.permute(1, 2, 4, 0, 3, 5).reshape(B, nW, N, 3 * nh * hd), dbias, None, None, None


# Shift masks and relative indices depend only on shapes: built once per
# (shape, window, shift, device) and reused by every block and step (traced under torch.compile).
_GEOMETRY_CACHE: dict = {}


def _cached(fn, *args, device):
    if torch.compiler.is_compiling():
        return fn(*args, device=device)
    key = (fn.__name__, *args, str(device))
    if key not in _GEOMETRY_CACHE:
        _GEOMETRY_CACHE[key] = fn(*args, device=device)
    return _GEOMETRY_CACHE[key]


# -----------------------------------------------------------------------------
# Checkpoint helpers: prefixes, shapes, window resizing (paper §4.1-4.2; the released checkpoint layout)


class LoadReport(NamedTuple):
    """What loading a checkpoint did: its kind; our keys loaded / missing; its keys unused (original
    names); index buffers re-derived; (checkpoint window, model window) if the tables were resized."""
    kind: str
    loaded: list
    missing: list
    unused: list
    rederived: list
    window: Optional[tuple] = None

    def describe(self, path) -> str:
        """A few lines for the log, the unused keys grouped by module."""
        more = " ..." if len(self.missing) > 6 else ""
        groups = sorted(collections.Counter(".".join(k.split(".")[:2]) for k in self.unused).items())
        lines = [f"init from {path}: {self.kind}; {len(self.loaded)} tensors loaded",
                 f"  missing ({len(self.missing)}, trained from scratch): {self.missing[:6]}{more}",
                 f"  unused ({len(self.unused)}): " + (", ".join(f"{g}* x{n}" for g, n in groups) or "none")]
        if self.window:
            lines.insert(1, f"  window {self.window[0]} -> {self.window[1]}: relative tables trilinearly resized")
        if self.rederived:
            lines.append(f"  re-derived, not loaded: {len(self.rederived)} index/mask buffers")
        return "\n".join(lines)


def load_file(path) -> object:
    """torch.load(weights_only=True) on CPU, else a one-line ValueError; also for a tensor beyond its storage or
    reusing elements (stride 0): weights_only accepts a 1.7 KB file declaring gigabytes (then allocated)."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                              # incl. MemoryError / allocation failures
        raise ValueError(f"{path} is not a checkpoint of this project, or cannot be loaded safely "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})") from None

    def check(x, where):
        if isinstance(x, torch.Tensor) and x.numel() > 0:
            room = x.untyped_storage().nbytes() // x.element_size()     # elements the storage holds
            extent = x.storage_offset() + sum((n - 1) * s for n, s in zip(x.shape, x.stride())) + 1
            if extent > room or x.numel() > room or any(s == 0 for n, s in zip(x.shape, x.stride()) if n > 1):
                raise ValueError(f"{path} is not a checkpoint of this project: tensor {where} declares "
                                 f"{tuple(x.shape)} with strides {x.stride()} over a storage of {room} elements")
        for k, v in (x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, (list, tuple)) else ()):
            check(v, f"{where}[{k!r}]")
    check(obj, "")
    return obj


def unwrap_key(key: str) -> str:
    """A state-dict key without the wrappers' prefixes: `module.` (DDP) then `_orig_mod.` (torch.compile)."""
    return key.removeprefix("module.").removeprefix("_orig_mod.")


def read_state_dict(checkpoint) -> tuple[dict, dict]:
    """(flat, outer) of a path or dict: flat = {key without `module.`/`_orig_mod.`: (original key, tensor)} of its
    `state_dict`, `model` or the bare dict, refusing what needs converting first; outer = the outer dict (or {})."""
    if isinstance(checkpoint, (str, bytes)) or hasattr(checkpoint, "__fspath__"):
        checkpoint = load_file(checkpoint)
    outer = checkpoint if isinstance(checkpoint, dict) else {}
    sd = next((outer[k] for k in ("state_dict", "model") if isinstance(outer.get(k), dict)), checkpoint)
    flat = {}
    for key, value in sd.items():
        k = unwrap_key(key)
        if k in flat:                                     # `encoder.X` and `module.encoder.X`: refuse to guess
            raise ValueError(f"checkpoint holds {k!r} twice, as {flat[k][0]!r} and {key!r}; refusing to guess")
        flat[k] = (key, value)
    check_converted({k: v for k, (_, v) in flat.items()})
    return flat, outer


def check_converted(state_dict: dict) -> None:
    """One-line ValueError for what tools/convert_checkpoint.py converts first: torchvision's swin3d
    (stages under `features.`) and a 2D Swin (a 4-D patch embedding)."""
    keys = [unwrap_key(k) for k in state_dict]
    if any(k.startswith("features.") for k in keys):
        raise ValueError("torchvision's swin3d layout: first `python tools/convert_checkpoint.py torchvision IN OUT`")
    if any(k.endswith("patch_embed.proj.weight") and v.dim() == 4 for k, v in zip(keys, state_dict.values())):
        raise ValueError("2D Swin image checkpoint: inflate it first with "
                         "`python tools/convert_checkpoint.py inflate IN OUT --model NAME`")


def resize_relative_tables(state_dict: dict, old_window: Sequence[int], new_window: Sequence[int]) -> dict:
    """Resize every 3D relative_position_bias_table from `old_window` to `new_window` (trilinear).

    E.g. (8,7,7) -> (16,7,7) for SSv2 finetuning (paper §4.1-4.2): a (15·13·13, nh) table is
    viewed as an (nh, 15, 13, 13) grid of offsets and interpolated to (nh, 31, 13, 13). With
    align_corners=False the centre (offset 0) maps to the centre, so the Δt = 0 slice is kept
    exactly. Index buffers are dropped (re-derived on load).
    """
    old_window, new_window = tuple(old_window), tuple(new_window)
    grid, new_grid = tuple(2 * w - 1 for w in old_window), tuple(2 * w - 1 for w in new_window)
    out = {}
    for k, v in state_dict.items():
        if k.endswith("relative_position_index"):
            continue
        if k.endswith("relative_position_bias_table") and old_window != new_window:
            if v.shape[0] != math.prod(grid):
                raise ValueError(f"{k} has {v.shape[0]} rows; a window {old_window} needs {math.prod(grid)}")
            t = v.float().T.reshape(1, v.shape[1], *grid)         # (1, nh, 2Wt-1, 2Wh-1, 2Ww-1)
            t = F.interpolate(t, size=new_grid, mode="trilinear", align_corners=False)
            v = t.reshape(v.shape[1], -1).T.contiguous().to(v.dtype)   # (prod(new_grid), nh)
        out[k] = v
    return out


def param_count(model: nn.Module, exclude: Sequence[str] = ()) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(tuple(exclude)))
