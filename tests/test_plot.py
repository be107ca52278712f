"""Pictures of a run (tools/plot.py: draw_curves / plot_runs / main) on metrics files written here.

Each picture is checked two ways: the record draw_curves returns (which panels and
series it drew) and the pixels of the PNG itself (a series' exact colour is present
where it was drawn, absent where it must not be), so a series drawn as a flat line
of zeros, or not drawn at all, fails whatever the record says.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tools import plot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ORANGE = plot.SERIES_COLOURS["acc_mvm"]            # one run: the MVM stream's colour


def pretrain_rows(stage: str, n: int = 60, seed: int = 0, acc_top: float = 0.3) -> list:
    """Rows as train.py logs them: noisy rising accuracy, falling loss; acc_mvm only in the joint stage."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(1, n + 1):
        p = 1 - math.exp(-s / (n / 3))
        r = {"step": s, "epoch": (s - 1) // 10, "lr": 1e-3 * min(1.0, s / 10), "images_per_s": 50.0,
             "loss_mim": 5.5 - 2 * p + rng.normal(0, 0.1), "acc_mim": acc_top * p + abs(rng.normal(0, 0.02)),
             "grad_norm": 1 + abs(rng.normal(0, 0.2))}
        if stage == "joint":
            r.update(loss_mvm=5.5 - 1.5 * p + rng.normal(0, 0.1), acc_mvm=0.2 * p + abs(rng.normal(0, 0.02)))
        r["loss"] = r["loss_mim"] + r.get("loss_mvm", 0.0)
        rows.append(r)
    return rows


def write_run(folder, rows: list, torn: str = "") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(torn)
    return str(folder)


def panel(record: dict, title: str) -> dict:
    return next(p for p in record["panels"] if p["title"] == title)


def count(img: Image.Image, colour: tuple, box=None) -> int:
    """Pixels of exactly this colour, in the whole picture or inside box (x0, y0, x1, y1)."""
    a = np.asarray(img.convert("RGB"))
    if box is not None:
        x0, y0, x1, y1 = box
        a = a[y0:y1, x0:x1]
    return int((a == np.array(colour, dtype=np.uint8)).all(-1).sum())


def test_joint_run_gives_the_four_panels_at_the_documented_size(tmp_path):
    run = write_run(tmp_path / "joint", pretrain_rows("joint"))
    out = tmp_path / "cmp.png"
    rec = plot.plot_runs([run], str(out))
    img = Image.open(out)
    # Two columns of panels: loss, accuracy / learning rate, gradient norm; one line of run names.
    assert img.size == (plot.CURVE_W, plot.CURVE_HEADER_H + plot.CURVE_RUN_LINE_H + 2 * plot.CURVE_PANEL_H)
    assert rec["size"] == img.size
    assert [p["title"] for p in rec["panels"]] == ["loss", "masked-token accuracy", "learning rate", "gradient norm"]
    assert [s["key"] for s in panel(rec, "loss")["series"]] == ["loss", "loss_mim", "loss_mvm"]
    assert [s["key"] for s in panel(rec, "masked-token accuracy")["series"]] == ["acc_mim", "acc_mvm"]
    lo, hi = panel(rec, "masked-token accuracy")["yrange"]
    assert lo == 0 and 20 <= hi <= 40                     # fractions up to ~0.3 drawn in %
    assert count(img, ORANGE, panel(rec, "masked-token accuracy")["box"]) > 50   # the MVM line is there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.png", "joint"]      # no temporary file left


def test_a_series_absent_from_every_row_is_left_out_not_drawn_as_zeros(tmp_path):
    run = write_run(tmp_path / "image", pretrain_rows("image"))
    out = tmp_path / "image.png"
    rec = plot.plot_runs([run], str(out))
    acc = panel(rec, "masked-token accuracy")
    assert [s["key"] for s in acc["series"]] == ["acc_mim"]
    assert all(s["key"] not in ("loss_mvm", "acc_mvm") for p in rec["panels"] for s in p["series"])
    img = Image.open(out)
    assert count(img, ORANGE) == 0                        # not a single pixel of the MVM colour, anywhere
    assert count(img, plot.SERIES_COLOURS["acc_mim"], acc["box"]) > 50
    # A key present in some rows only: drawn over those rows, the others are not zeros.
    rows = pretrain_rows("joint")
    for r in rows[:40]:
        del r["acc_mvm"]
    rec = plot.draw_curves({"late": rows}, str(tmp_path / "late.png"))
    assert {s["key"]: s["n"] for s in panel(rec, "masked-token accuracy")["series"]} == {"acc_mim": 60, "acc_mvm": 20}


def test_torn_last_line_is_tolerated(tmp_path):
    run = write_run(tmp_path / "killed", pretrain_rows("image", n=30), torn='{"step": 31, "loss": 3.')
    rec = plot.plot_runs([run], str(tmp_path / "killed.png"))
    assert panel(rec, "loss")["series"][0]["n"] == 30
    assert Image.open(tmp_path / "killed.png").size[0] == plot.CURVE_W


def test_two_runs_overlay_in_distinct_colours(tmp_path):
    a = write_run(tmp_path / "a", pretrain_rows("joint", seed=1, acc_top=0.3))
    b = write_run(tmp_path / "b", pretrain_rows("joint", seed=2, acc_top=0.6))
    out = tmp_path / "cmp.png"
    rec = plot.plot_runs([a, b], str(out))
    ca, cb = rec["runs"][a], rec["runs"][b]
    assert ca != cb
    acc = panel(rec, "masked-token accuracy")
    assert {(s["run"], s["key"]) for s in acc["series"]} == {(a, "acc_mim"), (a, "acc_mvm"), (b, "acc_mim"),
                                                            (b, "acc_mvm")}
    img = Image.open(out)
    assert count(img, ca, acc["box"]) > 50 and count(img, cb, acc["box"]) > 50
    # The same folder twice is two runs, not one overwriting the other.
    rec = plot.plot_runs([a, a], str(tmp_path / "twice.png"))
    assert len(rec["runs"]) == 2


def finetune_rows(n: int = 40, evals=(20, 40)) -> list:
    rng = np.random.default_rng(3)
    rows = []
    for s in range(1, n + 1):
        rows.append({"step": s, "epoch": (s - 1) // 10, "lr": 5e-4, "loss": 1.5 - s / n + rng.normal(0, 0.05),
                     "acc": min(1.0, 0.3 + 0.6 * s / n + abs(rng.normal(0, 0.05))), "grad_norm": 2.0})
        if s in evals:
            top1 = 40.0 + s
            rows.append({"step": s, "eval": {"model": {"normal": {"top1": top1, "top5": 99.0, "mean_class": top1,
                                                                  "n": 60},
                                                       "shuffle": {"top1": top1 / 2, "top5": 90.0,
                                                                   "mean_class": 20.0, "n": 60}},
                                             "ema": {"normal": {"top1": top1 - 5, "top5": 99.0,
                                                                "mean_class": top1, "n": 60}}}})
    return rows


def test_finetune_eval_rows_give_a_validation_top1_series_at_their_values(tmp_path):
    run = write_run(tmp_path / "ft", finetune_rows())
    out = tmp_path / "ft.png"
    rec = plot.plot_runs([run], str(out))
    assert [p["title"] for p in rec["panels"]] == ["loss", "classification accuracy", "learning rate",
                                                   "gradient norm"]       # no masked-token panel
    cls = panel(rec, "classification accuracy")
    series = {s["key"]: s for s in cls["series"]}
    assert set(series) == {"acc", "val_top1/model/normal", "val_top1/model/shuffle", "val_top1/ema/normal"}
    assert series["val_top1/model/normal"]["n"] == 2
    # The marker of the model's last evaluation (step 40, top-1 80 %) sits where the axes put it.
    x0, y0, x1, y1 = cls["box"]
    (xa, xb), (ya, yb) = cls["xrange"], cls["yrange"]
    assert ya <= 80 <= yb and xb == 40
    px = x0 + (40 - xa) / (xb - xa) * (x1 - x0 - 1)
    py = y0 + (y1 - y0 - 1) - (80 - ya) / (yb - ya) * (y1 - y0 - 1)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert tuple(img[round(py), round(px)]) == series["val_top1/model/normal"]["colour"]
    # Training accuracy is logged as a fraction and drawn in %, on the validation top-1's scale.
    assert yb >= 90


def test_baselines_from_the_argument_and_from_a_row_are_dashed_lines_at_their_value(tmp_path):
    rows = pretrain_rows("image")
    rows.append({"step": 60, "baselines": {"acc_mim": {"uniform": 1 / 256, "majority": 0.05},
                                           "acc_mvm": {"majority": 0.07}}})   # no MVM line: no MVM baseline
    out = tmp_path / "b.png"
    rec = plot.draw_curves({"run": rows}, str(out), baselines={"acc_mim": {"uniform": 1 / 256}})
    acc = panel(rec, "masked-token accuracy")
    got = {(b["name"], round(b["value"], 4)) for b in acc["baselines"]}
    assert got == {("uniform", round(100 / 256, 4)), ("majority", 5.0)}       # the two uniforms are one line
    assert acc["series"][0]["n"] == 60                                        # the baselines row is no step
    x0, y0, x1, y1 = acc["box"]
    ya, yb = acc["yrange"]
    y = y0 + (y1 - y0 - 1) - (5.0 - ya) / (yb - ya) * (y1 - y0 - 1)
    img = Image.open(out)
    grey = max(count(img, plot.BASELINE_GREY, (x0, r, x1, r + 1)) for r in range(round(y) - 1, round(y) + 2))
    assert grey > 0.3 * (x1 - x0)                                             # dashes across the panel


def test_nan_inf_one_row_and_constant_series(tmp_path):
    nan, inf = float("nan"), float("inf")
    rows = [{"step": s, "lr": 1e-3, "loss": nan if s % 5 == 0 else 2.0, "acc": 0.5,
             "grad_norm": inf if s == 3 else 1.0} for s in range(1, 21)]
    rec = plot.draw_curves({"c": rows}, str(tmp_path / "c.png"), smooth=4)
    n = {s["key"]: s["n"] for p in rec["panels"] for s in p["series"]}
    assert n == {"loss": 16, "acc": 20, "lr": 20, "grad_norm": 19}
    lo, hi = panel(rec, "loss")["yrange"]
    assert lo < 2.0 < hi                                                      # a constant gets a band
    rec = plot.draw_curves({"one": pretrain_rows("joint", n=1)}, str(tmp_path / "one.png"))
    assert all(s["n"] == 1 for p in rec["panels"] for s in p["series"])
    assert Image.open(tmp_path / "one.png").size == rec["size"]
    with pytest.raises(ValueError, match="nothing to draw"):
        plot.draw_curves({"empty": [{"step": 1, "loss": nan}]}, str(tmp_path / "e.png"))


def test_resumed_log_keeps_the_later_rows_of_a_repeated_step():
    rows = [{"step": s, "loss": 1.0} for s in range(1, 11)] + [{"step": s, "loss": 2.0} for s in range(6, 13)]
    s, v = plot.curve_data(rows)["train"]["loss"]
    assert s.tolist() == list(range(1, 13))
    assert v.tolist() == [1.0] * 5 + [2.0] * 7


def test_moving_average_is_trailing_over_steps_and_ticks_are_round():
    s = np.arange(1, 6, dtype=float)
    assert plot.moving_average(s, s.copy(), 3).tolist() == [1.0, 1.5, 2.0, 3.0, 4.0]
    # Counted in steps, not rows: a log every 10 steps, a 15-step window holds two rows.
    assert plot.moving_average(np.array([10.0, 20, 30]), np.array([0.0, 4, 8]), 15).tolist() == [0.0, 2.0, 6.0]
    ticks, lo, hi = plot.nice_ticks(0.0, 0.93)
    assert (lo, hi) == (0.0, 1.0) and plot.tick_labels(ticks) == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    ticks, _, _ = plot.nice_ticks(0.0, 2.5e-5)
    assert plot.tick_labels(ticks) == ["0", "5e-6", "1e-5", "1.5e-5", "2e-5", "2.5e-5"]
    assert plot.nice_ticks(1.0, 13.0, target=6, expand=False, min_step=1)[0] == [2, 4, 6, 8, 10, 12]


def test_command_line_draws_one_run_folder_or_compares_several(tmp_path, capsys):
    run = write_run(tmp_path / "r", pretrain_rows("image", n=10))
    rec, = plot.main([run, str(run), "--out-file", str(tmp_path / "o.png"), "--smooth", "3"])
    assert (tmp_path / "o.png").exists() and len(rec["panels"]) == 4 and len(rec["runs"]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        plot.main([run, str(tmp_path / "empty"), "--out-file", str(tmp_path / "x.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "empty") in err and "metrics.jsonl" in err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit) as e:                                  # several runs need a picture to go to
        plot.main([run, run])
    assert e.value.code == 2 and "--out-file" in capsys.readouterr().err


def test_a_run_folder_gets_its_curves_png_titled_from_its_config(tmp_path):
    """What the trainers drew themselves: <run>/curves.png, a pretraining stage's or a finetuning task's."""
    run = tmp_path / "bevt" / "joint"
    write_run(run, pretrain_rows("joint") + [{"step": 60, "baselines": {"acc_mvm": {"majority": 0.07}}}])
    (run / "config.json").write_text(json.dumps({"stage": "joint", "model": "cpu"}))
    rec, = plot.main([str(run)])
    assert rec["path"] == str(run / "curves.png") and Image.open(rec["path"]).size == rec["size"]
    assert plot.run_title(str(run)) == f"BEVT joint stage, cpu ({run})"
    assert [b["name"] for b in panel(rec, "masked-token accuracy")["baselines"]] == ["majority"]
    ft = tmp_path / "ft" / "motion"
    write_run(ft, finetune_rows())
    (ft / "config.json").write_text(json.dumps({"recipe": "k400", "model": "cpu"}))
    rec, = plot.main([str(ft)])
    assert (ft / "curves.png").exists() and "classification accuracy" in [p["title"] for p in rec["panels"]]
    assert plot.run_title(str(ft)) == f"finetune motion, cpu ({ft})"


def test_a_run_root_gives_each_stage_folder_its_curves(tmp_path, capsys):
    """Issue 30.7: `plot.py RUN_ROOT` (train.py's --out) finds the stage folders under it, in the order they
    run, and draws each one's curves.png; with --out-file they are compared in one picture."""
    root = tmp_path / "bevt"
    for stage in ("joint", "image"):
        write_run(root / stage, pretrain_rows(stage, n=10))
    (root / "notes").mkdir()                                              # no metrics.jsonl: not a run
    recs = plot.main([str(root)])
    assert [r["path"] for r in recs] == [str(root / "image" / "curves.png"), str(root / "joint" / "curves.png")]
    assert all(os.path.exists(r["path"]) for r in recs)
    rec, = plot.main([str(root), "--out-file", str(tmp_path / "cmp.png")])
    assert len(rec["runs"]) == 2 and (tmp_path / "cmp.png").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:                                  # nothing to draw: one line naming it
        plot.main([str(root / "notes")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "run root" in err and str(root / "notes") in err


def test_garbage_lines_are_skipped_and_counted_in_one_line(tmp_path):
    """Issue 29.8 as met: `python tools/plot.py RUN` on a metrics.jsonl with 5 garbage lines (text, a JSON
    list, a row without a step, bytes that are not UTF-8, a torn last line) draws the rest and says so."""
    run = tmp_path / "r"
    rows = pretrain_rows("image", n=10)
    write_run(run, rows[:5])
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"garbage\n[1, 2]\n{\"loss\": 1.0}\n\xff\xfe\x00junk\n")
        f.writelines((json.dumps(r) + "\n").encode() for r in rows[5:])
        f.write(b'{"step": 11, "lo')
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plot.py"), str(run)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "skipped" in line]
    assert len(said) == 1 and "skipped 5 of the 15 lines" in said[0] and str(run / "metrics.jsonl") in said[0], r.stderr
    assert (run / "curves.png").exists()
