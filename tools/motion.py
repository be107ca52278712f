"""The pre-registered motion experiment (docs/motion.md) on version 4 of the synthetic set:
H1 tube >= Random-3D, H2 BEVT >= BEVT-I, H3 video pretraining > scratch on motion with few
labels, H4 the appearance claims; 4 seeds per cell, resumable cell by cell.

    python tools/synthetic.py --version 4 --out data/synthetic-v4
    python tools/motion.py pilot                      # tube and Random-3D curves, sets the video budget V
    python tools/motion.py run --video-steps V        # every cell into assets/motion.json (hours: background it)
    python tools/motion.py report                     # tables, outcomes and chart from the cells on file
    python tools/motion.py posthoc --video-steps V    # not registered: the motion finetune with all 200 labels

Every run goes under --out (default runs/motion); a rerun skips the cells on file and reuses the
finished pretrainings. Two processes can share the work with --only-seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import numpy as np  # noqa: E402

import data  # noqa: E402
import finetune  # noqa: E402
import train  # noqa: E402
from tools import extract, probe, synthetic, tables  # noqa: E402

# The rows (docs/motion.md §7): name -> the pretrainings its encoder needs [(run folder, stage, extra flags)].
ROWS = {
    "scratch": [],
    "BEVT-I": [("bevt", "image", [])],
    "BEVT-V": [("video-tube", "video", ["--mask-strategy", "tube"])],
    "BEVT-V Random-3D": [("video-random-3d", "video", ["--mask-strategy", "random-3d"])],
    "BEVT": [("bevt", "image", []), ("bevt", "joint", [])],
}
# The hypotheses (docs/motion.md §3, §6): (name, row A, row B, task, minimum mean difference for "supported").
HYPOTHESES = (
    ("H1 tube >= Random-3D (motion)", "BEVT-V", "BEVT-V Random-3D", "motion", 0.0),
    ("H2 BEVT >= BEVT-I (motion)", "BEVT", "BEVT-I", "motion", 0.0),
    ("H3 video pretraining > scratch (motion, few labels)", "BEVT-V", "scratch", "motion", 5.0),
    ("H4a BEVT-I >= BEVT-V (appearance)", "BEVT-I", "BEVT-V", "appearance", 0.0),
    ("H4b BEVT >= BEVT-V (appearance)", "BEVT", "BEVT-V", "appearance", 0.0),
)
PAPER = {"H1": "Table 8: SSv2 63.3 vs 59.1, K400 71.6 vs 67.4", "H2": "Table 1: SSv2 70.6 vs 69.2, Diving48 86.7 vs 81.2",
         "H3": "no number (§1, §3)", "H4": "Table 1, K400: BEVT-I 80.5, BEVT 80.6, BEVT-V 76.2"}
STEPS_PER_VIDEO_EPOCH = synthetic.SYN_TRAIN // train.CPU_PRESET["video_batch"]      # 200 videos / 4 clips = 50
FEW_LABELS = 20                     # labelled training videos of a few-label finetune (10%)
FINETUNE_STEPS = 500                # the cpu finetune recipe's schedule (20 epochs x 200 videos / batch 8)
CHANCE_LIMIT = 63.0                 # single-frame / shuffled motion above this (50 + 2 s.e. on 60 videos): leak
PILOT_STEPS = 2000


def few_label_list(src: str, dst: str, n: int, seed: int) -> str:
    """A balanced draw of n rows of annotation list `src` (n // classes per class, the rest at random),
    the same for every row of one seed; written to `dst` (paths unchanged)."""
    rows = [line.split() for line in open(src) if line.strip()]
    rng = np.random.default_rng([seed, 2024])
    labels = sorted({r[1] for r in rows})
    chosen = []
    for lab in labels:
        idx = [i for i, r in enumerate(rows) if r[1] == lab]
        chosen += list(rng.choice(idx, n // len(labels), replace=False))
    rest = [i for i in range(len(rows)) if i not in set(chosen)]
    chosen += list(rng.choice(rest, n - len(chosen), replace=False))
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    train.write_atomic(dst, "".join(f"{rows[i][0]} {rows[i][1]}\n" for i in sorted(chosen)))
    return dst


class Experiment:
    def __init__(self, args):
        self.a = args
        self.vids = os.path.join(args.data, "videos")
        if not os.path.isfile(os.path.join(args.data, synthetic.DONE_NAME)):
            raise ValueError(f"no synthetic set at {args.data}: prepare it with "
                             f"python tools/synthetic.py --version 4 --out {args.data}")
        made = json.load(open(os.path.join(args.data, synthetic.DONE_NAME)))
        if made.get("version") != 4:
            raise ValueError(f"{args.data} is version {made.get('version')} of the synthetic set; the experiment "
                             f"runs on version 4 (docs/motion.md §2)")
        self.recipe = {"protocol": "docs/motion.md", "data": made, "video_steps": args.video_steps,
                       "few_labels": FEW_LABELS, "finetune_steps": FINETUNE_STEPS,
                       "train": json.loads(json.dumps(train.CPU_PRESET)),
                       "finetune": json.loads(json.dumps(finetune.CPU_PRESET))}
        self.store = tables.CellStore(args.results, self.recipe)

    # --- the runs behind the cells
    def pretrain(self, row: str, seed: int) -> str:
        path = "scratch"
        for name, stage, extra in ROWS[row]:
            run = os.path.join(self.a.out, f"s{seed}", name)
            path = os.path.join(run, stage, "final.pt")
            if os.path.exists(path):
                continue
            epochs = (train.CPU_STAGE_EPOCHS["image"] if stage == "image"
                      else self.a.video_steps // STEPS_PER_VIDEO_EPOCH)
            train.main(["--preset", "cpu", "--stage", stage, "--data", self.a.data, "--out", run,
                        "--seed", str(seed), "--epochs", str(epochs), *extra])
        return path

    def pretrain_cell(self, row: str, seed: int) -> None:
        key = f"pretrain|{row}|-|s{seed}"
        if not ROWS[row] or key in self.store.cells:
            return
        self.pretrain(row, seed)
        name, stage, _ = ROWS[row][-1]
        rows = train.read_metrics(os.path.join(self.a.out, f"s{seed}", name, stage, "metrics.jsonl"))
        steps = [r for r in rows if "loss" in r][-50:]
        value = {k: float(np.mean([r[k] for r in steps])) for k in ("acc_mim", "acc_mvm") if k in steps[-1]}
        for r in rows:
            if "baselines" in r:
                value.update({f"{k} majority": b["majority"] for k, b in r["baselines"].items()})
        self.store.record(f"pretrain|{row}|-|s{seed}", value, 0.0)

    def finetune_cell(self, row: str, task: str, seed: int, full: bool = False) -> None:
        """The few-label finetune of one row and task (docs/motion.md §4); full: all 200 labels (post hoc, §12)."""
        key = f"finetune{'-full' if full else ''}|{row}|{task}|s{seed}"
        if key in self.store.cells:
            return
        t0 = time.time()
        init = self.pretrain(row, seed)
        labels = os.path.join(self.vids, f"train_{task}.txt")
        n = synthetic.SYN_TRAIN if full else FEW_LABELS
        if not full:
            labels = few_label_list(labels, os.path.join(self.a.out, f"s{seed}", "labels", f"train_{task}_{n}.txt"),
                                    n, seed)
        classes = len(open(os.path.join(self.vids, f"classes_{task}.txt")).read().split())
        epochs = FINETUNE_STEPS // (n // finetune.CPU_PRESET["batch_size"])      # 500 steps either way
        out = os.path.join(self.a.out, f"s{seed}", "ft-full" if full else "ft", tables._slug(row), task)
        res = finetune.main(["--preset", "cpu", "--init", init, "--out", out, "--seed", str(seed),
                             "--video-root", self.vids, "--train-list", labels,
                             "--val-list", os.path.join(self.vids, f"val_{task}.txt"), "--num-classes", str(classes),
                             "--epochs", str(epochs), "--eval-mode", ",".join(finetune.EVAL_MODES),
                             *(["--flip", "0"] if task == "motion" else [])])
        res = next(iter(res.values()))
        value = {mode: m["top1"] for mode, m in res["model"].items()}
        self.store.record(key, value, time.time() - t0)

    def probe_cells(self, row: str, seed: int) -> None:
        keys = {task: f"probe|{row}|{task}|s{seed}" for task in finetune.SYNTHETIC_TASKS}
        if all(k in self.store.cells for k in keys.values()):
            return
        t0 = time.time()
        init = self.pretrain(row, seed)
        feats = {}
        for split in ("train", "val"):
            out = os.path.join(self.a.out, f"s{seed}", "features", tables._slug(row), split)
            extract.main(["--preset", "cpu", "--init", init, "--video-root", self.vids, "--out", out,
                          "--video-list", os.path.join(self.vids, f"{split}_appearance.txt")])
            feats[split] = extract.load_features(out)
        for task, key in keys.items():
            relabelled = {}
            for split in ("train", "val"):
                labels = {str(p): l for p, l in data.read_annotations(os.path.join(self.vids, f"{split}_{task}.txt"),
                                                                        self.vids)}
                relabelled[split] = {**feats[split], "labels": np.asarray([labels[p] for p in feats[split]["paths"]])}
            res = probe.probe_features(relabelled["train"], relabelled["val"], probe.ProbeConfig(seed=seed))
            self.store.record(key, {"linear": res["linear"]["top1"], "knn": res["knn"]["top1"]}, time.time() - t0)

    def seeds(self) -> list:
        """The seeds to run now: --only-seeds, else 0 .. --seeds - 1."""
        return [int(s) for s in tables.comma_items(self.a.only_seeds)] or list(range(self.a.seeds))

    def run(self) -> None:
        for seed in self.seeds():
            for row in ROWS:
                self.pretrain_cell(row, seed)
                for task in ("motion", "appearance"):
                    self.finetune_cell(row, task, seed)
                self.probe_cells(row, seed)

    def posthoc(self) -> None:
        """Not registered (docs/motion.md §12): every row's motion finetune with all 200 training labels."""
        for seed in self.seeds():
            for row in ROWS:
                self.finetune_cell(row, "motion", seed, full=True)


# -----------------------------------------------------------------------------
# The outcomes, by docs/motion.md §6


def per_seed(cells: dict, kind: str, row: str, task: str, measure: str) -> dict:
    """{seed: value} of one measure of one row."""
    out = {}
    for k, c in cells.items():
        kk, r, t, s = k.split("|")[:4]
        if (kk, r, t) == (kind, row, task) and measure in c:
            out[int(s[1:])] = c[measure]
    return out


def outcome(a: dict, b: dict, minimum: float) -> tuple:
    """(verdict, mean d, std d, seeds, seeds with d >= 0) of the paired differences d = a - b over the seeds
    both have."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 4:
        return "pending", None, None, len(seeds), None
    d = np.array([a[s] - b[s] for s in seeds])
    m, sd = float(d.mean()), float(d.std(ddof=1))
    if m > 0 and m >= minimum and (d >= 0).mean() >= 0.75:
        verdict = "supported"
    elif m < 0 and (d < 0).mean() >= 0.75:
        verdict = "contradicted"
    else:
        verdict = "inconclusive"
    return verdict, m, sd, len(seeds), int((d >= 0).sum())


def difference_cells(m, sd, n, up) -> str:
    """An outcome's "mean d ± std (seeds) | seeds with d >= 0" table cells ("-" while pending)."""
    return "- | -" if m is None else f"{m:+.1f} ± {sd:.1f} ({n}) | {up} of {n}"


def report_text(cells: dict) -> str:
    fmt = tables._fmt
    out = ["Motion experiment (docs/motion.md), synthetic v4: top-1 % on 60 validation videos, mean ± std (seeds)", "",
           "| row | motion few-label | single frame | shuffled | motion linear | motion k-NN | appearance few-label "
           "| appearance linear | appearance k-NN | MVM / MIM acc (majority) |", "|---|" + "---|" * 9]
    for row in ROWS:
        cols = [fmt(tables.cell_stats(cells, "finetune", row, "motion", m)) for m in finetune.EVAL_MODES]
        cols += [fmt(tables.cell_stats(cells, "probe", row, "motion", m)) for m in ("linear", "knn")]
        cols += [fmt(tables.cell_stats(cells, "finetune", row, "appearance", "normal"))]
        cols += [fmt(tables.cell_stats(cells, "probe", row, "appearance", m)) for m in ("linear", "knn")]
        acc = []
        for k in ("acc_mvm", "acc_mim"):
            st = tables.cell_stats(cells, "pretrain", row, "-", k)
            maj = tables.cell_stats(cells, "pretrain", row, "-", f"{k} majority")
            if st:
                acc.append(f"{k[4:].upper()} {st[0]:.3f} ({maj[0]:.3f})" if maj else f"{k[4:].upper()} {st[0]:.3f}")
        out.append(f"| {row} | " + " | ".join(cols + ["; ".join(acc) or "-"]) + " |")
    above = {row: per_seed(cells, "finetune", row, "motion", "normal") for row in ROWS}
    out += ["", f"Seeds whose few-label motion finetune beat chance by 2 standard errors (> {CHANCE_LIMIT:g}%): "
            + ", ".join(f"{row} {sum(v > CHANCE_LIMIT for v in s.values())} of {len(s)}" for row, s in above.items())]
    out += ["", "| hypothesis | measure | mean d ± std (seeds) | seeds with d ≥ 0 | outcome | paper |",
            "|---|---|---|---|---|---|"]
    leak = [row for row in ROWS for m in ("single-frame", "shuffle")
            if (st := tables.cell_stats(cells, "finetune", row, "motion", m)) and st[2] >= 4 and st[0] > CHANCE_LIMIT]
    for name, a, b, task, minimum in HYPOTHESES:
        for kind, measure, label in (("finetune", "normal", "few-label finetune"), ("probe", "linear", "linear probe")):
            verdict, m, sd, n, up = outcome(per_seed(cells, kind, a, task, measure),
                                            per_seed(cells, kind, b, task, measure), minimum)
            if task == "motion" and leak:
                verdict += " (invalid: motion leaks in single-frame/shuffled evaluations of " + ", ".join(leak) + ")"
            out.append(f"| {name} | {label} | {difference_cells(m, sd, n, up)} | {verdict} | {PAPER[name[:2]]} |")
    # H4's third part (§6): BEVT's appearance few-label mean within 5 points of BEVT-I's.
    _, m, sd, n, up = outcome(per_seed(cells, "finetune", "BEVT", "appearance", "normal"),
                              per_seed(cells, "finetune", "BEVT-I", "appearance", "normal"), 0.0)
    verdict = "pending" if m is None else "holds" if abs(m) <= 5 else "fails"
    out.append(f"| H4c BEVT within 5 points of BEVT-I (appearance) | few-label finetune | "
               f"{difference_cells(m, sd, n, up)} | {verdict} | {PAPER['H4']} |")
    if any(k.startswith("finetune-full|") for k in cells):
        out += ["", "Post-hoc, not registered (docs/motion.md §12): the motion finetune with all 200 training labels, "
                "the same 500 steps", "", "| row | motion | single frame | shuffled |", "|---|---|---|---|"]
        for row in ROWS:
            out.append(f"| {row} | " + " | ".join(tables._fmt(tables.cell_stats(cells, "finetune-full", row, "motion", m))
                                                   for m in finetune.EVAL_MODES) + " |")
    return "\n".join(out)


def draw_chart(cells: dict, path: str) -> None:
    """Two panels (motion, appearance): each measure's mean ± std over seeds, one bar per row."""
    panels = []
    for task in ("motion", "appearance"):
        groups = [(label, [(row, tables.cell_stats(cells, kind, row, task, measure)) for row in ROWS])
                  for label, kind, measure in (("few-label finetune", "finetune", "normal"),
                                               ("linear probe", "probe", "linear"), ("k-NN", "probe", "knn"))]
        panels.append((f"Motion experiment (synthetic v4): {task} labels", groups))
    tables.draw_bar_panels(panels, path)


# -----------------------------------------------------------------------------
# The pilot (docs/motion.md §5): tube and Random-3D video stages, seed 0, 2,000 steps; sets V


def pilot(args) -> dict:
    out = {}
    for strategy in ("tube", "random-3d"):
        run = os.path.join(args.out, "pilot", strategy)
        if not os.path.exists(os.path.join(run, "video", "final.pt")):
            train.main(["--preset", "cpu", "--stage", "video", "--data", args.data, "--out", run, "--seed", "0",
                        "--mask-strategy", strategy, "--epochs", str(PILOT_STEPS // STEPS_PER_VIDEO_EPOCH)])
        rows = train.read_metrics(os.path.join(run, "video", "metrics.jsonl"))
        base = next(r["baselines"]["acc_mvm"]["majority"] for r in rows if "baselines" in r)
        curve = {r["step"]: r["acc_mvm"] for r in rows if "acc_mvm" in r}
        window = lambda end: float(np.mean([v for s, v in curve.items() if end - 100 < s <= end]))  # noqa: E731
        out[strategy] = {"majority": base, "at_1000": window(1000), "at_2000": window(2000)}
    tube = out["tube"]
    v = 1000 if tube["at_1000"] >= 2 * tube["majority"] else 2000
    testable = max(tube["at_1000"], tube["at_2000"]) >= 2 * tube["majority"]
    out["decision"] = {"video_steps": v, "tube_task_left_baseline": testable}
    train.write_atomic(os.path.join(args.out, "pilot", "pilot.json"), json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="motion.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{pilot,run,report,posthoc}")
    for name, text in (("pilot", "the two pilot video stages and the budget V they set (docs/motion.md §5)"),
                       ("run", "run the cells not yet on file"), ("report", "the tables and outcomes of the cells on file"),
                       ("posthoc", "not registered: every row's motion finetune with all 200 labels (docs/motion.md §12)")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--data", default="data/synthetic-v4", help="the version-4 synthetic set (default data/synthetic-v4)")
        p.add_argument("--out", default="runs/motion", help="folder of the runs (default runs/motion)")
        p.add_argument("--results", default="assets/motion.json", help="the cells (default assets/motion.json)")
        p.add_argument("--chart", default="assets/motion.png", help="the chart (default assets/motion.png)")
        p.add_argument("--video-steps", type=int, default=0,
                       help="V, the video and joint stages' steps, as the pilot set it (required by run)")
        p.add_argument("--seeds", type=int, default=4, help="seeds 0 .. seeds-1 (default 4)")
        p.add_argument("--only-seeds", default="", help="comma-separated seeds to run now, e.g. 1,3 (default all)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "pilot":
        return train.run_cli("motion.py", pilot, args)
    if args.command in ("run", "posthoc") and args.video_steps not in (1000, 2000):
        raise SystemExit(f"motion.py: error: {args.command} needs --video-steps 1000 or 2000, as `motion.py pilot` decided")

    def go():
        if args.command == "run":
            Experiment(args).run()
        elif args.command == "posthoc":
            Experiment(args).posthoc()
        cells = tables.CellStore(args.results, None).cells
        text = report_text(cells)
        draw_chart(cells, args.chart)
        print(text + f"\n\nresults: {args.results}; chart: {args.chart}")
        return text
    return train.run_cli("motion.py", go)


if __name__ == "__main__":
    main()
