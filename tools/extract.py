"""Frozen features of a video list: the pretrained encoder's final-normed F4, average-pooled
(VideoClassifier.features), one row per video (its views averaged) or per sliding window.
They are what tools/probe.py's linear probe and k-NN read.

    python tools/extract.py --preset cpu --init runs/bevt/joint/final.pt \\
        --video-root data/synthetic/videos --video-list data/synthetic/videos/train_motion.txt \\
        --out runs/features/train
    torchrun --nproc_per_node=8 tools/extract.py --recipe k400 --init bevt.pth --video-root K400/ \\
        --video-list val.txt --out feats/val [--views test] [--clip-len 16 --stride 16]

Writes features.npy, index.tsv, bad.txt and meta.json into --out; resumable chunk by chunk.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import glob
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

if __name__ == "__main__":      # Ctrl-C while the imports below run (a few seconds): one line, exit 130
    signal.signal(signal.SIGINT, lambda *_: (print("extract.py: interrupted", file=sys.stderr), os._exit(130)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import data  # noqa: E402
import finetune  # noqa: E402
import train  # noqa: E402
from finetune import FinetuneConfig, VideoClassifier  # noqa: E402
from train import Runtime  # noqa: E402
from tools import run_script, sigint_held  # noqa: E402


@dataclass
class ExtractConfig:
    video_list: str = ""                  # the videos: a list of `relative/path label` lines, paths under --video-root
    views: str = "centre"                 # centre: one centre clip, centre crop | test: the recipe's clips x crops, averaged
    clip_len: int = 0                     # > 0: one feature row per window of clip_len frames (every --frame-interval-th)
    stride: int = 0                       # frames between window starts (0: clip_len x frame interval, side by side)
    chunk: int = 64                       # videos per part file under <out>/parts: the unit a rerun skips


# The FinetuneConfig fields extract reads (its --help lists only these).
EXTRACT_FIELDS = {"recipe", "preset", "model", "init", "out", "video_root", "sampling", "frames", "frame_interval", "crop",
                  "short_side", "test_short_side", "test_clips", "test_crops", "window", "eval_batch_size",
                  "workers", "precision", "dist_timeout"}
FEATURE_FORMAT = 2
# The barriers after unequal work (each rank's share of the chunks, then rank 0's merge) wait on a gloo group
# of their own with this timeout: they can outlast --dist-timeout by hours on a large list, while the
# collectives of equal work keep --dist-timeout. (torchrun stops the others when a process dies.)
WORK_TIMEOUT = datetime.timedelta(days=2)


class WindowSampling:
    """Every window of `clip_len` frames (each `interval`-th) starting every `stride` frames:
    num_frames -> frame indices (windows, clip_len). A video shorter than one window gives one
    window whose missing frames repeat its last frame."""

    def __init__(self, clip_len: int, interval: int, stride: int):
        self.clip_len, self.interval, self.stride = clip_len, interval, stride

    def __call__(self, num_frames: int) -> np.ndarray:
        span = (self.clip_len - 1) * self.interval + 1                       # frames one window covers
        starts = np.arange(0, max(num_frames - span, 0) + 1, self.stride)   # (windows,)
        idx = starts[:, None] + np.arange(self.clip_len)[None] * self.interval
        return np.minimum(idx, num_frames - 1)                               # (windows, clip_len)


class _EveryVideo(torch.utils.data.Dataset):
    """Each listed video exactly once (no replacement, unlike training): a file that cannot be
    decoded comes back as {"row", "bad": reason}, to be listed in bad.txt."""

    def __init__(self, rows: list, sampling, transform, threads: int):
        self.rows, self.sampling, self.transform, self.threads = rows, sampling, transform, threads

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k: int) -> dict:
        row, path = self.rows[k]
        try:
            frames, idx, _ = data.read_video(path, self.sampling, self.threads)   # (clips, T, H, W, 3)
        except data.BadMedia as e:
            return {"row": row, "bad": e.reason}
        video = self.transform(frames)["video"]
        video = video if video.dim() == 5 else video[None]                      # (views, 3, T, c, c)
        return {"row": row, "video": video, "starts": torch.as_tensor(idx.reshape(len(idx), -1)[:, 0])}


def _as_list(batch: list) -> list:
    return batch                                           # samples differ in view count: no stacking


def _file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def feature_settings(cfg: FinetuneConfig, xcfg: ExtractConfig) -> dict:
    """Everything the features depend on; its digest names the run, so a changed checkpoint,
    list or view never reuses old parts."""
    init = cfg.init or "scratch"
    return {"format": FEATURE_FORMAT, "init": os.path.abspath(init) if init != "scratch" else init,
            "init_digest": _file_digest(init) if init != "scratch" else "", "video_list": os.path.abspath(xcfg.video_list),
            "list_digest": _file_digest(xcfg.video_list), "video_root": os.path.abspath(cfg.video_root),
            "model": cfg.model, "window": list(cfg.window), "sampling": cfg.sampling, "frames": cfg.frames,
            "frame_interval": cfg.frame_interval,
            "crop": cfg.crop, "short_side": cfg.short_side, "test_short_side": cfg.test_short_side,
            "test_clips": cfg.test_clips, "test_crops": cfg.test_crops, "views": xcfg.views,
            "clip_len": xcfg.clip_len, "stride": xcfg.stride, "precision": cfg.precision}


def describe_frozen(report, path: str) -> str:
    """LoadReport.describe for a model used as it is, never trained: the classifier head is not listed
    (features do not use it; predict checks it separately) and what is missing stays random."""
    missing = [k for k in report.missing if not k.startswith("head.")]
    text = report._replace(missing=missing).describe(path)
    return text.replace(f"missing ({len(missing)}, trained from scratch)", f"missing ({len(missing)}, left random)")


def frozen_encoder(cfg: FinetuneConfig, log_fn=print) -> VideoClassifier:
    """The encoder of --init (any kind load_pretrained reads), frozen: eval mode, no gradients."""
    model = finetune.build_model(cfg, num_classes=1)                  # the head is never used for features
    if cfg.init and cfg.init != "scratch":
        log_fn(describe_frozen(finetune.load_pretrained(model, cfg.init, cfg.model), cfg.init))
    else:
        log_fn("init: scratch (random weights)")
    return model.eval().requires_grad_(False)


def extract_features(cfg: FinetuneConfig, xcfg: ExtractConfig, rt: Runtime, progress: bool = True) -> dict:
    """Features of every video of --video-list into --out; returns meta.json's contents.

    Writes features.npy (rows, 8C) float32, index.tsv (row, path, label, views,
    start frame), bad.txt (files that could not be decoded, with the reason)
    and, last, meta.json. The list is cut into chunks of xcfg.chunk videos;
    chunk k is computed by rank k % world and written atomically to
    parts/part_<k>.pt, so a killed run redoes only its unfinished chunks and a
    complete output (meta.json with the same settings) is not recomputed.
    Rank 0 merges the parts. The encoder runs on batches of --eval-batch-size
    views gathered across videos.
    """
    if not xcfg.video_list or not cfg.video_root or not cfg.out:
        raise ValueError("extract needs --video-list (the videos), --video-root (their folder) and --out (the "
                         "output folder)")
    if xcfg.views not in ("centre", "test"):
        raise ValueError(f"--views must be centre or test, got {xcfg.views!r}")
    if xcfg.clip_len < 0 or xcfg.stride < 0 or xcfg.chunk < 1:
        raise ValueError(f"--clip-len and --stride must be >= 0 and --chunk >= 1, got {xcfg.clip_len}, "
                         f"{xcfg.stride}, {xcfg.chunk}")
    if xcfg.clip_len and xcfg.views != "centre":
        raise ValueError("--clip-len (sliding windows) takes centre-crop views; drop --views test")
    ddp, rank, world, device, bf16 = rt
    log_fn = (lambda m: print(m, flush=True)) if rank == 0 else (lambda m: None)
    settings = feature_settings(cfg, xcfg)
    key = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8).hexdigest()
    meta_path = os.path.join(cfg.out, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError:
                meta = {}
        if meta.get("key") == key and os.path.exists(os.path.join(cfg.out, "features.npy")):
            log_fn(f"extract: {cfg.out} is complete for these settings ({meta['rows']} rows); nothing to do")
            return meta
    t0 = time.time()
    listed = data.read_annotations(xcfg.video_list, cfg.video_root)   # [(path, label)]
    rows = [(i, str(p)) for i, (p, _) in enumerate(listed)]
    labels = [label for _, label in listed]
    parts_dir = os.path.join(cfg.out, "parts", key)
    work = work_group(ddp)                                    # all ranks, before any unequal work
    if rank == 0:
        remove_partials(cfg.out)                              # a killed run's; no rank writes before the barrier
        os.makedirs(parts_dir, exist_ok=True)
        for old in os.listdir(os.path.join(cfg.out, "parts")):        # parts of other settings: stale
            if old != key:
                shutil.rmtree(os.path.join(cfg.out, "parts", old), ignore_errors=True)
    if ddp:
        dist.barrier(group=work)                                  # rank 0 has cleaned up (stale parts: any size)

    # --- what one sample is: frames -> views (V, 3, T, c, c)
    interval = cfg.frame_interval if cfg.sampling == "dense" else 1
    if xcfg.clip_len:
        sampling = WindowSampling(xcfg.clip_len, interval, xcfg.stride or xcfg.clip_len * interval)
        transform = data.FinetuneClipTransform("val", cfg.crop, cfg.short_side)
    elif xcfg.views == "centre":
        sampling = data.FrameSampling(cfg.frames, interval, cfg.sampling, num_clips=1, test_mode=True)
        transform = data.FinetuneClipTransform("val", cfg.crop, cfg.short_side)
    else:
        sampling = data.FrameSampling(cfg.frames, interval, cfg.sampling, num_clips=cfg.test_clips, test_mode=True)
        transform = data.FinetuneClipTransform("test", cfg.crop, cfg.short_side, cfg.test_short_side, cfg.test_crops)
    model = frozen_encoder(cfg, log_fn).to(device)
    chunks = [rows[k:k + xcfg.chunk] for k in range(0, len(rows), xcfg.chunk)]
    mine = [k for k in range(len(chunks)) if k % world == rank
            and not os.path.exists(os.path.join(parts_dir, f"part_{k:05d}.pt"))]
    done = len([k for k in range(len(chunks)) if k % world == rank]) - len(mine)
    log_fn(f"extract: {len(rows)} videos in {len(chunks)} chunks over {world} process(es); {done} chunk(s) of "
           f"rank 0 already written; views: " + (f"windows of {xcfg.clip_len} frames every {sampling.stride}"
                                                if xcfg.clip_len else xcfg.views) + f"; {train.precision_note(cfg.precision, bf16, device)}")
    threads = data.decode_threads(cfg.workers)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(chunks[k]) for k in mine), desc="extract", dynamic_ncols=True, file=sys.stderr)
    with torch.no_grad():
        for k in mine:
            ds = _EveryVideo(chunks[k], sampling, transform, threads)
            loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=cfg.workers, collate_fn=_as_list)
            with sigint_held():
                batches = iter(loader)                                            # its workers start here
            feats, out_rows, starts, bad, pending = [], [], [], [], []

            def run_pending():
                """The views of the waiting videos, in batches of --eval-batch-size across videos."""
                views = torch.cat([s["video"] for s in pending])                   # (sum V, 3, T, c, c)
                f = torch.cat([_pooled(model, views[i:i + cfg.eval_batch_size], rt)
                               for i in range(0, len(views), cfg.eval_batch_size)])   # (sum V, 8C)
                for s, fv in zip(pending, f.split([len(s["video"]) for s in pending])):
                    if xcfg.clip_len:                                             # one row per window
                        feats.append(fv)
                        out_rows.extend([s["row"]] * len(fv))
                        starts.extend(s["starts"].tolist())
                    else:                                                         # views averaged: one row
                        feats.append(fv.mean(0, keepdim=True))
                        out_rows.append(s["row"])
                        starts.append(-1)
                pending.clear()

            for (sample,) in batches:
                if "bad" in sample:
                    bad.append((sample["row"], sample["bad"]))
                else:
                    pending.append(sample)
                    if sum(len(s["video"]) for s in pending) >= cfg.eval_batch_size:
                        run_pending()
                if bar is not None:
                    bar.update(1)
            if pending:
                run_pending()
            dim = model.encoder.num_features
            part = {"rows": torch.tensor(out_rows, dtype=torch.long),
                    "features": torch.cat(feats) if feats else torch.zeros(0, dim),
                    "starts": torch.tensor(starts, dtype=torch.long), "bad": [[r, reason] for r, reason in bad]}
            tmp = os.path.join(parts_dir, f"part_{k:05d}.pt.tmp-{os.getpid()}")
            try:
                torch.save(part, tmp)
                os.replace(tmp, os.path.join(parts_dir, f"part_{k:05d}.pt"))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    if bar is not None:
        bar.close()
    if ddp:
        dist.barrier(group=work)                                  # every rank's parts are written (unequal work)
    meta = None
    if rank == 0:
        meta = _merge_parts(cfg, xcfg, settings, key, rows, labels, len(chunks), parts_dir, time.time() - t0)
        log_fn(f"extract: {meta['rows']} feature rows of dim {meta['dim']} from {meta['videos']} videos "
               f"({meta['bad']} unreadable, listed in bad.txt) -> {cfg.out} in {meta['seconds']:.0f} s")
    if ddp:
        dist.barrier(group=work)                                  # rank 0 has merged (work of its own)
    if rank == 0:
        return meta
    with open(meta_path) as f:
        return json.load(f)


def work_group(ddp: bool):
    """The process group of the barriers after unequal work: gloo (a CPU barrier beside NCCL), WORK_TIMEOUT."""
    return dist.new_group(backend="gloo", timeout=WORK_TIMEOUT) if ddp else None


PARTIAL = re.compile(r"(?:features\.npy|index\.tsv|bad\.txt|meta\.json|part_\d+\.pt)\.tmp-(\d+)")


def remove_partials(out: str, pid: Optional[int] = None) -> int:
    """Remove the temporary files (NAME.tmp-PID) that extract writes under `out` and renames when
    complete: those of process `pid`, or all (none is being written) -> how many."""
    removed = 0
    for path in glob.glob(os.path.join(glob.escape(out), "*.tmp-*")) + \
            glob.glob(os.path.join(glob.escape(out), "parts", "*", "*.tmp-*")):
        m = PARTIAL.fullmatch(os.path.basename(path))
        if m and (pid is None or int(m[1]) == pid):
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _pooled(model: VideoClassifier, video: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """(n, 3, T, c, c) -> (n, 8C) float32 on the CPU: the pooled final-normed F4."""
    with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.bf16):
        return model.features(video.to(rt.device, non_blocking=True)).float().cpu()


def _merge_parts(cfg, xcfg, settings, key, rows, labels, n_chunks, parts_dir, seconds) -> dict:
    parts = [torch.load(os.path.join(parts_dir, f"part_{k:05d}.pt"), weights_only=True) for k in range(n_chunks)]
    feats = torch.cat([p["features"] for p in parts]).numpy().astype(np.float32)     # (rows, 8C)
    rws = torch.cat([p["rows"] for p in parts]).tolist()
    starts = torch.cat([p["starts"] for p in parts]).tolist()
    bad = [b for p in parts for b in p["bad"]]
    views = (cfg.test_clips * cfg.test_crops) if (xcfg.views == "test" and not xcfg.clip_len) else 1
    tmp = os.path.join(cfg.out, f"features.npy.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, feats)
        os.replace(tmp, os.path.join(cfg.out, "features.npy"))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    train.write_atomic(os.path.join(cfg.out, "index.tsv"), "row\tpath\tlabel\tviews\tstart\n" + "".join(
        f"{r}\t{rows[r][1]}\t{labels[r]}\t{views}\t{s}\n" for r, s in zip(rws, starts)))
    train.write_atomic(os.path.join(cfg.out, "bad.txt"), "".join(f"{rows[r][1]}\t{why}\n" for r, why in bad))
    meta = {"key": key, "rows": len(rws), "dim": int(feats.shape[1]) if feats.ndim == 2 else 0,
            "videos": len(rows), "bad": len(bad), "seconds": round(seconds, 1), "settings": settings}
    train.write_atomic(os.path.join(cfg.out, "meta.json"), json.dumps(meta, indent=1))      # last: marks it complete
    return meta


def load_features(folder: str) -> dict:
    """A folder written by extract -> {"features": (N, D) float32, "labels": (N,) int64, "paths", "starts", "meta"}."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        raise ValueError(f"{folder} holds no complete features (no meta.json); write them with "
                         f"`python tools/extract.py ... --out {folder}`")
    with open(meta_path) as f:
        meta = json.load(f)
    feats = np.load(os.path.join(folder, "features.npy"))
    paths, labels, starts = [], [], []
    with open(os.path.join(folder, "index.tsv")) as f:
        next(f)
        for line in f:
            _, path, label, _, start = line.rstrip("\n").split("\t")
            paths.append(path)
            labels.append(int(label))
            starts.append(int(start))
    if len(labels) != len(feats) or len(feats) != meta["rows"]:
        raise ValueError(f"{folder}: features.npy has {len(feats)} rows, index.tsv {len(labels)}, meta.json "
                         f"{meta['rows']}; extract it again")
    return {"features": feats, "labels": np.asarray(labels, dtype=np.int64), "paths": paths,
            "starts": np.asarray(starts), "meta": meta}


# -----------------------------------------------------------------------------
# The command line (tools/predict.py and tools/probe.py build theirs with the same two helpers)


def tool_parser(prog: str, doc: str, fields: Optional[set], extra: tuple) -> argparse.ArgumentParser:
    """An argparse parser with FinetuneConfig's flags named in `fields` and every flag of the
    dataclasses in `extra` ((dataclass, choices) pairs)."""
    ap = train.Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if fields:
        own = {"video_root", "frame_interval", "out"}          # named here: the table's names, the tool's meaning
        train.add_dataclass_flags(ap, FinetuneConfig, finetune.CHOICES, only=set(fields) - own)
        if "video_root" in fields:
            ap.add_argument("--video-root", dest="video_root", metavar="DIR", default=None,
                            help="the folder the list's paths are relative to")
        if "frame_interval" in fields:
            ap.add_argument("--frame-interval", dest="frame_interval", metavar="N", type=int, default=None,
                            help="take every N-th frame, dense sampling (default: the recipe's; k400 2, "
                                 "--preset cpu 4)")
        if "out" in fields:
            ap.add_argument("--out", metavar="DIR", default=None, help="the output folder: features.npy, "
                            "index.tsv, bad.txt, meta.json and parts/ (required)")
    for cls, choices in extra:
        train.add_dataclass_flags(ap, cls, choices)
    return ap


def split_flags(args: dict, cls) -> tuple[dict, object]:
    """Parsed flags -> (the FinetuneConfig ones, an instance of `cls` from its own)."""
    names = {f.name for f in dataclasses.fields(cls)}
    mine = {k: v for k, v in args.items() if k in names and v is not None}
    return {k: v for k, v in args.items() if k not in names}, cls(**mine)


def run(cfg: FinetuneConfig, xcfg: ExtractConfig) -> dict:
    rt = train.setup_distributed(cfg.dist_timeout, cfg.precision)
    if rt.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
    try:
        meta = extract_features(cfg, xcfg, rt)
    except BaseException:                                     # Ctrl-C: what this process had half written goes
        remove_partials(cfg.out, os.getpid())
        raise
    if rt.ddp:
        dist.destroy_process_group()
    return meta


def build_parser() -> argparse.ArgumentParser:
    return tool_parser("extract.py", __doc__, EXTRACT_FIELDS, ((ExtractConfig, {"views": ("centre", "test")}),))


def main(argv=None) -> dict:
    ap = build_parser()
    args, xcfg = split_flags(vars(ap.parse_args(argv)), ExtractConfig)
    if args.get("out") is None:
        ap.error("extract needs --out DIR (where features.npy, index.tsv, bad.txt and meta.json go)")
    try:
        cfg = finetune.resolve_config(args)
    except ValueError as e:
        ap.error(str(e))
    return train.run_cli("extract.py", run, cfg, xcfg)


if __name__ == "__main__":
    run_script(main)
