"""Mini reproductions of the paper's Tables 1, 2 and 8 on the synthetic set (cpu presets),
mean ± std over seeds; resumable cell by cell.

    python tools/tables.py --tables 1,2,8 --seeds 3 --out runs/tables      # -> runs/tables/tables.json, .png
    python tools/tables.py --tables 2 --seeds 5 --results assets/tables.json --chart assets/tables.png  # published

The synthetic set's appearance labels stand in for K400 (one frame tells the
class) and its motion labels for SSv2 / Diving48 (the class needs time). Every
pretraining uses the cpu preset of train.py and every finetune the cpu preset
of finetune.py: one recipe for all rows of a table.
  Table 1: scratch, BEVT-I (image stage), BEVT-V (video stage from scratch),
           BEVT (image stage, then joint) and, the question of Table 6, the
           joint stage from scratch; each by linear probe, k-NN and
           finetuning on both label sets. BEVT-V and both joint runs see the
           same videos: the video stage and the joint stage run the same
           number of steps on the same clip batch.
  Table 2: the BEVT finetunes evaluated normally, on single frames and on
           shuffled frames.
  Table 8: BEVT-V with each mask strategy, by linear probe and finetuning on
           the motion labels.
Results go cell by cell into a JSON file (a rerun skips the cells it holds),
and as mean ± std over seeds into a text table and a chart: under --out unless
--results / --chart name other files (the published ones are only written when
named). A file, and a run folder, hold one recipe: every flag that changes a
number (--max-steps, --pretrain-args, --finetune-args, another synthetic set)
is part of it and of every cell's key, and a file or folder made with another
recipe is refused, never mixed with.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import numpy as np  # noqa: E402

import data  # noqa: E402
import finetune  # noqa: E402
import train  # noqa: E402
from tools import extract, probe, synthetic  # noqa: E402


def comma_items(spec: str) -> list:
    """The items of a comma-separated flag value, stripped, empty ones dropped."""
    return [x.strip() for x in spec.split(",") if x.strip()]


@dataclass
class TablesConfig:
    tables: str = "1,2,8"                 # comma-separated subset of 1, 2, 8
    seeds: int = 3                        # seeds 0 .. seeds-1 (pretraining, finetuning and probe draws)
    out: str = "runs/tables"              # the runs: <out>/s<seed>/<pretraining>/<stage>, <out>/s<seed>/ft/...
    results: str = ""                     # the cells, a rerun skipping those there (none: <out>/tables.json)
    chart: str = ""                       # mean +- std over seeds as bars (none: <out>/tables.png)
    data: str = ""                        # the synthetic set (none: data/synthetic; python tools/synthetic.py)
    only_seeds: str = ""                  # comma-separated subset of the seeds to run now (e.g. "1,3"), so two
                                          # processes can share the work; the tables report every seed on file
    rows: str = ""                        # comma-separated rows to run now (e.g. "bevt-i,tube"; default all)
                                          # by Table 1 slug (scratch, bevt-i, bevt-v, bevt,
                                          # bevt-joint-from-scratch) or Table 8 strategy (tube, ..., random-3d)
    max_steps: int = 0                    # > 0: cap every pretraining and finetune (to try the plumbing)
    pretrain_args: str = ""               # extra train.py flags for every pretraining (part of the recipe)
    finetune_args: str = ""               # extra finetune.py flags for every finetune (part of the recipe)


TABLE1_ROWS = ("scratch", "BEVT-I", "BEVT-V", "BEVT", "BEVT, joint from scratch")
TABLE8_ROWS = ("tube", "tube-fixed", "tube-0.25-0.75", "tube-0.75-1.0", "frame-diff", "random-frame", "random-3d")
# Table 8's row names, as the paper prints them (Swin-T, BEVT-V, mask ratio 50%).
TABLE8_NAMES = {"tube": "Tube 0.5T-T", "tube-fixed": "Tube T", "tube-0.25-0.75": "Tube 0.25T-0.75T",
                "tube-0.75-1.0": "Tube 0.75T-1.0T", "frame-diff": "Frame-Diff", "random-frame": "Random-Frame",
                "random-3d": "Random-3D"}
# The paper's numbers beside ours (top-1 %): Table 1 / 6 (Swin-B; SSv2, Diving48, K400), Table 8
# (Swin-T; SSv2, K400), Table 2 (Swin-B; normal, single-frame, shuffle).
PAPER = {
    "1": {"scratch": None, "BEVT-I": (69.2, 81.2, 80.5), "BEVT-V": (67.1, 83.7, 76.2), "BEVT": (70.6, 86.7, 80.6),
          "BEVT, joint from scratch": (67.9, 85.1, 78.5)},
    "8": {"tube": (63.3, 71.6), "tube-fixed": (62.6, 71.2), "tube-0.25-0.75": (62.8, 69.5),
          "tube-0.75-1.0": (63.1, 71.6), "frame-diff": (62.9, 70.6), "random-frame": (62.6, 70.9),
          "random-3d": (59.1, 67.4)},
    "2": {"K400": (80.6, 65.3, 77.8), "SSv2": (66.3, 6.3, 19.0), "Diving48": (84.0, 13.8, 50.4)},
}


def tables_recipe(pretrain_args: str = "", finetune_args: str = "", max_steps: int = 0, data_dir: str = "") -> dict:
    """The recipe every cell depends on: both CPU presets, the pretraining stages' epochs, and what the
    flags change (recorded only where they differ from the default: recipe_variant)."""
    norm = lambda d: json.loads(json.dumps(d))                   # tuples -> lists, as stored in JSON
    recipe = {"synthetic_version": synthetic.SYNTHETIC_VERSION, "train": norm(train.CPU_PRESET),
              "stage_epochs": norm(train.CPU_STAGE_EPOCHS), "finetune": norm(finetune.CPU_PRESET)}
    return {**recipe, **recipe_variant(pretrain_args, finetune_args, max_steps, data_dir)}


def recipe_variant(pretrain_args: str, finetune_args: str, max_steps: int, data_dir: str) -> dict:
    """What the flags change in every cell, where it is not the default: extra flags of every run, the
    step cap, and a synthetic set made with other sizes (its DONE record)."""
    done = os.path.join(data_dir or "data/synthetic", synthetic.DONE_NAME)
    made = json.load(open(done)) if os.path.isfile(done) else None
    default = synthetic._syn_key(0, synthetic.SYN_TRAIN, synthetic.SYN_VAL, synthetic.SYN_IMAGES_TRAIN,
                                 synthetic.SYN_IMAGES_VAL, synthetic.SYN_FRAMES, synthetic.SYN_HEIGHT,
                                 synthetic.SYN_WIDTH)
    variant = {"pretrain_args": pretrain_args, "finetune_args": finetune_args, "max_steps": max_steps,
               "data": made if made != default else None}
    return {k: v for k, v in variant.items() if v}


def variant_tag(variant: dict) -> str:
    """The suffix of every cell key of a recipe variant: "" for the default recipe, else "|recipe-<digest>"."""
    if not variant:
        return ""
    return "|recipe-" + hashlib.sha256(json.dumps(variant, sort_keys=True).encode()).hexdigest()[:10]


def recipe_difference(on_file: dict, now: dict) -> str:
    """What differs between two recipes, in a few words: "max_steps 2 there, none now; finetune preset"."""
    out = []
    for k in sorted(set(on_file) | set(now)):
        a, b = on_file.get(k), now.get(k)
        if a != b:
            short = all(isinstance(v, (str, int, float, type(None))) for v in (a, b))
            out.append(f"{k} {a!r} there, {b!r} now" if short else f"{k} differs")
    return "; ".join(out)


def check_writable(*paths: str) -> None:
    """Fail at once, before any run, on a results or chart file that could not be written at the end."""
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(folder):                          # made later: its first existing parent
            folder = os.path.dirname(folder)
        if (os.path.exists(path) and not os.access(path, os.W_OK)) or not os.access(folder, os.W_OK):
            raise ValueError(f"{path} is read-only (or its folder is): name a file that can be written, "
                             f"e.g. --results {os.path.join('runs', 'tables.json')}")


def row_names(tables: tuple) -> dict:
    """{name accepted by --rows: row as the runner knows it} for the requested tables."""
    names = {"bevt": "BEVT"} if "2" in tables else {}
    names.update({_slug(r): r for r in TABLE1_ROWS} if "1" in tables else {})
    names.update({s: s for s in TABLE8_ROWS} if "8" in tables else {})
    return names


def _pretrainings(row: str) -> list:
    """The train.py runs a row's encoder needs, in order: [(run folder name, stage, extra flags)]."""
    if row == "scratch":
        return []
    if row == "BEVT-I":
        return [("bevt", "image", [])]
    if row == "BEVT":
        return [("bevt", "image", []), ("bevt", "joint", [])]        # joint starts from <run>/image/final.pt
    if row == "BEVT, joint from scratch":
        return [("joint-scratch", "joint", ["--init", "scratch"])]    # no image stage in that folder
    strategy = "tube" if row == "BEVT-V" else row
    name = "video" if strategy == "tube" else f"video-{strategy}"
    return [(name, "video", ["--mask-strategy", strategy])]


def record_cell(path: str, results: dict, key: str, value: dict, seconds: float) -> None:
    """Add one cell to results["cells"] and the results file: under a lock, re-read the file and merge,
    so processes running other seeds into the same file never drop each other's cells."""
    cells = results.setdefault("cells", {})
    cells[key] = {**value, "seconds": round(seconds, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lock = data.FileLock(path + ".lock")
    while lock.acquire() is not None:
        time.sleep(0.2)                                    # another process is writing its cell
    try:
        if os.path.exists(path):
            with open(path) as f:
                on_file = json.load(f).get("cells", {})
            cells.update({k: v for k, v in on_file.items() if k not in cells})
        train.write_atomic(path, json.dumps(results, indent=1, sort_keys=True))
    finally:
        lock.release()
    print(f"[cell] {key}: " + ", ".join(f"{k} {v:.3g}" for k, v in value.items() if isinstance(v, (int, float))),
          flush=True)


class CellStore:
    """A results file of cells made with one recipe (a file of another recipe is refused, never mixed
    in); `record` adds a cell (record_cell). recipe None: read the cells, check nothing."""

    def __init__(self, path: str, recipe: Optional[dict]):
        self.path, self.results = path, {"cells": {}}
        if os.path.exists(path):
            with open(path) as f:
                try:
                    self.results = json.load(f)
                except json.JSONDecodeError:
                    raise ValueError(f"{path} is not valid JSON (a torn write?); move it away to start again")
        self.cells = self.results.setdefault("cells", {})
        if recipe is not None:
            check_writable(path)
            on_file = self.results.setdefault("recipe", recipe)
            if on_file != recipe:
                raise ValueError(f"{path} holds cells made with another recipe ({recipe_difference(on_file, recipe)}"
                                 f"); pass another --results file")

    def record(self, key: str, value: dict, seconds: float) -> None:
        record_cell(self.path, self.results, key, value, seconds)


class Tables:
    """Runs and records the cells of the requested tables; see the section comment above."""

    def __init__(self, tcfg: TablesConfig):
        self.t = tcfg
        self.data = tcfg.data or "data/synthetic"
        self.path = tcfg.results or os.path.join(tcfg.out, "tables.json")
        self.chart = tcfg.chart or os.path.join(tcfg.out, "tables.png")
        check_writable(self.path, self.chart)
        self.results = {"cells": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                try:
                    self.results = json.load(f)
                except json.JSONDecodeError:
                    raise ValueError(f"{self.path} is not valid JSON (a torn write?); move it away to start again")
        self.cells = self.results.setdefault("cells", {})
        # Cells of one file come from one recipe: a file made with other presets or flags is not mixed in.
        self.recipe = tables_recipe(tcfg.pretrain_args, tcfg.finetune_args, tcfg.max_steps, tcfg.data)
        self.tag = variant_tag(recipe_variant(tcfg.pretrain_args, tcfg.finetune_args, tcfg.max_steps, tcfg.data))
        on_file = self.results.setdefault("recipe", self.recipe)
        if on_file != self.recipe:
            raise ValueError(f"{self.path} holds cells made with another recipe ({recipe_difference(on_file, self.recipe)}"
                             f"); pass another --results file")
        if self.tag:              # cells written before keys named their recipe: the file's recipe, checked above
            self.cells.update({k + self.tag: self.cells.pop(k) for k in list(self.cells) if k.count("|") == 3})
        self.out_claimed = False

    def claim_out(self) -> None:
        """Before the first run: --out holds the runs of one recipe (<out>/recipe.json), as a results file its
        cells; a finished run there is reused as it is, so a folder of another recipe is refused."""
        if self.out_claimed:
            return
        path = os.path.join(self.t.out, "recipe.json")
        if os.path.exists(path):
            with open(path) as f:
                on_file = json.load(f)
            if on_file != self.recipe:
                raise ValueError(f"{self.t.out} holds the runs of another recipe ({recipe_difference(on_file, self.recipe)}"
                                 f"); pass another --out")
        else:
            os.makedirs(self.t.out, exist_ok=True)
            train.write_atomic(path, json.dumps(self.recipe, indent=1, sort_keys=True))
        self.out_claimed = True

    def key(self, kind: str, row: str, task: str, seed: int) -> str:
        return f"{kind}|{row}|{task}|s{seed}{self.tag}"

    def own_cells(self) -> dict:
        """The cells of this recipe, their keys without its tag (what cell_stats reads)."""
        return {k[:len(k) - len(self.tag)]: v for k, v in self.cells.items()
                if k.endswith(self.tag) and k.count("|") == 3 + self.tag.count("|")}

    def record(self, key: str, value: dict, seconds: float) -> None:
        record_cell(self.path, self.results, key, value, seconds)

    # --- the runs behind the cells
    def checkpoint(self, row: str, seed: int) -> str:
        """Run (or reuse) the pretrainings of `row` for `seed`; return the encoder's checkpoint or 'scratch'."""
        path = "scratch"
        self.claim_out()
        for name, stage, extra in _pretrainings(row):
            run = os.path.join(self.t.out, f"s{seed}", name)
            path = os.path.join(run, stage, "final.pt")
            if os.path.exists(path):
                continue
            argv = ["--preset", "cpu", "--stage", stage, "--out", run, "--seed", str(seed), *extra]
            argv += ["--data", self.data] if self.t.data else []
            argv += ["--max-steps", str(self.t.max_steps)] if self.t.max_steps else []
            train.main(argv + shlex.split(self.t.pretrain_args))
        return path

    def finetune(self, row: str, task: str, seed: int) -> None:
        key = self.key("finetune", row, task, seed)
        if key in self.cells:
            return
        t0 = time.time()
        init = self.checkpoint(row, seed)
        out = os.path.join(self.t.out, f"s{seed}", "ft", _slug(row))
        argv = ["--preset", "cpu", "--task", task, "--init", init, "--out", out, "--seed", str(seed),
                "--eval-mode", ",".join(finetune.EVAL_MODES)]
        argv += ["--data", self.data] if self.t.data else []
        argv += ["--max-steps", str(self.t.max_steps)] if self.t.max_steps else []
        res = finetune.main(argv + shlex.split(self.t.finetune_args))[task]
        value = {mode: m["top1"] for mode, m in res["model"].items()}
        value.update({f"ema {mode}": m["top1"] for mode, m in res.get("ema", {}).items()})
        self.record(key, value, time.time() - t0)

    def probe(self, row: str, seed: int) -> None:
        """Linear probe and k-NN on both label sets from one extraction per split (same videos)."""
        keys = {task: self.key("probe", row, task, seed) for task in finetune.SYNTHETIC_TASKS}
        if all(k in self.cells for k in keys.values()):
            return
        t0 = time.time()
        init = self.checkpoint(row, seed)
        vids = os.path.join(self.data, "videos")
        feats = {}
        for split in ("train", "val"):
            out = os.path.join(self.t.out, f"s{seed}", "features", _slug(row), split)
            argv = ["--preset", "cpu", "--init", init, "--video-root", vids, "--out", out,
                    "--video-list", os.path.join(vids, f"{split}_appearance.txt")]
            extract.main(argv + _only_flags(shlex.split(self.t.finetune_args), extract.EXTRACT_FIELDS))
            feats[split] = extract.load_features(out)
        for task, key in keys.items():
            relabelled = {}
            for split in ("train", "val"):             # the same videos under the task's labels
                labels = {str(p): l for p, l in data.read_annotations(os.path.join(vids, f"{split}_{task}.txt"),
                                                                        vids)}
                relabelled[split] = {**feats[split], "labels": np.asarray([labels[p] for p in feats[split]["paths"]])}
            res = probe.probe_features(relabelled["train"], relabelled["val"], probe.ProbeConfig(seed=seed))
            self.record(key, {"linear": res["linear"]["top1"], "knn": res["knn"]["top1"]}, time.time() - t0)

    def run(self, tables: tuple) -> None:
        seeds = range(self.t.seeds)
        if self.t.only_seeds:
            seeds = [int(x) for x in comma_items(self.t.only_seeds)]
        wanted = set(comma_items(self.t.rows)) or set(row_names(tables))
        for seed in seeds:
            if "2" in tables and "bevt" in wanted:
                for task in finetune.SYNTHETIC_TASKS:
                    self.finetune("BEVT", task, seed)
            if "1" in tables:
                for row in (r for r in TABLE1_ROWS if _slug(r) in wanted):
                    self.probe(row, seed)
                    for task in finetune.SYNTHETIC_TASKS:
                        self.finetune(row, task, seed)
            if "8" in tables:
                for strategy in (s for s in TABLE8_ROWS if s in wanted):
                    row = "BEVT-V" if strategy == "tube" else strategy
                    self.probe(row, seed)
                    self.finetune(row, "motion", seed)


def _only_flags(tokens: list, fields: set) -> list:
    """The flags of a token list (`--name value...`) whose field is in `fields`."""
    out, keep = [], False
    for tok in tokens:
        if tok.startswith("--"):
            keep = tok[2:].split("=")[0].replace("-", "_") in fields
        if keep:
            out.append(tok)
    return out


def _slug(row: str) -> str:
    return row.replace(", ", "-").replace(" ", "-").lower()


def cell_stats(cells: dict, kind: str, row: str, task: str, measure: str) -> Optional[tuple]:
    """(mean, std, n) over the seeds that have the cell, or None (std 0 for one seed)."""
    vals = [c[measure] for k, c in cells.items() if k.rsplit("|", 1)[0] == f"{kind}|{row}|{task}" and measure in c]
    if not vals:
        return None
    v = np.asarray(vals, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _fmt(s: Optional[tuple]) -> str:
    return "-" if s is None else f"{s[0]:.1f} ± {s[1]:.1f} ({s[2]})"


def tables_text(cells: dict, tables: tuple) -> str:
    """The requested tables in Markdown: top-1 % as mean ± std (seeds), the paper's beside."""
    out = []
    if "1" in tables:
        out += ["Table 1 (mini): top-1 %, mean ± std (seeds); paper: Swin-B, SSv2 / Diving48 / K400 finetuned",
                "", "| init | appearance linear | appearance k-NN | appearance finetune | motion linear | "
                "motion k-NN | motion finetune | paper |", "|---|---|---|---|---|---|---|---|"]
        for row in TABLE1_ROWS:
            cols = [_fmt(cell_stats(cells, "probe", row, t, m)) for t in finetune.SYNTHETIC_TASKS for m in ("linear", "knn")]
            cols = [cols[0], cols[1], _fmt(cell_stats(cells, "finetune", row, "appearance", "normal")),
                    cols[2], cols[3], _fmt(cell_stats(cells, "finetune", row, "motion", "normal"))]
            paper = PAPER["1"][row]
            out.append(f"| {row} | " + " | ".join(cols) + f" | {' / '.join(map(str, paper)) if paper else '-'} |")
        out.append("")
    if "2" in tables:
        out += ["Table 2 (mini): BEVT finetuned, top-1 %, mean ± std (seeds)", "",
                "| labels | Normal | Single-frame | Random-Shuffling |", "|---|---|---|---|"]
        for task in finetune.SYNTHETIC_TASKS:
            out.append(f"| {task} | " + " | ".join(_fmt(cell_stats(cells, "finetune", "BEVT", task, m))
                                                    for m in finetune.EVAL_MODES) + " |")
        for name, nums in PAPER["2"].items():
            out.append(f"| paper, {name} | " + " | ".join(f"{v}" for v in nums) + " |")
        out.append("")
    if "8" in tables:
        out += ["Table 8 (mini): BEVT-V by mask strategy, motion labels, top-1 %, mean ± std (seeds); paper: "
                "Swin-T, SSv2 / K400 finetuned", "", "| strategy | motion linear | motion finetune | paper |",
                "|---|---|---|---|"]
        for strategy in TABLE8_ROWS:
            row = "BEVT-V" if strategy == "tube" else strategy
            out.append(f"| {TABLE8_NAMES[strategy]} | {_fmt(cell_stats(cells, 'probe', row, 'motion', 'linear'))} | "
                       f"{_fmt(cell_stats(cells, 'finetune', row, 'motion', 'normal'))} | "
                       f"{' / '.join(map(str, PAPER['8'][strategy]))} |")
    return "\n".join(out)


def draw_tables_chart(cells: dict, tables: tuple, path: str) -> None:
    """One panel per table: bars of the mean top-1 over seeds with ±std error bars (draw_bar_panels)."""
    panels = []
    if "1" in tables:
        groups = [(f"{t} {m}", [(row, cell_stats(cells, kind, row, t, meas)) for row in TABLE1_ROWS])
                  for t in finetune.SYNTHETIC_TASKS for m, kind, meas in (("linear", "probe", "linear"), ("k-NN", "probe", "knn"),
                                                                  ("finetune", "finetune", "normal"))]
        panels.append(("Table 1 (mini): initialisations", groups))
    if "2" in tables:
        groups = [(t, [(m, cell_stats(cells, "finetune", "BEVT", t, m)) for m in finetune.EVAL_MODES]) for t in finetune.SYNTHETIC_TASKS]
        panels.append(("Table 2 (mini): BEVT finetuned, temporal probes", groups))
    if "8" in tables:
        groups = [(m, [(TABLE8_NAMES[s], cell_stats(cells, kind, "BEVT-V" if s == "tube" else s, "motion", meas))
                       for s in TABLE8_ROWS]) for m, kind, meas in (("motion linear", "probe", "linear"),
                                                                    ("motion finetune", "finetune", "normal"))]
        panels.append(("Table 8 (mini): BEVT-V mask strategies", groups))
    draw_bar_panels(panels, path)


def draw_bar_panels(panels: list, path: str) -> None:
    """panels [(title, [(group name, [(series name, (mean, std, n) or None)])])] -> one PNG of bar panels,
    top-1 % with ±std error bars (Pillow only), written atomically."""
    from PIL import Image, ImageDraw
    palette = [(66, 103, 172), (221, 132, 82), (85, 168, 104), (196, 78, 82), (129, 114, 179), (147, 120, 96),
               (218, 139, 195)]
    W, PH, left, top = 900, 260, 50, 40
    img = Image.new("RGB", (W, PH * len(panels) + 10), "white")
    d = ImageDraw.Draw(img)
    for p, (title, groups) in enumerate(panels):
        y0 = p * PH
        plot_h, base = PH - top - 60, y0 + PH - 60                       # bar area height, y of 0%
        d.text((left, y0 + 8), title + "  (top-1 %, mean ± std over seeds)", fill="black")
        for v in (0, 25, 50, 75, 100):
            y = base - plot_h * v / 100
            d.line([(left, y), (W - 10, y)], fill=(225, 225, 225))
            d.text((8, y - 6), f"{v}", fill="grey")
        series = [name for name, _ in groups[0][1]]
        gw = (W - left - 10) / len(groups)
        bw = max(4, (gw - 16) / len(series))
        for g, (gname, bars) in enumerate(groups):
            gx = left + g * gw + 8
            d.text((gx, base + 4), gname, fill="black")
            for b, (_, st) in enumerate(bars):
                if st is None:
                    continue
                x0 = gx + b * bw
                y = base - plot_h * st[0] / 100
                d.rectangle([x0, y, x0 + bw - 2, base], fill=palette[b % len(palette)])
                lo, hi = base - plot_h * (st[0] - st[1]) / 100, base - plot_h * (st[0] + st[1]) / 100
                cx = x0 + (bw - 2) / 2
                d.line([(cx, lo), (cx, hi)], fill="black")
                d.line([(cx - 3, lo), (cx + 3, lo)], fill="black")
                d.line([(cx - 3, hi), (cx + 3, hi)], fill="black")
        x = left
        for b, name in enumerate(series):                                 # legend
            d.rectangle([x, base + 22, x + 10, base + 32], fill=palette[b % len(palette)])
            d.text((x + 14, base + 22), name, fill="black")
            x += 14 + 7 * len(name) + 16
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    img.save(tmp)
    os.replace(tmp, path)


def check_flags(ap, tcfg: TablesConfig) -> tuple:
    """The requested tables, after checking every flag (argparse's one-line errors)."""
    tables = tuple(comma_items(tcfg.tables))
    if not tables or any(t not in ("1", "2", "8") for t in tables):
        ap.error(f"--tables must be a comma-separated subset of 1,2,8, got {tcfg.tables!r}")
    if tcfg.seeds < 1 or tcfg.max_steps < 0:
        ap.error(f"--seeds must be >= 1 and --max-steps >= 0, got {tcfg.seeds} and {tcfg.max_steps}")
    try:
        only = [int(x) for x in comma_items(tcfg.only_seeds)]
    except ValueError:
        only = [-1]
    if any(not 0 <= x < tcfg.seeds for x in only):
        ap.error(f"--only-seeds must list seeds in 0..{tcfg.seeds - 1}, got {tcfg.only_seeds!r}")
    names = row_names(tables)
    unknown = [x for x in comma_items(tcfg.rows) if x not in names]
    if unknown:
        ap.error(f"--rows: {', '.join(unknown)} is not a row of table(s) {','.join(tables)}; "
                 f"choose from {', '.join(names)}")
    return tables


def run(tcfg: TablesConfig, tables: tuple) -> dict:
    t0 = time.time()
    runner = Tables(tcfg)
    runner.run(tables)
    shown = ("1", "2", "8")                      # every table, from every cell on file (other runs' too)
    text = tables_text(runner.own_cells(), shown)
    draw_tables_chart(runner.own_cells(), shown, runner.chart)
    print("\n" + text + f"\n\nresults: {runner.path}; chart: {runner.chart}; this run took {time.time() - t0:.0f} s")
    return runner.cells


def build_parser():
    ap = extract.tool_parser("tables.py", __doc__, None, ((TablesConfig, {}),))
    ap.add_argument("--preset", choices=("cpu",), default="cpu", help="the only scale this runs at (default cpu)")
    return ap


def main(argv=None) -> dict:
    ap = build_parser()
    args = vars(ap.parse_args(argv))
    args.pop("preset")
    _, tcfg = extract.split_flags(args, TablesConfig)
    return train.run_cli("tables.py", run, tcfg, check_flags(ap, tcfg))


if __name__ == "__main__":
    main()
