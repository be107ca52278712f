"""Top classes of single videos with a finetuned checkpoint: softmax averaged over the recipe's
test views (the views the checkpoint was finetuned for, unless flags say otherwise), with the
class names finetune.py stores in final.pt.

    python tools/predict.py --init runs/finetune/motion/final.pt --video a.mp4 b.mp4 [--classes names.txt] [--json]

An unreadable video is reported on stderr and the others are still predicted (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import torch  # noqa: E402

import data  # noqa: E402
import finetune  # noqa: E402
import swin3d  # noqa: E402
import train  # noqa: E402
from finetune import FinetuneConfig, VideoClassifier  # noqa: E402
from tools import extract  # noqa: E402


@dataclass
class PredictConfig:
    classes: str = ""                     # class names, one a line (default: those the checkpoint stores, else indices)
    top: int = 5                          # classes printed per video
    json: bool = False                    # one JSON document on stdout instead of text


# The FinetuneConfig fields predict reads; the view settings default to those the checkpoint was finetuned with.
PREDICT_FIELDS = {"recipe", "preset", "model", "init", "sampling", "frames", "frame_interval", "crop",
                  "test_short_side", "test_clips", "test_crops", "window", "eval_batch_size", "precision"}
VIEW_FIELDS = ("model", "sampling", "frames", "frame_interval", "crop", "test_short_side", "test_clips", "test_crops",
               "window")


def load_classifier(args: dict, log_fn=print) -> tuple[VideoClassifier, FinetuneConfig, Optional[list]]:
    """A finetuned classifier from --init, its view settings (the checkpoint's config where the
    flags do not say otherwise) and the class names it stores."""
    init = args.get("init")
    if not init or init == "scratch":
        raise ValueError("predict needs --init: a finetuned checkpoint (finetune.py's final.pt or a released "
                         "classification checkpoint)")
    if not os.path.exists(init):
        raise ValueError(f"--init {init}: no such file")
    ck = swin3d.load_file(init)
    stored = ck.get("config") if isinstance(ck, dict) and isinstance(ck.get("config"), dict) else {}
    base = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in VIEW_FIELDS}
    if stored.get("preset") == "cpu":
        base["preset"] = "cpu"                              # a --preset flag still overrides it, below
    cfg = finetune.resolve_config({**base, **{k: v for k, v in args.items() if v is not None}})
    sd, _ = swin3d.read_state_dict(ck)
    heads = [v for k, (_, v) in sd.items() if k.endswith(("head.weight", "fc_cls.weight")) and v.dim() == 2]
    num_classes = (ck.get("num_classes") if isinstance(ck, dict) else None) or (heads[0].shape[0] if heads else 0)
    model = finetune.build_model(cfg, num_classes or 1)
    report = finetune.load_pretrained(model, ck, cfg.model)
    if not num_classes or "head.weight" not in report.loaded:
        raise ValueError(f"--init {init} holds no classifier head ({report.kind}); predict needs a finetuned "
                         f"checkpoint")
    log_fn(extract.describe_frozen(report, init))
    classes = ck.get("classes") if isinstance(ck, dict) else None
    return model.eval().requires_grad_(False), cfg, classes


def predict_video(model: VideoClassifier, cfg: FinetuneConfig, path: str, device, bf16: bool) -> tuple[torch.Tensor, int]:
    """One video file -> (class probabilities (K,), views): softmax averaged over the recipe's
    test views (clips x crops, as finetune.py's test evaluation). Raises data.BadMedia."""
    interval = cfg.frame_interval if cfg.sampling == "dense" else 1
    sampling = data.FrameSampling(cfg.frames, interval, cfg.sampling, num_clips=cfg.test_clips, test_mode=True)
    transform = data.FinetuneClipTransform("test", cfg.crop, cfg.short_side, cfg.test_short_side, cfg.test_crops)
    frames, _, _ = data.read_video(path, sampling)                          # (clips, T, H, W, 3)
    views = transform(frames)["video"]                                      # (crops*clips, 3, T, c, c)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = torch.cat([model(views[i:i + cfg.eval_batch_size].to(device))
                            for i in range(0, len(views), cfg.eval_batch_size)])   # (V, K)
    return finetune.average_views(logits, len(views))[0].cpu(), len(views)


# -----------------------------------------------------------------------------


def load_named_classifier(args: dict, pcfg: PredictConfig, quiet: bool) -> tuple:
    """load_classifier, with the class names of --classes or of the checkpoint checked against its head."""
    model, cfg, classes = load_classifier(args, log_fn=(lambda m: print(m, file=sys.stderr)) if quiet else print)
    if classes and len(classes) != model.num_classes:
        raise ValueError(f"{args.get('init')} names {len(classes)} classes but its head has {model.num_classes}; "
                         f"pass --classes names.txt")
    if pcfg.classes:
        classes = finetune.read_names(pcfg.classes)
        if len(classes) != model.num_classes:
            raise ValueError(f"--classes {pcfg.classes} names {len(classes)} classes, the checkpoint has "
                             f"{model.num_classes}")
    return model, cfg, classes or [str(i) for i in range(model.num_classes)]


def run(args: dict, pcfg: PredictConfig, videos: list) -> list:
    quiet = pcfg.json
    model, cfg, names = load_named_classifier(args, pcfg, quiet)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    bf16 = train.resolve_precision(cfg.precision, device)
    out, failed = [], 0
    for path in videos:
        try:
            if not os.path.isfile(path):
                raise data.BadMedia(path, "no such file")
            probs, views = predict_video(model, cfg, path, device, bf16)
        except data.BadMedia as e:
            print(f"predict.py: error: cannot read {path}: {e.reason}", file=sys.stderr, flush=True)
            out.append({"video": path, "error": e.reason})
            failed += 1
            continue
        p, i = probs.topk(min(pcfg.top, len(probs)))
        top = [{"class": names[j], "index": j, "prob": round(float(q), 5)} for q, j in zip(p.tolist(), i.tolist())]
        out.append({"video": path, "views": views, "top": top})
        if not quiet:
            print(f"{path} ({views} views): " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in top), flush=True)
    if quiet:
        print(json.dumps(out))
    if failed:
        raise SystemExit(1)                       # every readable video was still predicted
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = extract.tool_parser("predict.py", __doc__, PREDICT_FIELDS, ((PredictConfig, {}),))
    ap.add_argument("--video", nargs="+", required=True, metavar="FILE", help="video files (any container FFmpeg "
                    "reads)")
    return ap


def main(argv=None) -> list:
    args = vars(build_parser().parse_args(argv))
    videos = args.pop("video")
    args, pcfg = extract.split_flags(args, PredictConfig)
    return train.run_cli("predict.py", run, args, pcfg, videos)


if __name__ == "__main__":
    main()
