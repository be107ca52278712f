"""BEVT: the two streams, their decoders, the shared prediction head and the joint loss.

Implements paper §3 "Decoders" (Fig. 3) and eqs. 2-5, with a loader for the
authors' released checkpoint layout (README, "Differences from the released
code"). The encoder is swin3d.SwinTransformer3D.

    clip  (B, 3, T, H, W) + tube mask (B, T/2, H/16, W/16)
        -> encoder -> F3 (B, T/2, H/16, W/16, 4C), F4 (B, T/2, H/32, W/32, 8C)
        -> video decoder -> (B, T, H/16, W/16, 8C)           one feature per tokenizer code
    image (B, 3, H, W) + block mask (B, H/16, W/16)
        -> encoder -> F3 (B, H/16, W/16, 4C), F4 (B, H/32, W/32, 8C)
        -> image decoder -> (B, H/16, W/16, 8C)
    masked positions only -> shared head Linear(8C -> 8192) -> cross-entropy with the tokenizer codes
    L = L_MIM + λ·L_MVM                                        (eq. 5, λ = 1)

The tokenizer is deliberately not part of this module (it is frozen, never
trained and never saved with the model): train.py runs it and passes codes.

Run it through train.py (`python train.py --preset cpu --stage joint`);
`python tools/show.py --init CKPT --video a.mp4 --out-file pred.png` draws what a
pretrained model predicts under a mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import masking
import swin3d
from swin3d import SwinConfig, SwinTransformer3D
from tokenizer import VOCAB_SIZE   # 8192 DALL-E codes (appendix A): the token head predicts one of them

LAMBDA = 1.0               # eq. 5, "the loss weight λ is simply set to 1" (§4.1)


@dataclass
class BEVTConfig:
    swin: SwinConfig = field(default_factory=lambda: swin3d.get_config("base", drop_path_rate=0.3))
    vocab_size: int = VOCAB_SIZE
    lam: float = LAMBDA


# -----------------------------------------------------------------------------
# Decoders (Fig. 3)


def _crop_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Crop the spatial dims (-3, -2) of channels-last `x` to those of `ref`.

    Upsampling F4 by 2 gives an even size; F3 is odd when the input is not a
    multiple of 32 px (e.g. 112 px: F3 7x7, F4 4x4 -> 8x8). Patch merging
    zero-padded the end, so the extra row/column is dropped.
    Differs from the released code, which only works for multiples of 32.
    """
    return x[..., : ref.shape[-3], : ref.shape[-2], :]


class VideoDecoder(nn.Module):
    """F̂4 = ConvT3d_(1,2,2)(F4);  F = Linear(12C -> 8C)([F3, F̂4]);  F̂ = ConvT3d_(2,1,1)(F).

    Spatial x2 to the tokenizer grid, fuse with F3, then temporal x2 to one
    feature per frame. Attribute names follow the released keys (`fpn_s.0`,
    `lm_down_st.0`, `fpn_t.0`). The final LayerNorm is the encoder's `norm`
    (shared, as in the released code), applied by BEVT.features.
    """

    def __init__(self, dim: int, temporal_patch: int = 2):
        super().__init__()
        self.fpn_s = nn.Sequential(nn.ConvTranspose3d(dim, dim, (1, 2, 2), stride=(1, 2, 2)))
        self.lm_down_st = nn.Sequential(nn.Linear(dim + dim // 2, dim))
        self.fpn_t = nn.Sequential(nn.ConvTranspose3d(dim, dim, (temporal_patch, 1, 1), stride=(temporal_patch, 1, 1)))

    def forward(self, f3: torch.Tensor, f4: torch.Tensor) -> torch.Tensor:
        """f3 (B, t, h, w, 4C), f4 (B, t, h/2, w/2, 8C) -> (B, 2t, h, w, 8C)."""
        up = self.fpn_s(f4.movedim(-1, 1)).movedim(1, -1)                 # (B, t, h, w, 8C)
        # Concatenate F3 first: the released code's order (the paper writes Concat(F̂4, F3)).
        x = self.lm_down_st(torch.cat([f3, _crop_like(up, f3)], dim=-1))   # (B, t, h, w, 8C)
        return self.fpn_t(x.movedim(-1, 1)).movedim(1, -1)                 # (B, 2t, h, w, 8C)


class ImageDecoder(nn.Module):
    """F̂4 = ConvT2d_2(F4);  F = Linear(12C -> 8C)([F3, F̂4])  ("without the temporal upsampling", §3)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fpn = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2))
        self.lm_down = nn.Linear(dim + dim // 2, dim)

    def forward(self, f3: torch.Tensor, f4: torch.Tensor) -> torch.Tensor:
        """f3 (B, h, w, 4C), f4 (B, h/2, w/2, 8C) -> (B, h, w, 8C)."""
        up = self.fpn(f4.movedim(-1, 1)).movedim(1, -1)                   # (B, h, w, 8C)
        return self.lm_down(torch.cat([f3, _crop_like(up, f3)], dim=-1))


# -----------------------------------------------------------------------------
# The model


STAGES = ("image", "video", "joint")


class BEVT(nn.Module):
    """Encoder + image decoder + video decoder + one head shared by both streams (eq. 2)."""

    def __init__(self, config: Optional[BEVTConfig] = None):
        super().__init__()
        self.config = config = config if config is not None else BEVTConfig()
        self.encoder = SwinTransformer3D(config.swin)
        dim = self.encoder.num_features                                     # 8C
        self.video_decoder = VideoDecoder(dim, config.swin.patch_size[0])
        self.image_decoder = ImageDecoder(dim)
        self.head = nn.Linear(dim, config.vocab_size)                       # W, b of eq. 2
        for m in (self.video_decoder, self.image_decoder, self.head):
            m.apply(swin3d._init_weights)

    # -- per-stream features (the public interface: "the decoder output before the head")
    def features(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decoder output, LayerNorm'd: video (B, 2·ceil(T/2), H/16, W/16, 8C), image (B, H/16, W/16, 8C)."""
        out = self.encoder(x, mask)
        decoder = self.video_decoder if x.dim() == 5 else self.image_decoder
        return self.encoder.norm(decoder(out.f3, out.f4))

    def _stream_loss(self, x, mask, codes):
        """Cross-entropy and accuracy over the masked positions of one stream (eqs. 3, 4)."""
        if codes.dtype != torch.long:
            raise ValueError(f"tokenizer codes must be int64, got {codes.dtype}")
        feats = self.features(x, mask)                                      # encode(x, mask) -> decode
        if x.dim() == 5:
            mask = masking.target_mask(mask, codes.shape[1], self.config.swin.patch_size[0])   # (B, T, h, w)
            feats = feats[:, : codes.shape[1]]                              # drop the time padding, if any
        if feats.shape[:-1] != codes.shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not match the decoder grid "
                             f"{tuple(feats.shape[:-1])}")
        # Gather first, then project: logits only at masked positions (§3, eq. 2 is needed only where
        # eqs. 3-4 sum). nonzero() is this stream's one host sync (M is data-dependent). It stays: a loss over
        # every position weighted by the mask would compute the 8192-way head everywhere (×2 at 50% masking),
        # and M known on the host (where the loader draws the masks) would be one more input per stream.
        idx = mask.reshape(-1).nonzero().squeeze(1)                         # (M,) flat masked positions
        logits = self.head(feats.reshape(-1, feats.shape[-1]).index_select(0, idx))   # (M, vocab)
        target = codes.reshape(-1).index_select(0, idx)                     # (M,)
        loss = F.cross_entropy(logits.float(), target)
        with torch.no_grad():
            acc = (logits.argmax(-1) == target).float().mean()
        return loss, acc

    def forward(self, videos=None, video_masks=None, video_codes=None,
                images=None, image_masks=None, image_codes=None) -> dict:
        """The training forward: L = L_MIM + λ·L_MVM (eq. 5) over whichever streams are given.

        videos (B, 3, T, H, W), video_masks (B, T/2, H/16, W/16) bool, video_codes (B, T, H/16, W/16) int64;
        images (B, 3, H, W), image_masks (B, H/16, W/16) bool, image_codes (B, H/16, W/16) int64.
        Returns loss, and loss_mim/acc_mim and loss_mvm/acc_mvm for the streams present.
        """
        out, total = {}, 0.0
        if images is not None:
            out["loss_mim"], out["acc_mim"] = self._stream_loss(images, image_masks, image_codes)
            total = total + out["loss_mim"]
        if videos is not None:
            out["loss_mvm"], out["acc_mvm"] = self._stream_loss(videos, video_masks, video_codes)
            total = total + self.config.lam * out["loss_mvm"]
        if images is None and videos is None:
            raise ValueError("BEVT.forward needs images and/or videos")
        out["loss"] = total
        return out

    # -- stages: which parameters train (so DDP needs no find_unused_parameters)
    def set_stage(self, stage: str) -> None:
        """BEVT-I trains the image stream only, BEVT-V the video stream only, BEVT both (§4.1).

        The other stream's own parts (its patch embedding and decoder) get requires_grad=False, so every
        trainable parameter receives a gradient in every step and DDP runs with find_unused_parameters=False.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        video_only = [self.encoder.patch_embed, self.video_decoder]
        image_only = [self.encoder.patch_embed_2d, self.image_decoder]
        for p in self.parameters():
            p.requires_grad_(True)
        frozen = video_only if stage == "image" else image_only if stage == "video" else []
        for m in frozen:
            for p in m.parameters():
                p.requires_grad_(False)

    def compile_streams(self, **kwargs) -> None:
        """torch.compile the encoder and both decoders in place (state-dict keys unchanged). The masked gather, head
        and loss stay eager: their size depends on the data (a graph break anyway), and they are a small part."""
        for m in (self.encoder, self.video_decoder, self.image_decoder):
            m.compile(**kwargs)

    def load_released(self, checkpoint) -> swin3d.LoadReport:
        """Load a BEVT checkpoint (path or dict) in the released layout (_PREFIXES, below) or ours, and report exactly
        what was not used: the tokenizer's (`cls_head.vae_encoder.*`) and a classifier's (`cls_head.fc_cls.*`)."""
        flat, _ = swin3d.read_state_dict(checkpoint)
        return load_renamed(self, flat, _PREFIXES, "BEVT pretraining (released or train.py layout)")


# =============================================================================
# Machinery: what running the method needs (not the method itself).

# Checkpoint prefix -> ours (load_renamed: the first that matches): our own layout, then the released one.
_PREFIXES = (("encoder.", "encoder."), ("video_decoder.", "video_decoder."), ("image_decoder.", "image_decoder."),
             ("head.", "head."), ("backbone.fpn_s.", "video_decoder.fpn_s."),
             ("backbone.lm_down_st.", "video_decoder.lm_down_st."), ("backbone.fpn_t.", "video_decoder.fpn_t."),
             ("backbone.fpn.", "image_decoder.fpn."), ("backbone.lm_down.", "image_decoder.lm_down."),
             ("cls_head.lm_head.", "head."), ("backbone.", "encoder."))


def load_renamed(model: nn.Module, flat: dict, prefixes: tuple, kind: str, window: Optional[tuple] = None,
                 soft: tuple = ()) -> swin3d.LoadReport:
    """Load `flat` (read_state_dict) into `model`, each key renamed by the first (theirs, ours) prefix pair it starts
    with (ours None, or none: unused), and report exactly what was not used. Index and mask buffers are re-derived;
    tables resized from window[0] to window[1]; another shape is an error, or unused under a `soft` prefix."""
    ours, source, tensors, unused, rederived = model.state_dict(), {}, {}, [], []
    for name, (key, value) in flat.items():
        old, new = next(((o, n) for o, n in prefixes if name.startswith(o)), ("", None))
        k = None if new is None else new + name[len(old):]
        if k in source:                                   # `encoder.X` and the released `backbone.X`: which one?
            raise ValueError(f"checkpoint holds {k!r} twice, as {source[k]!r} and {key!r}; refusing to guess")
        if k is not None and k.endswith(("relative_position_index", "attn_mask")):
            rederived.append(key)
        elif k in ours:
            source[k], tensors[k] = key, value
        else:
            unused.append(key)
    if window:
        tensors = swin3d.resize_relative_tables(tensors, *window)
    for k in [k for k, v in tensors.items() if v.shape != ours[k].shape]:
        if not k.startswith(soft):
            raise ValueError(f"checkpoint key {source[k]!r} has shape {tuple(tensors[k].shape)}, the model "
                             f"{tuple(ours[k].shape)}")
        unused.append(source[k])
        del tensors[k]
    missing = model.load_state_dict(tensors, strict=False).missing_keys
    return swin3d.LoadReport(kind, sorted(tensors), sorted(missing), sorted(unused), sorted(rederived), window)
