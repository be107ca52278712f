"""Tests of tools/prepare_data.py: `lists` (official annotation files -> lists and class
files), `resize` (a video tree at a short side: exact, repeatable, timing kept) and `check`.

Real CSV/JSON files in the official formats (a byte-order mark included), real videos written
with PyAV (H.264 mp4, VP8/VP9 webm, an MPEG-4 AVI with packed B-frames); the expected lists are
written out by hand from the conventions (file names of the downloaders, class orders and names
of the official files / mmaction2's maps), never from prepare_data's output.
Run: python -m pytest -q tests/test_prepare_data.py
"""

import os
from pathlib import Path

import numpy as np
import pytest

import data
from tools import prepare_data
from tools import synthetic as synth
from test_data import frame_levels, level_clip   # frames that carry their own index


def write_list(path, rows):
    Path(path).write_text("".join(f"{rel} {label}\n" for rel, label in rows))
    return path


# -----------------------------------------------------------------------------
# Dataset preparation: `python tools/prepare_data.py lists | resize | check`
#
# Real CSV/JSON files in the official formats, real videos written with PyAV;
# the expected lists are written out by hand from the conventions (file names
# of the downloaders, class orders of the official files / mmaction2).


def _write_csv(path, lines):
    Path(path).write_text("\n".join(lines) + "\n")
    return path


def _lines(path):
    return Path(path).read_text().splitlines()


def test_prep_lists_k400_names_layouts_and_class_order(tmp_path):
    train = _write_csv(tmp_path / "train.csv", [
        "label,youtube_id,time_start,time_end,split",
        "zumba,---QUuC4vJs,84,94,train",
        "playing guitar,abcdefghijk,0,10,train",
        "",                                                          # blank lines are skipped
        "a b,-x_y-z_1234,5.0,15.0,train",                            # times written as floats
        "aZ,ZZZZZZZZZZZ,100000,100010,train",
        "abseiling,0123456789a,7,17,train",
    ])
    out = tmp_path / "lists" / "k400_train.txt"
    said = prepare_data.make_lists("k400", train, out, prefix="train")
    # Classes: sorted with spaces read as '_' (mmaction2): "aZ" < "a_b" since 'Z' < '_', though "a b" < "aZ" plainly.
    assert _lines(tmp_path / "lists" / "k400_classes.txt") == ["aZ", "a b", "abseiling", "playing guitar", "zumba"]
    assert _lines(out) == ["train/---QUuC4vJs_000084_000094.mp4 4", "train/abcdefghijk_000000_000010.mp4 3",
                           "train/-x_y-z_1234_000005_000015.mp4 1", "train/ZZZZZZZZZZZ_100000_100010.mp4 0",
                           "train/0123456789a_000007_000017.mp4 2"]
    assert said.startswith("k400: 5 rows") and "5 classes ->" in said
    for layout, folder in (("class", "playing guitar"), ("class-underscore", "playing_guitar")):
        prepare_data.make_lists("k400", train, tmp_path / f"{layout}.txt", classes=tmp_path / "lists" / "k400_classes.txt",
                        layout=layout, ext=".mkv")
        assert _lines(tmp_path / f"{layout}.txt")[1] == f"{folder}/abcdefghijk_000000_000010.mkv 3"
        assert data.read_annotations(tmp_path / f"{layout}.txt", tmp_path).path(1).parent.name == folder
    # Validation: columns in another order plus an extra one; the training classes are read back, not re-derived.
    val = _write_csv(tmp_path / "val.csv", ["youtube_id,label,is_cc,time_end,time_start",
                                            "vvvvvvvvvvv,zumba,0,20,10", "wwwwwwwwwww,a b,1,3,0"])
    said = prepare_data.make_lists("k400", val, tmp_path / "lists" / "k400_val.txt")
    assert _lines(tmp_path / "lists" / "k400_val.txt") == ["vvvvvvvvvvv_000010_000020.mp4 4",
                                                           "wwwwwwwwwww_000000_000003.mp4 1"]
    assert "5 classes from" in said
    stray = _write_csv(tmp_path / "stray.csv", ["label,youtube_id,time_start,time_end", "juggling,jjjjjjjjjjj,0,10"])
    with pytest.raises(ValueError, match="'juggling'.*training CSV"):
        prepare_data.make_lists("k400", stray, tmp_path / "lists" / "stray.txt")
    assert not (tmp_path / "lists" / "stray.txt").exists()
    # A test CSV without a label column: label -1, and only the flat layout.
    test = _write_csv(tmp_path / "test.csv", ["youtube_id,time_start,time_end,split", "ttttttttttt,1,11,test"])
    said = prepare_data.make_lists("k400", test, tmp_path / "lists" / "k400_test.txt")
    assert _lines(tmp_path / "lists" / "k400_test.txt") == ["ttttttttttt_000001_000011.mp4 -1"]
    assert "1 without a label" in said
    with pytest.raises(ValueError, match="expected --layout flat"):
        prepare_data.make_lists("k400", test, tmp_path / "t.txt", layout="class")
    bad = _write_csv(tmp_path / "bad.csv", ["label,youtube_id,time_start,time_end", "zumba,zzzzzzzzzzz,ten,20"])
    with pytest.raises(ValueError, match=r"bad.csv:2: expected a youtube_id and whole-second times"):
        prepare_data.make_lists("k400", bad, tmp_path / "b.txt")


def test_prep_lists_ssv2_and_diving48_from_their_json(tmp_path):
    import json
    labels = tmp_path / "something-something-v2-labels.json"
    labels.write_text(json.dumps({"Moving something up": "0", "Putting something on a surface": "1",
                                  "Pushing something from left to right": "2"}))
    train = tmp_path / "something-something-v2-train.json"
    train.write_text(json.dumps([
        {"id": "78687", "label": "putting a pen on a table", "template": "Putting [something] on a surface",
         "placeholders": ["a pen"]},
        {"id": "42326", "label": "moving a cup up", "template": "Moving [something] up", "placeholders": ["a cup"]},
        {"id": "100", "label": "pushing a box from left to right",
         "template": "Pushing [something] from left to right", "placeholders": ["a box"]},
    ]))
    out = tmp_path / "ssv2_train.txt"
    said = prepare_data.make_lists("ssv2", train, out, labels=labels)
    assert _lines(out) == ["78687.webm 1", "42326.webm 0", "100.webm 2"]
    assert _lines(tmp_path / "ssv2_classes.txt") == ["Moving something up", "Putting something on a surface",
                                                     "Pushing something from left to right"]
    assert said == f"ssv2: 3 rows -> {out}; 3 classes -> {tmp_path / 'ssv2_classes.txt'}"
    prepare_data.make_lists("ssv2", train, tmp_path / "mp4.txt", labels=labels, ext=".mp4", prefix="videos")
    assert _lines(tmp_path / "mp4.txt")[0] == "videos/78687.mp4 1"
    test = tmp_path / "something-something-v2-test.json"
    test.write_text(json.dumps([{"id": "1"}, {"id": "2"}]))
    prepare_data.make_lists("ssv2", test, tmp_path / "ssv2_test.txt", labels=labels)
    assert _lines(tmp_path / "ssv2_test.txt") == ["1.webm -1", "2.webm -1"]
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps([{"id": "5", "template": "Spinning [something]"}]))
    with pytest.raises(ValueError, match="'Spinning something'"):
        prepare_data.make_lists("ssv2", odd, tmp_path / "odd.txt", labels=labels)
    with pytest.raises(ValueError, match="expected something-something-v2-labels.json.*got a JSON list"):
        prepare_data.make_lists("ssv2", train, tmp_path / "x.txt", labels=train)

    vocab = tmp_path / "Diving48_vocab.json"
    vocab.write_text(json.dumps([["Back", "15som", "05Twis", "FREE"], ["Back", "15som", "15Twis", "FREE"],
                                 ["Forward", "25som", "NoTwis", "PIKE"]]))
    dtrain = tmp_path / "Diving48_V2_train.json"
    dtrain.write_text(json.dumps([{"vid_name": "_8Vy3dlHg2w_00000", "label": 2, "start_frame": 0, "end_frame": 83},
                                  {"vid_name": "2x00lRzlTVQ_00001", "label": 0, "start_frame": 0, "end_frame": 67}]))
    prepare_data.make_lists("diving48", dtrain, tmp_path / "d_train.txt", vocab=vocab, prefix="rgb")
    assert _lines(tmp_path / "d_train.txt") == ["rgb/_8Vy3dlHg2w_00000.mp4 2", "rgb/2x00lRzlTVQ_00001.mp4 0"]
    # The names joined with '+', as mmaction2's tools/data/diving48/label_map.txt has them (issue 29).
    assert _lines(tmp_path / "diving48_classes.txt") == ["Back+15som+05Twis+FREE", "Back+15som+15Twis+FREE",
                                                         "Forward+25som+NoTwis+PIKE"]
    dtrain.write_text(json.dumps([{"vid_name": "x", "label": 3}]))
    with pytest.raises(ValueError, match=r"expected a class index in 0\.\.2.*got 3"):
        prepare_data.make_lists("diving48", dtrain, tmp_path / "d.txt", vocab=vocab)


def _lists_cli(capsys, *argv):
    """`python tools/prepare_data.py lists k400 ARGV` as a user runs it -> (exit code, stdout lines, stderr lines)."""
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["lists", "k400", *map(str, argv)])
    out, err = capsys.readouterr()
    return e.value.code, out.splitlines(), [line for line in err.splitlines() if line.strip()]


def test_prep_lists_k400_byte_order_mark_and_val_before_train_are_never_wrong_labels(tmp_path, capsys):
    """Issue 29.1: a CSV saved by a spreadsheet (byte-order mark, CRLF) gives the right labels; a
    validation/test CSV into a folder without a class file is refused, never numbered by itself."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "train.csv").write_bytes(bom + b"label,youtube_id,time_start,time_end,split\r\n"
                                         b"zumba,zzzzzzzzzzz,0,10,train\r\nabseiling,aaaaaaaaaaa,5,15,train\r\n"
                                         b"juggling balls,jjjjjjjjjjj,1,11,train\r\n")
    (tmp_path / "val.csv").write_bytes(bom + b"label,youtube_id,time_start,time_end,split\r\n"
                                       b"zumba,vvvvvvvvvvv,0,10,val\r\n")
    lists = tmp_path / "lists"
    # Validation first, into a folder with no class file: one line, exit 2, nothing written.
    code, out, err = _lists_cli(capsys, "--official-ann", tmp_path / "val.csv", "--out-file", lists / "k400_val.txt")
    assert code == 2 and len(err) == 1 and "make the training list first" in err[0], err
    assert not lists.exists() or not list(lists.iterdir())
    # CVDF's validate.csv has no split column: its name says it; an unlabelled row in a train split is refused.
    _write_csv(tmp_path / "validate.csv", ["youtube_id,label,time_start,time_end", "vvvvvvvvvvv,zumba,0,10"])
    code, _, err = _lists_cli(capsys, "--official-ann", tmp_path / "validate.csv", "--out-file", lists / "v.txt")
    assert code == 2 and len(err) == 1 and "make the training list first" in err[0], err
    _write_csv(tmp_path / "kinetics_train.csv", ["label,youtube_id,time_start,time_end", "zumba,zzzzzzzzzzz,0,10",
                                                 ",yyyyyyyyyyy,0,10"])
    code, _, err = _lists_cli(capsys, "--official-ann", tmp_path / "kinetics_train.csv", "--out-file", lists / "t.txt")
    assert code == 2 and len(err) == 1 and "must label every row" in err[0], err
    assert not lists.exists() or not list(lists.iterdir())
    # The training list (with its byte-order mark): every label right, the class file written.
    code, out, err = _lists_cli(capsys, "--official-ann", tmp_path / "train.csv",
                                "--out-file", lists / "k400_train.txt")
    assert code == 0 and not err
    assert _lines(lists / "k400_classes.txt") == ["abseiling", "juggling balls", "zumba"]
    assert _lines(lists / "k400_train.txt") == ["zzzzzzzzzzz_000000_000010.mp4 2", "aaaaaaaaaaa_000005_000015.mp4 0",
                                                "jjjjjjjjjjj_000001_000011.mp4 1"]
    assert "3 classes ->" in out[-1] and "without a label" not in out[-1]
    # Then the validation list reads those classes back; elsewhere, --classes names them.
    code, out, _ = _lists_cli(capsys, "--official-ann", tmp_path / "val.csv", "--out-file", lists / "k400_val.txt")
    assert code == 0 and _lines(lists / "k400_val.txt") == ["vvvvvvvvvvv_000000_000010.mp4 2"]
    assert "3 classes from" in out[-1]
    code, _, _ = _lists_cli(capsys, "--official-ann", tmp_path / "validate.csv",
                            "--out-file", tmp_path / "other" / "v.txt",
                            "--classes", lists / "k400_classes.txt")
    assert code == 0 and _lines(tmp_path / "other" / "v.txt") == ["vvvvvvvvvvv_000000_000010.mp4 2"]
    # A class file saved with a byte-order mark (an edited label map) reads the same.
    (tmp_path / "bom_classes.txt").write_bytes(bom + b"abseiling\r\njuggling balls\r\nzumba\r\n")
    code, _, _ = _lists_cli(capsys, "--official-ann", tmp_path / "val.csv", "--out-file", tmp_path / "b.txt",
                            "--classes", tmp_path / "bom_classes.txt")
    assert code == 0 and _lines(tmp_path / "b.txt") == ["vvvvvvvvvvv_000000_000010.mp4 2"]


def test_prep_lists_with_root_keep_the_files_that_are_there(tmp_path):
    root = tmp_path / "k400"
    (root / "val").mkdir(parents=True)
    for yid in ("aaaaaaaaaaa", "ccccccccccc"):
        synth.write_video(root / "val" / f"{yid}_000000_000010.mp4", level_clip(4, 32, 32))
    csv = _write_csv(tmp_path / "val.csv", ["label,youtube_id,time_start,time_end,split", "x,aaaaaaaaaaa,0,10,val",
                                            "y,bbbbbbbbbbb,0,10,val", "x,ccccccccccc,0,10,val"])
    (tmp_path / "k400_classes.txt").write_text("x\ny\n")                 # the training list's classes
    out = tmp_path / "val.txt"
    said = prepare_data.make_lists("k400", csv, out, prefix="val", root=root)
    assert _lines(out) == ["val/aaaaaaaaaaa_000000_000010.mp4 0", "val/ccccccccccc_000000_000010.mp4 0"]
    assert _lines(tmp_path / "val.txt.missing.txt") == ["val/bbbbbbbbbbb_000000_000010.mp4 1"]
    assert "1 of 3 not under" in said
    assert len(data.read_annotations(out, root)) == 2
    synth.write_video(root / "val" / "bbbbbbbbbbb_000000_000010.mp4", level_clip(4, 32, 32))
    prepare_data.make_lists("k400", csv, out, prefix="val", root=root)
    assert len(_lines(out)) == 3 and not (tmp_path / "val.txt.missing.txt").exists()   # the stale one is gone
    with pytest.raises(ValueError, match="none of the 3"):
        prepare_data.make_lists("k400", csv, tmp_path / "none.txt", root=root)             # no prefix: nothing found
    assert not (tmp_path / "none.txt").exists()


def _with_audio(path, frames, fps=16):
    """An H.264 mp4 with an AAC audio track beside the video (a downloaded clip has one)."""
    import av
    from fractions import Fraction
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        a = c.add_stream("aac", rate=8000)
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for p in v.encode(frame):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        samples = np.zeros((1, 8000 * len(frames) // fps), np.float32)
        af = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        af.sample_rate, af.pts = 8000, 0
        for p in a.encode(af):
            c.mux(p)
        for p in a.encode():
            c.mux(p)


def _probe(path):
    import av
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return s.codec_context.name, s.codec_context.width, s.codec_context.height, len(c.streams.audio), s.average_rate


def _times(path):
    """The presentation time of every decoded frame, seconds."""
    import av
    with av.open(str(path)) as c:
        return [float(f.time) for f in c.decode(video=0)]


def test_prep_resize_short_side_frames_kept_and_resumable(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "abseiling").mkdir(parents=True)
    n = 20
    synth.write_video(src / "abseiling" / "land.mp4", level_clip(n, 64, 96))
    synth.write_video(src / "abseiling" / "port.mp4", level_clip(n, 96, 64))
    synth.write_video(src / "odd.mp4", level_clip(n, 60, 100))
    _with_audio(src / "small.mp4", level_clip(n, 24, 36))
    synth.write_video(src / "small9.webm", level_clip(n, 24, 36), codec="libvpx-vp9")
    synth.write_video(src / "small8.webm", level_clip(n, 24, 36), codec="libvpx")
    (src / "broken.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    (src / "notes.txt").write_text("not a video")
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["resize", "--video-root", str(src), "--out", str(dst), "--short-side", "32",
                           "--workers", "2"])
    assert e.value.code == 1                                        # one source failed
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("3 resized to a 32-px short side, 2 kept as they were and 1 re-encoded")
    assert _lines(dst / "resize_failures.txt")[0].startswith("broken.mp4\t")
    # Short side 32, the other side keeping the aspect ratio, even (100x60 -> 53.3 -> 54); H.264; frames and fps kept.
    assert _probe(dst / "abseiling" / "land.mp4") == ("h264", 48, 32, 0, 16)
    assert _probe(dst / "abseiling" / "port.mp4") == ("h264", 32, 48, 0, 16)
    assert _probe(dst / "odd.mp4") == ("h264", 54, 32, 0, 16)
    for rel in ("abseiling/land.mp4", "abseiling/port.mp4", "odd.mp4"):
        frames, _, count = data.read_video(dst / rel)
        assert count == n
        assert np.abs(frame_levels(frames) - (20 + 5 * np.arange(n))).max() < 4, rel      # frame i is frame i
    for rel in ("abseiling/land.mp4", "odd.mp4", "small.mp4", "small9.webm", "small8.webm"):   # same instants
        assert _times(dst / (os.path.splitext(rel)[0] + ".mp4")) == pytest.approx(_times(src / rel), abs=1e-4), rel
    # Already small: the video stream copied unchanged (audio dropped); VP8 cannot go in mp4, so re-encoded.
    assert _probe(dst / "small.mp4")[:4] == ("h264", 36, 24, 0) and _probe(src / "small.mp4")[3] == 1
    assert _probe(dst / "small9.mp4")[:3] == ("vp9", 36, 24)
    for rel in ("small.mp4", "small9.webm"):
        np.testing.assert_array_equal(data.read_video(dst / (rel[:-len(Path(rel).suffix)] + ".mp4"))[0],
                                      data.read_video(src / rel)[0])
    assert _probe(dst / "small8.mp4")[:3] == ("h264", 36, 24)
    assert not [p for p in dst.rglob(".*")]                          # no temporary file left behind
    outputs = write_list(tmp_path / "out.txt", [(p.relative_to(dst), 0) for p in sorted(dst.rglob("*.mp4"))])
    report = prepare_data.check_files(outputs, dst)                          # every output decodes as counted
    assert report.listed == 6 and not report.missing and not report.bad
    # Again: everything done is skipped; a damaged output is done again; the failure is still listed.
    before = (dst / "odd.mp4").stat().st_mtime_ns
    raw = (dst / "abseiling" / "land.mp4").read_bytes()
    (dst / "abseiling" / "land.mp4").write_bytes(raw[: len(raw) // 3])
    counts, failed, where = prepare_data.resize_videos(src, dst, 32, progress=False)
    assert counts == {"resized": 1, "kept": 0, "encoded": 0, "skipped": 5, "failed": 1}
    assert [rel for rel, _ in failed] == ["broken.mp4"] and where == dst / "resize_failures.txt"
    assert (dst / "odd.mp4").stat().st_mtime_ns == before
    assert data.count_frames(dst / "abseiling" / "land.mp4") == n
    # --ann: only the listed files; --small upscale: scaled like the rest; a failure-free run removes the old list.
    write_list(tmp_path / "two.txt", [("small.mp4", 0), ("abseiling/port.mp4", 1)])
    counts, failed, _ = prepare_data.resize_videos(src, dst, 32, ann=tmp_path / "two.txt", progress=False)
    assert counts["skipped"] == 2 and not failed and not (dst / "resize_failures.txt").exists()
    counts, _, _ = prepare_data.resize_videos(src, tmp_path / "up", 32, ann=tmp_path / "two.txt", small="upscale",
                                      progress=False)
    assert counts["resized"] == 2 and _probe(tmp_path / "up" / "small.mp4")[1:3] == (48, 32)
    with pytest.raises(ValueError, match="even number"):
        prepare_data.resize_videos(src, dst, 31)
    with pytest.raises(ValueError, match="other than the source"):
        prepare_data.resize_videos(src, src, 32)


def test_prep_check_reports_missing_and_unreadable_apart_and_the_official_count(tmp_path, capsys):
    synth.write_video(tmp_path / "good.mp4", level_clip(12, 32, 32))
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4000, np.uint8).tobytes())
    ann = write_list(tmp_path / "list.txt", [("good.mp4", 0), ("gone.mp4", 1), ("corrupt.mp4", 2)])
    for extra in ([], ["--quick"]):
        with pytest.raises(SystemExit) as e:
            prepare_data.main(["check", "--video-list", str(ann), "--video-root", str(tmp_path), "--expect", "5",
                               *extra])
        assert e.value.code == 1
        out = capsys.readouterr().out.splitlines()
        assert [line for line in out if line.startswith("MISSING")] == [f"MISSING {tmp_path / 'gone.mp4'}"]
        assert [line.split(":")[0] for line in out if line.startswith("BAD")] == [f"BAD {tmp_path / 'corrupt.mp4'}"]
        assert "count: expected size 5; the list has 3 rows (-2), 1 usable (20.0% of 5)" in out
        assert out[-1] == "1 bad file(s); 1 missing of 3 listed"
    good = write_list(tmp_path / "good.txt", [("good.mp4", 0)])
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["check", "--video-list", str(good), "--video-root", str(tmp_path),
                           "--official", "diving48-test"])
    assert e.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "count: official size of diving48-test 1,970; the list has 1 rows (-1,969), 1 usable (0.1% of 1,970)"


@pytest.mark.parametrize("argv, expect", [
    (["lists", "k400", "--official-ann", "{json}", "--out-file", "{tmp}/k.txt"],
     "expected a Kinetics CSV whose header names"),
    (["lists", "ssv2", "--official-ann", "{json}", "--official-classes", "{csv}", "--out-file", "{tmp}/s.txt"],
     "got text that is not JSON"),
    (["lists", "ssv2", "--official-ann", "{deep}", "--official-classes", "{csv}", "--out-file", "{tmp}/s.txt"],
     "deep.json: expected"),
    (["resize", "--video-root", "{tmp}", "--out", "{tmp}/out", "--short-side", "255"], "even number of pixels"),
])
def test_prep_commands_bad_input_is_one_line_exit_2(tmp_path, argv, expect):
    import subprocess
    import sys
    (tmp_path / "a.json").write_text('[{"id": "1"}]')
    (tmp_path / "deep.json").write_text("[" * 200_000 + "]" * 200_000)    # issue 33: no RecursionError
    _write_csv(tmp_path / "a.csv", ["label,youtube_id,time_start,time_end", "x,aaaaaaaaaaa,0,10"])
    argv = [a.format(json=tmp_path / "a.json", deep=tmp_path / "deep.json", csv=tmp_path / "a.csv", tmp=tmp_path) for a in argv]
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tools" / "prepare_data.py"), *argv], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("prepare_data.py: error: ") and expect in lines[0]
    assert not list(tmp_path.glob("*.txt"))                              # no list written


def _textured_clip(n, h, w, seed):
    """Frame i: top half grey level 20 + 5i; bottom half a noise picture panning right (what makes x264 work)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w + n, 3), np.uint8)
    frames = np.stack([base[:, i: i + w] for i in range(n)])
    frames[:, : h // 2] = (20 + 5 * np.arange(n))[:, None, None, None]
    return frames


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_prep_resize_is_repeatable_in_one_process_and_in_two(tmp_path):
    """Issue 29.2: the same videos resized again (same process, another process with 2 workers, a resumed
    run) give byte-identical files. x264 with its assembly wrote other bytes after the first encode."""
    import subprocess
    import sys
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for k, rel in enumerate(("a/one.mp4", "a/two.mp4", "three.mp4", "four.mp4")):
        synth.write_video(src / rel, _textured_clip(30, 96, 128, k))
    first, _, _ = prepare_data.resize_videos(src, tmp_path / "first", 64, progress=False)
    prepare_data.resize_videos(src, tmp_path / "again", 64, progress=False)
    assert first["resized"] == 4
    want = _tree_bytes(tmp_path / "first")
    assert len(want) == 4 and _tree_bytes(tmp_path / "again") == want
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tools" / "prepare_data.py"), "resize", "--video-root", str(src),
                        "--out",
                        str(tmp_path / "other"), "--short-side", "64", "--workers", "2"], cwd=root, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _tree_bytes(tmp_path / "other") == want
    # Resumed: two outputs there (one of them cut short, as a killed run can leave it), the rest done now.
    (tmp_path / "resumed" / "a").mkdir(parents=True)
    (tmp_path / "resumed" / "a" / "one.mp4").write_bytes(want["a/one.mp4"])
    (tmp_path / "resumed" / "three.mp4").write_bytes(want["three.mp4"][:300])
    counts, _, _ = prepare_data.resize_videos(src, tmp_path / "resumed", 64, progress=False)
    assert counts["skipped"] == 1 and counts["resized"] == 3
    assert _tree_bytes(tmp_path / "resumed") == want


def _packed_b_frame_avi(path, frames, fps=25):
    """An MPEG-4 Part 2 AVI with packed B-frames, the DivX/XviD format of UCF101 and HMDB51 (and of
    mmaction2's test.avi): PyAV's mpeg4 encoder with 2 B-frames, then, as DivX packs them, each
    P-frame and the first B-frame after it in one chunk, the second B-frame alone, and a not-coded
    VOP holding the place; the DivX user data ending in `p` says so. FFmpeg decodes the frames in
    presentation order with the timestamps 1, 2, 4, 3, 5, 7, 6, ... Keep it under a second (the
    not-coded VOPs carry no modulo_time_base)."""
    import av
    from fractions import Fraction
    assert len(frames) < fps
    h, w = frames.shape[1:3]
    enc = av.CodecContext.create("mpeg4", "w")
    enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
    enc.time_base, enc.framerate, enc.max_b_frames, enc.gop_size, enc.bit_rate = Fraction(1, fps), fps, 2, 12, 4_000_000
    packets = []
    for i, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(f, format="rgb24")
        vf.pts = i
        packets += [(bytes(p), p.pts) for p in enc.encode(vf)]
    packets += [(bytes(p), p.pts) for p in enc.encode(None)]

    def kind(b):
        return "IPBS"[b[b.find(b"\x00\x00\x01\xb6") + 4] >> 6]               # vop_coding_type

    def not_coded_vop(t):      # start code, P, modulo_time_base 0, marker, time increment, marker, vop_coded 0, stuffing
        bits = "0101" + format(t, f"0{(fps - 1).bit_length()}b") + "10"
        bits += "0" + "1" * ((8 - (len(bits) + 1) % 8) % 8)
        return b"\x00\x00\x01\xb6" + int(bits, 2).to_bytes(len(bits) // 8, "big")
    chunks, i = [], 0
    while i < len(packets):
        data, pts = packets[i]
        bs = [b for b, _ in packets[i + 1: i + 3]]
        bs = bs[:next((k for k, b in enumerate(bs) if kind(b) != "B"), len(bs))]
        chunks += [data] if not bs else [data + bs[0], *bs[1:], not_coded_vop(pts)]
        i += 1 + len(bs)
    at = chunks[0].find(b"\x00\x00\x01\xb6")
    chunks[0] = chunks[0][:at] + b"\x00\x00\x01\xb2DivX503b1393p" + chunks[0][at:]   # the `p`: packed
    with av.open(str(path), "w", format="avi") as out:
        st = out.add_stream("mpeg4", rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.codec_context.codec_tag = "XVID"
        for k, data in enumerate(chunks):
            p = av.Packet(data)
            p.stream, p.pts, p.dts, p.time_base, p.is_keyframe = st, k, k, Fraction(1, fps), k == 0 or kind(data) == "I"
            out.mux(p)


def _timing(path):
    """(average frame rate, duration in seconds, presentation times of the decoded frames in decode order)."""
    import av
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return s.average_rate, float(s.duration * s.time_base), [float(f.time) for f in c.decode(s)]


def test_prep_resize_keeps_the_timing_of_a_packed_b_frame_avi(tmp_path):
    """Issue 29.3: frame rate, duration and timestamps of a packed-B-frame AVI survive resize (they
    became 24.7 fps and a gap at frame 3), and frame i of the output is frame i of the source."""
    src, dst, n = tmp_path / "src", tmp_path / "dst", 24
    src.mkdir()
    _packed_b_frame_avi(src / "clip.avi", level_clip(n, 96, 128))
    rate, duration, times = _timing(src / "clip.avi")
    assert rate == 25 and duration == pytest.approx(n / 25)
    assert [round(t * 25) for t in times[:7]] == [1, 2, 4, 3, 5, 7, 6]               # the premise: stamps out of order
    assert np.abs(frame_levels(data.read_video(src / "clip.avi")[0]) - (20 + 5 * np.arange(n))).max() < 3
    counts, failed, _ = prepare_data.resize_videos(src, dst, 64, progress=False)
    assert counts["resized"] == 1 and not failed
    out_rate, out_duration, out_times = _timing(dst / "clip.mp4")
    assert out_rate == 25 and out_duration == pytest.approx(duration, abs=1e-3)
    assert out_times == pytest.approx(sorted(times), abs=1e-4)                      # 0.04, 0.08, 0.12, ...
    frames, _, count = data.read_video(dst / "clip.mp4")
    assert count == n and frames.shape[1:3] == (64, 86)
    assert np.abs(frame_levels(frames) - (20 + 5 * np.arange(n))).max() < 4          # frame i is frame i
