"""Convert encoder checkpoints into this project's Video Swin key layout (swin3d.py).

    python tools/convert_checkpoint.py inflate swin_base_2d.pth out.pt --preset base [--window 8 7 7]
    python tools/convert_checkpoint.py resize in.pt out.pt --old-window 8 7 7 --new-window 16 7 7
    python tools/convert_checkpoint.py torchvision swin3d_b.pth out.pt

inflate:      a 2D Swin image checkpoint (Liu et al. 2021 layout) -> 3D encoder keys
              (swin3d.inflate_2d_state_dict: I3D-style patch embedding, tiled bias tables).
resize:       trilinearly resize every relative bias table to another window, e.g. (8,7,7)
              -> (16,7,7) for SSv2 finetuning (paper §4.1-4.2; swin3d.resize_relative_tables).
torchvision:  a torchvision swin3d_t/s/b state dict -> this encoder's keys (values untouched).

The loaders (bevt.BEVT.load_released, finetune.load_pretrained) already do all
three on the fly; these commands write the converted file once. The output is
`{"state_dict": {encoder key: tensor}}`, loadable by `finetune.py --init`.

torchvision's Video Swin is the same network as the released encoder under
other names (torchvision/models/video/swin_transformer.py):

  torchvision                              ours
  patch_embed.proj / .norm                 patch_embed.proj / .norm           (same)
  features.{2i}.{j}.norm1/.attn.*/.norm2   layers.{i}.blocks.{j}.(same)       stage i, block j
  features.{2i}.{j}.mlp.0 / .mlp.3         layers.{i}.blocks.{j}.mlp.fc1 / .fc2   (torchvision's MLP is a
                                           Sequential: 0 Linear, 1 GELU, 2 Dropout, 3 Linear, 4 Dropout)
  features.{2i+1}.reduction / .norm        layers.{i}.downsample.reduction / .norm   (patch merging)
  norm                                     norm                               (same)
  head (400-class Linear)                  not the encoder's: a classifier head

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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import torch    # noqa: E402

import swin3d   # noqa: E402
import train    # noqa: E402

PROG = "convert_checkpoint.py"


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
        new = swin3d.torchvision_key(k)
        if new in out:
            raise ValueError(f"torchvision key {k!r} maps onto {new!r}, which another key already took")
        out[new] = v
    return out


def _tensors(path: str) -> dict:
    """The state dict of a checkpoint file: its `state_dict`/`model` entry or itself, prefixes removed."""
    ck = swin3d.load_file(path)
    sd = ck.get("state_dict", ck.get("model", ck)) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    sd = {swin3d.unwrap_key(k): v for k, v in sd.items()}
    return strip_prefix(sd, "backbone.") if any(k.startswith("backbone.") for k in sd) else sd


def convert(args) -> str:
    sd = _tensors(args.src)
    if args.command == "inflate":
        cfg = swin3d.get_config(args.preset, **({"window_size": tuple(args.window)} if args.window else {}))
        sd = swin3d.inflate_2d_state_dict(sd, cfg, image_embed=not args.no_image_embed)
    elif args.command == "resize":
        sd = swin3d.resize_relative_tables(sd, args.old_window, args.new_window)
    else:
        sd = map_torchvision_state_dict(sd)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    torch.save({"state_dict": sd}, tmp)
    os.replace(tmp, args.out)                                  # atomic: never a torn output file
    print(f"{args.command}: {len(sd)} tensors -> {args.out}")
    return args.out


def main(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inflate", help="2D Swin image checkpoint -> 3D encoder keys")
    p.add_argument("--preset", default="base", choices=sorted(swin3d.PRESETS))
    p.add_argument("--window", type=int, nargs=3, help="3D window (default: the preset's)")
    p.add_argument("--no-image-embed", action="store_true",
                   help="do not copy the 2D patch embedding to the image stream")
    p = sub.add_parser("resize", help="resize the relative bias tables to another window")
    p.add_argument("--old-window", type=int, nargs=3, required=True)
    p.add_argument("--new-window", type=int, nargs=3, required=True)
    sub.add_parser("torchvision", help="torchvision swin3d_t/s/b -> this encoder's keys")
    for p in sub.choices.values():
        p.add_argument("src", help="input checkpoint")
        p.add_argument("out", help="output file")
    args = ap.parse_args(argv)
    return train.run_cli(PROG, convert, args)


if __name__ == "__main__":
    main()
