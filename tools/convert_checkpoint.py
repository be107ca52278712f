"""Convert encoder checkpoints into the released BEVT key layout that the loaders read.

    python tools/convert_checkpoint.py inflate swin_base_2d.pth out.pt --model base [--window 8 7 7]
    python tools/convert_checkpoint.py resize in.pt out.pt --old-window 8 7 7 --new-window 16 7 7
    python tools/convert_checkpoint.py torchvision swin3d_b.pth out.pt

inflate:      a 2D Swin image checkpoint (Liu et al. 2021 layout) -> 3D encoder keys
              (inflate_2d_state_dict: I3D-style patch embedding, tiled bias tables).
resize:       trilinearly resize every relative bias table to another window, e.g. (8,7,7)
              -> (16,7,7) for SSv2 finetuning (paper §4.1-4.2; swin3d.resize_relative_tables).
              Keys are kept as they are. (finetune.load_pretrained also resizes on the fly.)
torchvision:  a torchvision swin3d_t/s/b state dict -> this encoder's keys (values untouched).

inflate and torchvision write `{"state_dict": {"backbone." + encoder key: tensor}}`, the
released layout (torchvision's Kinetics-400 head as the released classifier,
`cls_head.fc_cls.*`): `train.py --init` (bevt.BEVT.load_released) and `finetune.py --init`
(finetune.load_pretrained) read it; given the unconverted files, both refuse with a
one-line error naming the command here (swin3d.check_converted).

torchvision's Video Swin is the same network as the released encoder under
other names (torchvision/models/video/swin_transformer.py):

  torchvision                              ours
  patch_embed.proj / .norm                 patch_embed.proj / .norm           (same)
  features.{2i}.{j}.norm1/.attn.*/.norm2   layers.{i}.blocks.{j}.(same)       stage i, block j
  features.{2i}.{j}.mlp.0 / .mlp.3         layers.{i}.blocks.{j}.mlp.fc1 / .fc2   (torchvision's MLP is a
                                           Sequential: 0 Linear, 1 GELU, 2 Dropout, 3 Linear, 4 Dropout)
  features.{2i+1}.reduction / .norm        layers.{i}.downsample.reduction / .norm   (patch merging)
  norm                                     norm                               (same)
  head (400-class Linear)                  cls_head.fc_cls (the released classifier; not the encoder's)

Nothing is reordered inside a tensor, because every convention agrees: patch
merging concatenates neighbours (h0,w0), (h1,w0), (h0,w1), (h1,w1) in both;
qkv output channels are (3, heads, head_dim); the relative table is
((2Wt-1)(2Wh-1)(2Ww-1), heads), Δt-major; tokens in a window are time-major.
One thing differs in the forward, not in the weights: where a feature map is
smaller than the window in H or W, torchvision slices the index of the full
window (`index[:N, :N]`), which pairs wrong offsets; ours is derived for the
window actually used. Where only time shrinks, or nothing does, both agree.
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import torch    # noqa: E402
import torch.nn.functional as F   # noqa: E402

import swin3d   # noqa: E402
import train    # noqa: E402

PROG = "convert_checkpoint.py"


def inflate_2d_state_dict(state_dict_2d: dict, config: swin3d.SwinConfig, image_embed: bool = True) -> dict:
    """Turn a 2D Swin image checkpoint (Liu et al. 2021 layout) into this encoder's keys.

    * patch_embed.proj.weight (C, 3, 4, 4) -> (C, 3, pt, 4, 4), copied into every
      temporal slice and divided by pt, so a static clip gives the 2D features
      (I3D-style inflation, Video Swin `inflate_weights`);
    * relative tables ((2Wh-1)(2Ww-1), nh) -> resized bicubically if the 2D
      window differs, then tiled over the 2Wt-1 temporal offsets, so every
      Δt row (in particular Δt = 0) equals the 2D table;
    * the 2D patch embedding is also copied to `patch_embed_2d` (the image
      stream) when `image_embed`;
    * dropped: relative_position_index and attn_mask buffers, the 2D head.
    Missing `head.*` or `mask_token` keys are expected to be reported by the loader.
    """
    Wt, Wh, Ww = config.window_size
    pt = config.patch_size[0]
    out = {}
    for k, v in state_dict_2d.items():
        if k.endswith(("relative_position_index", "attn_mask")) or k.startswith("head."):
            continue
        if k == "patch_embed.proj.weight":
            if v.dim() != 4:
                raise ValueError(f"expected a 2D patch embedding (C, 3, 4, 4) for {k}, got {tuple(v.shape)}")
            if image_embed:
                out["patch_embed_2d.proj.weight"] = v.clone()
            v = v.unsqueeze(2).repeat(1, 1, pt, 1, 1) / pt         # (C, 3, pt, 4, 4)
        elif k.startswith("patch_embed.") and image_embed:
            out["patch_embed_2d." + k[len("patch_embed."):]] = v.clone()
        elif k.endswith("relative_position_bias_table"):
            nh = v.shape[1]
            side = int(round(math.sqrt(v.shape[0])))
            if side * side != v.shape[0]:
                raise ValueError(f"{k}: expected a square 2D table, got {tuple(v.shape)}")
            if side != 2 * Wh - 1 or side != 2 * Ww - 1:
                t = v.float().T.reshape(1, nh, side, side)
                t = F.interpolate(t, size=(2 * Wh - 1, 2 * Ww - 1), mode="bicubic", align_corners=False)
                v = t.reshape(nh, -1).T.to(v.dtype)
            v = v.repeat(2 * Wt - 1, 1)                            # ((2Wt-1)(2Wh-1)(2Ww-1), nh), Δt-major
        out[k] = v
    return out


def torchvision_key(key: str) -> str:
    """Our encoder's name for a key of torchvision's swin3d state dict (the table in the docstring).

    Keys that have no place in the encoder (`head.*`, or anything unexpected)
    come back unchanged, so a loader reports them as unused under their own name.
    """
    parts = key.split(".")
    if parts[0] != "features" or len(parts) < 3 or not parts[1].isdigit():
        return key                                           # patch_embed.*, norm.*, head.*: as they are
    k = int(parts[1])
    if k % 2 == 0 and parts[2].isdigit():                    # features.{2i}.{j}.*: stage i, block j
        rest = ".".join(parts[3:])
        for theirs, ours in (("mlp.0.", "mlp.fc1."), ("mlp.3.", "mlp.fc2.")):
            if rest.startswith(theirs):
                rest = ours + rest[len(theirs):]
        return f"layers.{k // 2}.blocks.{parts[2]}.{rest}"
    if k % 2 == 1 and parts[2] in ("reduction", "norm"):      # features.{2i+1}: stage i's patch merging
        return f"layers.{k // 2}.downsample." + ".".join(parts[2:])
    return key


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    """Keep the entries under `prefix` with it removed, e.g. strip_prefix(sd, 'backbone.')."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def map_torchvision_state_dict(state_dict: dict) -> dict:
    """A torchvision swin3d_t/s/b state dict -> this encoder's keys (values untouched).

    `head.*` (torchvision's Kinetics-400 classifier) stays under its own name;
    the relative index buffers keep their (mapped) names and are re-derived on load.
    """
    out = {}
    for k, v in state_dict.items():
        new = torchvision_key(k)
        if new in out:
            raise ValueError(f"torchvision key {k!r} maps onto {new!r}, which another key already took")
        out[new] = v
    return out


def released_layout(encoder: dict) -> dict:
    """Encoder keys -> the released layout: `backbone.` + key; a classifier `head.*` -> `cls_head.fc_cls.*`."""
    return {("cls_head.fc_cls." + k[len("head."):] if k.startswith("head.") else "backbone." + k): v
            for k, v in encoder.items()}


def _tensors(path: str) -> dict:
    """The state dict of a checkpoint file: its `state_dict`/`model` entry or itself, wrappers' prefixes removed."""
    ck = swin3d.load_file(path)
    sd = ck.get("state_dict", ck.get("model", ck)) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return {swin3d.unwrap_key(k): v for k, v in sd.items()}


def convert(args) -> str:
    sd = _tensors(args.src)
    encoder = strip_prefix(sd, "backbone.") if any(k.startswith("backbone.") for k in sd) else sd
    if args.command == "inflate":
        cfg = swin3d.get_config(args.model, **({"window_size": tuple(args.window)} if args.window else {}))
        sd = released_layout(inflate_2d_state_dict(encoder, cfg, image_embed=not args.no_image_embed))
    elif args.command == "resize":
        sd = swin3d.resize_relative_tables(sd, args.old_window, args.new_window)
    else:
        if not any(k.startswith("features.") for k in encoder):
            raise ValueError(f"{args.src}: not a torchvision swin3d checkpoint (no features.* keys)")
        sd = released_layout(map_torchvision_state_dict(encoder))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    torch.save({"state_dict": sd}, tmp)
    os.replace(tmp, args.out)                                  # atomic: never a torn output file
    print(f"{args.command}: {len(sd)} tensors -> {args.out}")
    return args.out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inflate", help="2D Swin image checkpoint -> 3D encoder keys")
    p.add_argument("--model", default="base", choices=sorted(swin3d.PRESETS), help="the swin3d preset the 2D "
                   "checkpoint's size matches (default base)")
    p.add_argument("--window", type=int, nargs=3, metavar=("T", "H", "W"), help="3D window (default: the model's)")
    p.add_argument("--no-image-embed", action="store_true",
                   help="do not copy the 2D patch embedding to the image stream")
    p = sub.add_parser("resize", help="resize the relative bias tables to another window")
    p.add_argument("--old-window", type=int, nargs=3, required=True, metavar=("T", "H", "W"),
                   help="the window the checkpoint's tables were trained for")
    p.add_argument("--new-window", type=int, nargs=3, required=True, metavar=("T", "H", "W"),
                   help="the window to resize them to (trilinear)")
    sub.add_parser("torchvision", help="torchvision swin3d_t/s/b -> this encoder's keys")
    for p in sub.choices.values():
        p.add_argument("src", help="input checkpoint")
        p.add_argument("out", help="output file")
    return ap


def main(argv=None):
    return train.run_cli(PROG, convert, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
