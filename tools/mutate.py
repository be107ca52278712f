"""Mutation check: do the tests catch plausible reimplementation mistakes?

Run by hand (pytest does not collect it: the name does not start with test_):

    python tools/mutate.py                      # every mutation, then the score
    python tools/mutate.py concat-video merge-order     # some, by name
    python tools/mutate.py --list               # names, files and what each one breaks
    python tools/mutate.py --check              # only verify that every edit still applies
    python tools/mutate.py --without-golden     # the same without tests/test_golden.py

Each entry of MUTATIONS below is one semantic mistake someone re-writing the
method could make: a plausible line, not a syntax error. For each, the
project's tracked files (`git ls-files`) are copied to a fresh temporary
folder, the edit is applied there as exact string replacements, and the
relevant test files run with `pytest -x -q` (under `nice -n 10`; the slow
finetune demo test is never run). The mutation is *caught* when some test
fails. Every edit must match its file exactly once, checked for the whole list
before anything runs, so the list cannot silently rot when the code changes:
a stale entry stops the script naming the mutation and the text not found.

Before the mutations, each test selection runs once on the unmutated copy
(skip with --no-baseline): a selection that already fails would make every
mutation look caught.

Target: every mutation caught. A mutation that no test can catch because it
does not change what the code computes (a true equivalent) does not belong in
the list; the ones considered and removed are listed at the end of the file
with the reason.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
# Test selections: the golden tests first (seconds, and they catch most layout
# mistakes), then the component's own tests. `-x` stops at the first failure.

SELECTIONS = {
    "bevt": ["tests/test_golden.py", "tests/test_bevt.py"],
    "swin3d": ["tests/test_golden.py", "tests/test_swin3d.py"],
    "convert": ["tests/test_golden.py", "tests/test_swin3d.py"],      # tools/convert_checkpoint.py
    "masking": ["tests/test_masking.py", "-k", "not cli_sheet"],
    "tokenizer": ["tests/test_golden.py", "tests/test_tokenizer.py"],
    "data": ["tests/test_golden.py", "tests/test_data.py", "-k",
             "golden or pretrain_clip or crop_and_flip or finetune_val or sampling"],
    "train": ["tests/test_golden.py", "tests/test_train_units.py"],
    "finetune": ["tests/test_golden.py", "tests/test_finetune.py"],
}


class Mutation(NamedTuple):
    name: str
    file: str
    edits: list          # [(old, new), ...], each `old` exactly once in the original file
    tests: str          # a key of SELECTIONS
    what: str           # the mistake, in words


M = Mutation
MUTATIONS = [
    # ---------------------------------------------------------------- bevt.py
    M("concat-video", "bevt.py",
      [("self.lm_down_st(torch.cat([f3, _crop_like(up, f3)], dim=-1))",
        "self.lm_down_st(torch.cat([_crop_like(up, f3), f3], dim=-1))")],
      "bevt", "video decoder concatenates [F^4, F3] (the paper's order) instead of the released [F3, F^4]"),
    M("concat-image", "bevt.py",
      [("self.lm_down(torch.cat([f3, _crop_like(up, f3)], dim=-1))",
        "self.lm_down(torch.cat([_crop_like(up, f3), f3], dim=-1))")],
      "bevt", "image decoder concatenates [F^4, F3]"),
    M("lambda-ignored", "bevt.py",
      [("total = total + self.config.lam * out[\"loss_mvm\"]", "total = total + out[\"loss_mvm\"]")],
      "bevt", "L = L_MIM + L_MVM whatever λ is"),
    M("decoder-norm-skipped", "bevt.py",
      [("return self.encoder.norm(decoder(out.f3, out.f4))", "return decoder(out.f3, out.f4)")],
      "bevt", "the decoders' shared final LayerNorm skipped"),
    M("crop-wrong-end", "bevt.py",
      [("return x[..., : ref.shape[-3], : ref.shape[-2], :]",
        "return x[..., x.shape[-3] - ref.shape[-3]:, x.shape[-2] - ref.shape[-2]:, :]")],
      "bevt", "odd F3: the upsampled F4 cropped at the start instead of the end (padding is at the end)"),
    M("fpn-hw-permute", "bevt.py",
      [("up = self.fpn_s(f4.movedim(-1, 1)).movedim(1, -1)",
        "up = self.fpn_s(f4.permute(0, 4, 1, 3, 2)).permute(0, 2, 4, 3, 1)")],
      "bevt", "channels-first permute with h and w exchanged around the (1,2,2) transposed conv"),

    # ---------------------------------------------------------------- swin3d.py
    M("shift-mask-zero", "swin3d.py",
      [("masked_fill_(diff, -100.0)", "masked_fill_(diff, 0.0)")],
      "swin3d", "shifted-window mask value 0 instead of -100"),
    M("mask-token-tiled", "swin3d.py",
      [("m = mask.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)", "m = mask.repeat(1, 1, 4, 4)")],
      "swin3d", "mask upsampled to the token grid by tiling instead of x4 nearest on (h, w)"),
    M("rel-index-hw-strides", "swin3d.py",
      [("+ (rel[1] + Wh - 1) * (2 * Ww - 1) + (rel[2] + Ww - 1)",
        "+ (rel[1] + Wh - 1) + (rel[2] + Ww - 1) * (2 * Wh - 1)")],
      "swin3d", "relative index with its h and w strides swapped"),
    M("rel-index-sign", "swin3d.py",
      [("rel = coords[:, :, None] - coords[:, None, :]", "rel = coords[:, None, :] - coords[:, :, None]")],
      "swin3d", "relative offset key - query instead of query - key"),
    M("window-token-order", "swin3d.py",
      [("x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)", "x = x.permute(0, 1, 3, 5, 4, 2, 6, 7)"),
       ("x = windows.view(B, t // wt, h // wh, w // ww, wt, wh, ww, C)",
        "x = windows.view(B, t // wt, h // wh, w // ww, wh, wt, ww, C)"),
       ("x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)", "x = x.permute(0, 1, 5, 2, 4, 3, 6, 7)")],
      "swin3d", "tokens of a window flattened (h, t, w) (partition and reverse consistent), index time-major"),
    M("qkv-layout", "swin3d.py",
      [("qkv = qkv.view(B, nW, N, 3, num_heads, C3 // (3 * num_heads))",
        "qkv = qkv.view(B, nW, N, num_heads, 3, C3 // (3 * num_heads))"),
       ("return qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)", "return qkv.permute(4, 0, 1, 3, 2, 5).unbind(0)"),
       ("heads = qkv.view(B, nW, N, 3, num_heads, C3 // (3 * num_heads))",
        "heads = qkv.view(B, nW, N, num_heads, 3, C3 // (3 * num_heads))"),
       ("heads = heads.permute(3, 0, 1, 4, 2, 5).contiguous()", "heads = heads.permute(4, 0, 1, 3, 2, 5).contiguous()"),
       ("return dheads.permute(1, 2, 4, 0, 3, 5).reshape(", "return dheads.permute(1, 2, 4, 3, 0, 5).reshape(")],
      "swin3d", "qkv output read as (heads, 3, head_dim) instead of (3, heads, head_dim), consistently in "
                "every attention path and the hand-written backward"),
    M("head-merge-order", "swin3d.py",
      [("return out.transpose(2, 3).reshape(B, nW, N, nh * hd)", "return out.permute(0, 1, 3, 4, 2).reshape(B, nW, N, nh * hd)"),
       ("dout = dout.reshape(B, nW, N, nh, hd).transpose(2, 3).contiguous()",
        "dout = dout.reshape(B, nW, N, hd, nh).permute(0, 1, 4, 2, 3).contiguous()")],
      "swin3d", "heads merged head_dim-major instead of head-major (and the backward to match)"),
    M("attn-scale-dim", "swin3d.py",
      [("self.scale = (dim // num_heads) ** -0.5", "self.scale = dim ** -0.5")],
      "swin3d", "attention scaled by C^-0.5 instead of head_dim^-0.5"),
    M("block-roll-direction", "swin3d.py",
      [("x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))",
        "x = torch.roll(x, shifts=shift, dims=(1, 2, 3))"),
       ("x = torch.roll(x, shifts=shift, dims=(1, 2, 3))   # and back by +shift",
        "x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))   # and back by +shift")],
      "swin3d", "the block's torch.roll shifts by +s before attention and -s after"),
    M("clamp-shift-strict", "swin3d.py",
      [("sh = tuple(0 if s <= w else k", "sh = tuple(0 if s < w else k")],
      "swin3d", "an axis exactly one window long keeps its shift"),
    M("merge-order", "swin3d.py",
      [("x = x.permute(0, 1, 2, 4, 5, 3, 6).reshape(B, t, h // 2, w // 2, 4 * C)",
        "x = x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, t, h // 2, w // 2, 4 * C)")],
      "swin3d", "patch merging neighbours (h0,w0),(h0,w1),(h1,w0),(h1,w1) (row-major) instead of the released order"),
    M("merge-pad-front", "swin3d.py",
      [("x = F.pad(x, (0, 0, 0, x.shape[3] % 2, 0, x.shape[2] % 2))",
        "x = F.pad(x, (0, 0, x.shape[3] % 2, 0, x.shape[2] % 2, 0))")],
      "swin3d", "odd h/w zero-padded at the start before patch merging"),
    M("embed-pad-front", "swin3d.py",
      [("pad += [0, (p - size % p) % p]", "pad += [(p - size % p) % p, 0]")],
      "swin3d", "input zero-padded at the start to a multiple of the patch"),
    M("embed-hw-swapped", "swin3d.py",
      [("x = x.movedim(1, -1)                                      # (B, [t,] h, w, C)",
        "x = x.movedim(1, -1).transpose(-2, -3)                   # (B, [t,] h, w, C)")],
      "swin3d", "patch-embedding output laid out (w, h) (a permute(0, 2, 4, 3, 1) typo)"),
    M("inflate-no-division", "tools/convert_checkpoint.py",
      [("v = v.unsqueeze(2).repeat(1, 1, pt, 1, 1) / pt", "v = v.unsqueeze(2).repeat(1, 1, pt, 1, 1)")],
      "convert", "2D kernel inflated without dividing by the temporal patch"),
    M("inflate-first-slice", "tools/convert_checkpoint.py",
      [("v = v.unsqueeze(2).repeat(1, 1, pt, 1, 1) / pt", "v = F.pad(v.unsqueeze(2), (0, 0, 0, 0, 0, pt - 1))")],
      "convert", "2D kernel put in the first temporal slice only (zeros elsewhere) instead of averaged over slices"),
    M("inflate-table-interleaved", "tools/convert_checkpoint.py",
      [("v = v.repeat(2 * Wt - 1, 1)", "v = v.repeat_interleave(2 * Wt - 1, dim=0)")],
      "convert", "2D table rows repeated in place instead of tiled over Δt"),
    M("resize-align-corners", "swin3d.py",
      [("mode=\"trilinear\", align_corners=False)", "mode=\"trilinear\", align_corners=True)")],
      "swin3d", "window resize with align_corners=True (the released loader uses torch's default, False)"),
    M("resize-no-transpose", "swin3d.py",
      [("t = v.float().T.reshape(1, v.shape[1], *grid)", "t = v.float().reshape(1, v.shape[1], *grid)")],
      "swin3d", "table (rows, heads) reshaped to (heads, Δt, Δh, Δw) without the transpose"),

    # ---------------------------------------------------------------- masking.py
    M("target-tiled", "masking.py",
      [("out = input_mask.repeat_interleave(temporal_patch, dim=-3)",
        "out = input_mask.repeat(*(1,) * (input_mask.dim() - 3), temporal_patch, 1, 1)")],
      "bevt", "model-side (torch) target mask tiled in time (t0,t1,..,t0,t1,..) instead of interleaved"),
    M("mask-target-tiled", "masking.py",
      [("out = np.repeat(input_mask, temporal_patch, axis=-3)", "out = np.tile(input_mask, (temporal_patch, 1, 1))")],
      "masking", "data-side (numpy) target mask tiled in time instead of interleaved"),
    M("tube-no-wrap", "masking.py",
      [("return [(start + i) % self.time for i in range(length)]",
        "return [min(start + i, self.time - 1) for i in range(length)]")],
      "masking", "tube stops at the last step instead of wrapping past the end"),
    M("block-fits-loose", "masking.py",
      [("if h < gh and w < gw:", "if h <= gh and w <= gw:")],
      "masking", "a BEiT block may span the whole grid"),
    M("aspect-linear", "masking.py",
      [("aspect = math.exp(log_lo + (log_hi - log_lo) * self._uniform())",
        "aspect = self.min_aspect + (self.max_aspect - self.min_aspect) * self._uniform()")],
      "masking", "block aspect uniform instead of log-uniform"),
    M("block-overlap-ignored", "masking.py",
      [("new = h * w - int(block.sum())", "new = h * w")],
      "masking", "a BEiT block counts all its cells as new, overlap with earlier blocks included"),
    M("random-frame-is-tube", "masking.py",
      [("pick = self._random_steps if s == \"random-frame\" else self._tube_steps", "pick = self._tube_steps")],
      "masking", "Random-Frame draws consecutive steps"),

    # ---------------------------------------------------------------- tokenizer.py
    M("pixel-map-skipped", "tokenizer.py",
      [("x = map_pixels(x_half)", "x = x_half")],
      "tokenizer", "the dVAE gets [0, 1] pixels instead of (1-2ε)x + ε"),
    M("pixel-map-eps", "tokenizer.py",
      [("return (1 - 2 * eps) * x + eps", "return (1 - eps) * x + eps")],
      "tokenizer", "pixel map (1-ε)x + ε"),
    M("half-patches-transposed", "tokenizer.py",
      [("x = x.permute(0, 2, 4, 1, 3, 5)", "x = x.permute(0, 4, 2, 1, 3, 5)")],
      "tokenizer", "offline tokenizer's patch grid read column-major"),
    M("half-patches-channels-last", "tokenizer.py",
      [("x = x.permute(0, 2, 4, 1, 3, 5)", "x = x.permute(0, 2, 4, 3, 5, 1)")],
      "tokenizer", "offline tokenizer's patch features in (y, x, c) order instead of (c, y, x)"),
    M("clip-frames-no-transpose", "tokenizer.py",
      [("x = x.transpose(1, 2).reshape(B * T, 3, h, w)", "x = x.reshape(B * T, 3, h, w)")],
      "tokenizer", "clip (B, 3, T, H, W) cut into frames without moving T next to B"),
    M("dalle-post-gain", "tokenizer.py",
      [("self.post_gain = 1 / n_layers ** 2", "self.post_gain = 1 / n_layers")],
      "tokenizer", "dVAE residual gain 1/n_layers instead of 1/n_layers²"),
    M("half-size-hw-swapped", "tokenizer.py",
      [("return lanczos_resize(x, (x.shape[-2] // DOWNSAMPLE, x.shape[-1] // DOWNSAMPLE), kind)",
        "return lanczos_resize(x, (x.shape[-1] // DOWNSAMPLE, x.shape[-2] // DOWNSAMPLE), kind)")],
      "tokenizer", "half-size copy with height and width exchanged"),

    # ---------------------------------------------------------------- data.py
    M("normalize-bgr", "data.py",
      [("IMAGENET_MEAN = (123.675, 116.28, 103.53)", "IMAGENET_MEAN = (103.53, 116.28, 123.675)"),
       ("IMAGENET_STD = (58.395, 57.12, 57.375)", "IMAGENET_STD = (57.375, 57.12, 58.395)")],
      "data", "ImageNet mean/std in BGR order (OpenCV habit) on RGB frames"),
    M("video-half-hw-swapped", "data.py",
      [("half = to_uint8(half).transpose(0, 1).contiguous()",
        "half = to_uint8(half).permute(1, 0, 3, 2).contiguous()")],
      "data", "half-size tokenizer copy of a clip (video_half) laid out (3, T, W, H)"),
    M("three-crop-order", "data.py",
      [("return [(0, 0), (0, 2 * step), (0, step)]", "return [(0, 0), (0, step), (0, 2 * step)]")],
      "data", "three-crop views left, middle, right instead of the released left, right, middle"),
    M("dense-no-interval", "data.py",
      [("idx = offsets[:, None] + np.arange(clip_len)[None, :] * interval",
        "idx = offsets[:, None] + np.arange(clip_len)[None, :]")],
      "data", "dense sampling ignores the frame interval"),

    # ---------------------------------------------------------------- train.py
    M("image-codes-of-encoder-input", "train.py",
      [("tok.codes_of_copy(batch[f\"{stream}_half\"]", "tok.codes_of_copy(batch[stream]")],
      "train", "targets tokenized from the encoder input instead of the tokenizer copy"),
    M("warmup-off-by-one", "train.py",
      [("return lr * (step + 1) / warmup", "return lr * step / warmup")],
      "train", "warm-up starts at lr 0"),
    M("decay-on-biases", "train.py",
      [("(no_decay if p.ndim <= 1 or", "(no_decay if p.ndim < 1 or")],
      "train", "weight decay on norms and biases"),

    # ---------------------------------------------------------------- finetune.py
    M("classifier-unnormed-f4", "finetune.py",
      [("f4 = self.encoder(video).f4_norm", "f4 = self.encoder(video).f4")],
      "finetune", "classifier pools F4 before the final LayerNorm"),
    M("classifier-max-pool", "finetune.py",
      [("return f4.mean(dim=(1, 2, 3))", "return f4.amax(dim=(1, 2, 3))")],
      "finetune", "global max pool instead of the released average pool"),
    M("old-window-formula", "finetune.py",
      [("return (((rows // spatial) + 1) // 2, *cfg.window_size[1:])", "return ((rows // spatial) // 2, *cfg.window_size[1:])")],
      "finetune", "checkpoint's temporal window read off the table as rows/2 instead of (rows+1)/2"),
    M("layer-decay-exponent", "finetune.py",
      [("exponent = {p: k + 1 for k, p in enumerate(order)}", "exponent = {p: k for k, p in enumerate(order)}")],
      "finetune", "layer-wise decay one power short (last block at lr x1)"),
    M("views-average-logits", "finetune.py",
      [(".softmax(-1).mean(1)", ".mean(1).softmax(-1)")],
      "finetune", "test views averaged as logits instead of softmax scores"),
]

# Considered and removed as true equivalents (they do not change what the code computes):
# * bevt.py, head applied to every position and then the masked ones gathered (instead of
#   gather, then head): the head is a per-position Linear, so the selected logits are identical.
# * bevt.py, load_released loading a checkpoint's relative_position_index instead of skipping it:
#   WindowAttention3D._load_from_state_dict replaces it by the re-derived index before loading.
# * swin3d.py, window_partition / window_reverse permuted to another token order *together with*
#   relative_position_index's coordinates in that order: the bias each pair gets is unchanged.
# * tokenizer.py, the Lanczos half-size resize done height-first instead of width-first: a
#   separable linear filter commutes; only the intermediate [0, 1] clamp differs, by at most one
#   8-bit step, which no test should be asked to pin.
#
# Removed as duplicates (the same edit as another entry, after code moved):
# * codes-of-no-transpose (train.py's target codes of a clip cut into frames without moving T
#   next to B): train.py now tokenizes through tokenizer.codes_of_copy, so the edit became the
#   one of clip-frames-no-transpose, on the same line of tokenizer.py.


# -----------------------------------------------------------------------------
# Machinery


def fail(msg: str):
    print(f"mutate.py: {msg}", file=sys.stderr)
    raise SystemExit(2)


def apply_edits(text: str, mut: Mutation) -> str:
    """All of mut's edits, each matched exactly once in the *original* text, applied together."""
    spans = []
    for old, new in mut.edits:
        n = text.count(old)
        if n != 1:
            fail(f"mutation {mut.name!r}: {mut.file} contains {n} copies of {old!r} (expected exactly 1); "
                 f"update the list")
        i = text.index(old)
        spans.append((i, i + len(old), new))
    spans.sort()
    for (a0, a1, _), (b0, _, _) in zip(spans, spans[1:]):
        if b0 < a1:
            fail(f"mutation {mut.name!r}: two edits overlap in {mut.file}")
    out, pos = [], 0
    for a, b, new in spans:
        out += [text[pos:a], new]
        pos = b
    return "".join(out + [text[pos:]])


def tracked_files() -> list:
    r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [p for p in r.stdout.split("\0") if p]


def copy_project(files: list, dest: str) -> None:
    for rel in files:
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):          # deleted in the working tree but still tracked
            continue
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        shutil.copy2(src, os.path.join(dest, rel))
    for rel in ("tests/test_golden.py", "tools/mutate.py"):      # also before they are committed
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src) and rel not in files:
            shutil.copy2(src, os.path.join(dest, rel))


def run_tests(workdir: str, selection: list) -> tuple:
    """(pytest return code, first failing test id or '', seconds, the end of its output)."""
    cmd = ["nice", "-n", "10", sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selection]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.time()
    r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, flags=re.M)
    return r.returncode, (failed[0] if failed else ""), time.time() - t0, r.stdout[-3000:] + r.stderr[-2000:]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mutate.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutations to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--check", action="store_true", help="only check that every edit applies exactly once")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test selection")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies (for debugging)")
    ap.add_argument("--without-golden", action="store_true",
                    help="leave tests/test_golden.py out of every selection (what the suite caught before it)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        fail("duplicate mutation names")
    unknown = [n for n in args.names if n not in names]
    if unknown:
        fail(f"unknown mutation(s) {unknown}; see --list")
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]

    # Every edit of the whole list must apply, whatever is run.
    originals = {}
    for m in MUTATIONS:
        if m.tests not in SELECTIONS:
            fail(f"mutation {m.name!r}: unknown test selection {m.tests!r}")
        if m.file not in originals:
            with open(os.path.join(ROOT, m.file), encoding="utf-8") as f:
                originals[m.file] = f.read()
        if apply_edits(originals[m.file], m) == originals[m.file]:
            fail(f"mutation {m.name!r} changes nothing")

    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:30s} {m.file:28s} {m.what}")
        print(f"{len(MUTATIONS)} mutations in {len(originals)} files")
        return 0
    if args.check:
        print(f"all {len(MUTATIONS)} mutations apply exactly once")
        return 0

    if args.without_golden:
        for key, sel in SELECTIONS.items():
            SELECTIONS[key] = [a for a in sel if a != "tests/test_golden.py"]
    files = tracked_files()
    t_start = time.time()
    tmp_root = tempfile.mkdtemp(prefix="bevt-mutate-")
    try:
        if not args.no_baseline:
            for key in sorted({m.tests for m in chosen}):
                work = os.path.join(tmp_root, f"baseline-{key}")
                copy_project(files, work)
                rc, first, secs, tail = run_tests(work, SELECTIONS[key])
                print(f"baseline {key:10s} rc={rc} ({secs:.0f} s)", flush=True)
                if rc != 0:
                    print(tail)
                    fail(f"the unmutated project fails test selection {key!r} ({first}); fix that first")
        rows = []
        print(f"\n{'mutation':30s} {'file':28s} {'result':9s} {'secs':>5s}  first failing test", flush=True)
        for m in chosen:
            work = os.path.join(tmp_root, m.name)
            copy_project(files, work)
            with open(os.path.join(work, m.file), "w", encoding="utf-8") as f:
                f.write(apply_edits(originals[m.file], m))
            rc, first, secs, tail = run_tests(work, SELECTIONS[m.tests])
            result = "caught" if rc == 1 else "SURVIVED" if rc == 0 else f"ERROR{rc}"
            rows.append((m, result))
            print(f"{m.name:30s} {m.file:28s} {result:9s} {secs:5.0f}  {first}", flush=True)
            if result.startswith("ERROR"):
                print(tail)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp_root, ignore_errors=True)
        else:
            print(f"copies kept in {tmp_root}")
    caught = sum(r == "caught" for _, r in rows)
    by_file = {}
    for m, r in rows:
        c, n = by_file.get(m.file, (0, 0))
        by_file[m.file] = (c + (r == "caught"), n + 1)
    print("\nper file: " + ", ".join(f"{f} {c}/{n}" for f, (c, n) in by_file.items()))
    print(f"score: {caught}/{len(rows)} mutations caught in {time.time() - t_start:.0f} s")
    survivors = [m.name for m, r in rows if r != "caught"]
    if survivors:
        print("not caught: " + ", ".join(survivors))
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
