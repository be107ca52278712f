"""Tests of the scripts around finetune.py: frozen features (tools/extract.py), the linear
probe and k-NN (tools/probe.py), prediction on single videos (tools/predict.py) and the
plumbing of the mini reproductions (tools/tables.py).

The probe is checked on features whose answer is known by construction:
separable classes must be found, random features must give chance. The
extracted features are checked against an independent computation (the
finetuning val loader and VideoClassifier.features on the same checkpoint).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bevt
import data
import finetune
import swin3d
from tools import extract, predict, probe, synthetic, tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 96-px crops of 8 frames (every 2nd) from the 16-frame, 96x112 test videos.
VIEW = ["--preset", "cpu", "--crop", "96", "--short-side", "96", "--test-short-side", "96", "--frames", "8",
        "--frame-interval", "2", "--workers", "0", "--precision", "fp32"]


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """12 + 4 videos with a 16-code tokenizer fitted on 96-px crops (the tables test's pretrainings)."""
    root = tmp_path_factory.mktemp("probe") / "syn"
    synthetic.prepare(root, seed=0, verbose=False, vocab=16, size=96, n_train=12, n_val=4, images_train=1,
                      images_val=1, frames=16, height=96, width=112)
    return str(root)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A train.py-format checkpoint of the cpu model (random weights, joint stage)."""
    torch.manual_seed(1)
    model = bevt.BEVT(bevt.BEVTConfig(swin=swin3d.get_config("cpu"), vocab_size=256))
    path = tmp_path_factory.mktemp("ck") / "pre.pt"
    torch.save({"model": model.state_dict(), "config": {"stage": "joint"}}, path)
    return str(path)


def separable(n, classes=4, dim=32, seed=0, spread=8.0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g) * spread
    y = torch.arange(n) % classes
    return means[y] + torch.randn(n, dim, generator=g), y


# -----------------------------------------------------------------------------
# Linear probe and k-NN on generated features


def test_probe_finds_separable_classes():
    tx, ty = separable(200)
    vx, vy = separable(100, seed=0)                                      # same class means, fresh noise
    vx = vx + torch.randn(vx.shape, generator=torch.Generator().manual_seed(9))
    lin = probe.linear_probe(tx, ty, vx, vy, 4)
    knn = probe.knn_classify(tx, ty, vx, vy, 4)
    assert lin["top1"] >= 98 and lin["train_top1"] >= 98, lin
    assert knn["top1"] >= 98, knn


def test_probe_on_random_features_is_at_chance():
    """Features independent of the labels: 400 val samples, 4 classes; the binomial std of the
    accuracy at p = 0.25 is 2.2 points, so 25 +- 9 is a 4-sigma band."""
    g = torch.Generator().manual_seed(3)
    tx, vx = torch.randn(400, 64, generator=g), torch.randn(400, 64, generator=g)
    ty, vy = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (400,), generator=g)
    lin = probe.linear_probe(tx, ty, vx, vy, 4)
    knn = probe.knn_classify(tx, ty, vx, vy, 4)
    assert abs(lin["top1"] - 25) <= 9, lin
    assert abs(knn["top1"] - 25) <= 9, knn


def test_knn_vote_is_temperature_weighted():
    """Two neighbours of class 0 at cosine 0.6 against one of class 1 at cosine 1: with T = 0.07
    the single close one wins (exp(1/0.07) > 2 exp(0.6/0.07)); with T = 10 the two win."""
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0, 0])
    val, vy = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    assert probe.knn_classify(train, labels, val, vy, 2, k=3, temperature=0.07)["top1"] == 100
    assert probe.knn_classify(train, labels, val, vy, 2, k=3, temperature=10.0)["top1"] == 0


# -----------------------------------------------------------------------------
# extract: the features the probe reads


def extract_list(syn, init, out, *extra, split="train"):
    vids = os.path.join(syn, "videos")
    return extract.main([*VIEW, "--init", init, "--video-root", vids, "--out", str(out),
                         "--video-list", os.path.join(vids, f"{split}_motion.txt"), *extra])


def test_extract_gives_the_pooled_f4_of_the_centre_clip(syn, pretrained, tmp_path, capsys):
    meta = extract_list(syn, pretrained, tmp_path / "f", "--chunk", "5")              # 3 chunks for 12 videos
    said = capsys.readouterr().out                       # issue 30.7: nothing is trained here, the head is unused
    assert f"init from {pretrained}" in said and "missing (0, left random)" in said
    assert "trained from scratch" not in said
    got = extract.load_features(str(tmp_path / "f"))
    assert meta["rows"] == 12 and meta["bad"] == 0 and got["features"].shape == (12, 256)
    # Independently: finetune.py's val loader (one centre clip) and the classifier's features.
    cfg = finetune.resolve_config({"preset": "cpu", "crop": 96, "short_side": 96, "frames": 8, "frame_interval": 2,
                                   "workers": 0})
    model = finetune.build_model(cfg, 4)
    finetune.load_pretrained(model, pretrained, "cpu")
    model.eval()
    vids = os.path.join(syn, "videos")
    loader = data.build_finetune_loader("val", finetune.data_config(cfg), ann=os.path.join(vids, "train_motion.txt"),
                                        root=vids, verbose=False)
    want, labels = [], []
    with torch.no_grad():
        for b in loader:
            want.append(model.features(b["video"]))
            labels.append(b["label"])
    np.testing.assert_allclose(got["features"], torch.cat(want).numpy(), rtol=1e-4, atol=1e-5)
    assert got["labels"].tolist() == torch.cat(labels).tolist()


def test_extraction_and_probe_never_change_the_encoder(syn, pretrained, tmp_path):
    before = open(pretrained, "rb").read()
    cfg = finetune.resolve_config({"preset": "cpu", "init": pretrained})
    enc = extract.frozen_encoder(cfg, log_fn=lambda m: None)
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    for split in ("train", "val"):
        extract_list(syn, pretrained, tmp_path / split, split=split)
    res = probe.main(["--train-features", str(tmp_path / "train"), "--val-features", str(tmp_path / "val")])
    assert 0 <= res["linear"]["top1"] <= 100 and res["classes"] == len(synthetic.MOTION_CLASSES)
    assert open(pretrained, "rb").read() == before
    assert all(torch.equal(state[k], v) for k, v in enc.state_dict().items())
    again = extract.frozen_encoder(cfg, log_fn=lambda m: None).state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state if k.startswith("encoder."))   # the head: unused


def test_extract_resumes_and_lists_bad_files(syn, pretrained, tmp_path, capsys):
    vids = os.path.join(syn, "videos")
    rows = open(os.path.join(vids, "train_motion.txt")).read().splitlines()[:6]
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(rows[:3] + [f"{tmp_path / 'broken.mp4'} 1"] + rows[3:]) + "\n")
    argv = [*VIEW, "--init", pretrained, "--video-root", vids, "--video-list", str(lst), "--chunk", "2"]
    meta = extract.main([*argv, "--out", str(tmp_path / "f")])
    assert meta["videos"] == 7 and meta["rows"] == 6 and meta["bad"] == 1
    bad = (tmp_path / "f" / "bad.txt").read_text().splitlines()
    assert len(bad) == 1 and bad[0].startswith(str(tmp_path / "broken.mp4"))
    got = extract.load_features(str(tmp_path / "f"))
    assert str(tmp_path / "broken.mp4") not in got["paths"] and len(got["paths"]) == 6
    # A complete output is not recomputed.
    feats = (tmp_path / "f" / "features.npy").read_bytes()
    capsys.readouterr()
    extract.main([*argv, "--out", str(tmp_path / "f")])
    assert "nothing to do" in capsys.readouterr().out
    # Killed before the merge: only the missing part is computed again.
    parts = tmp_path / "f" / "parts" / meta["key"]
    os.remove(tmp_path / "f" / "meta.json")
    os.remove(parts / "part_00001.pt")
    stamps = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
    extract.main([*argv, "--out", str(tmp_path / "f")])
    assert (parts / "part_00001.pt").exists()
    assert all((parts / n).stat().st_mtime_ns == t for n, t in stamps.items())
    assert (tmp_path / "f" / "features.npy").read_bytes() == feats
    # Another checkpoint: the old parts are not reused.
    other = tmp_path / "other.pt"
    torch.save({"model": finetune.VideoClassifier(swin3d.get_config("cpu"), 4).state_dict()}, other)
    extract.main([*VIEW, "--init", str(other), "--video-root", vids, "--video-list", str(lst), "--out",
                   str(tmp_path / "f")])
    assert (tmp_path / "f" / "features.npy").read_bytes() != feats
    assert not parts.exists()


def test_sliding_window_features(syn, pretrained, tmp_path):
    """16-frame videos, windows of 4 frames (interval 1) every 4 frames: starts 0, 4, 8, 12."""
    meta = extract_list(syn, pretrained, tmp_path / "w", "--clip-len", "4", "--frame-interval", "1", "--stride", "4",
                   split="val")
    got = extract.load_features(str(tmp_path / "w"))
    assert meta["rows"] == 4 * 4
    assert got["starts"].tolist() == [0, 4, 8, 12] * 4
    assert len(set(got["paths"])) == 4
    assert extract.WindowSampling(4, 2, 3)(10).tolist() == [[0, 2, 4, 6], [3, 5, 7, 9]]
    assert extract.WindowSampling(4, 2, 3)(5).tolist() == [[0, 2, 4, 4]]             # shorter than a window


def test_extract_on_two_processes_matches_one(syn, pretrained, tmp_path):
    vids = os.path.join(syn, "videos")
    args = [*VIEW, "--init", pretrained, "--video-root", vids, "--video-list", os.path.join(vids, "train_motion.txt"),
            "--chunk", "3"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(REPO, "tools", "extract.py"), *args, "--out", str(tmp_path / "two")],
                       cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    extract.main([*args, "--out", str(tmp_path / "one")])
    two, one = extract.load_features(str(tmp_path / "two")), extract.load_features(str(tmp_path / "one"))
    assert two["paths"] == one["paths"]
    np.testing.assert_allclose(two["features"], one["features"], rtol=1e-5, atol=1e-6)


def _barrier_worker(rank: int, store: str, out: str) -> None:
    """One of two gloo processes whose default group times out after 2 s; rank 0 works 5 s longer."""
    import datetime
    import time
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))
    group = extract.work_group(True)
    t = time.time()
    if rank == 0:
        time.sleep(5)                                   # a longer share of the chunks, or the merge
    dist.barrier(group=group)
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{time.time() - t:.1f}")
    dist.destroy_process_group()


def test_extract_barriers_after_unequal_work_outlast_the_collective_timeout(tmp_path):
    """Issue 32.3: the barriers after each rank's share (and rank 0's merge) wait on their own group, so a
    rank that finishes early waits longer than --dist-timeout instead of failing the job."""
    torch.multiprocessing.spawn(_barrier_worker, args=(str(tmp_path / "store"), str(tmp_path / "done")), nprocs=2)
    assert extract.WORK_TIMEOUT.total_seconds() >= 24 * 3600
    assert float((tmp_path / "done.1").read_text()) >= 4.5             # rank 1 waited past the 2 s timeout


def test_extract_bad_flags_are_one_line_errors(syn, pretrained, tmp_path, capsys):
    for tool, argv, words in ((extract, ["--init", pretrained], ["--out"]),
                              (extract, [*VIEW, "--init", pretrained, "--out", str(tmp_path), "--video-root", syn,
                                         "--video-list", str(tmp_path / "nope.txt")], ["nope.txt"]),
                              (probe, ["--train-features", str(tmp_path), "--val-features", str(tmp_path)],
                               ["meta.json"])):
        with pytest.raises(SystemExit) as e:
            tool.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and all(w in err for w in words), err


def test_probe_refuses_the_same_features_for_train_and_val(tmp_path, capsys):
    """Issue 30.7: a probe on its own training features (one folder twice, or a copy) is one line, exit 2."""
    one = feature_folder(tmp_path / "one")
    copy = feature_folder(tmp_path / "copy")                              # the same meta.json key
    for val in (one, str(tmp_path / "." / "one"), copy):
        with pytest.raises(SystemExit) as e:
            probe.main(["--train-features", one, "--val-features", val])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and "--val-features" in err and "same" in err, err


def feature_folder(folder, n=8, dim=4, key="k") -> str:
    """A folder as tools/extract.py writes it: features.npy, index.tsv (a header, one line per row), meta.json."""
    os.makedirs(folder)
    np.save(os.path.join(folder, "features.npy"), np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32))
    with open(os.path.join(folder, "index.tsv"), "w") as f:
        f.write("row\tpath\tlabel\tviews\tstart\n" + "".join(f"{r}\tv{r}.mp4\t{r % 2}\t1\t0\n" for r in range(n)))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"key": key, "rows": n, "dim": dim}, f, indent=1)
    return str(folder)


@pytest.mark.parametrize("name, garbage, line", [
    ("meta.json", '{\n "key": "k",\n "rows": 8,,\n}', 3),       # torn JSON: its line
    ("meta.json", '[8]', 1),                                       # JSON, but not extract's
    ("index.tsv", None, 4),                                        # one line of index.tsv replaced by garbage
])
def test_garbage_feature_files_are_one_line_naming_the_file_and_line(tmp_path, name, garbage, line):
    """Issue 29.8 as met: `python tools/probe.py` on a features folder with a garbage meta.json or index.tsv
    line ends in one line naming the file and the line, exit 2."""
    good, bad = feature_folder(tmp_path / "train"), feature_folder(tmp_path / "val")
    path = os.path.join(bad, name)
    if garbage is None:
        lines = open(path).read().splitlines(keepends=True)
        lines[line - 1] = "3\tv3.mp4\tnot-a-label\n"
        garbage = "".join(lines)
    with open(path, "w") as f:
        f.write(garbage)
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "probe.py"), "--train-features", good,
                        "--val-features", bad], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("probe.py: error: ") and f"{path}:{line}:" in err[0], r.stderr
    other = feature_folder(tmp_path / "other", key="k2")                 # features of another list
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "probe.py"), "--train-features", good,
                        "--val-features", other], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "8 train / 8 val features" in r.stdout, r.stderr   # the good folder works


# -----------------------------------------------------------------------------
# predict


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A finetune.py final.pt: the cpu classifier, the motion classes, 96-px views, 1 clip x 3 crops."""
    torch.manual_seed(2)
    cfg = finetune.resolve_config({"preset": "cpu", "crop": 96, "short_side": 96, "test_short_side": 96})
    k = len(synthetic.MOTION_CLASSES)
    model = finetune.build_model(cfg, k)
    path = tmp_path_factory.mktemp("ft") / "final.pt"
    torch.save({"model": model.state_dict(), "config": finetune.dataclasses.asdict(cfg), "num_classes": k,
                "classes": list(synthetic.MOTION_CLASSES)}, path)
    return str(path), model.eval(), cfg


def test_predict_reports_top_classes_and_skips_unreadable_videos(syn, finetuned, tmp_path, capsys):
    path, model, cfg = finetuned
    vids = os.path.join(syn, "videos")
    good = [str(p) for p, _ in data.read_annotations(os.path.join(vids, "val_motion.txt"), vids)][:2]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(SystemExit) as e:
        predict.main(["--init", path, "--video", good[0], str(broken), good[1], "--json",
                       "--precision", "fp32"])
    assert e.value.code == 1                                     # a video failed; the others still ran
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert "trained from scratch" not in cap.err + cap.out                # nothing is trained here
    errors = [line for line in cap.err.splitlines() if "error" in line]
    assert len(errors) == 1 and str(broken) in errors[0]
    assert [o["video"] for o in out] == [good[0], str(broken), good[1]] and "error" in out[1]
    # Independently: the test views (1 clip x 3 crops) through the model, softmax averaged.
    # In-process loading (num_workers 0): a reference computation, no worker processes to fork.
    loader = data.build_finetune_loader("test", finetune.dataclasses.replace(finetune.data_config(cfg), test_clips=1,
                                                                             num_workers=0),
                                        ann=os.path.join(vids, "val_motion.txt"), root=vids, verbose=False)
    batch = next(iter(loader))
    with torch.no_grad():
        views = batch["video"][0]                                 # (3, 3, T, c, c)
        want = model(views).softmax(-1).mean(0)
    top = out[0]["top"]
    assert len(top) == len(synthetic.MOTION_CLASSES) and out[0]["views"] == 3
    assert top[0]["index"] == int(want.argmax()) and top[0]["class"] == synthetic.MOTION_CLASSES[int(want.argmax())]
    assert abs(top[0]["prob"] - float(want.max())) < 1e-4
    assert abs(sum(t["prob"] for t in top) - 1) < 1e-3 and top == sorted(top, key=lambda t: -t["prob"])


def test_predict_needs_a_finetuned_checkpoint(syn, pretrained, capsys):
    vids = os.path.join(syn, "videos")
    video = str(data.read_annotations(os.path.join(vids, "val_motion.txt"), vids)[0][0])
    with pytest.raises(SystemExit) as e:
        predict.main(["--preset", "cpu", "--init", pretrained, "--video", video])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "classifier head" in err, err



def test_predict_refuses_class_names_that_do_not_fit_the_head(syn, finetuned, tmp_path, capsys):
    path, _, _ = finetuned
    ck = torch.load(path, weights_only=True)
    ck["classes"] = ck["classes"] + ["extra"]                        # one name more than the head's outputs
    bad = tmp_path / "bad.pt"
    torch.save(ck, bad)
    vids = os.path.join(syn, "videos")
    video = str(data.read_annotations(os.path.join(vids, "val_motion.txt"), vids)[0][0])
    with pytest.raises(SystemExit) as e:
        predict.main(["--init", str(bad), "--video", video])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "names 3 classes but its head has 2" in err, err

# -----------------------------------------------------------------------------
# tables: the cells are written, a rerun skips them, the chart is drawn


PUBLISHED = os.path.join(REPO, "assets", "tables.json")


def published_copy(folder) -> str:
    """assets/tables.json as a checkout holds it, at <folder>/assets/tables.json."""
    os.makedirs(os.path.join(folder, "assets"))
    with open(PUBLISHED, "rb") as f, open(os.path.join(folder, "assets", "tables.json"), "wb") as g:
        g.write(f.read())
    return os.path.join(folder, "assets", "tables.json")


def test_tables_plumbing_writes_cells_resumes_and_draws(syn, tmp_path, capsys, monkeypatch):
    """Issue 29.6 as met: a run "to try the plumbing" in a checkout writes under its --out, never into the
    published assets/tables.json, and its cells are keyed by its recipe (--max-steps, the extra flags)."""
    published = published_copy(tmp_path)
    monkeypatch.chdir(tmp_path)                                  # the checkout: assets/tables.json is there
    before = (open(published, "rb").read(), os.stat(published).st_mtime_ns)
    small = ("--crop 96 --short-side 96 104 --frames 4 --workers 0 --video-batch 2 --image-batch 4 "
             "--global-video-batch 2 --global-image-batch 4 --precision fp32 --vocab-size 16")
    ft = "--crop 96 --short-side 96 --test-short-side 96 --frames 4 --workers 0 --batch-size 4 --precision fp32"
    argv = ["--tables", "2", "--seeds", "1", "--data", syn, "--out", "runs", "--max-steps", "2",
            "--pretrain-args", small, "--finetune-args", ft]
    cells = tables.main(argv)
    assert (open(published, "rb").read(), os.stat(published).st_mtime_ns) == before
    tag = tables.variant_tag(tables.recipe_variant(small, ft, 2, syn))
    assert tag and set(cells) == {"finetune|BEVT|appearance|s0" + tag, "finetune|BEVT|motion|s0" + tag}
    for c in cells.values():
        assert set(finetune.EVAL_MODES) <= set(c) and all(0 <= c[m] <= 100 for m in finetune.EVAL_MODES)
    on_file = json.load(open(tmp_path / "runs" / "tables.json"))
    assert on_file["cells"] == cells and on_file["recipe"]["max_steps"] == 2
    from PIL import Image
    assert Image.open(tmp_path / "runs" / "tables.png").size[0] > 100
    # Every run logs its throughput with its last step (images/s in the image stage, clips/s otherwise).
    logs = sorted((tmp_path / "runs").rglob("metrics.jsonl"))
    assert {p.parent.name for p in logs} >= {"image", "joint", "appearance", "motion"}, logs
    for p in logs:
        last = [r for r in map(json.loads, p.read_text().splitlines()) if "loss" in r][-1]
        unit = "images_per_s" if p.parent.name == "image" else "clips_per_s"
        assert last["step"] == 2 and last[unit] > 0, (p, last)
    # A rerun trains nothing: the runs' folders may even be gone.
    import shutil
    shutil.rmtree(tmp_path / "runs" / "s0")
    capsys.readouterr()
    assert tables.main(argv) == cells
    assert not (tmp_path / "runs" / "s0").exists()
    assert "Table 2 (mini)" in capsys.readouterr().out
    # The probe cells of Tables 1 and 8: one extraction per split, both label sets.
    tcfg = tables.TablesConfig(seeds=1, data=syn, out="runs", results=str(tmp_path / "t.json"), max_steps=2,
                               pretrain_args=small, finetune_args=ft)
    runner = tables.Tables(tcfg)
    runner.probe("BEVT-V", 0)
    assert (tmp_path / "runs" / "s0" / "video" / "video" / "final.pt").exists()     # BEVT-V: the video stage
    for task in ("appearance", "motion"):
        c = runner.cells[runner.key("probe", "BEVT-V", task, 0)]
        assert 0 <= c["linear"] <= 100 and 0 <= c["knn"] <= 100
    tables.draw_tables_chart(runner.own_cells(), ("1", "2", "8"), str(tmp_path / "all.png"))   # partial tables
    text = tables.tables_text(runner.own_cells(), ("1", "2", "8"))
    assert "| BEVT-V | " in text and "| Random-3D | - | - |" in text


def test_tables_processes_sharing_a_results_file_keep_each_others_cells(tmp_path):
    """Two runs on other seeds write into one file: each write merges what is on file."""
    a = tables.Tables(tables.TablesConfig(results=str(tmp_path / "t.json")))
    b = tables.Tables(tables.TablesConfig(results=str(tmp_path / "t.json")))
    a.record("finetune|BEVT|motion|s0", {"normal": 90.0}, 1.0)
    b.record("finetune|BEVT|motion|s1", {"normal": 80.0}, 1.0)
    a.record("finetune|BEVT|appearance|s0", {"normal": 100.0}, 1.0)
    cells = json.load(open(tmp_path / "t.json"))["cells"]
    assert set(cells) == {"finetune|BEVT|motion|s0", "finetune|BEVT|motion|s1", "finetune|BEVT|appearance|s0"}
    assert (tmp_path / "t.json.lock").exists()                     # a lock file stays (data.FileLock); it is free
    # A file made with another recipe is never mixed with this one's cells.
    other = json.load(open(tmp_path / "t.json"))
    other["recipe"]["finetune"]["frame_interval"] = 99
    (tmp_path / "old.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="another recipe"):
        tables.Tables(tables.TablesConfig(results=str(tmp_path / "old.json")))
    # Extra flags for every run (a longer pretraining) make another recipe too.
    with pytest.raises(ValueError, match="another recipe"):
        tables.Tables(tables.TablesConfig(results=str(tmp_path / "t.json"), pretrain_args="--epochs 32"))


def test_every_flag_that_changes_a_number_is_part_of_the_recipe_and_the_cell_key(tmp_path):
    """Issue 29.6: --max-steps (like the extra flags and another synthetic set) makes another recipe: refused
    by the published file and by a run folder of the default recipe, and part of every cell's key."""
    published, none = published_copy(tmp_path), str(tmp_path / "no-data")
    for change in ({"max_steps": 2}, {"finetune_args": "--epochs 2"}, {"pretrain_args": "--lr 1e-3"}):
        with pytest.raises(ValueError, match="another recipe") as e:
            tables.Tables(tables.TablesConfig(results=published, data=none, **change))
        assert next(iter(change)) in str(e.value)
    runner = tables.Tables(tables.TablesConfig(results=published, data=none, out=str(tmp_path / "runs")))
    assert runner.key("finetune", "BEVT", "appearance", 0) == "finetune|BEVT|appearance|s0"   # published keys
    assert "| appearance | 97.7 ± 2.5 (5) |" in tables.tables_text(runner.own_cells(), ("2",))   # README's cell
    short = tables.Tables(tables.TablesConfig(results=str(tmp_path / "short.json"), data=none, max_steps=2,
                                              out=str(tmp_path / "runs")))
    assert short.key("finetune", "BEVT", "appearance", 0).startswith("finetune|BEVT|appearance|s0|recipe-")
    short.record(short.key("finetune", "BEVT", "appearance", 0), {"normal": 50.0}, 1.0)
    assert list(short.own_cells()) == ["finetune|BEVT|appearance|s0"]
    budget = tables.Tables(tables.TablesConfig(results=os.path.join(REPO, "assets", "tables_budget.json"), data=none,
                                               pretrain_args="--epochs 32", out=str(tmp_path / "budget")))
    assert len(budget.own_cells()) == 18        # keyed before keys named a recipe: the file's (checked) recipe
    runner.claim_out()                                           # the default recipe's runs in runs/ ...
    with pytest.raises(ValueError, match="holds the runs of another recipe"):
        short.claim_out()                                        # ... are never reused by the short recipe


def test_a_read_only_results_file_fails_before_any_run(syn, tmp_path):
    """Issue 29.6/8: a results file that cannot be written fails at once, in one line, before any run."""
    ro = published_copy(tmp_path)
    immutable = subprocess.run(["chattr", "+i", ro], capture_output=True).returncode == 0
    if not immutable:
        if os.geteuid() == 0:
            pytest.skip("no way to make a file read-only for root here (chattr failed)")
        os.chmod(ro, 0o444)
    try:
        t0 = __import__("time").time()
        r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "tables.py"), "--tables", "2", "--seeds", "6",
                            "--only-seeds", "5", "--max-steps", "1", "--data", syn, "--out", str(tmp_path / "runs"),
                            "--results", ro], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
        seconds = __import__("time").time() - t0
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", ro])
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "tables.py: error:" in lines[0] and ro in lines[0] and "read-only" in lines[0]
    assert not (tmp_path / "runs").exists() and seconds < 60


class _Calls(tables.Tables):
    """The runner with its two kinds of run replaced by a record of which were asked for."""
    def __init__(self, tcfg):
        super().__init__(tcfg)
        self.calls = []

    def probe(self, row, seed):
        self.calls.append(("probe", row, seed))

    def finetune(self, row, task, seed):
        self.calls.append(("finetune", row, task, seed))


def test_tables_rows_selects_what_runs_now(tmp_path, capsys):
    everything = _Calls(tables.TablesConfig(results=str(tmp_path / "t.json"), seeds=2))
    everything.run(("1", "2", "8"))
    assert len(everything.calls) == 2 * (2 + 5 * 3 + 7 * 2)         # per seed: Table 2, 1 and 8's runs
    some = _Calls(tables.TablesConfig(results=str(tmp_path / "t.json"), seeds=2, rows="tube,random-3d,bevt-i"))
    some.run(("1", "8"))
    assert some.calls == [c for s in (0, 1) for c in (
        ("probe", "BEVT-I", s), ("finetune", "BEVT-I", "appearance", s), ("finetune", "BEVT-I", "motion", s),
        ("probe", "BEVT-V", s), ("finetune", "BEVT-V", "motion", s),           # Table 8's tube row is BEVT-V
        ("probe", "random-3d", s), ("finetune", "random-3d", "motion", s))]
    with pytest.raises(SystemExit):
        tables.main(["--tables", "8", "--rows", "bevt-i", "--results", str(tmp_path / "t.json")])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--rows: bevt-i is not a row of table(s) 8" in err and "random-3d" in err


def test_tables_text_gives_mean_and_std_over_seeds():
    cells = {f"finetune|BEVT|motion|s{s}": {"normal": v, "single-frame": 25.0, "shuffle": 25.0}
             for s, v in enumerate((90.0, 100.0, 95.0))}
    st = tables.cell_stats(cells, "finetune", "BEVT", "motion", "normal")
    assert st == (95.0, 5.0, 3)                                   # sample std of 90, 100, 95
    assert "95.0 ± 5.0 (3)" in tables.tables_text(cells, ("2",))
