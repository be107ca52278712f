"""Confusion matrices of a finetune run as pictures: the row-normalised matrix of every
evaluation in <run>/eval.json (written by finetune.py), one PNG each.

    python tools/confusion.py runs/finetune/motion [runs/finetune/appearance ...]

writes <run>/confusion_<weights>_<mode>.png (weights: model or ema; mode: normal,
single-frame, shuffle), labelled with the class names eval.json stores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import numpy as np  # noqa: E402

import train  # noqa: E402


def save_confusion_png(conf, path: str, classes: Optional[list] = None, title: str = "") -> None:
    """Row-normalised confusion matrix as a PNG (Pillow only): white = 0, dark blue = 1,
    rows = true class, columns = prediction; counts written in the cells when they fit."""
    from PIL import Image, ImageDraw
    conf = np.asarray(conf, dtype=np.float64)
    K = conf.shape[0]
    cell = int(max(3, min(48, 720 // max(K, 1))))
    names = list(classes) if classes and len(classes) == K and K <= 60 else [str(i) for i in range(K)]
    label_w = 8 + 6 * max(len(n) for n in names) if cell >= 10 else 0
    top = 24 + (label_w if cell >= 10 else 0)
    W, H = label_w + K * cell + 10, top + K * cell + 10
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black")
    rows = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    for i in range(K):
        for j in range(K):
            v = rows[i, j]
            colour = (int(255 * (1 - v) + 20 * v), int(255 * (1 - v) + 60 * v), int(255 * (1 - v) + 140 * v))
            x0, y0 = label_w + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=colour, outline=(200, 200, 200))
            if cell >= 24 and conf[i, j]:
                draw.text((x0 + 3, y0 + cell // 3), str(int(conf[i, j])), fill="white" if v > 0.5 else "black")
    if cell >= 10:
        for i, n in enumerate(names):
            draw.text((4, top + i * cell + cell // 3), n, fill="black")                     # true class
            col = Image.new("RGB", (label_w, 12), "white")
            ImageDraw.Draw(col).text((2, 0), n, fill="black")
            img.paste(col.rotate(90, expand=True), (label_w + i * cell + (cell - 12) // 2, 24))   # predicted
    img.save(path)


def draw_run(run_dir: str) -> list:
    """Every evaluation of run_dir/eval.json as confusion_<weights>_<mode>.png; returns the paths."""
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir} holds no eval.json (a finetune.py run folder, e.g. runs/finetune/motion)")
    with open(path) as f:
        ev = json.load(f)
    name, written = os.path.basename(os.path.normpath(run_dir)), []
    for which, res in ev["results"].items():
        for mode, m in res.items():
            out = os.path.join(run_dir, f"confusion_{which}_{mode}.png")
            save_confusion_png(m["confusion"], out, ev.get("classes"), f"{name} {which} {mode}: top-1 {m['top1']:.1f}%")
            written.append(out)
    return written


def run(run_dirs: list) -> list:
    written = [p for d in run_dirs for p in draw_run(d)]
    print("\n".join(written))
    return written


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="confusion.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finetune.py run folders (<out>/<task>)")
    return ap


def main(argv=None) -> list:
    return train.run_cli("confusion.py", run, build_parser().parse_args(argv).run_dirs)


if __name__ == "__main__":
    main()
