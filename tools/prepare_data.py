"""Data preparation: a real data set from what the common downloaders leave on disk to what
data.py's loaders read. One subcommand each:

    lists    official annotations -> `relative/path label` list + class-name file
             (Kinetics-400 CSV, Something-Something-v2 JSON, Diving48 JSON), or an
             image folder tree -> its list (written once, read by every rank)
    resize   a video tree -> the same tree at a given short side, H.264 mp4, video only
             (PyAV decode + encode, parallel processes, resumable, failures listed)
    check    a list -> the files that are missing or that data.read_video cannot use,
             and the count against the official split size

    python tools/prepare_data.py lists {k400,ssv2,diving48} --official-ann FILE --out-file LIST [--video-root DIR]
    python tools/prepare_data.py lists images --image-root IMAGE_FOLDER --out-file LIST
    python tools/prepare_data.py resize --video-root DIR --out DIR --short-side 256 [--workers N]
    python tools/prepare_data.py check --video-list LIST --video-root DIR [--official k400-val | --expect N] [--quick]
"""
from __future__ import annotations

import argparse
import collections
import functools
import heapq
import json
import os
import re
import signal
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

if __name__ == "__main__":      # Ctrl-C while the imports below run (a second or two): one line, exit 130
    signal.signal(signal.SIGINT, lambda *_: (print("prepare_data.py: interrupted", file=sys.stderr), os._exit(130)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import av            # noqa: E402
import numpy as np   # noqa: E402

import data          # noqa: E402
import train         # noqa: E402
from tools import run_script, sigint_held   # noqa: E402

# ---- Conventions: how the downloaders name the files, and what the lists say
#
# Kinetics-400. The annotations are the CSVs of the CVDF mirror
# (s3.amazonaws.com/kinetics/400/annotations/{train,val,test}.csv) or of
# ActivityNet's crawler, header `label,youtube_id,time_start,time_end,split`
# (older files add `is_cc`; an unlabelled test CSV has no `label`). Columns
# are found by their header names, in any order. ActivityNet's download.py (trim
# format `%06d`) and the CVDF tarballs name a clip
#     <youtube_id>_<time_start:06d>_<time_end:06d>.mp4      e.g. ---QUuC4vJs_000084_000094.mp4
# and put it in one of these folder layouts (--layout):
#     flat              <name>             the CVDF tarballs extracted (k400/train/<name>); mmaction2 "level 1"
#     class             <label>/<name>     ActivityNet download.py and CVDF arrange_by_classes.py (the label
#                                          as the CSV writes it, spaces kept)
#     class-underscore  <label_>/<name>    mmaction2's "level 2" lists (spaces in the label become '_')
# --prefix puts a folder in front of every path (e.g. `train/`). The classes are
# the sorted unique labels, sorted with spaces read as '_' (mmaction2's
# parse_kinetics_splits; the label_map_k400.txt order: 0 = abseiling, 399 =
# zumba). Validation and test lists must use the training classes, so the
# class file (--classes) is read back when it exists: make the training list first.
# A CSV known to be a validation or test split (its `split` column, else its file
# name: val, validate, test) never makes a class file of its own: with none there,
# it is refused (make the training list first, or pass --classes). A training or
# validation split must label every row. CSVs and JSONs may start with a UTF-8
# byte-order mark (spreadsheet programs write one).
#
# Something-Something v2 (20BN). something-something-v2-{train,validation,test}.json
# are lists of {"id", "label", "template", "placeholders"} (the test file: ids
# only); something-something-v2-labels.json maps each template with its
# brackets removed ("Putting something on a surface") to the class index, a
# string. A video is `<id>.webm`, all in one folder. An entry's class is
# labels[template without '[' and ']'] (mmaction2's parse_sthv2_splits); the
# class file lists the templates in index order. VideoMAE and others convert
# the webm files to mp4 first (`resize` writes mp4): pass --ext .mp4 then.
#
# Diving48, V2 annotations. Diving48_V2_{train,test}.json are lists of
# {"vid_name", "label", "start_frame", "end_frame"} (start and end are not
# used: the whole clip is the sample); Diving48_vocab.json holds the 48 classes as 4 words
# each (take-off, somersaults, twists, flight position), joined by '+' as the
# class name (mmaction2's tools/data/diving48/label_map.txt: Back+15som+05Twis+FREE). A video is `<vid_name>.mp4` in the folder `rgb/` of
# Diving48_rgb.tar.gz.
#
# An entry without a label (the K400 and SSv2 test files) is written with
# label -1, and the summary says how many.
#
# Official split sizes (rows of the annotation files; `check --official NAME`):
#     Kinetics-400  train 246,534  val 19,906  test 39,805   rows of the CVDF CSVs, as CVDF's
#                   arrange_by_classes.py counts them. Downloads hold fewer: CVDF has
#                   240,258 (+1,392 replacements) / 19,881 / 38,685 videos, and YouTube
#                   loses more every year. (Some write-ups give 246,535 / 19,907: one
#                   more each, what `wc -l` counts with the header line.)
#     SSv2          train 168,913  val 24,777  test 27,157   (220,847 videos in all)
#     Diving48 V2   train 15,027   test 1,970

OFFICIAL_SIZES = {
    "k400-train": 246_534, "k400-val": 19_906, "k400-test": 39_805,
    "ssv2-train": 168_913, "ssv2-val": 24_777, "ssv2-test": 27_157,
    "diving48-train": 15_027, "diving48-test": 1_970,
}
K400_NAME = "{youtube_id}_{time_start:06d}_{time_end:06d}"         # + the extension
K400_LAYOUTS = {"flat": "{name}", "class": "{label}/{name}", "class-underscore": "{label_}/{name}"}
LIST_EXTS = {"k400": ".mp4", "ssv2": ".webm", "diving48": ".mp4"}   # as downloaded
UNLABELLED = -1                                                     # the label of an entry that has none


# ---- lists: official annotations -> `relative/path label` + class names


def _k400_class_order(label: str) -> str:
    return label.replace(" ", "_")              # mmaction2 sorts the folder names, where spaces are '_'


def read_kinetics_csv(path: data.PathLike) -> list[tuple[str, int, int, Optional[str]]]:
    """An official Kinetics CSV -> rows (youtube_id, time_start, time_end, label or None)."""
    return _read_kinetics_csv(path)[0]


def _read_kinetics_csv(path: data.PathLike) -> tuple[list, set]:
    """An official Kinetics CSV -> (rows (youtube_id, time_start, time_end, label or None),
    the values of its `split` column, lower case; empty if it has none).

    Columns are found by their names in the header, so any order (and extra
    columns such as `split`, `is_cc`) is fine; a UTF-8 byte-order mark in front
    is skipped; times are whole seconds (written `10` or `10.0`). Blank lines are skipped.
    """
    import csv
    path = data._check_exists(Path(path), "Kinetics CSV")
    need = ("youtube_id", "time_start", "time_end")
    rows, splits = [], set()
    with open(path, newline="", encoding="utf-8-sig", errors="strict") as f:   # -sig: a byte-order mark is not a name
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader, [])]
            if not all(c in header for c in need):
                raise ValueError(f"{path}: expected a Kinetics CSV whose header names {', '.join(need)} "
                                 f"(and label), got {','.join(header)[:120]!r}")
            col = [header.index(c) for c in need]
            lab = header.index("label") if "label" in header else None
            split = header.index("split") if "split" in header else None
            for fields in reader:
                if not "".join(fields).strip():
                    continue
                try:
                    yid = fields[col[0]].strip()
                    t0, t1 = int(float(fields[col[1]])), int(float(fields[col[2]]))
                    if not yid:
                        raise ValueError
                except (IndexError, ValueError, OverflowError):
                    raise ValueError(f"{path}:{reader.line_num}: expected a youtube_id and whole-second times, "
                                     f"got {','.join(fields)[:120]!r}") from None
                label = fields[lab].strip() if lab is not None and lab < len(fields) else ""
                rows.append((yid, t0, t1, label or None))
                if split is not None and split < len(fields):
                    splits.add(fields[split].strip().lower())
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: expected CSV, got {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: expected a UTF-8 text CSV, got bytes that are not ({e.reason})") from None
    if not rows:
        raise ValueError(f"{path}: expected Kinetics rows after the header, got none")
    return rows, splits


K400_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
               "validation": "val", "test": "test", "testing": "test"}


def kinetics_split(path: data.PathLike, splits: set) -> Optional[str]:
    """train | val | test | None: what a Kinetics CSV holds, from its `split` column (one value in
    all rows) or else from its file name (CVDF's train/validate/test.csv, kinetics_val.csv, ...)."""
    named = {K400_SPLITS.get(v) for v in splits}
    if len(named) == 1 and None not in named:
        return named.pop()
    if splits:
        return None                                         # mixed or unknown values: no guess
    words = "".join(c if c.isalpha() else " " for c in Path(path).stem.lower()).split()
    found = {K400_SPLITS[w] for w in words if w in K400_SPLITS}
    return found.pop() if len(found) == 1 else None


def read_class_names(path: data.PathLike) -> list[str]:
    """A class-name file (line i = the name of class i; blank lines skipped) -> names."""
    path = data._check_exists(Path(path), "class-name file")
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    dup = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) != len(names) else []
    if not names or dup:
        raise ValueError(f"{path}: expected one distinct class name per line, got "
                         + (f"{dup[0]!r} twice" if dup else "no names"))
    return names


def _read_json(path: data.PathLike, kind: type, what: str):
    """The JSON value in `path`, which must be a `kind` (list or dict); `what` names the file expected."""
    path = data._check_exists(Path(path), what.split(":")[0])
    try:
        with open(path, encoding="utf-8-sig") as f:              # -sig: a byte-order mark in front is skipped
            value = json.load(f)
    except ValueError as e:                                      # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}: expected {what}, got text that is not JSON ({str(e)[:80]})") from None
    except RecursionError:                                       # e.g. [[[[...]]]] 200,000 deep
        raise ValueError(f"{path}: expected {what}, got JSON nested too deeply to read") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: expected {what}, got a JSON {type(value).__name__}")
    return value


def kinetics_list(ann: data.PathLike, classes: data.PathLike, layout: str = "flat", ext: str = ".mp4",
                  prefix: str = "") -> tuple[list, list, bool]:
    """A Kinetics CSV -> (rows [(relative path, label)], class names, whether the names are new).

    The names are read from `classes` when that file exists (the training
    list's classes, for val/test), else made from this CSV: sorted unique
    labels (see the conventions above); an unlabelled CSV makes none, and a
    validation or test CSV (kinetics_split) is refused rather than numbered
    by its own classes. A row without a label gets -1 and needs the flat
    layout (it has no class folder); in a training or validation CSV it is an error.
    """
    if layout not in K400_LAYOUTS:
        raise ValueError(f"expected a layout in {', '.join(K400_LAYOUTS)}, got {layout!r}")
    rows, splits = _read_kinetics_csv(ann)
    split = kinetics_split(ann, splits)
    unlabelled = [r for r in rows if r[3] is None]
    if unlabelled and split in ("train", "val"):
        raise ValueError(f"{ann}: a {split} split must label every row, got {len(unlabelled):,} of {len(rows):,} "
                         f"without a label (e.g. {unlabelled[0][0]}): expected a CSV with a filled `label` column")
    classes = Path(classes)
    new = not classes.exists()
    if new and split in ("val", "test") and len(unlabelled) < len(rows):
        raise ValueError(f"{ann} is a {split} split and the class file {classes} does not exist: make the training "
                         f"list first (it writes the class file), or pass --classes with the training classes")
    if new:
        names = sorted({r[3] for r in rows if r[3] is not None}, key=_k400_class_order)
    else:
        names = read_class_names(classes)
    index = {name: i for i, name in enumerate(names)}
    template, out = K400_LAYOUTS[layout], []
    for yid, t0, t1, label in rows:
        name = K400_NAME.format(youtube_id=yid, time_start=t0, time_end=t1) + ext
        if label is None:
            if layout != "flat":
                raise ValueError(f"{ann}: {yid} has no label, so no class folder: expected --layout flat "
                                 f"for an unlabelled (test) CSV, got --layout {layout}")
            out.append((prefix + name, UNLABELLED))
            continue
        if label not in index:
            raise ValueError(f"{ann}: the label {label!r} ({yid}) is not one of the {len(names)} classes in "
                             f"{classes}: expected the class file made from the training CSV")
        out.append((prefix + template.format(name=name, label=label, label_=label.replace(" ", "_")), index[label]))
    return out, names, new


def ssv2_list(ann: data.PathLike, labels: data.PathLike, ext: str = ".webm", prefix: str = "") -> tuple[list, list]:
    """Something-Something-v2 JSON + labels JSON -> (rows [(relative path, label)], class names in index order)."""
    entries = _read_json(ann, list, 'an SSv2 annotation file: a JSON list of {"id", "template", ...}')
    table = _read_json(labels, dict, "something-something-v2-labels.json: a JSON object, template -> class index")
    try:
        by_index = {int(v): k for k, v in table.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{labels}: expected class indices as the values, got "
                         f"{next(v for v in table.values() if not str(v).strip().isdigit())!r}") from None
    if sorted(by_index) != list(range(len(table))):
        raise ValueError(f"{labels}: expected the class indices 0..{len(table) - 1} once each, "
                         f"got {len(by_index)} distinct from {min(by_index, default=0)} to {max(by_index, default=0)}")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "id" not in e:
            raise ValueError(f'{ann}: entry {i}: expected an object with an "id", got {json.dumps(e)[:80]}')
        rel = f"{prefix}{e['id']}{ext}"
        if e.get("template") is None:                              # the test file: ids only
            out.append((rel, UNLABELLED))
            continue
        key = str(e["template"]).replace("[", "").replace("]", "")
        if key not in table:
            raise ValueError(f"{ann}: entry {i} (id {e['id']}): expected its template in {labels}, got {key!r}")
        out.append((rel, int(table[key])))
    return out, [by_index[i] for i in range(len(table))]


def diving48_list(ann: data.PathLike, vocab: data.PathLike, ext: str = ".mp4", prefix: str = "") -> tuple[list, list]:
    """Diving48 V2 JSON + Diving48_vocab.json -> (rows [(relative path, label)], class names)."""
    entries = _read_json(ann, list, 'a Diving48 annotation file: a JSON list of {"vid_name", "label", ...}')
    words = _read_json(vocab, list, "Diving48_vocab.json: a JSON list of [take-off, somersaults, twists, flight]")
    names = ["+".join(map(str, w)) if isinstance(w, list) else str(w) for w in words]   # mmaction2's label_map
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "vid_name" not in e:
            raise ValueError(f'{ann}: entry {i}: expected an object with a "vid_name", got {json.dumps(e)[:80]}')
        label = e.get("label")
        if label is None:
            label = UNLABELLED
        elif isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(names):
            raise ValueError(f"{ann}: entry {i} ({e['vid_name']}): expected a class index in 0..{len(names) - 1} "
                             f"({vocab} has {len(names)} classes), got {label!r}")
        out.append((f"{prefix}{e['vid_name']}{ext}", label))
    return out, names


def images_list(root: data.PathLike, out: data.PathLike) -> str:
    """An image folder tree root/<class>/<image> -> its `relative/path label` list at `out` (the rows
    and labels of data.scan_image_folder, in its order) and the class names at <out>.classes.txt.
    Pass it as train.py --image-list so that the ranks of a run do not each scan the folder."""
    samples, classes = data.scan_image_folder(root)
    rows = [(os.fsdecode(samples.relpath_bytes(i)), int(samples.labels[i])) for i in range(len(samples))]
    write_list(rows, out)
    write_atomic(Path(f"{out}.classes.txt"), "".join(f"{n}\n" for n in classes).encode("utf-8"))
    return f"images: {len(rows):,} rows in {len(classes)} classes -> {out}"


def write_atomic(path: Path, payload: bytes) -> None:
    """Write through a temporary file in the same folder and rename: readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())                                   # on disk before the name points at it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _list_bytes(rows) -> bytes:
    return b"".join(os.fsencode(rel) + b" %d\n" % label for rel, label in rows)


def write_list(rows: list, out: data.PathLike, root: Optional[data.PathLike] = None) -> tuple[list, list]:
    """Write rows as a `relative/path label` list, atomically -> (rows written, rows left out).

    With `root`, a row whose file is not under root is left out of `out` and
    written to `<out>.missing.txt` instead (same format), so that a list made
    for a partial download names only files that are there. A name the list
    format cannot hold (a line break, or white space in front) is an error.
    """
    from tqdm import tqdm
    out = Path(out)
    for rel, _ in rows:
        if "\n" in rel or "\r" in rel or rel[:1].isspace():
            raise ValueError(f"expected file names a list line can hold, got {rel!r}")
    kept, missing = list(rows), []
    if root is not None:
        root = data._check_exists(Path(root), "video root")
        kept = []
        for rel, label in tqdm(rows, desc="looking for the files", unit="file", leave=False):
            (kept if (root / rel).is_file() else missing).append((rel, label))
        if not kept:
            raise ValueError(f"expected the listed videos under {root} (e.g. {root / rows[0][0]}), got none of "
                             f"the {len(rows):,}: check --video-root, --layout, --prefix and --ext")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, _list_bytes(kept))
    left_out = out.with_name(out.name + ".missing.txt")
    if missing:
        write_atomic(left_out, _list_bytes(missing))
    elif root is not None:
        left_out.unlink(missing_ok=True)                  # a previous run's: nothing is missing now
    return kept, missing


def make_lists(dataset: str, ann: data.PathLike, out: data.PathLike, classes: Optional[data.PathLike] = None,
               ext: Optional[str] = None, prefix: str = "", root: Optional[data.PathLike] = None,
               layout: str = "flat", labels: Optional[data.PathLike] = None, vocab: Optional[data.PathLike] = None) -> str:
    """`python tools/prepare_data.py lists DATASET ...`: write the list (and the class-name file) -> a one-line summary."""
    out = Path(out)
    classes = Path(classes) if classes else out.parent / f"{dataset}_classes.txt"
    ext = LIST_EXTS[dataset] if ext is None else ext
    if not ext.startswith(".") or "/" in ext:
        raise ValueError(f"--ext: expected a file extension such as .mp4, got {ext!r}")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if dataset == "k400":
        rows, names, new = kinetics_list(ann, classes, layout, ext, prefix)
    elif dataset == "ssv2":
        rows, names = ssv2_list(ann, labels, ext, prefix)
        new = True                                         # from the official labels file: always (re)written
    else:
        rows, names = diving48_list(ann, vocab, ext, prefix)
        new = True
    kept, missing = write_list(rows, out, root)
    if new and names:
        write_atomic(classes, "".join(f"{n}\n" for n in names).encode("utf-8"))
    said = [f"{dataset}: {len(kept):,} rows -> {out}"]
    if names:
        said.append(f"{len(names)} classes {'->' if new else 'from'} {classes}")
    if missing:
        said.append(f"{len(missing):,} of {len(rows):,} not under {root}, left out -> {out}.missing.txt")
    unlabelled = sum(label == UNLABELLED for _, label in kept)
    if unlabelled:
        said.append(f"{unlabelled:,} without a label (written as {UNLABELLED})")
    return "; ".join(said)


# ---- resize: a video tree -> the same tree at short side N (PyAV, parallel processes)
#
# Every video under --video-root (or every file of --video-list) is decoded and encoded again
# with libx264 (CRF 23, preset medium: FFmpeg's defaults, which the common
# resize scripts run, e.g. mmaction2's tools/data/resize_videos.py) into
# <out>/<same relative path>.mp4, video only. The short side becomes N and the
# long side keeps the aspect ratio, rounded to the nearest even number
# (FFmpeg's scale=-2:N; yuv420p needs even sizes), bicubic (FFmpeg's default).
# Frame rate, time base and timestamps are kept, so frame i of the output is
# frame i of the source, at the same instant (FFmpeg's mp4 muxer multiplies a
# time base coarser than 1/10000 by a power of two: 1/16 -> 1/16384). A video whose short side is already N or less is
# kept (--small):
#     keep     its video stream copied unchanged into the output container (no loss,
#              audio dropped), and re-encoded at its own size where the container cannot
#              hold that codec (VP8 in mp4, ...). Default.
#     encode   re-encoded at its own size (made even).
#     upscale  scaled up to N like the others (mmaction2's resize_videos.py does this).
# Each output is written under a hidden temporary name and renamed when
# complete; an existing output is skipped if it opens and its first frame
# decodes (so a killed run resumes), and done again otherwise. On Ctrl-C the
# workers end and their partial files are removed; a run also removes the
# partial files that a killed or crashed run left (those of ended processes). A source that
# fails is listed in <dst>/resize_failures.txt (`relative path<TAB>reason`).

VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts", ".3gp")
RESIZE_FAILURES = "resize_failures.txt"
RESIZE_SMALL = ("keep", "encode", "upscale")
RESIZE_STATUS = ("resized", "kept", "encoded", "skipped", "failed")


def short_side_scaled(w: int, h: int, short: int) -> tuple[int, int]:
    """(w, h) scaled so that the short side is `short`; the other side keeps the aspect ratio,
    rounded to the nearest even number as FFmpeg's scale=-2:short does. Square: (short, short)."""
    if w <= h:
        return short, max(2, 2 * ((h * short + w) // (2 * w)))
    return max(2, 2 * ((w * short + h) // (2 * h))), short


@dataclass(frozen=True)
class ResizeJob:
    """One source video and what to do with it (picklable: it travels to a worker process)."""
    src: str
    dst: str
    rel: str                 # the source's path relative to --video-root (what the failure list names)
    short: int
    small: str = "keep"
    crf: int = 23
    preset: str = "medium"
    gop: int = 0             # 0: the encoder's default (x264: 250); mmaction2's --dense uses 16
    threads: int = 1         # decoder and encoder threads per worker


def _output_problem(path: Path) -> Optional[str]:
    """None if an existing output opens, counts frames and decodes its first frame, else why not."""
    try:
        data.read_video(path, lambda n: np.zeros(1, np.int64))          # counts, then decodes frame 0
        return None
    except data.BadMedia as e:                                       # anything FFmpeg throws: redo it
        return e.reason


def _copy_video_stream(src: Path, tmp: Path) -> None:
    """The first video stream of src, packets copied unchanged, into tmp (audio and the rest left out).

    Each packet is decoded too, as a check: a source that does not decode fails here.
    """
    with av.open(str(src), metadata_errors="ignore") as inp:
        ist = inp.streams.video[0]
        ist.codec_context.thread_count = 1
        frames = 0
        with av.open(str(tmp), "w") as out:
            ost = out.add_stream_from_template(ist)
            for packet in inp.demux(ist):
                if packet.dts is None:                               # the demuxer's end-of-stream packet
                    continue
                frames += len(ist.decode(packet))
                packet.stream = ost
                out.mux(packet)
            frames += len(ist.decode(None))                          # flush the decoder
    if frames == 0:
        raise data.BadMedia(src, "no frame decodes")


# x264 as the synthetic set runs it (tools/synthetic.py, SYN_X264): with its assembly, this x264
# build (PyAV's) wrote different bytes for the same frames after other encodes in the same process
# (4 encodes of one video: 3 different outputs); with asm=0, byte-identical every time, in one
# process or several (~50% more encoding time). --threads above 1 may still differ run to run.
RESIZE_X264 = {"x264-params": "asm=0"}
REORDER = 16     # decoded frames held back so that their timestamps can be put in order (B-frame reorder < 16)


def _encode_video(src: Path, tmp: Path, size: tuple[int, int], job: ResizeJob) -> None:
    """Decode src and encode it into tmp at `size` with libx264 (yuv420p), keeping fps, time base and timestamps.

    Frame i of the output is the decoder's frame i; its timestamp is the i-th
    smallest of the decoded timestamps (sorted over a window of REORDER frames):
    a packed-B-frame AVI decodes its stamps as 1, 2, 4, 3, 5, 7, 6, ... in
    presentation order, and they go out as 1, 2, 3, 4, ... . A frame left
    without one, or with one not after the previous (damaged files), gets the
    previous one plus one frame duration, so the encoder sees increasing timestamps.
    """
    with av.open(str(src), metadata_errors="ignore") as inp:
        ist = inp.streams.video[0]
        ist.thread_type = "AUTO"
        ist.codec_context.thread_count = job.threads
        rate = Fraction(ist.average_rate or ist.guessed_rate or ist.base_rate or 25)
        tb = ist.time_base or 1 / rate
        step = max(1, round(1 / (rate * tb)))                        # one frame, in time-base ticks
        options = {"crf": str(job.crf), "preset": job.preset, "threads": str(job.threads), **RESIZE_X264}
        frames = 0
        with av.open(str(tmp), "w") as out:
            ost = out.add_stream("libx264", rate=rate, options=options)
            ost.width, ost.height, ost.pix_fmt = size[0], size[1], "yuv420p"
            ost.codec_context.time_base = tb                         # the source's: its timestamps go through as they are
            ost.time_base = tb
            if job.gop:
                ost.codec_context.gop_size = job.gop
            held, stamps, last = collections.deque(), [], None

            def put(frame):                                          # the oldest held frame, with the smallest stamp
                nonlocal last
                pts = heapq.heappop(stamps) if stamps else None
                if pts is None or (last is not None and pts <= last):
                    pts = 0 if last is None else last + step
                frame.pts, frame.time_base, last = pts, tb, pts
                for packet in ost.encode(frame):
                    out.mux(packet)

            for frame in inp.decode(ist):
                if frame.pts is not None:
                    heapq.heappush(stamps, frame.pts)
                held.append(frame.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="BICUBIC"))
                if len(held) > REORDER:
                    put(held.popleft())
                frames += 1
            while held:
                put(held.popleft())
            for packet in ost.encode():                              # flush the encoder
                out.mux(packet)
    if frames == 0:
        raise data.BadMedia(src, "no frame decodes")


def _resize_file(src: Path, tmp: Path, job: ResizeJob) -> str:
    """Write the resized (or kept) video to tmp -> its status: resized | kept | encoded."""
    container, stream = data._open_video(src, 1)
    with container:
        w, h = stream.codec_context.width, stream.codec_context.height
    if w < 1 or h < 1:
        raise data.BadMedia(src, f"no picture size ({w}x{h})")
    if min(w, h) > job.short or job.small == "upscale":
        _encode_video(src, tmp, short_side_scaled(w, h, job.short), job)
        return "resized"
    if job.small == "keep":
        try:
            _copy_video_stream(src, tmp)
            return "kept"
        except Exception:              # the codec cannot go in this container, or the source is damaged:
            pass                       # re-encode (a damaged source fails there too, and is reported)
    _encode_video(src, tmp, (max(2, w - w % 2), max(2, h - h % 2)), job)
    return "encoded"


def _resize_one(job: ResizeJob) -> tuple[str, str, str]:
    """One video, in a worker -> (status, its relative path, reason if it failed). Never raises."""
    dst = Path(job.dst)
    try:
        if not Path(job.src).is_file():
            return "failed", job.rel, "missing"
        if dst.exists():
            if _output_problem(dst) is None:
                return "skipped", job.rel, ""
            dst.unlink()                                   # unreadable: done again (and never left looking done)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.stem}.tmp-{os.getpid()}{dst.suffix}")   # hidden; the suffix picks the container
        try:
            status = _resize_file(Path(job.src), tmp, job)
            os.replace(tmp, dst)                            # complete, or absent
        finally:
            tmp.unlink(missing_ok=True)
        return status, job.rel, ""
    except Exception as e:                                  # a bad source (or a full disk): listed, the rest goes on
        reason = e.reason if isinstance(e, data.BadMedia) else f"{type(e).__name__}: {e}"
        return "failed", job.rel, " ".join(str(reason).split())


def _resize_worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)            # Ctrl-C reaches the parent, which ends the pool


PARTIAL = re.compile(r"\.(?P<stem>.+)\.tmp-(?P<pid>\d+)(?P<suffix>\.[^.]+)$")   # _resize_one's .NAME.tmp-PID.EXT


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                                         # another user's: alive
        pass
    return True


def remove_partials(jobs: list) -> int:
    """Remove the hidden partial outputs (.NAME.tmp-PID.EXT) of these jobs left by processes that have
    ended (a Ctrl-C, a kill, a crash) or by this one -> how many. A live process's are another run's, kept."""
    names = collections.defaultdict(set)
    for job in jobs:
        names[os.path.dirname(job.dst)].add(os.path.basename(job.dst))
    removed = 0
    for folder, mine in names.items():
        try:
            entries = [e.name for e in os.scandir(folder) if e.name.startswith(".") and ".tmp-" in e.name]
        except FileNotFoundError:
            continue
        for name in entries:
            m = PARTIAL.fullmatch(name)
            if m and m["stem"] + m["suffix"] in mine and (int(m["pid"]) == os.getpid() or not _alive(int(m["pid"]))):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
    return removed


def _video_files(src: Path, skip: Optional[Path] = None) -> list[str]:
    """Relative paths of the video files under src (VIDEO_EXTS), sorted; hidden names and `skip` left out.
    Symlinked files count (CVDF's arrange_by_classes.py makes them); symlinked folders are not entered."""
    found = []
    for folder, subfolders, files in os.walk(src):
        subfolders[:] = sorted(d for d in subfolders
                               if not d.startswith(".") and (skip is None or Path(folder, d).resolve() != skip))
        found += [os.path.relpath(os.path.join(folder, f), src) for f in sorted(files)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in VIDEO_EXTS]
    return found


def resize_videos(src: data.PathLike, dst: data.PathLike, short: int, workers: int = 1, ann: Optional[data.PathLike] = None,
                  small: str = "keep", ext: str = ".mp4", crf: int = 23, preset: str = "medium", gop: int = 0,
                  threads: int = 1, failures: Optional[data.PathLike] = None,
                  progress: bool = True) -> tuple[dict, list, Path]:
    """Resize every video under src (or listed in `ann`, relative to src) into dst -> (counts, failed, failure list).

    counts: how many were resized / kept / encoded / skipped / failed;
    failed: [(relative path, reason)], also written to `failures`
    (default <dst>/resize_failures.txt; removed when nothing failed).
    `workers` processes (1: this process).
    """
    from tqdm import tqdm
    src = data._check_exists(Path(src), "source folder").resolve()
    dst = Path(dst).resolve()
    if short < 2 or short % 2:
        raise ValueError(f"--short-side: expected an even number of pixels (yuv420p halves the chroma), got {short}")
    if small not in RESIZE_SMALL:
        raise ValueError(f"--small: expected one of {', '.join(RESIZE_SMALL)}, got {small!r}")
    if ext not in (".mp4", ".mkv", ".mov"):
        raise ValueError(f"--ext: expected .mp4, .mkv or .mov (containers that hold H.264), got {ext!r}")
    if workers < 1:
        raise ValueError(f"--workers: expected 1 or more, got {workers}")
    if dst == src:
        raise ValueError(f"expected an output folder other than the source folder, got {dst} for both")
    if ann is not None:
        listed = data.read_annotations(ann, src)
        rels = list(dict.fromkeys(os.fsdecode(listed.relpath_bytes(i)) for i in range(len(listed))))
    else:
        rels = _video_files(src, skip=dst if src in dst.parents else None)
    if not rels:
        raise ValueError(f"{src}: expected video files ({' '.join(VIDEO_EXTS)}) under it, found none")
    jobs, taken = [], {}
    for rel in rels:
        out_rel = os.path.splitext(rel)[0] + ext
        if out_rel in taken:
            raise ValueError(f"expected one source per output name, got {taken[out_rel]} and {rel} "
                             f"both for {dst / out_rel}")
        taken[out_rel] = rel
        jobs.append(ResizeJob(str(src / rel), str(dst / out_rel), rel, short, small, crf, preset, gop, threads))
    dst.mkdir(parents=True, exist_ok=True)
    remove_partials(jobs)                                   # an earlier run's, killed before it could
    counts, failed = dict.fromkeys(RESIZE_STATUS, 0), []
    bar = functools.partial(tqdm, total=len(jobs), desc=f"short side {short}", unit="video", disable=not progress)
    pool = None
    try:
        if workers == 1:
            results = bar(map(_resize_one, jobs))
        else:
            import multiprocessing as mp
            # forkserver: workers fork from a fresh server, never from a process whose FFmpeg thread pools
            # (left by decoding or encoding here) a forked child can deadlock on
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else None)
            with sigint_held():
                pool = ctx.Pool(min(workers, len(jobs)), initializer=_resize_worker_init)
            results = bar(pool.imap_unordered(_resize_one, jobs))
        for status, rel, reason in results:
            counts[status] += 1
            if status == "failed":
                failed.append((rel, reason))
    except BaseException:                                   # Ctrl-C: the workers ended, their partial files removed
        if pool is not None:
            pool.terminate()                                # SIGTERM, then joined
        remove_partials(jobs)
        raise
    if pool is not None:
        pool.close()
        pool.join()
    failed.sort()
    failures = Path(failures) if failures else dst / RESIZE_FAILURES
    if failed:
        write_atomic(failures, "".join(f"{rel}\t{why}\n" for rel, why in failed).encode("utf-8"))
    else:
        failures.unlink(missing_ok=True)                    # a previous run's list: nothing failed now
    return counts, failed, failures


# ---- check: the files of a list (missing, unreadable) and its size


@dataclass
class CheckReport:
    listed: int              # rows of the list
    missing: list            # paths of listed files that are not there
    bad: list                # (path, reason): there, but not usable


def check_files(ann: data.PathLike, root: data.PathLike, threads: int = 0, quick: bool = False) -> CheckReport:
    """Every file of a list: missing, or decoded and checked (below); `quick` only opens and counts.

    bad: files data.read_video cannot use: unreadable, no frames, or a frame
    count (data.count_frames) that disagrees with what decodes from the start.
    With `quick`, a file is bad only if it does not open or counts no frames
    (no decode: minutes instead of hours for Kinetics).
    """
    from tqdm import tqdm
    samples = data.read_annotations(ann, root)
    missing, bad = [], []
    for path, _ in tqdm(samples, desc="opening" if quick else "decoding", unit="video"):
        if not path.is_file():
            missing.append(str(path))
            continue
        try:
            n = data.count_frames(path)
            if n < 1:
                bad.append((str(path), "zero frames"))
            elif not quick:
                container, stream = data._open_video(path, threads)
                with container:
                    decoded = sum(1 for _ in container.decode(stream))
                if decoded != n:
                    bad.append((str(path), f"counted {n} frames but {decoded} decode"))
        except Exception as e:
            bad.append((str(path), f"{type(e).__name__}: {e}"))
    return CheckReport(len(samples), missing, bad)


def count_line(report: CheckReport, expected: int, name: Optional[str] = None) -> str:
    """One line comparing a list with the size it should have (an official split, or --expect)."""
    usable = report.listed - len(report.missing) - len(report.bad)
    what = f"official size of {name}" if name else "expected size"
    diff = report.listed - expected
    return (f"count: {what} {expected:,}; the list has {report.listed:,} rows"
            f"{f' ({diff:+,})' if diff else ' (all)'}, {usable:,} usable ({usable / max(expected, 1):.1%} of {expected:,})")


# ---- the command line

EPILOG = """\
file naming (see the conventions at the top of this file):
  k400      <youtube_id>_<time_start:06d>_<time_end:06d>.mp4; --layout flat (CVDF tarballs),
            class (<label>/..., ActivityNet download.py) or class-underscore (mmaction2)
  ssv2      <id>.webm (20BN archive); --ext .mp4 after converting
  diving48  <vid_name>.mp4 (rgb/ of Diving48_rgb.tar.gz)
examples:
  python tools/prepare_data.py lists k400 --official-ann k400/annotations/train.csv \\
      --out-file lists/k400_train.txt --prefix train
  python tools/prepare_data.py lists k400 --official-ann k400/annotations/val.csv \\
      --out-file lists/k400_val.txt --prefix val
  python tools/prepare_data.py lists ssv2 --official-ann ssv2/something-something-v2-train.json \\
      --official-classes ssv2/something-something-v2-labels.json --out-file lists/ssv2_train.txt
  python tools/prepare_data.py resize --video-root k400 --out k400_256 --short-side 256 --workers 16
  python tools/prepare_data.py check --video-list lists/k400_val.txt --video-root k400_256 --official k400-val --quick
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="every file of an annotation list: missing or unreadable; the count against "
                                     "an official split size",
                       epilog="official sizes: " + ", ".join(f"{k} {v:,}" for k, v in OFFICIAL_SIZES.items()))
    c.add_argument("--video-list", required=True, metavar="LIST", help="the list (`relative/path label` per line)")
    c.add_argument("--video-root", required=True, metavar="DIR", help="the folder the list's paths are relative to")
    size = c.add_mutually_exclusive_group()
    size.add_argument("--official", choices=sorted(OFFICIAL_SIZES), help="compare the count with this split's size")
    size.add_argument("--expect", type=int, help="compare the count with this number")
    c.add_argument("--quick", action="store_true", help="only open each file and count its frames (no decode)")
    c.set_defaults(run=run_check)

    lists = sub.add_parser("lists", help="official annotations (K400 CSV, SSv2 JSON, Diving48 JSON) -> "
                                         "a `path label` list and a class-name file",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    lists.set_defaults(run=run_lists)
    which = lists.add_subparsers(dest="dataset", required=True)
    sets = {
        "k400": which.add_parser("k400", help="a Kinetics-400 CSV (train/val/test)"),
        "ssv2": which.add_parser("ssv2", help="a Something-Something-v2 JSON (train/validation/test)"),
        "diving48": which.add_parser("diving48", help="a Diving48 V2 JSON (train/test)"),
    }
    images = which.add_parser("images", help="an image folder tree root/<class>/<image> (ImageNet): "
                                             "the list train.py --image-list reads")
    images.add_argument("--image-root", required=True, metavar="DIR", help="the image folder (root/<class>/<image>)")
    images.add_argument("--out-file", required=True, metavar="LIST", help="the list to write (class names: "
                        "<list>.classes.txt)")
    for name, p in sets.items():
        p.add_argument("--official-ann", required=True, metavar="FILE", help="the official annotation file")
        p.add_argument("--out-file", required=True, metavar="LIST", help="the list to write")
        p.add_argument("--classes", help=f"the class-name file (default: <out folder>/{name}_classes.txt)"
                       + ("; read if it exists, else written from a training CSV (make the training list "
                          "first: a val/test CSV is refused without it)" if name == "k400" else ""))
        p.add_argument("--ext", help=f"the videos' extension (default {LIST_EXTS[name]})")
        p.add_argument("--prefix", default="", help="a folder in front of every path (e.g. train)")
        p.add_argument("--video-root", metavar="DIR", help="keep only the rows whose file is under this folder; "
                                                          "the others go to <list>.missing.txt")
    sets["k400"].add_argument("--layout", choices=list(K400_LAYOUTS), default="flat",
                              help="flat: <name> (CVDF); class: <label>/<name> (ActivityNet download.py); "
                                   "class-underscore: <label_with_underscores>/<name> (mmaction2)")
    sets["ssv2"].add_argument("--official-classes", required=True, metavar="FILE",
                              help="the official class names: something-something-v2-labels.json")
    sets["diving48"].add_argument("--official-classes", required=True, metavar="FILE",
                                  help="the official class names: Diving48_vocab.json")

    r = sub.add_parser("resize", help="re-encode videos to a short side (H.264 mp4, video only; parallel; "
                                      "resumable; failures listed)")
    r.add_argument("--video-root", required=True, metavar="DIR", help="the folder of source videos")
    r.add_argument("--out", required=True, metavar="DIR", help="the output folder (the same tree, .mp4)")
    r.add_argument("--short-side", type=int, required=True, help="pixels; K400 practice: 256 or 320")
    r.add_argument("--workers", type=int, default=1, help="processes (each encodes one video at a time)")
    r.add_argument("--video-list", metavar="LIST", help="only the files of this list (paths relative to --video-root)")
    r.add_argument("--small", choices=RESIZE_SMALL, default="keep",
                   help="videos whose short side is already <= N: keep (copy the video stream), encode "
                        "(at their own size) or upscale")
    r.add_argument("--ext", default=".mp4", help="output container: .mp4, .mkv or .mov")
    r.add_argument("--crf", type=int, default=23, help="x264 quality (FFmpeg's default 23)")
    r.add_argument("--x264-preset", default="medium", help="x264 preset: ultrafast ... veryslow (FFmpeg's "
                   "default medium)")
    r.add_argument("--gop", type=int, default=0, help="keyframe interval (0: x264's 250)")
    r.add_argument("--threads", type=int, default=1, help="decoder/encoder threads per worker")
    r.add_argument("--failures", metavar="FILE", help=f"where to list the failures (default "
                   f"<out>/{RESIZE_FAILURES})")
    r.set_defaults(run=run_resize)
    return ap


def run_lists(args) -> int:
    if args.dataset == "images":
        print(images_list(args.image_root, args.out_file))
        return 0
    official = {"ssv2": "labels", "diving48": "vocab"}.get(args.dataset)
    print(make_lists(args.dataset, args.official_ann, args.out_file, classes=args.classes, ext=args.ext,
                     prefix=args.prefix, root=args.video_root, layout=getattr(args, "layout", "flat"),
                     **({official: args.official_classes} if official else {})))
    return 0


def run_resize(args) -> int:
    counts, failed, where = resize_videos(args.video_root, args.out, args.short_side, workers=args.workers,
                                          ann=args.video_list, small=args.small, ext=args.ext, crf=args.crf,
                                          preset=args.x264_preset, gop=args.gop, threads=args.threads,
                                          failures=args.failures)
    for rel, why in failed[:20]:
        print(f"FAILED {rel}: {why}")
    print(f"{counts['resized']} resized to a {args.short_side}-px short side, {counts['kept']} kept as they "
          f"were and {counts['encoded']} re-encoded at their own size (short side <= {args.short_side}), "
          f"{counts['skipped']} already done; {counts['failed']} failed"
          + (f" -> {where}" if failed else ""))
    return 1 if failed else 0


def run_check(args) -> int:
    report = check_files(args.video_list, args.video_root, quick=args.quick)
    for path in report.missing:
        print(f"MISSING {path}")
    for path, reason in report.bad:
        print(f"BAD {path}: {reason}")
    if args.official or args.expect is not None:
        print(count_line(report, OFFICIAL_SIZES[args.official] if args.official else args.expect, args.official))
    print(f"{len(report.bad)} bad file(s); {len(report.missing)} missing of {report.listed} listed")
    return 1 if report.bad or report.missing else 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Exit 0 when all went well, 1 when files failed (listed), 2 on a user error (one line)."""
    args = build_parser().parse_args(argv)
    sys.exit(train.run_cli("prepare_data.py", args.run, args))


if __name__ == "__main__":
    run_script(main)
