"""Codes back to pixels, for prediction pictures (tools/show.py): the DALL-E dVAE decoder and
the offline tokenizer's codebook.

Not part of the method: BEVT only needs the codes (tokenizer.py). A picture of what target
and predicted codes stand for needs the way back: for DALL-E its decoder (openai/DALL-E
dall_e/decoder.py, utils.py), read from the published `decoder.pkl` by tokenizer.py's
restricted unpickler with the decoder's own allow-list, or from the plain state dict
`python tools/tokenizer_tool.py convert --pkl decoder.pkl --out-file dalle_decoder.pt` writes;
for the offline tokenizer each code's codebook row (`decode_offline`).

    dec = load_dalle_decoder("decoder.pkl")        # or dalle_decoder.pt, or a folder holding decoder.pkl
    half = dec.decode_half(codes)                  # codes (N, h, w) -> (N, 3, 8h, 8w) in [0, 1]
    half = decode_offline(tok, codes)              # the same for a tokenizer.OfflineTokenizer

    codes (N, h, w) int64 -> one-hot (N, 8192, h, w) float32
    blocks.input   conv 1x1 8192 -> 128 (n_init)               (N, 128,  h,   w)
    blocks.group_1 2 x block(-> 2048)  + upsample x2 nearest   (N, 2048, 2h,  2w)
    blocks.group_2 2 x block(-> 1024)  + upsample x2           (N, 1024, 4h,  4w)
    blocks.group_3 2 x block(-> 512)   + upsample x2           (N, 512,  8h,  8w)
    blocks.group_4 2 x block(-> 256)                           (N, 256,  8h,  8w)
    blocks.output  ReLU, conv 1x1 256 -> 6                     (N, 6,    8h,  8w) logit-Laplace statistics
    pixels = unmap_pixels(sigmoid(stats[:, :3]))               (N, 3,    8h,  8w) in [0, 1]

Parameter names equal the published file's (76 tensors).
"""
import functools
import os
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import torch                     # noqa: E402
import torch.nn as nn            # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tokenizer                 # noqa: E402
from tokenizer import LOGIT_LAPLACE_EPS, VOCAB_SIZE, DalleConv2d   # noqa: E402


class DalleDecoderBlock(tokenizer.DalleEncoderBlock):
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
        group = functools.partial(tokenizer.dalle_group, DalleDecoderBlock, n_blk=n_blk_per_group,
                                  n_layers=n_layers)
        up = lambda: ("upsample", nn.Upsample(scale_factor=2, mode="nearest"))   # noqa: E731
        self.blocks = nn.Sequential(OrderedDict([
            ("input", DalleConv2d(vocab_size, n_init, 1)),
            ("group_1", group(n_init, 8 * n_hid, last=up())),
            ("group_2", group(8 * n_hid, 4 * n_hid, last=up())),
            ("group_3", group(4 * n_hid, 2 * n_hid, last=up())),
            ("group_4", group(2 * n_hid, 1 * n_hid, last=None)),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                  ("conv", DalleConv2d(1 * n_hid, 2 * output_channels, 1))]))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The published interface: one-hot (N, vocab, h, w) float32 -> (N, 2·channels, 8h, 8w)."""
        if x.dim() != 4 or x.shape[1] != self.vocab_size or x.dtype != torch.float32:
            raise ValueError(f"DalleDecoder: expected float32 one-hot codes (N, {self.vocab_size}, h, w), got "
                             f"{x.dtype} {tuple(x.shape)}")
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
    def from_state_dict(cls, state: dict) -> "DalleDecoder":
        """Build from the published tensors (names as in decoder.pkl), checking every key and shape."""
        with torch.device("meta"):                                  # no 45M-value random init to throw away
            dec = cls(**_decoder_config(state))
        return tokenizer.load_exact(dec, state, "decoder").eval()


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of map_pixels: [ε, 1-ε] -> [0, 1], clamped (dall_e.utils.unmap_pixels)."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0.0, 1.0)


def _decoder_config(state: dict) -> dict:
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
# Reading decoder.pkl: tokenizer.py's restricted unpickler with the decoder's classes.
# Each file is read with only the globals its own kind needs, so the encoder's reader
# never accepts decoder classes and the reverse.


class PickledDecoder(tokenizer.PickledModule):      # dall_e.decoder.Decoder, the root of decoder.pkl
    pass


class DecoderUnpickler(tokenizer.RestrictedUnpickler):
    allowed = tokenizer.allowed_globals({("dall_e.decoder", "Decoder"): PickledDecoder,
                                         ("dall_e.decoder", "DecoderBlock"): tokenizer.PickledModule,
                                         ("torch.nn.modules.upsampling", "Upsample"): tokenizer.PickledModule})
    what = "a DALL-E decoder pickle"


def read_decoder_state(path) -> dict:
    """The decoder's tensors by name, from decoder.pkl or a (converted) state dict."""
    obj = tokenizer.restricted_torch_load(path, DecoderUnpickler, what="a DALL-E decoder or its state dict")
    if isinstance(obj, PickledDecoder):
        return tokenizer.module_tensors(obj)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a DALL-E decoder or its state dict, got a {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(k, str)}     # DDP's prefix


def load_dalle_decoder(spec, device="cpu") -> DalleDecoder:
    """The DALL-E decoder from `decoder.pkl`, a directory holding one, or its converted state dict."""
    path = Path(spec)
    if path.is_dir() and (path / "decoder.pkl").is_file():
        path = path / "decoder.pkl"
    if not path.is_file():
        raise FileNotFoundError(f"DALL-E decoder file not found: {path} (expected decoder.pkl or its "
                                f"converted .pt from `python tools/tokenizer_tool.py convert --pkl decoder.pkl`)")
    try:
        return DalleDecoder.from_state_dict(read_decoder_state(path)).to(device)
    except ValueError as e:
        raise ValueError(e if str(path) in str(e) else f"{path}: {e}") from None


def decode_offline(tok: tokenizer.OfflineTokenizer, codes: torch.Tensor) -> torch.Tensor:
    """An offline tokenizer's codes (N, h, w) -> the half-size image they stand for, (N, 3, 8h, 8w)
    in [0, 1]: each code's codebook row put back as its 8x8 patch (inverse of half_patches)."""
    feats = tok.codebook[codes]                                         # (N, h, w, 3*p*p)
    N, h, w, _ = feats.shape
    p = tokenizer.DVAE_PATCH
    x = feats.reshape(N, h, w, 3, p, p).permute(0, 3, 1, 4, 2, 5)       # (N, 3, h, p, w, p)
    return x.reshape(N, 3, h * p, w * p)
