"""A picture of sample masks (masking.py): one row per sample, one cell per frame, masked cells dark.

    python tools/mask_sheet.py --strategy tube --out-file tube.png [--frames 16 --crop 224 --rows 6 --seed 0]
    python tools/mask_sheet.py --strategy block --out-file block.png --rows 3 --cols 8
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import numpy as np   # noqa: E402

import train         # noqa: E402
from masking import STRATEGIES, MaskGenerator   # noqa: E402

PROG = "mask_sheet.py"


def render_sheet(masks: np.ndarray, cell: int = 4, gap: int = 3):
    """A grey-scale PIL image of masks (rows, cols, h, w): one row per sample, one
    grid per column (frame), each tokenizer cell `cell` px, masked cells dark."""
    from PIL import Image
    rows, cols, gh, gw = masks.shape
    DARK, LIGHT, PAPER = 40, 225, 255             # masked cell, visible cell, background
    H, W = gh * cell, gw * cell
    sheet = np.full((gap + rows * (H + gap), gap + cols * (W + gap)), PAPER, np.uint8)
    for r in range(rows):
        for c in range(cols):
            tile = np.where(masks[r, c], DARK, LIGHT).astype(np.uint8)
            y, x = gap + r * (H + gap), gap + c * (W + gap)
            sheet[y:y + H, x:x + W] = tile.repeat(cell, 0).repeat(cell, 1)   # nearest upsampling
    return Image.fromarray(sheet, mode="L")


def sheet(args) -> str:
    if args.strategy == "block":
        gen = MaskGenerator(args.strategy, (args.crop, args.crop), seed=args.seed)
        masks = gen.batch(args.rows * args.cols)[0].reshape(args.rows, args.cols, *gen.grid)
    else:
        gen = MaskGenerator(args.strategy, (args.frames, args.crop, args.crop), seed=args.seed)
        inp, tgt = gen.batch(args.rows)
        masks = tgt if args.view == "target" else inp
    render_sheet(masks, cell=args.cell).save(args.out_file, optimize=True)
    print(f"{gen.strategy}: grid {gen.grid}, {gen.num_masked} cells per masked frame, masked token steps "
          f"{gen.length_range}, seed {gen.seed}\nwrote {args.out_file}: {masks.shape[0]} rows x {masks.shape[1]} "
          f"cells, "
          f"masked = dark")
    return args.out_file


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Write a PNG sheet of sample masks: one row per sample, "
                                 "one cell per frame (target view) or token step (input view), "
                                 "masked cells dark. Images ('block'): --cols samples per row.")
    ap.add_argument("--strategy", default="tube", choices=STRATEGIES, help="the masking strategy (masking.py; "
                    "tube for clips, block for images; default tube)")
    ap.add_argument("--out-file", required=True, metavar="PNG", help="the picture to write")
    ap.add_argument("--frames", type=int, default=16, help="T, clip length in frames (§4: 16)")
    ap.add_argument("--crop", type=int, default=224, help="crop size in pixels, a multiple of 16 (§4: 224)")
    ap.add_argument("--rows", type=int, default=6, help="samples (rows)")
    ap.add_argument("--cols", type=int, default=8, help="'block' only: image samples per row")
    ap.add_argument("--view", choices=("target", "input"), default="target",
                    help="clips: T frames (target) or T/2 token steps (input)")
    ap.add_argument("--cell", type=int, default=4, help="pixels per tokenizer cell")
    ap.add_argument("--seed", type=int, default=0, help="seed of the masks (default 0)")
    return ap


def main(argv=None):
    return train.run_cli(PROG, sheet, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
