"""Training curves of runs, drawn from their metrics.jsonl (Pillow and numpy only).

    python tools/plot.py runs/bevt/joint                       # -> runs/bevt/joint/curves.png
    python tools/plot.py runs/bevt                             # a run root: each stage folder's curves.png
    python tools/plot.py runs/cpu/image runs/cpu/joint --out-file cmp.png [--smooth 20]

train.py and finetune.py write metrics.jsonl and print the first command at the end of a run,
as TensorBoard is pointed at a log folder. One run folder: its curves.png, titled from its
config.json (a pretraining stage or a finetuning task), smoothed over 20 steps or 1/300 of
the steps logged when that is more. A run root (train.py's or finetune.py's --out): the same
for each stage or task folder under it that holds a metrics.jsonl. Several folders: one
picture comparing them (--out-file).

One PNG, panels on a shared step axis: loss (total and per stream), masked-token
accuracy per stream with its two "chance" baselines (the end-of-run `baselines` row),
finetuning accuracy (train and validation top-1), learning rate, gradient norm. A panel
or series is drawn only where the rows hold it: the image stage has no acc_mvm, so its
accuracy panel has one line, never a flat line of zeros. One run: colour = series.
Several runs: colour = run (legend at the top), line style = series (legend in each
panel). Noisy series are drawn as a trailing mean over `smooth` steps, the per-step
values faint behind them.
"""
import argparse
import json
import math
import os
import sys
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

from train import read_metrics, run_cli   # noqa: E402

CURVE_W = 1400                      # picture width: two columns of panels
CURVE_PANEL_H = 360                 # height of one row of panels
CURVE_HEADER_H = 48                 # title line
CURVE_RUN_LINE_H = 26               # one line of run names below the title

# (panel title, y-axis label, ((row key, legend label), ...)) in drawing order.
CURVE_PANELS = (
    ("loss", "loss", (("loss", "total"), ("loss_mim", "MIM (image)"), ("loss_mvm", "MVM (video)"))),
    ("masked-token accuracy", "accuracy (%)", (("acc_mim", "MIM (image)"), ("acc_mvm", "MVM (video)"))),
    ("classification accuracy", "top-1 (%)", (("acc", "train"),)),   # + validation top-1 from the eval rows
    ("learning rate", "learning rate", (("lr", "lr"),)),
    ("gradient norm", "norm before clipping", (("grad_norm", "gradient norm"),)),
)
CURVE_PERCENT = ("acc_mim", "acc_mvm", "acc")   # logged as fractions, drawn in % (the eval rows' top-1 already is)
CURVE_RAW = ("lr",)                             # exact values: never smoothed

# One run: a fixed colour per series, so the same stream has the same colour in every picture.
SERIES_COLOURS = {"loss": (40, 40, 40), "loss_mim": (31, 119, 180), "loss_mvm": (255, 127, 14),
                  "acc_mim": (31, 119, 180), "acc_mvm": (255, 127, 14), "acc": (44, 160, 44),
                  "lr": (148, 103, 189), "grad_norm": (140, 86, 75)}
VAL_COLOURS = ((214, 39, 40), (23, 190, 207), (227, 119, 194), (188, 189, 34))
# Several runs: a colour per run (the tab10 palette without its grey), cycled past nine runs.
RUN_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207))
# Several runs: the line style tells the series apart (pixels on, pixels off; None = solid), the same
# in every panel: total solid, MIM long dashes, MVM short dashes.
SERIES_DASH = {"loss_mim": (10, 5), "loss_mvm": (3, 3), "acc_mim": (10, 5), "acc_mvm": (3, 3)}
BASELINE_DASH = (5, 5)
BASELINE_GREY = (110, 110, 110)
MARKERS = ("circle", "square", "triangle", "diamond")




def curve_data(rows: list) -> dict:
    """Split the rows of one metrics.jsonl into what the picture draws.

    Returns {"train": {key: (steps, values)}, "val": {(weights, mode): (steps, top1 %)},
    "baselines": {acc key: {name: fraction}}}. Training rows are the rows without
    "eval" and "baselines"; a step logged twice (a log appended to by a resumed run
    that start_log did not trim) keeps its later row, and so do the evaluation rows.
    Values that are not finite numbers are dropped, point by point.
    """
    train_rows, evals, baselines = [], {}, {}
    for r in rows:
        if not isinstance(r.get("step"), (int, float)):
            continue
        if isinstance(r.get("baselines"), dict):
            baselines = r["baselines"]                          # the last one is the run's final word
        elif isinstance(r.get("eval"), dict):
            evals[r["step"]] = r["eval"]
        else:
            while train_rows and train_rows[-1]["step"] >= r["step"]:
                train_rows.pop()                                 # superseded by a resumed run
            train_rows.append(r)

    def finite(pairs):
        pairs = [(s, float(v)) for s, v in pairs
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        return (np.array([s for s, _ in pairs], dtype=np.float64), np.array([v for _, v in pairs], dtype=np.float64))

    out = {"train": {}, "val": {}, "baselines": {}}
    for _, _, keys in CURVE_PANELS:
        for key, _ in keys:
            s, v = finite((r["step"], r.get(key)) for r in train_rows)
            if len(s):                                           # absent from every row: no series at all
                out["train"][key] = (s, v * 100 if key in CURVE_PERCENT else v)
    pairs = {}
    for step in sorted(evals):
        for weights, modes in evals[step].items():
            for mode, m in (modes.items() if isinstance(modes, dict) else ()):
                if isinstance(m, dict):
                    pairs.setdefault((weights, mode), []).append((step, m.get("top1")))
    for wm, p in pairs.items():
        s, v = finite(p)
        if len(s):
            out["val"][wm] = (s, v)
    for key, b in baselines.items():
        if isinstance(b, dict):
            b = {k: float(v) for k, v in b.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            if b:
                out["baselines"][key] = b
    return out


def moving_average(steps: np.ndarray, values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last `window` steps: at step s, the mean of the values logged at
    steps in (s - window, s]. Counted in steps, not rows, so a log written every 10 steps
    is smoothed over the same stretch of training as one written every step."""
    if window <= 1 or len(values) == 0:
        return values
    csum = np.concatenate([[0.0], np.cumsum(values)])
    hi = np.arange(1, len(values) + 1)
    lo = np.searchsorted(steps, steps - window, side="right")   # first row inside the window
    return (csum[hi] - csum[lo]) / (hi - lo)


def nice_ticks(lo: float, hi: float, target: int = 5, expand: bool = True, min_step: float = 0.0):
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi].

    expand=True widens the limits to the outer ticks (the y axes); expand=False keeps
    [lo, hi] and returns the ticks inside it (the step axis, whose ticks are whole
    steps: min_step=1). Returns (ticks, lo, hi).
    """
    if not hi - lo > 1e-12 * max(1.0, abs(lo), abs(hi)):        # one value: a band around it
        pad = abs(hi) * 0.05
        lo, hi = (lo - pad, hi + pad) if pad else (0.0, 1.0)     # all zeros (accuracy at step 1): 0..1
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    if step < min_step:
        step = min_step
    elif min_step >= 1 and step != int(step):                    # 2.5 steps: no such step
        step = 2 * step if step * 2 == int(step * 2) else math.ceil(step)
    if expand:
        lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    ticks = [k * step for k in range(first, last + 1)]
    return ticks, lo, hi


def tick_labels(ticks: list) -> list:
    """Labels with as few decimals as the ticks need; scientific notation for tiny or huge values."""
    if not ticks:
        return []
    big = max(abs(t) for t in ticks)
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else big or 1.0
    d = next((d for d in range(7) if all(abs(round(t, d) - t) <= step * 1e-6 for t in ticks)), 7)
    if d <= 4 and big < 1e6:
        return [f"{t:.{d}f}".replace("-0", "0") if round(t, d) == 0 else f"{t:.{d}f}" for t in ticks]
    out = []
    for t in ticks:                                              # 2.5e-05 -> 2.5e-5, 1e+06 -> 1e6
        m, e = f"{t:.3e}".split("e")
        out.append("0" if abs(t) < step * 1e-6 else f"{m.rstrip('0').rstrip('.')}e{int(e)}")
    return out


_FONTS = {}


def curve_font(size: int, bold: bool = False):
    """DejaVu Sans (installed on most Linux systems) or Pillow's own scalable font (Pillow >= 10.1)."""
    if (size, bold) not in _FONTS:
        from PIL import ImageFont
        font = None
        for name in (("DejaVuSans-Bold.ttf", "DejaVuSans.ttf") if bold else ("DejaVuSans.ttf",)):
            try:
                font = ImageFont.truetype(name, size)
                break
            except OSError:
                pass
        if font is None:
            try:
                font = ImageFont.load_default(size=size)
            except TypeError:                                    # Pillow < 10.1: the small bitmap font
                font = ImageFont.load_default()
        _FONTS[size, bold] = font
    return _FONTS[size, bold]


def _text_size(draw, s: str, font) -> tuple:
    x0, y0, x1, y1 = draw.textbbox((0, 0), s, font=font)
    return x1 - x0, y1 - y0


def _text(draw, xy, s: str, font, fill, align: str = "left", valign: str = "top", halo: int = 0) -> tuple:
    """Text placed by its ink box (no anchors: the bitmap fallback font has none); returns the box.
    halo > 0: a white outline of that width, to stay readable where it crosses a line."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), s, font=font)
    w, h = x1 - x0, y1 - y0
    x = xy[0] - {"left": 0, "center": w / 2, "right": w}[align]
    y = xy[1] - {"top": 0, "middle": h / 2, "bottom": h}[valign]
    halo_kw = {"stroke_width": halo, "stroke_fill": (255, 255, 255)} if halo else {}
    draw.text((x - x0, y - y0), s, font=font, fill=fill, **halo_kw)
    return (x, y, x + w, y + h)


def _polyline(draw, pts: list, fill, width: int, dash=None) -> None:
    """A polyline, solid or dashed (dash = (on, off) pixels along its length)."""
    if len(pts) == 1:
        x, y = pts[0]
        r = max(2, width + 1)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)    # one row: a dot, not nothing
        return
    if dash is None:
        draw.line(pts, fill=fill, width=width, joint="curve" if width > 1 and len(pts) < 3000 else None)
        return
    # Resample at 1-pixel steps along the line and keep the "on" part of each period.
    p = np.asarray(pts, dtype=np.float64)
    seg = np.hypot(*(p[1:] - p[:-1]).T)                          # (n-1,) segment lengths
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    if arc[-1] == 0:
        return
    t = np.arange(0.0, arc[-1] + 1.0, 1.0)
    xs, ys = np.interp(t, arc, p[:, 0]), np.interp(t, arc, p[:, 1])
    on = (t % (dash[0] + dash[1])) < dash[0]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(np.int8), [0]])))   # starts, ends of runs
    for a, b in zip(edges[::2], edges[1::2]):
        if b - a >= 2:
            draw.line(list(zip(xs[a:b], ys[a:b])), fill=fill, width=width)


def _marker(draw, x: float, y: float, shape: str, fill, r: int = 5) -> None:
    outline = tuple(int(c * 0.6) for c in fill)
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=outline)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill, outline=outline)
    elif shape == "triangle":
        draw.polygon([(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)], fill=fill, outline=outline)
    else:
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=fill, outline=outline)


def _faint(colour: tuple, alpha: float = 0.28) -> tuple:
    """The colour at `alpha` over white: the per-step values behind a smoothed line."""
    return tuple(int(round(255 - alpha * (255 - c))) for c in colour)


def draw_curves(runs: dict, path: str, title: str = "", baselines: Optional[dict] = None, smooth: int = 20) -> dict:
    """Draw the metrics rows of one or more runs ({name: rows}) into one PNG at `path`.

    `baselines` ({"acc_mim": {"uniform": 0.0039, "majority": 0.031}, ...}, fractions)
    are drawn as labelled dashed lines in the accuracy panel, together with those of
    each run's own {"step", "baselines"} row. The PNG is written to a temporary file
    in the same folder and renamed, so a reader never sees half a picture. Returns
    what was drawn: {"size", "runs": {name: colour (None: one run, colour = series)},
    "panels": [{"title", "box" (plot area, pixels), "xrange", "yrange" (its data limits),
    "series": [{"run", "key", "label", "colour", "n" points}], "baselines": [...]}]}.
    """
    from PIL import Image, ImageDraw
    smooth = max(1, int(smooth))
    names = list(runs)
    data_ = {n: curve_data(runs[n]) for n in names}
    several = len(names) > 1
    run_colour = {n: RUN_COLOURS[i % len(RUN_COLOURS)] for i, n in enumerate(names)}

    # --- what to draw: panels, their series and the shared step range
    panels = []
    for ptitle, ylabel, keys in CURVE_PANELS:
        series = []
        for key, label in keys:
            for n in names:
                if key in data_[n]["train"]:
                    s, v = data_[n]["train"][key]
                    series.append({"run": n, "key": key, "label": label, "s": s, "v": v, "marker": None,
                                   "smooth": key not in CURVE_RAW and smooth > 1})
        if ptitle == "classification accuracy":
            wms = sorted({wm for n in names for wm in data_[n]["val"]},
                         key=lambda wm: (wm[0] != "model", wm[0], wm[1] != "normal", wm[1]))
            for i, wm in enumerate(wms):
                for n in names:
                    if wm in data_[n]["val"]:
                        s, v = data_[n]["val"][wm]
                        series.append({"run": n, "key": f"val_top1/{wm[0]}/{wm[1]}",
                                       "label": f"val top-1 ({wm[0]}, {wm[1]})", "s": s, "v": v,
                                       "marker": MARKERS[i % len(MARKERS)], "val_index": i, "smooth": False})
        if not series:
            continue                                             # nothing of this panel in any row
        for sr in series:
            if several:
                sr["colour"] = run_colour[sr["run"]]
                sr["dash"] = SERIES_DASH.get(sr["key"])
            else:
                sr["colour"] = (SERIES_COLOURS[sr["key"]] if sr["marker"] is None
                                else VAL_COLOURS[sr["val_index"] % len(VAL_COLOURS)])
                sr["dash"] = None
            sr["line"] = moving_average(sr["s"], sr["v"], smooth) if sr["smooth"] else sr["v"]
        # The image stage logs loss == loss_mim (and the video stage loss == loss_mvm when λ = 1):
        # two identical lines would hide each other. One run: the total stays, its legend says
        # "= MIM". Several runs: the stream's line stays, in the style of the other runs' MIM.
        for n in names:
            mine = {sr["key"]: sr for sr in series if sr["run"] == n}
            streams = [k for k in ("loss_mim", "loss_mvm") if k in mine]
            if "loss" in mine and len(streams) == 1:
                a, b = mine["loss"], mine[streams[0]]
                if len(a["s"]) == len(b["s"]) and np.allclose(a["v"], b["v"], rtol=1e-6, atol=1e-9):
                    series.remove(a if several else b)
                    a["label"] = f"total (= {b['label'].split()[0]})"
        bl = []
        if ptitle == "masked-token accuracy":
            bl = _collect_baselines(baselines, data_, names, {sr["key"] for sr in series}, several, run_colour)
        panels.append({"title": ptitle, "ylabel": ylabel, "series": series, "baselines": bl})
    if not panels:
        raise ValueError(f"nothing to draw: no training or evaluation rows in {', '.join(names) or 'no runs'}")
    all_steps = np.concatenate([sr["s"] for p in panels for sr in p["series"]])
    xmax = float(all_steps.max())
    xmin = float(all_steps.min())
    xmin = 0.0 if xmin >= 0 and xmin <= 0.1 * xmax else xmin    # start at 0 unless the log starts late
    if xmax - xmin < 1:                                          # one step: centre it
        xmin, xmax = max(0.0, xmin - 1), xmin + 1
    xticks, _, _ = nice_ticks(xmin, xmax, target=6, expand=False, min_step=1)
    xlab = [f"{t / 1000:g}k" if t else "0" for t in xticks] if xmax >= 10000 else [f"{t:g}" for t in xticks]

    # --- canvas: title, run legend, panel grid
    img = Image.new("RGB", (CURVE_W, 10), "white")
    draw = ImageDraw.Draw(img)
    f_title, f_panel, f_small = curve_font(22, True), curve_font(16, True), curve_font(13)
    f_tick, f_label = curve_font(13), curve_font(14)
    run_lines, x = [[]], 16                                      # wrap the run names into lines
    for n in names:
        w = 34 + _text_size(draw, n, f_label)[0] + 24
        if x + w > CURVE_W - 16 and run_lines[-1]:
            run_lines.append([])
            x = 16
        run_lines[-1].append((x, n))
        x += w
    header = CURVE_HEADER_H + CURVE_RUN_LINE_H * len(run_lines)
    cols = 2
    rows_n = (len(panels) + cols - 1) // cols
    W, H = CURVE_W, header + rows_n * CURVE_PANEL_H
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    _text(draw, (16, 12), title or "training curves", f_title, (0, 0, 0))
    for li, line in enumerate(run_lines):
        y = CURVE_HEADER_H + li * CURVE_RUN_LINE_H + 10
        for x, n in line:
            if several:
                draw.line([(x, y), (x + 26, y)], fill=run_colour[n], width=4)
                _text(draw, (x + 34, y), n, f_label, (0, 0, 0), valign="middle")
            else:
                _text(draw, (x, y), f"run: {n}", f_label, (70, 70, 70), valign="middle")

    # Legends first (their height sets the top margin of every panel, so the plots line up).
    pw_outer = W // cols
    left, right, bottom = 86, 24, 54
    plot_w = pw_outer - left - right
    for p in panels:
        p["legend"] = _legend_entries(p, several)
        p["legend_rows"] = _legend_layout(draw, p["legend"], f_small, plot_w)
    n_leg = min(3, max(len(p["legend_rows"]) for p in panels))
    top = 34 + 20 * n_leg + 6
    plot_h = CURVE_PANEL_H - top - bottom

    record = {"size": (W, H), "runs": dict(run_colour) if several else {n: None for n in names}, "panels": []}
    for pi, p in enumerate(panels):
        ox, oy = (pi % cols) * pw_outer, header + (pi // cols) * CURVE_PANEL_H
        x0, y0 = ox + left, oy + top
        x1, y1 = x0 + plot_w, y0 + plot_h
        # y range: every smoothed point, the per-step values but for the top and bottom 1 %
        # (a few wild steps must not flatten the curve; they are clipped), evaluation
        # markers and baselines.
        vals = []
        for sr in p["series"]:
            vals.append(sr["line"])
            vals.append(np.quantile(sr["v"], [0.01, 0.99]) if sr["smooth"] else sr["v"])
        vals.append(np.array([b["value"] for b in p["baselines"]], dtype=np.float64))
        allv = np.concatenate(vals)
        lo, hi = float(allv.min()), float(allv.max())
        if p["title"] in ("learning rate", "masked-token accuracy", "classification accuracy"):
            lo = min(lo, 0.0)                                    # rates and accuracies read from 0
        yticks, ylo, yhi = nice_ticks(lo, hi, target=5, expand=True)

        def X(s):
            return (np.asarray(s, dtype=np.float64) - xmin) / (xmax - xmin) * (plot_w - 1)

        def Y(v):
            return (plot_h - 1) - (np.asarray(v, dtype=np.float64) - ylo) / (yhi - ylo) * (plot_h - 1)

        # The plot area is drawn on its own image and pasted: lines leaving it are clipped.
        plot = Image.new("RGB", (plot_w, plot_h), "white")
        pd = ImageDraw.Draw(plot)
        for t in yticks:
            pd.line([(0, float(Y(t))), (plot_w, float(Y(t)))], fill=(232, 232, 232))
        for t in xticks:
            pd.line([(float(X(t)), 0), (float(X(t)), plot_h)], fill=(232, 232, 232))
        for sr in p["series"]:                                   # per-step values, faint, beneath everything
            if sr["smooth"] and len(sr["v"]) > 1:
                pd.line(list(zip(X(sr["s"]), Y(sr["v"]))), fill=_faint(sr["colour"], 0.18 if several else 0.28),
                        width=1)
        for b in p["baselines"]:
            yb = float(Y(b["value"]))
            _polyline(pd, [(0, yb), (plot_w - 1, yb)], b["colour"], 1, BASELINE_DASH)
        for sr in p["series"]:
            if sr["marker"] is None:
                xs, ys = X(sr["s"]), Y(sr["line"])
                stride = max(1, len(xs) // (2 * plot_w))         # more points than pixels: thin them out
                idx = np.r_[np.arange(0, len(xs) - 1, stride), len(xs) - 1] if stride > 1 else slice(None)
                _polyline(pd, list(zip(xs[idx], ys[idx])), sr["colour"], 2, sr["dash"])
        # Baseline labels last, in a thin white outline: readable across a line, hiding only its glyphs' pixels.
        _baseline_labels(pd, p["baselines"], [float(Y(b["value"])) for b in p["baselines"]], plot_w - 8, f_small)
        img.paste(plot, (x0, y0))
        # Evaluation markers and labels go on the main image, so a marker at the last step shows whole.
        for sr in p["series"]:
            if sr["marker"] is not None:
                xs, ys = X(sr["s"]) + x0, Y(sr["v"]) + y0
                if len(xs) > 1:
                    draw.line(list(zip(xs, ys)), fill=sr["colour"], width=1)
                for xm, ym in zip(xs, ys):
                    _marker(draw, float(xm), float(ym), sr["marker"], sr["colour"])
        # Frame, ticks, tick labels, axis labels.
        draw.rectangle([x0 - 1, y0 - 1, x1, y1], outline=(90, 90, 90))
        for t, s in zip(yticks, tick_labels(yticks)):
            yt = y0 + float(Y(t))
            draw.line([(x0 - 6, yt), (x0 - 1, yt)], fill=(90, 90, 90))
            _text(draw, (x0 - 9, yt), s, f_tick, (40, 40, 40), align="right", valign="middle")
        for t, s in zip(xticks, xlab):
            xt = x0 + float(X(t))
            draw.line([(xt, y1), (xt, y1 + 5)], fill=(90, 90, 90))
            _text(draw, (xt, y1 + 9), s, f_tick, (40, 40, 40), align="center")
        _text(draw, ((x0 + x1) / 2, y1 + 29), "step", f_label, (40, 40, 40), align="center")
        _vertical_text(img, p["ylabel"], f_label, ox + 10, (y0 + y1) / 2)
        # Title (with the smoothing window where there is one) and the legend rows.
        tb = _text(draw, (x0, oy + 10), p["title"], f_panel, (0, 0, 0))
        if any(sr["smooth"] for sr in p["series"]):
            _text(draw, (tb[2] + 10, tb[3]), f"lines: mean of the last {smooth} steps; faint: every step",
                  f_small, (110, 110, 110), valign="bottom")
        for li, row in enumerate(p["legend_rows"][:n_leg]):
            ly = oy + 34 + 20 * li + 8
            for lx, e in row:
                ex = x0 + lx
                if e["marker"]:
                    _marker(draw, ex + 13, ly, e["marker"], e["colour"], r=4)
                else:
                    _polyline(draw, [(ex, ly), (ex + 26, ly)], e["colour"], 2, e["dash"])
                _text(draw, (ex + 32, ly), e["label"], f_small, (40, 40, 40), valign="middle")
        record["panels"].append({
            "title": p["title"], "box": (x0, y0, x1, y1), "xrange": (xmin, xmax), "yrange": (ylo, yhi),
            "series": [{"run": sr["run"], "key": sr["key"], "label": sr["label"], "colour": sr["colour"],
                        "n": len(sr["s"])} for sr in p["series"]],
            "baselines": [{k: b[k] for k in ("key", "name", "value", "label")} for b in p["baselines"]]})

    # Atomic write: a temporary file in the same folder (same file system), then a rename.
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return record


def _collect_baselines(given: Optional[dict], data_: dict, names: list, keys: set, several: bool,
                       run_colour: dict) -> list:
    """The baselines of the drawn accuracy series: the `baselines` argument and each run's own row.

    The same (kind, value) for both streams (uniform 1/vocab, one vocabulary) is one
    line; a value that only some of several runs have is drawn in the first one's colour.
    """
    found = {}                                                   # (key, name, value %) -> runs (None: given)
    sources = [(None, given or {})] + [(n, data_[n]["baselines"]) for n in names]
    for run, b in sources:
        for key, kinds in b.items():
            if key not in keys or not isinstance(kinds, dict):
                continue                                         # a stream that is not drawn has no baseline
            for name, v in kinds.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    found.setdefault((key, name, round(100.0 * v, 6)), []).append(run)
    merged = {}                                                  # (name, value) -> keys
    for key, name, value in found:
        merged.setdefault((name, value), []).append(key)
    out = []
    for (name, value), ks in sorted(merged.items(), key=lambda kv: kv[0][1]):
        runs_ = {r for k in ks for r in found[(k, name, value)]}
        stream = "" if len(ks) > 1 or len(keys) == 1 else f" {ks[0][4:].upper()}"
        colour = BASELINE_GREY
        if several and len(runs_) == 1 and None not in runs_:
            colour = run_colour[next(iter(runs_))]               # one run's own: in its colour
        out.append({"key": "+".join(sorted(ks)), "name": name, "value": value, "colour": colour,
                    "label": f"{name}{stream} {value:.2f}%"})
    return out


def _baseline_labels(draw, bl: list, ys: list, x_right: float, font) -> None:
    """Labels just above their lines, right-aligned, pushed up where two would overlap."""
    floor_ = None
    for b, y in sorted(zip(bl, ys), key=lambda t: -t[1]):       # lowest line first
        h = _text_size(draw, b["label"], font)[1]
        bottom = y - 3 if floor_ is None else min(y - 3, floor_ - 3)
        bottom = max(bottom, h + 4)                              # inside the plot
        _text(draw, (x_right, bottom), b["label"], font, b["colour"], align="right", valign="bottom", halo=2)
        floor_ = bottom - h - 1


def _legend_entries(p: dict, several: bool) -> list:
    """One entry per drawn series; with several runs, one per series kind in black (colour = run)."""
    out, seen = [], set()
    for sr in p["series"]:
        ident = sr["key"] if several else (sr["key"], sr["run"])
        if ident in seen:
            continue
        seen.add(ident)
        colour = (40, 40, 40) if several else sr["colour"]
        label = sr["label"]
        if sr["marker"] is not None and not several:             # the latest evaluation, in numbers
            label += f": {sr['v'][-1]:.1f}"
        out.append({"label": label, "colour": colour, "dash": sr["dash"], "marker": sr["marker"]})
    if len(out) == 1 and out[0]["label"] in ("total", "lr", "gradient norm"):
        return []                                                # the panel title says it all
    return out


def _legend_layout(draw, entries: list, font, width: int) -> list:
    rows, x = [[]], 0
    for e in entries:
        w = 32 + _text_size(draw, e["label"], font)[0] + 22
        if x + w > width and rows[-1]:
            rows.append([])
            x = 0
        rows[-1].append((x, e))
        x += w
    return rows


def _vertical_text(img, s: str, font, x: float, y_mid: float, fill=(40, 40, 40)) -> None:
    """Text rotated 90° (bottom to top), its left edge at x, centred on y_mid."""
    from PIL import Image, ImageDraw
    probe = ImageDraw.Draw(img)
    x0, y0, x1, y1 = probe.textbbox((0, 0), s, font=font)
    mask = Image.new("L", (x1 - x0 + 2, y1 - y0 + 2), 0)
    ImageDraw.Draw(mask).text((1 - x0, 1 - y0), s, font=font, fill=255)
    mask = mask.rotate(90, expand=True)
    top = int(y_mid - mask.size[1] / 2)
    img.paste(fill, (int(x), top, int(x) + mask.size[0], top + mask.size[1]), mask)


STAGE_ORDER = ("image", "video", "joint")     # a pretraining run root's folders, in the order they run


def run_folders(path: str) -> list:
    """The run folders `path` names: itself if it holds a metrics.jsonl, else the folders under it that do
    (a run root: train.py's <out>/<stage>, finetune.py's <out>/<task>), pretraining stages in their order."""
    if os.path.isfile(os.path.join(path, "metrics.jsonl")) or not os.path.isdir(path):
        return [path]
    found = sorted((d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "metrics.jsonl"))),
                   key=lambda d: (STAGE_ORDER.index(d) if d in STAGE_ORDER else len(STAGE_ORDER), d))
    return [os.path.join(path, d) for d in found] or [path]      # none: plot_runs names the folder


def plot_runs(run_dirs: list, out: str, smooth: int = 20, title: str = "", baselines: Optional[dict] = None) -> dict:
    """Read <dir>/metrics.jsonl of each run folder and draw them together into `out`."""
    runs = {}
    for d in run_dirs:
        path = os.path.join(d, "metrics.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"{d}: no metrics.jsonl there nor in a folder under it; expected a run folder "
                             f"(e.g. runs/bevt/joint) or a run root (e.g. runs/bevt)")
        name = os.path.normpath(d)
        k = 2
        while name in runs:                                      # the same folder twice: keep both
            name = f"{os.path.normpath(d)} ({k})"
            k += 1
        runs[name] = read_run(path)
    return draw_curves(runs, out, title=title, baselines=baselines, smooth=smooth)


def read_run(path: str) -> list:
    """train.read_metrics's rows of one metrics.jsonl, saying in one line how many lines it skipped."""
    rows = read_metrics(path)
    with open(path, errors="replace") as f:
        lines = sum(1 for line in f if line.strip())
    if lines > len(rows):
        print(f"plot.py: skipped {lines - len(rows)} of the {lines} lines of {path} (not a JSON object with a step: "
              f"torn or garbage)", file=sys.stderr)
    return rows


def run_title(run_dir: str) -> str:
    """The title of one run folder's picture, from its config.json: a pretraining stage or a finetuning task."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return ""
    if not isinstance(cfg, dict):
        return ""
    if "stage" in cfg:
        return f"BEVT {cfg['stage']} stage, {cfg.get('model')} ({run_dir})"
    return f"finetune {os.path.basename(os.path.normpath(run_dir))}, {cfg.get('model')} ({run_dir})"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run folder holding a metrics.jsonl "
                    "(e.g. runs/bevt/joint) or a run root (e.g. runs/bevt: each stage or task folder under it); "
                    "with --out-file, all of them overlaid in distinct colours")
    ap.add_argument("--out-file", metavar="PNG", help="one picture comparing every run, written atomically "
                    "(default: each run folder's own curves.png; needed to compare runs named separately)")
    ap.add_argument("--smooth", type=int, help="trailing mean over this many steps for the noisy series "
                    "(1 = no smoothing; default 20, or 1/300 of the steps logged for one run folder)")
    ap.add_argument("--title", default="", help="title of the picture (default: the run's stage or task)")
    return ap


def main(argv=None) -> list:
    """`python tools/plot.py RUN_DIR [RUN_DIR ...] [--out-file cmp.png] [--smooth N] [--title T]`: the records
    of the pictures written (one per run folder without --out-file, else one)."""
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.smooth is not None and a.smooth < 1:
        ap.error(f"--smooth must be >= 1, got {a.smooth}")
    if a.out_file is None and len(a.run_dirs) > 1:
        ap.error("--out-file is needed to compare several runs")
    folders = [f for d in a.run_dirs for f in run_folders(d)]
    jobs = [([f], None) for f in folders] if a.out_file is None else [(folders, a.out_file)]
    records = []
    for dirs, out in jobs:
        record = run_cli("plot.py", draw_runs, dirs, out, a.smooth, a.title)
        print(f"wrote {record['path']}: {len(record['panels'])} panels "
              f"({', '.join(p['title'] for p in record['panels'])}), {len(dirs)} run(s)")
        records.append(record)
    return records


def draw_runs(run_dirs: list, out: Optional[str], smooth: Optional[int], title: str) -> dict:
    """One folder without --out-file: its own curves.png, as the trainers drew it; else plot_runs into `out`."""
    if out is None:
        run_dir = run_dirs[0]
        out = os.path.join(run_dir, "curves.png")
        title = title or run_title(run_dir)
        if smooth is None:
            steps = [r["step"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))] \
                if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) else []
            smooth = max(20, int(max(steps, default=0)) // 300)
    record = plot_runs(run_dirs, out, smooth=smooth or 20, title=title)
    return {**record, "path": out}


if __name__ == "__main__":
    main()
