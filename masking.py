"""Masks for BEVT's masked image modeling (blockwise) and masked video modeling (tube).

Implements paper §3 "Mask strategy" and the ablations of Table 8 ("Effect of
masking strategies", §4). The blockwise algorithm is BEiT's (Bao et al., 2021, the paper's reference [3]);
the tube and its wrap-around follow the released BEVT code
(`MaskedPositionGenerate` in mmaction/datasets/pipelines/mask_generator.py).

Convention, stated once (and asserted on every mask this module returns):

    mask: numpy bool array, True = replaced by the mask token and predicted.

All masks live on the tokenizer grid h x w = H/16 x W/16 (14 x 14 at 224 px):
one DALL-E code per 16 x 16 pixels of the encoder input (§3 "Tokenizer"). Each
call returns two views of one mask (paper §3 "Mask strategy" "Two views of one mask"):

    image  input (h, w)        target (h, w)        the same cells
    clip   input (T/2, h, w)   target (T, h, w)     input repeated x2 in time

The input mask is at token time T/2 because the video patch embedding has
temporal patch 2, so mask tokens are placed per pair of frames; the target
mask selects which of the T per-frame tokenizer codes are predicted.

Usage:

    gen = MaskGenerator("tube", (16, 224, 224), seed=0)
    inp, tgt = gen()             # (8, 14, 14), (16, 14, 14) bool; tgt == target_mask(inp)
    inp, tgt = gen.batch(8)      # (8, 8, 14, 14), (8, 16, 14, 14)
    gen.reseed_sample(epoch, index)   # one sample's stream (data.py: before every sample)

Pictures: `python tools/mask_sheet.py --strategy tube --out-file tube.png`; speed: `python tools/bench_masking.py`.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


# -----------------------------------------------------------------------------
# Conventions and the paper's numbers

MASK_DTYPE = np.bool_  # True = replaced by the mask token and predicted (cf. MAE's "0 is keep, 1 is remove")

# Strategy names (train.py's --mask-strategy). "block" is the image stream's; the rest are video strategies.
STRATEGIES = (
    "block",            # §3 MIM: blockwise masking "following [3]" (BEiT)
    "tube",             # §3 MVM: the paper's default, Table 8 row "Tube 0.5T-T 50%"
    "random-3d",        # Table 8 "Random-3D"
    "frame-diff",       # Table 8 "Frame-Diff"
    "random-frame",     # Table 8 "Random-Frame"
    "tube-fixed",       # Table 8 "Tube T"
    "tube-0.25-0.75",   # Table 8 "Tube 0.25T-0.75T"
    "tube-0.75-1.0",    # Table 8 "Tube 0.75T-1.0T"
)

# Range of the number l of masked token time steps, as fractions of T/2 (the paper writes lengths
# in frames, [0.5T, T]; the released code draws them on the token time axis, the same fraction).
# Frame-Diff and Random-Frame: Table 8 lists them with "0.5T-T". Random-3D has no length.
TUBE_LENGTHS = {
    "tube": (0.5, 1.0),             # §3 "the range of the masked tube length is [0.5T, T]"
    "frame-diff": (0.5, 1.0),       # Table 8
    "random-frame": (0.5, 1.0),     # Table 8
    "tube-fixed": (1.0, 1.0),       # Table 8 "T": every frame masked
    "tube-0.25-0.75": (0.25, 0.75),  # Table 8
    "tube-0.75-1.0": (0.75, 1.0),   # Table 8
}

PATCH_SIZE = 16       # pixels per tokenizer cell: 112-px tokenizer input / 8 (paper §3 "Tokenizer")
TEMPORAL_PATCH = 2    # frames per video token: patch embedding (2, 4, 4) (paper §3 "BEVT encoders"); token time = T/2
MASK_RATIO = 0.5      # §3 "the masking ratio of each masked frame is 0.5"; Table 8 best 0.5-0.7
MIN_BLOCK = 16        # BEiT min_num_patches; released BEVT config min_num_patches=16
MIN_ASPECT = 0.3      # BEiT min_aspect; aspect is log-uniform in [0.3, 1/0.3]
MAX_ATTEMPTS = 10     # BEiT: tries per block before a round gives up (MaskingGenerator._mask)


def target_mask(input_mask, frames: Optional[int] = None, temporal_patch: int = TEMPORAL_PATCH):
    """The one definition of a clip's target mask: (..., T/2, h, w) -> (..., T, h, w), numpy or torch.

    Each token time step covers `temporal_patch` frames, whose tokenizer codes are all predicted
    where the step is masked (paper §3 "Mask strategy"; the released code's nearest interpolation
    x2 in time). `frames` crops the end (an odd T is padded by the patch embedding). An image's
    target mask is its input mask.
    """
    if isinstance(input_mask, np.ndarray):
        out = np.repeat(input_mask, temporal_patch, axis=-3)
    else:
        out = input_mask.repeat_interleave(temporal_patch, dim=-3)    # torch
    return out[..., :frames, :, :]


# -----------------------------------------------------------------------------
# The mask generator: blockwise (BEiT), tube and the Table 8 ablations


class MaskGenerator:
    """Draws (input_mask, target_mask) pairs for one strategy and one input size.

    input_size: (H, W) pixels for images ("block") or (T, H, W) frames x pixels for clips (every
    other strategy): a grid of H/16 x W/16 cells and T/2 token time steps (T/temporal_patch); the
    rest are the paper's constants above.
    """

    def __init__(self, strategy: str, input_size, mask_ratio: float = MASK_RATIO, seed: int = 0,
                 temporal_patch: int = TEMPORAL_PATCH):
        size = tuple(input_size) if isinstance(input_size, (tuple, list)) else (input_size,)
        p, tp, min_block, min_aspect, max_aspect = PATCH_SIZE, temporal_patch, MIN_BLOCK, MIN_ASPECT, 1 / MIN_ASPECT
        _check_arguments(strategy, input_size, size, p, tp, mask_ratio)
        is_video = len(size) == 3
        (T, H, W) = size if is_video else (0, *size)

        # ---- can BEiT's loop fill this grid? (method, not bookkeeping)
        gh, gw = self.grid = (H // p, W // p)                       # (h, w) tokenizer grid
        cells, self.num_masked = gh * gw, int(round(mask_ratio * gh * gw))    # 98 of 196 at 224 px
        # BEiT accepts a block only if h < grid height and w < grid width, so a
        # grid can hold min_block cells and still fit no block: with h, w the
        # rounded sqrt(area*r), sqrt(area/r), the smallest area fits iff some
        # aspect r gives sqrt(a*r) < gh - 1/2 and sqrt(a/r) < gw - 1/2.
        r_lo, r_hi = max(min_aspect, min_block / (gw - 0.5) ** 2), min(max_aspect, (gh - 0.5) ** 2 / min_block)
        _check((f"tokenizer grid {gh}x{gw} ({cells} cells) for min_block={min_block}", cells >= min_block,
                f"at least {min_block} cells (input >= {math.ceil(math.sqrt(min_block)) * p} px)", (H, W)),
               (f"tokenizer grid {gh}x{gw} for min_block={min_block}, aspect [{min_aspect:.3g}, {max_aspect:.3g}]",
                r_lo < r_hi, "room for a block with h < grid height and w < grid width", (H, W)),
               # Fewer than min_block cells to mask: BEiT's first block would have to be smaller than
               # min_block to pass "new <= remaining", which only rounding allows, so most masks would
               # come out empty. Differs from the released code (which returns them): ask for more.
               (f"masked count round(mask_ratio * {cells} cells) of the {gh}x{gw} grid",
                self.num_masked >= min_block, f"at least min_block={min_block}", self.num_masked))

        self.strategy, self.seed = strategy, seed
        self.time, self.temporal_patch = (T // tp if is_video else 0), tp     # token time steps T/2 (0: images)
        self.mask_ratio, self.min_block, self.max_attempts = float(mask_ratio), min_block, MAX_ATTEMPTS
        self.min_aspect, self.max_aspect = min_aspect, max_aspect
        self.input_shape, self.target_shape = ((self.time, gh, gw), (T, gh, gw)) if is_video else ((gh, gw),) * 2
        # (min, max) masked token steps l, inclusive (None: no lengths). Released: l in {max(int(lo*t), 1) ..
        # min(int(hi*t), t)}, (4, 8) for "tube" at t = 8; a range below its minimum (t = 1) collapses to it.
        lo, hi = TUBE_LENGTHS.get(strategy, (0, 0))
        l_min = max(int(lo * self.time), 1)
        l_max = max(min(int(hi * self.time), self.time), l_min)
        self.length_range = (l_min, l_max) if strategy in TUBE_LENGTHS else None
        # Differs from the released code: it draws masks from Python's global `random`, seeded per
        # DataLoader worker. Here a generator owns its numpy stream, re-keyed per sample (reseed_sample).
        self.rng = np.random.default_rng(derive_seed(seed, 0, 0, 0))
        self._ubuf, self._upos = [], 0                             # uniforms drawn in chunks (_uniform)

    # ---- randomness

    def reseed_sample(self, epoch: int, index: int, attempt: int = 0) -> None:
        """Switch to the stream of one sample, (seed, epoch, row index, attempt): data.py calls it before
        every sample, so a mask depends on its key alone, not on the rank, worker or batch that draws it."""
        self.rng = np.random.default_rng(sample_seed(self.seed, KEY_MASKS, epoch, index, attempt))
        self._ubuf, self._upos = [], 0                             # drop the previous stream's buffered draws

    def _uniform(self) -> float:
        """Next uniform in [0, 1) of this generator's stream."""
        if self._upos == len(self._ubuf):                         # in chunks: a numpy call per scalar is slow
            self._ubuf, self._upos = self.rng.random(2048).tolist(), 0     # (the chunk size is part of the stream)
        self._upos += 1
        return self._ubuf[self._upos - 1]

    def _randint(self, low: int, high: int) -> int:
        """Uniform int in {low .. high}, both inclusive (Python's random.randint)."""
        return low + int(self._uniform() * (high - low + 1))

    # ---- blockwise masking (BEiT), the 2D building block of every strategy but Random-3D

    def blockwise(self) -> np.ndarray:
        """One BEiT blockwise mask, (h, w) bool.

        BEiT's Algorithm 1 ("Blockwise Masking", `MaskingGenerator` in its
        code), written out with one numpy array: rectangles of random area and
        aspect ratio are dropped on the grid one after another until num_masked
        cells are masked. Blocks may overlap; a block counts only the cells it
        turns from visible to masked, and is refused if that is none or more
        than what is left of the target. A round is up to max_attempts tries for
        one block; the mask is done when the target is reached or a whole
        round places nothing (then it stays a little under the target).
        min_block bounds the drawn *area*, as in BEiT: rounding h and w can
        leave the rectangle a little smaller (area 16 at aspect 0.39: 2 x 6).

        Random numbers come from this generator's stream in a fixed order: per
        try 2 uniforms (area, aspect), then 2 more (top, left) if the block fits
        the grid. That order is part of the contract: one stream, one mask.
        """
        gh, gw = self.grid
        target = self.num_masked                       # 98 of 14 x 14 at 224 px
        log_lo, log_hi = math.log(self.min_aspect), math.log(self.max_aspect)   # aspect bounds, log scale
        mask = np.zeros((gh, gw), MASK_DTYPE)          # (h, w), True = masked
        count = 0                                      # cells masked so far
        while count < target:                          # BEiT __call__: until the target is reached ...
            remaining = target - count                 # per-block max = remaining (max_num_patches=None)
            added = 0
            for attempt in range(self.max_attempts):   # BEiT _mask: 10 tries for one block
                # random.uniform(min, remaining): when remaining < min_block this
                # draws from [remaining, min_block], as BEiT's does (uniform(a, b)
                # is a + (b-a)u either way); the overlap test below then lets only
                # blocks that add <= remaining new cells through.
                area = self.min_block + (remaining - self.min_block) * self._uniform()
                aspect = math.exp(log_lo + (log_hi - log_lo) * self._uniform())   # log-uniform h/w
                h = round(math.sqrt(area * aspect))    # Python round(): half to even, as in BEiT
                w = round(math.sqrt(area / aspect))
                if h < gh and w < gw:                  # strict: a block never spans the grid
                    top = self._randint(0, gh - h)
                    left = self._randint(0, gw - w)
                    block = mask[top:top + h, left:left + w]   # (h, w) view into the mask
                    new = h * w - int(block.sum())     # cells not masked yet
                    if 0 < new <= remaining:           # adds something, never overshoots
                        block[...] = True
                        added = new
                        break
            if added == 0:                             # ... or a round of 10 tries adds nothing
                break
            count += added
        return mask

    # ---- which token time steps are masked

    def _tube_steps(self) -> list:
        """l (uniform in length_range) consecutive token time steps from a start uniform in {0 .. t-1}, wrapping
        past t-1 to 0 (the released code fills [start:] and [0:start+l-t])."""
        length = self._randint(*self.length_range)
        start = self._randint(0, self.time - 1)
        return [(start + i) % self.time for i in range(length)]

    def _random_steps(self) -> np.ndarray:
        """l distinct token time steps in random order, not necessarily consecutive (Random-Frame)."""
        length = self._randint(*self.length_range)
        return self.rng.permutation(self.time)[:length]

    # ---- one input mask per strategy

    def _draw_inputs(self, n: int) -> np.ndarray:
        """n input masks of this strategy, (n, *input_shape) bool, drawn one after another: batch(n) is n calls."""
        s = self.strategy
        if s == "block":
            return np.stack([self.blockwise() for _ in range(n)])        # (n, h, w)
        if s == "random-3d":
            # Exactly round(ratio * cells) of all t*h*w cells (Table 8: 50%): a random permutation's first k.
            cells = int(np.prod(self.input_shape))
            k = int(round(self.mask_ratio * cells))
            out = np.zeros((n, cells), MASK_DTYPE)
            for i in range(n):
                out[i, self.rng.permutation(cells)[:k]] = True
            return out.reshape(n, *self.input_shape)
        out = np.zeros((n, *self.input_shape), MASK_DTYPE)
        if s == "frame-diff":
            # Frames chosen as for the tube, but a fresh 2D mask on every masked frame.
            for i in range(n):
                steps = self._tube_steps()
                out[i, steps] = np.stack([self.blockwise() for _ in steps])   # (l, h, w), one per step
            return out
        # tube, tube-fixed, tube-0.25-0.75, tube-0.75-1.0, random-frame: one
        # shared 2D mask on the chosen steps ("the shape of the 3D mask is a tube").
        pick = self._random_steps if s == "random-frame" else self._tube_steps
        for i in range(n):
            steps = pick()
            out[i, steps] = self.blockwise()                           # one (h, w) on every chosen step
        return out

    # ---- public API

    def __call__(self):
        """(input_mask, target_mask) of one sample; see the module docstring for shapes."""
        return tuple(m[0] for m in self.batch(1))

    def batch(self, n: int):
        """(input_masks (n, *input_shape), target_masks (n, *target_shape)) of n samples."""
        _check(("batch size n", _is_int(n), "an int >= 1", n))
        inp = self._draw_inputs(int(n))
        tgt = target_mask(inp, temporal_patch=self.temporal_patch) if self.time else inp.copy()
        assert inp.dtype == MASK_DTYPE and inp.shape == (n, *self.input_shape)
        assert tgt.dtype == MASK_DTYPE and tgt.shape == (n, *self.target_shape)
        return inp, tgt


# =============================================================================
# Machinery: what running the method needs (not the method itself).

# -----------------------------------------------------------------------------
# Seeding: one stream per (base seed, rank, DataLoader worker, epoch), or per sample (base seed, epoch, row)


def _seed(**key) -> int:
    """A 64-bit seed from numpy's SeedSequence(entropy=first value, spawn_key=the rest), the same on any machine:
    independent streams per key (`base + rank + worker` would give rank 1 / worker 0 rank 0 / worker 1's)."""
    for name, v in key.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    base, *spawn = (int(v) for v in key.values())
    return int(np.random.SeedSequence(entropy=base, spawn_key=tuple(spawn)).generate_state(1, np.uint64)[0])


def derive_seed(base_seed: int, rank: int = 0, worker_id: int = 0, epoch: int = 0) -> int:
    """A 64-bit seed for the stream of one (rank, worker, epoch), from one base seed."""
    return _seed(base_seed=base_seed, rank=rank, worker_id=worker_id, epoch=epoch)


# Purposes of the per-sample keys: distinct tags, so a sample's masks, pixels, replacements and orders differ.
KEY_MASKS, KEY_PIXELS, KEY_REPLACE, KEY_ORDER = 1, 2, 3, 4


def sample_seed(base_seed: int, purpose: int, epoch: int, index: int = 0, attempt: int = 0) -> int:
    """A 64-bit seed for one sample's randomness, keyed by what it *is* (base seed, purpose, epoch, row, attempt:
    the files tried, data.py replacing bad ones), not who draws it, so a re-sharded run draws the same crops and
    masks. 4 key entries against derive_seed's 3: the two families never coincide."""
    return _seed(base_seed=base_seed, purpose=purpose, epoch=epoch, index=index, attempt=attempt)


# -----------------------------------------------------------------------------
# Argument checks: one-line errors (the constructor's paper constants are not checked)


def _check(*rows) -> None:
    """For the first row (what, ok, expected, got) whose ok is false: ValueError "what: expected .., got .."."""
    for what, ok, expected, got in rows:
        if not ok:
            raise ValueError(f"{what}: expected {expected}, got {got!r}")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and v >= 1


def _check_arguments(strategy, input_size, size, p, tp, mask_ratio) -> None:
    """MaskGenerator's arguments, checked in order: the first bad one raises a one-line ValueError."""
    is_video = len(size) == 3
    kind, want = ("images", "(H, W)") if strategy == "block" else ("clips", "(T, H, W)")
    _check(("mask strategy", strategy in STRATEGIES, f"one of: {', '.join(STRATEGIES)}", strategy),
           ("input_size", len(size) in (2, 3) and all(map(_is_int, size)), "(H, W) or (T, H, W) positive ints",
            input_size),
           (f"input_size for {strategy!r} ({kind})", is_video == (kind == "clips"), want, input_size))
    (T, H, W) = size if is_video else (0, *size)
    # Differs from the released code (which crops): uneven sizes raise, as the encoder places mask
    # tokens by upsampling this grid x4 onto its H/4 x W/4 tokens; a cropped grid would misalign them.
    _check(("input H, W", H % p == 0 and W % p == 0, f"multiples of patch_size={p}", (H, W)),
           (f"token time T/{tp}", not is_video or (_is_int(tp) and T // tp >= 1), f">= 1 (T >= {tp} frames)", T),
           ("number of frames T", not is_video or T % tp == 0, f"a multiple of temporal_patch={tp}", T),
           ("mask_ratio", isinstance(mask_ratio, (int, float, np.floating)) and 0 < mask_ratio < 1,
            "a number in the open interval (0, 1)", mask_ratio))
