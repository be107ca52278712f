"""Tests of tokenizer.py: the DALL-E dVAE encoder's published layout, safe
loading of encoder.pkl without the dall_e package, the paper's preprocessing,
the code contract, frozenness inside a training step, the offline k-means
tokenizer, and the DALL-E decoder used for pictures (paper §3 "Tokenizer", appendix A; paper §3 "Tokenizer"; the released checkpoint layout; the public interface).

Expected values come from outside the code under test: the parameter list is
written out from paper §3 "Tokenizer" (and openai/DALL-E's encoder.py), the resize is
checked against PIL, the pickle is made by a stand-in `dall_e` package with its
own forward, exactly as encoder.pkl was made (`torch.save(model)` in the old
format), and hostile pickles are first shown to run their payload when loaded
the unsafe way, so that refusing them is a real property."""

import importlib.util
import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import tokenizer as T
from tokenizer import (DalleEncoder, DalleTokenizer, OfflineTokenizer, Tokenizer, UnsafePickleError,
                       check_vocab, load_tokenizer)
from tools import decoders, kmeans_fit, tokenizer_tool

EPS = 0.1   # DALL-E's logit-Laplace ε (dall_e/utils.py), written out independently of tokenizer.py


# ----------------------------------------------------------------------------- helpers

def published_shapes():
    """The 74 tensors of the published encoder.pkl, in its state_dict order (paper §3 "Tokenizer")."""
    s = OrderedDict()
    s["blocks.input.w"], s["blocks.input.b"] = (256, 3, 7, 7), (256,)
    groups = {1: (256, 256), 2: (256, 512), 3: (512, 1024), 4: (1024, 2048)}   # group: (n_in, n_out)
    for g, (g_in, g_out) in groups.items():
        for blk in (1, 2):
            n_in, hid = (g_in if blk == 1 else g_out), g_out // 4
            p = f"blocks.group_{g}.block_{blk}."
            if n_in != g_out:                                   # 1x1 id_path where channels change
                s[p + "id_path.w"], s[p + "id_path.b"] = (g_out, n_in, 1, 1), (g_out,)
            convs = [(n_in, hid, 3), (hid, hid, 3), (hid, hid, 3), (hid, g_out, 1)]
            for i, (a, o, k) in enumerate(convs, 1):
                s[p + f"res_path.conv_{i}.w"], s[p + f"res_path.conv_{i}.b"] = (o, a, k, k), (o,)
    s["blocks.output.conv.w"], s["blocks.output.conv.b"] = (8192, 2048, 1, 1), (8192,)
    return s


def synth_images(n, size=64, seed=0):
    """Smooth colour fields with a few hard-edged rectangles and a little noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bicubic", align_corners=False)
    for i in range(n):
        for _ in range(3):
            y0, x0 = torch.randint(0, size - 8, (2,), generator=g).tolist()
            h, w = torch.randint(4, size // 2, (2,), generator=g).tolist()
            x[i, :, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=g)
    return (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def small_dalle(seed=0):
    """The DALL-E architecture at its smallest legal size (n_hid 64, 512 codes): same code path, fast."""
    torch.manual_seed(seed)
    enc = DalleEncoder(n_hid=64, vocab_size=512)
    for m in enc.modules():
        if isinstance(m, T.DalleConv2d):
            m.b.data.normal_(0, 0.1)                            # non-zero biases, as trained weights have
    return DalleTokenizer(enc)


# A stand-in for the `dall_e` package (openai/DALL-E, attrs removed): plain
# nn.Module subclasses that set the same instance attributes as the attrs
# classes, so their pickles name the same classes and carry the same __dict__.
FAKE_DALL_E = {
    "__init__.py": "",
    "utils.py": '''
import math
import torch
import torch.nn as nn
import torch.nn.functional as F


class Conv2d(nn.Module):
    def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device("cpu"), requires_grad=False):
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16, self.device, self.requires_grad = use_float16, device, requires_grad
        w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32, device=device, requires_grad=requires_grad)
        w.normal_(std=1 / ((n_in * kw ** 2) ** (1 / 2)))
        b = torch.zeros((n_out,), dtype=torch.float32, device=device, requires_grad=requires_grad)
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x):
        return F.conv2d(x.float(), self.w, self.b, padding=(self.kw - 1) // 2)
''',
    "encoder.py": '''
from collections import OrderedDict
from functools import partial
import torch
import torch.nn as nn
from dall_e.utils import Conv2d


class EncoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
        super().__init__()
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.device, self.requires_grad = device, requires_grad
        self.n_hid = self.n_out // 4
        self.post_gain = 1 / (self.n_layers ** 2)
        make_conv = partial(Conv2d, device=self.device, requires_grad=self.requires_grad)
        self.id_path = make_conv(self.n_in, self.n_out, 1) if self.n_in != self.n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", make_conv(self.n_in, self.n_hid, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", make_conv(self.n_hid, self.n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", make_conv(self.n_hid, self.n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", make_conv(self.n_hid, self.n_out, 1))]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    group_count = 4

    def __init__(self, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192,
                 device=torch.device("cpu"), requires_grad=False, use_mixed_precision=True):
        super().__init__()
        self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        self.device, self.requires_grad, self.use_mixed_precision = device, requires_grad, use_mixed_precision
        blk_range = range(self.n_blk_per_group)
        n_layers = self.group_count * self.n_blk_per_group
        make_conv = partial(Conv2d, device=self.device, requires_grad=self.requires_grad)
        make_blk = partial(EncoderBlock, n_layers=n_layers, device=self.device, requires_grad=self.requires_grad)
        h = self.n_hid
        self.blocks = nn.Sequential(OrderedDict([
            ("input", make_conv(self.input_channels, 1 * h, 7)),
            ("group_1", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", make_blk(1 * h, 1 * h)) for i in blk_range],
                ("pool", nn.MaxPool2d(kernel_size=2))]))),
            ("group_2", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", make_blk(1 * h if i == 0 else 2 * h, 2 * h)) for i in blk_range],
                ("pool", nn.MaxPool2d(kernel_size=2))]))),
            ("group_3", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", make_blk(2 * h if i == 0 else 4 * h, 4 * h)) for i in blk_range],
                ("pool", nn.MaxPool2d(kernel_size=2))]))),
            ("group_4", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", make_blk(4 * h if i == 0 else 8 * h, 8 * h)) for i in blk_range]]))),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()),
                ("conv", make_conv(8 * h, self.vocab_size, 1, use_float16=False))]))),
        ]))

    def forward(self, x):
        if x.dtype != torch.float32:
            raise ValueError("input must have dtype torch.float32")
        return self.blocks(x)
''',
    "decoder.py": '''
from collections import OrderedDict
from functools import partial
import torch
import torch.nn as nn
from dall_e.utils import Conv2d


class DecoderBlock(nn.Module):
    def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
        super().__init__()
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.device, self.requires_grad = device, requires_grad
        self.n_hid = self.n_out // 4
        self.post_gain = 1 / (self.n_layers ** 2)
        make_conv = partial(Conv2d, device=self.device, requires_grad=self.requires_grad)
        self.id_path = make_conv(self.n_in, self.n_out, 1) if self.n_in != self.n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", make_conv(self.n_in, self.n_hid, 1)),
            ("relu_2", nn.ReLU()), ("conv_2", make_conv(self.n_hid, self.n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", make_conv(self.n_hid, self.n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", make_conv(self.n_hid, self.n_out, 3))]))

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Decoder(nn.Module):
    group_count = 4

    def __init__(self, n_init=128, n_hid=256, n_blk_per_group=2, output_channels=3, vocab_size=8192,
                 device=torch.device("cpu"), requires_grad=False, use_mixed_precision=True):
        super().__init__()
        self.n_init, self.n_hid, self.n_blk_per_group = n_init, n_hid, n_blk_per_group
        self.output_channels, self.vocab_size = output_channels, vocab_size
        self.device, self.requires_grad, self.use_mixed_precision = device, requires_grad, use_mixed_precision
        blk_range = range(self.n_blk_per_group)
        n_layers = self.group_count * self.n_blk_per_group
        make_conv = partial(Conv2d, device=self.device, requires_grad=self.requires_grad)
        make_blk = partial(DecoderBlock, n_layers=n_layers, device=self.device, requires_grad=self.requires_grad)
        h = self.n_hid
        self.blocks = nn.Sequential(OrderedDict([
            ("input", make_conv(self.vocab_size, self.n_init, 1, use_float16=False)),
            ("group_1", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", make_blk(self.n_init if i == 0 else 8 * h, 8 * h)) for i in blk_range],
                ("upsample", nn.Upsample(scale_factor=2, mode="nearest"))]))),
            ("group_2", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", make_blk(8 * h if i == 0 else 4 * h, 4 * h)) for i in blk_range],
                ("upsample", nn.Upsample(scale_factor=2, mode="nearest"))]))),
            ("group_3", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", make_blk(4 * h if i == 0 else 2 * h, 2 * h)) for i in blk_range],
                ("upsample", nn.Upsample(scale_factor=2, mode="nearest"))]))),
            ("group_4", nn.Sequential(OrderedDict([
                *[(f"block_{i + 1}", make_blk(2 * h if i == 0 else 1 * h, 1 * h)) for i in blk_range]]))),
            ("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()),
                ("conv", make_conv(1 * h, 2 * self.output_channels, 1))]))),
        ]))

    def forward(self, x):
        if x.shape[1] != self.vocab_size or x.dtype != torch.float32:
            raise ValueError("expected float32 one-hot codes")
        return self.blocks(x)
''',
}


def _drop_fake_dall_e(pkg_root):
    for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
        del sys.modules[name]
    if pkg_root in sys.path:
        sys.path.remove(pkg_root)
    importlib.invalidate_caches()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """An encoder.pkl made the way the published one was: the full-size dall_e
    Encoder, `torch.save(model, f, _use_new_zipfile_serialization=False)`; then
    the fake package is removed again. Returns the file, the original tensors,
    a test input and the codes the dall_e model itself gives for it."""
    root = tmp_path_factory.mktemp("fake_dall_e")
    (root / "dall_e").mkdir()
    for name, src in FAKE_DALL_E.items():
        (root / "dall_e" / name).write_text(src)
    sys.path.insert(0, str(root))
    try:
        import dall_e.encoder
        torch.manual_seed(0)
        model = dall_e.encoder.Encoder()                       # n_hid 256, 8192 codes: the published size
        for m in model.modules():
            if type(m).__name__ == "Conv2d":
                m.b.data.normal_(0, 0.1)
        path = root / "encoder.pkl"
        torch.save(model, path, _use_new_zipfile_serialization=False)
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
        x = synth_images(3, size=32, seed=1)                   # 32 px -> 16 px half -> 2x2 codes
        x_half = T.lanczos_resize(x, (16, 16))
        with torch.no_grad():
            ref_logits = model((1 - 2 * EPS) * x_half + EPS)     # (3, 8192, 2, 2)
        del model
    finally:
        _drop_fake_dall_e(str(root))
    assert importlib.util.find_spec("dall_e") is None          # the loader must do without it
    return types.SimpleNamespace(path=path, tensors=tensors, x=x, x_half=x_half, logits=ref_logits,
                                 codes=ref_logits.argmax(1))


def published_decoder_shapes():
    """The 76 tensors of the published decoder.pkl, in its state_dict order (openai/DALL-E decoder.py)."""
    s = OrderedDict()
    s["blocks.input.w"], s["blocks.input.b"] = (128, 8192, 1, 1), (128,)
    groups = {1: (128, 2048), 2: (2048, 1024), 3: (1024, 512), 4: (512, 256)}   # group: (n_in, n_out)
    for g, (g_in, g_out) in groups.items():
        for blk in (1, 2):
            n_in, hid = (g_in if blk == 1 else g_out), g_out // 4
            p = f"blocks.group_{g}.block_{blk}."
            if n_in != g_out:
                s[p + "id_path.w"], s[p + "id_path.b"] = (g_out, n_in, 1, 1), (g_out,)
            convs = [(n_in, hid, 1), (hid, hid, 3), (hid, hid, 3), (hid, g_out, 3)]   # 1x1 first, unlike the encoder
            for i, (a, o, k) in enumerate(convs, 1):
                s[p + f"res_path.conv_{i}.w"], s[p + f"res_path.conv_{i}.b"] = (o, a, k, k), (o,)
    s["blocks.output.conv.w"], s["blocks.output.conv.b"] = (6, 256, 1, 1), (6,)     # 2 statistics x RGB
    return s


@pytest.fixture(scope="module")
def published_decoder(tmp_path_factory):
    """A decoder.pkl made the way the published one was (the full-size dall_e Decoder, old torch format),
    the fake package removed again; with its tensors, some codes and what dall_e's decoder makes of them."""
    root = tmp_path_factory.mktemp("fake_dall_e_decoder")
    (root / "dall_e").mkdir()
    for name, src in FAKE_DALL_E.items():
        (root / "dall_e" / name).write_text(src)
    sys.path.insert(0, str(root))
    try:
        import dall_e.decoder
        torch.manual_seed(1)
        model = dall_e.decoder.Decoder()                       # n_init 128, n_hid 256, 8192 codes
        for m in model.modules():
            if type(m).__name__ == "Conv2d":
                m.b.data.normal_(0, 0.1)
        path = root / "decoder.pkl"
        torch.save(model, path, _use_new_zipfile_serialization=False)
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
        codes = torch.randint(0, 8192, (2, 2, 3), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            stats = model(F.one_hot(codes, 8192).permute(0, 3, 1, 2).float())   # (2, 6, 16, 24)
        del model
    finally:
        _drop_fake_dall_e(str(root))
    assert importlib.util.find_spec("dall_e") is None
    return types.SimpleNamespace(path=path, tensors=tensors, codes=codes, stats=stats)


@pytest.fixture(scope="module")
def dalle_tok(published):
    return load_tokenizer(published.path)


@pytest.fixture(scope="module")
def offline_tok():
    return kmeans_fit.fit(synth_images(24, size=64, seed=0), 64, seed=0, iters=10)


@pytest.fixture(params=["dalle", "offline"])
def any_tok(request):
    return small_dalle() if request.param == "dalle" else kmeans_fit.fit(
        synth_images(8, size=64, seed=3), 32, seed=0, iters=5)


# ----------------------------------------------------------------------------- architecture

def test_parameter_names_and_shapes_equal_published():
    expected = published_shapes()
    assert len(expected) == 74
    with torch.device("meta"):                                 # shapes only, no 50M random values
        enc = DalleEncoder()
    got = OrderedDict((k, tuple(v.shape)) for k, v in enc.state_dict().items())
    assert list(got) == list(expected)                         # names, in the published order
    assert got == expected                                     # and shapes
    assert [n for n, _ in enc.named_parameters()] == list(expected)   # all parameters, no buffers


# ----------------------------------------------------------------------------- loading encoder.pkl

def test_encoder_pkl_loads_without_dall_e_bit_identical(published, dalle_tok, tmp_path):
    assert "dall_e" not in sys.modules
    with pytest.raises(Exception):                             # the ordinary loader cannot even read it
        torch.load(published.path, weights_only=True)
    assert isinstance(dalle_tok, DalleTokenizer) and dalle_tok.vocab_size == 8192
    state = dalle_tok.encoder.state_dict()
    assert list(state) == list(published.tensors)
    for k, v in published.tensors.items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], v), k
    with torch.no_grad():                                      # our forward == dall_e's forward
        logits = dalle_tok.encoder(T.map_pixels(published.x_half))
    torch.testing.assert_close(logits, published.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(dalle_tok.tokenize(published.x), published.codes)
    # convert once -> a plain state dict that loads with weights_only=True and gives the same codes
    out = tmp_path / "dalle_encoder.pt"
    tokenizer_tool.main(["convert", "--pkl", str(published.path), "--out-file", str(out)])
    plain = torch.load(out, weights_only=True)
    assert set(plain) == set(published.tensors)
    assert torch.equal(load_tokenizer(out).tokenize(published.x), published.codes)


def test_released_bevt_checkpoint_tokenizer_tensors(tmp_path):
    src = small_dalle(seed=1)
    x = synth_images(2, size=32, seed=2)
    vae = {f"cls_head.vae_encoder.{k}": v for k, v in src.encoder.state_dict().items()}
    other = {"backbone.patch_embed.proj.weight": torch.zeros(4, 3, 2, 4, 4), "cls_head.lm_head.weight": torch.zeros(512, 8)}
    for prefix in ("", "module."):
        ckpt = {"state_dict": {prefix + k: v for k, v in {**other, **vae}.items()}, "meta": {"epoch": 150}}
        torch.save(ckpt, tmp_path / "bevt.pth")
        tok = load_tokenizer(tmp_path / "bevt.pth")
        assert tok.vocab_size == 512                           # read off the tensors, not assumed
        for k, v in src.encoder.state_dict().items():
            assert torch.equal(tok.encoder.state_dict()[k], v)
        assert torch.equal(tok.tokenize(x), src.tokenize(x))


# ----------------------------------------------------------------------------- the decoder (tools/decoders.py)

def test_decoder_parameter_names_and_shapes_equal_published():
    expected = published_decoder_shapes()
    assert len(expected) == 76
    with torch.device("meta"):
        dec = decoders.DalleDecoder()
    got = OrderedDict((k, tuple(v.shape)) for k, v in dec.state_dict().items())
    assert list(got) == list(expected) and got == expected
    assert [n for n, _ in dec.named_parameters()] == list(expected)


def test_decoder_pkl_loads_without_dall_e_bit_identical(published_decoder, tmp_path):
    assert "dall_e" not in sys.modules
    dec = decoders.load_dalle_decoder(published_decoder.path)
    state = dec.state_dict()
    assert list(state) == list(published_decoder.tensors)
    for k, v in published_decoder.tensors.items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], v), k
    codes = published_decoder.codes
    with torch.no_grad():                                      # our forward == dall_e's forward
        stats = dec(F.one_hot(codes, 8192).permute(0, 3, 1, 2).float())
    torch.testing.assert_close(stats, published_decoder.stats, rtol=1e-5, atol=1e-5)
    # decode_half (an embedding lookup for the one-hot input conv) == dall_e's usage:
    # x_rec = unmap_pixels(sigmoid(stats[:, :3])), unmap = clamp((x - ε) / (1 - 2ε), 0, 1).
    ref = ((torch.sigmoid(published_decoder.stats[:, :3]) - EPS) / (1 - 2 * EPS)).clamp(0, 1)
    half = dec.decode_half(codes)
    assert half.shape == (2, 3, 16, 24)
    torch.testing.assert_close(half, ref, rtol=1e-5, atol=1e-5)
    # convert once -> a plain state dict that loads with weights_only=True and decodes the same
    out = tmp_path / "dalle_decoder.pt"
    tokenizer_tool.main(["convert", "--pkl", str(published_decoder.path), "--out-file", str(out)])
    assert set(torch.load(out, weights_only=True)) == set(published_decoder.tensors)
    assert torch.equal(decoders.load_dalle_decoder(out).decode_half(codes), half)


def test_decoder_and_encoder_pickles_keep_to_their_own_allow_lists(published, published_decoder):
    # A decoder pickle is not a tokenizer, and the decoder's reader does not take the encoder's classes.
    with pytest.raises(UnsafePickleError, match=r"dall_e\.decoder\.Decoder"):
        load_tokenizer(published_decoder.path)
    with pytest.raises(UnsafePickleError, match=r"dall_e\.encoder\.Encoder.*DALL-E decoder pickle"):
        decoders.load_dalle_decoder(published.path)
    assert tokenizer_tool.read_dalle_pickle(published_decoder.path)[0] == "decoder"


def test_decoder_reader_refuses_hostile_globals(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "decoder.pkl"
    torch.save({"blocks.input.w": torch.zeros(2), "x": _payloads(marker)["os.system"]}, path,
               _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafePickleError, match="refusing global .*system"):
        decoders.load_dalle_decoder(path)
    with pytest.raises(UnsafePickleError, match="refusing global .*system"):
        tokenizer_tool.convert(path, tmp_path / "x.pt")
    assert not marker.exists() and not (tmp_path / "x.pt").exists()


def test_encoder_and_decoder_state_dicts_are_not_confused(tmp_path):
    torch.save(small_dalle().encoder.state_dict(), tmp_path / "enc.pt")
    with pytest.raises(ValueError, match="encoder's: pass decoder.pkl"):
        decoders.load_dalle_decoder(tmp_path / "enc.pt")
    torch.manual_seed(0)
    torch.save(decoders.DalleDecoder(n_init=8, n_hid=64, vocab_size=512).state_dict(), tmp_path / "dec.pt")
    with pytest.raises(ValueError, match="decoder state dict.*needs the encoder"):
        load_tokenizer(tmp_path / "dec.pt")
    with pytest.raises(FileNotFoundError, match="decoder file not found"):
        decoders.load_dalle_decoder(tmp_path / "none.pkl")


# ----------------------------------------------------------------------------- hostile pickles

class _Payload:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _payloads(marker):
    return {"os.system": _Payload(os.system, f"touch '{marker}'"),
            "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()")}


@pytest.mark.parametrize("name", ["os.system", "builtins.exec"])
def test_hostile_global_inside_the_object_is_refused(tmp_path, name):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pkl"
    obj = {"blocks.input.w": torch.zeros(2), "x": _payloads(marker)[name]}
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    # Control: loaded the unsafe way, the file does run its payload.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafePickleError) as e:
        load_tokenizer(path)
    assert not marker.exists()
    assert name.split(".")[1] in str(e.value) and "refusing global" in str(e.value)


def test_hostile_first_header_object_is_refused(tmp_path):
    """The payload as the very first pickle of an old-format file: torch reads it
    with pickle_module.load before any find_class of its own Unpickler."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil_header.pkl"
    path.write_bytes(pickle.dumps(_Payload(os.system, f"touch '{marker}'"), protocol=2))
    # Control: a shim with the restricted Unpickler but plain pickle.load runs it.
    naive = types.ModuleType("naive_shim")
    naive.Unpickler, naive.load = T.RestrictedUnpickler, pickle.load
    with pytest.raises(Exception):
        torch.load(path, pickle_module=naive, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafePickleError, match=r"system"):
        load_tokenizer(path)
    assert not marker.exists()


def test_foreign_class_is_refused_by_name(tmp_path):
    # A dall_e class that is not one of the three (protocol-2 GLOBAL + EMPTY_TUPLE + NEWOBJ + STOP).
    path = tmp_path / "decoder.pkl"
    path.write_bytes(b"\x80\x02cdall_e.decoder\nDecoder\n)\x81.")
    with pytest.raises(UnsafePickleError, match=r"dall_e\.decoder\.Decoder"):
        load_tokenizer(path)


def _poisoning_encoder_pkl(path):
    """An old-format file whose first header pickle sets `torch._utils._rebuild_tensor_v2.__defaults__`
    to ({'neg': True},) with a BUILD (slot state) on that allowed function, pops it and goes on
    as the real magic-number header: a file that loads cleanly while poisoning the process."""
    torch.save({"blocks.input.w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    with open(path, "rb") as f:
        pickle.Unpickler(f).load()                             # the real first header (the magic number)
        first_len = f.tell()
    state = pickle.dumps((None, {"__defaults__": ({"neg": True},)}), protocol=2)[2:-1]   # no PROTO, no STOP
    magic = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[2:-1]
    header = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n" + state + pickle.BUILD + pickle.POP + magic + pickle.STOP
    path.write_bytes(header + raw[first_len:])


def test_header_build_on_an_allowed_function_is_refused_and_poisons_nothing(tmp_path):
    import torch._utils as U
    good, evil = tmp_path / "good.pt", tmp_path / "encoder.pkl"
    torch.save({"x": torch.arange(3.0)}, good)                 # an ordinary zip file, read with weights_only=True
    _poisoning_encoder_pkl(evil)
    saved = U._rebuild_tensor_v2.__defaults__
    try:
        # Control: a shim with the allow-list but C pickle's BUILD loads it, and poisons the process.
        class AllowListOnly(pickle.Unpickler):
            def find_class(self, module, name):
                return T.RestrictedUnpickler.allowed[(module, name)]
        naive = types.ModuleType("naive_shim")
        naive.Unpickler, naive.UnpicklingError = AllowListOnly, pickle.UnpicklingError
        naive.load = lambda f, **kw: AllowListOnly(f, **kw).load()
        torch.load(evil, pickle_module=naive, weights_only=False)
        assert torch.equal(torch.load(good, weights_only=True)["x"], -torch.arange(3.0))
        U._rebuild_tensor_v2.__defaults__ = saved
        # The loader refuses the BUILD before it happens ...
        with pytest.raises(UnsafePickleError, match="refusing to set the state of function"):
            load_tokenizer(evil)
        assert U._rebuild_tensor_v2.__defaults__ is saved
        x = torch.load(good, weights_only=True)["x"]
        assert torch.equal(x, torch.arange(3.0)) and not x.is_neg()
    finally:
        U._rebuild_tensor_v2.__defaults__ = saved


@pytest.mark.parametrize("kind", ["hardlink", "fifo", "symlink"])
def test_tar_archives_are_refused_before_anything_is_extracted(tmp_path, kind):
    """torch.load extracts an old tar-format file's `storages` member unfiltered: a hard link
    takes on the archive's mode for a file elsewhere, a FIFO hangs the load, a symlink reads
    another file. Refused in one line, nothing on disk touched, no hang."""
    import subprocess
    import tarfile
    secret = tmp_path / "secret"
    secret.write_text("top secret")
    os.chmod(secret, 0o600)
    before = os.stat(secret)
    member = tarfile.TarInfo("storages")
    member.mode, member.uid, member.gid = 0o7777, 4242, 4242
    member.type = {"hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "symlink": tarfile.SYMTYPE}[kind]
    member.linkname = str(secret) if kind != "fifo" else ""
    path = tmp_path / "encoder.pkl"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(member)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "tokenizer_tool.py")
    r = subprocess.run([sys.executable, tool, "info", str(path)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "tar archive" in r.stderr and "load key" not in r.stderr     # the other file was not read
    after = os.stat(secret)
    assert (after.st_mode, after.st_uid, after.st_nlink) == (before.st_mode, before.st_uid, before.st_nlink)
    assert list(scratch.iterdir()) == []


# ----------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("kind", ["noise", "smooth"])
def test_lanczos_half_matches_pil(kind):
    rng = np.random.default_rng(0)
    if kind == "noise":
        a = rng.integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    else:
        a = np.asarray(Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)).resize((96, 64), Image.BICUBIC))
    ref = np.asarray(Image.fromarray(a).resize((48, 32), Image.LANCZOS)).astype(np.float32) / 255
    x = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255
    y = T.lanczos_resize(x, (32, 48), "pil")[0].permute(1, 2, 0).numpy()
    err = np.abs(y - ref) * 255
    assert err.max() <= 1.5 and err.mean() < 0.5               # PIL rounds to 8 bits twice; we do not


def test_cv2_lanczos4_weights():
    """The released pipeline's filter (mmcv.imresize -> cv2 INTER_LANCZOS4) for a 1/2
    downscale: output i sits at source 2i + 0.5, 8 taps 2i-3 .. 2i+4 weighted by
    sinc(d)·sinc(d/4), normalised, edge pixels replicated."""
    n = 20
    sig = torch.rand(n, dtype=torch.float64)
    expected = []
    for i in range(n // 2):
        taps = np.arange(2 * i - 3, 2 * i + 5)
        d = taps - (2 * i + 0.5)
        w = np.sinc(d) * np.sinc(d / 4)
        w /= w.sum()
        expected.append(float((w * sig.numpy()[np.clip(taps, 0, n - 1)]).sum()))
    got = (T._resize_matrix(n, n // 2, "cv2") @ sig).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_map_pixels_range():
    x = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(T.map_pixels(x), torch.tensor([EPS, 0.5, 1 - EPS]))


# ----------------------------------------------------------------------------- the code contract

def test_codes_shape_dtype_range_full_dalle(dalle_tok):
    x = synth_images(2, size=48, seed=4)[..., :32, :]          # 32 x 48 -> 2 x 3 codes
    c = dalle_tok.tokenize(x)
    assert c.shape == (2, 2, 3) and c.dtype == torch.int64
    assert 0 <= c.min() and c.max() < 8192


@pytest.mark.parametrize("hw", [(32, 48), (64, 64)])
def test_codes_shape_dtype_range(any_tok, hw):
    assert isinstance(any_tok, Tokenizer)                     # one interface for both
    x = synth_images(2, size=max(hw), seed=5)[..., :hw[0], :hw[1]]
    c = any_tok.tokenize(x)
    assert c.shape == (2, hw[0] // 16, hw[1] // 16) and c.dtype == torch.int64
    assert 0 <= c.min() and c.max() < any_tok.vocab_size
    assert len(c.unique()) > 1                                 # not a constant map


def test_clip_codes_equal_per_frame(any_tok):
    B, Tn = 2, 3
    frames = synth_images(B * Tn, size=32, seed=6).view(B, Tn, 3, 32, 32)
    clips = frames.transpose(1, 2).contiguous()               # (B, 3, T, H, W): the encoder's layout
    per_frame = torch.stack([torch.stack([any_tok.tokenize(frames[b, t:t + 1])[0] for t in range(Tn)])
                             for b in range(B)])              # (B, T, 2, 2), one frame at a time
    for chunk in (4, 64):                                      # 4 does not divide B*T = 6
        got = any_tok.tokenize_clip(clips, chunk_size=chunk)
        assert got.shape == (B, Tn, 2, 2) and got.dtype == torch.int64
        assert torch.equal(got, per_frame)


def test_frozen_inside_a_training_step(any_tok):
    tok = any_tok
    head = nn.Conv2d(3, tok.vocab_size, kernel_size=16, stride=16)      # predicts a code per 16x16 px
    model = nn.Module()
    model.head, model.tok = head, tok                         # even as a submodule (it should not be one)
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    tok.train()
    x = synth_images(2, size=32, seed=7).requires_grad_(True)
    codes = tok.tokenize(x)
    assert not codes.requires_grad and codes.grad_fn is None
    loss = F.cross_entropy(head(x), codes)
    loss.backward()
    opt.step()
    assert head.weight.grad is not None and head.training       # the trained part did train
    assert not any(m.training for m in tok.modules())
    assert all(p.grad is None and not p.requires_grad for p in tok.parameters())
    for k, v in tok.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fp32_inside_autocast():
    tok = small_dalle()
    x = synth_images(2, size=32, seed=8)
    seen = []
    h = tok.encoder.blocks.output.conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ref = tok.tokenize(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tok.tokenize(x)
    h.remove()
    assert seen == [torch.float32, torch.float32] and torch.equal(got, ref)


# ----------------------------------------------------------------------------- offline tokenizer

def quantization_error(tok, images):
    """Mean squared error per value between the half-size images and their decoded codes."""
    x_half = T.half_copy(images, tok.resample)
    return F.mse_loss(decoders.decode_offline(tok, tok.tokenize(images)), x_half).item()


def test_offline_error_falls_as_vocabulary_grows():
    train, held_out = synth_images(24, size=64, seed=10), synth_images(8, size=64, seed=11)
    errs = [quantization_error(kmeans_fit.fit(train, k, seed=0, iters=10), held_out) for k in (4, 16, 64)]
    assert errs[0] > errs[1] > errs[2]
    # and the codes decode to something far better than the mean colour
    x_half = T.lanczos_resize(held_out, (32, 32))
    assert errs[2] < 0.5 * F.mse_loss(x_half, x_half.mean(dim=(0, 2, 3), keepdim=True).expand_as(x_half)).item()


def test_offline_save_load_identical_codes(offline_tok, tmp_path):
    path = tmp_path / "tok.pt"
    offline_tok.save(path)
    raw = torch.load(path, weights_only=True)                  # plain tensors and Python values only
    assert raw["kind"] == "offline-kmeans" and raw["config"]["vocab_size"] == 64
    tok = load_tokenizer(path)
    assert isinstance(tok, OfflineTokenizer) and tok.vocab_size == 64 and tok.config == offline_tok.config
    x = synth_images(4, size=64, seed=12)
    assert torch.equal(tok.tokenize(x), offline_tok.tokenize(x))
    clips = synth_images(6, size=32, seed=13).view(2, 3, 3, 32, 32).transpose(1, 2)
    assert torch.equal(tok.tokenize_clip(clips), offline_tok.tokenize_clip(clips))


def test_offline_fit_deterministic_from_seed():
    x = synth_images(12, size=64, seed=14)
    a = kmeans_fit.fit(x, 32, seed=5, iters=8)
    b = kmeans_fit.fit(x, 32, seed=5, iters=8)
    c = kmeans_fit.fit(x, 32, seed=6, iters=8)
    assert torch.equal(a.codebook, b.codebook)
    assert not torch.equal(a.codebook, c.codebook)


def test_offline_codes_are_nearest_patches(offline_tok):
    """Brute force: each code is the codebook row closest to its 8x8 patch of the half-size image."""
    x = synth_images(2, size=32, seed=15)
    x_half = T.lanczos_resize(x, (16, 16))
    codes = offline_tok.tokenize(x)
    for n in range(2):
        for i in range(2):
            for j in range(2):
                patch = x_half[n, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8].reshape(-1)
                d = ((offline_tok.codebook - patch) ** 2).sum(1)
                assert d[codes[n, i, j]] <= d.min() + 1e-6


def test_fit_command_on_an_image_directory(tmp_path, capsys):
    data = tmp_path / "imgs"
    (data / "sub").mkdir(parents=True)
    imgs = (synth_images(7, size=96, seed=16) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for i, a in enumerate(imgs):
        im = Image.fromarray(a[: 80 if i % 2 else 96])        # mixed aspect ratios
        if i < 5:
            im.save(data / f"img{i}.png")
        else:
            im.save(data / "sub" / f"img{i}.jpg", quality=95)
    (data / "notes.txt").write_text("not an image")
    out = tmp_path / "tok.pt"
    tokenizer_tool.main(["fit", "--image-root", str(data), "--vocab-size", "16", "--out-file", str(out), "--crop", "64",
            "--iters", "5", "--max-patches", "100", "--quiet"])
    tok = load_tokenizer(out)
    assert isinstance(tok, OfflineTokenizer) and tok.vocab_size == 16
    assert tok.config["n_images"] == 7 and tok.config["size"] == 64 and tok.config["n_patches"] <= 100
    tokenizer_tool.main(["info", str(out)])
    assert "offline-kmeans" in capsys.readouterr().out


# ----------------------------------------------------------------------------- clear errors

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "nope.pkl")


def test_files_of_the_wrong_kind(tmp_path):
    png = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(png)
    with pytest.raises(ValueError, match="not a readable torch/pickle file"):
        load_tokenizer(png)
    torch.save({"foo": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "other.pt")
    torch.save({"state_dict": {"backbone.norm.weight": torch.ones(4)}}, tmp_path / "finetuned.pth")
    with pytest.raises(ValueError, match="carries no tokenizer"):
        load_tokenizer(tmp_path / "finetuned.pth")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="got a list"):
        load_tokenizer(tmp_path / "list.pt")


def test_dalle_state_dict_with_wrong_tensors(tmp_path):
    state = small_dalle().encoder.state_dict()
    broken = {k: v for k, v in state.items() if k != "blocks.group_2.block_1.id_path.w"}
    with pytest.raises(ValueError, match="id_path.w"):
        DalleTokenizer.from_state_dict(broken)
    bad = dict(state)
    bad["blocks.group_1.block_1.res_path.conv_2.w"] = torch.zeros(16, 16, 5, 5)
    with pytest.raises(ValueError, match="conv_2.w.*shape"):
        DalleTokenizer.from_state_dict(bad)


@pytest.mark.parametrize("shape", [(1, 3, 40, 48), (1, 3, 48, 56)])
def test_size_not_multiple_of_16(shape):
    tok = small_dalle()
    with pytest.raises(ValueError, match="multiple of 16"):
        tok.tokenize(torch.rand(shape))
    with pytest.raises(ValueError, match="multiple of 16"):
        tok.tokenize_clip(torch.rand(shape[0], 3, 2, *shape[2:]))


def test_bad_pixels():
    tok = small_dalle()
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tok.tokenize((x - 0.45) / 0.225)                         # mean/std-normalised by mistake
    with pytest.raises(ValueError, match="uint8"):
        tok.tokenize((x * 255).byte())
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        tok.tokenize(x[0])


def test_vocabulary_must_match_the_head(offline_tok):
    check_vocab(offline_tok, 64)
    with pytest.raises(ValueError, match="64 codes.*8192 classes"):
        check_vocab(offline_tok, 8192)


def test_offline_file_with_inconsistent_vocabulary(offline_tok, tmp_path):
    path = tmp_path / "tok.pt"
    offline_tok.save(path)
    raw = torch.load(path, weights_only=True)
    raw["config"]["vocab_size"] = 8192                         # says 8192, holds 64 rows
    torch.save(raw, path)
    with pytest.raises(ValueError, match="8192 codes.*64"):
        load_tokenizer(path)
