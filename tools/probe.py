"""Linear probe and k-NN on frozen features written by tools/extract.py.

The two standard measures of what a pretrained encoder has learnt without
training it: a linear classifier on the features (MAE's protocol: BatchNorm
without affine parameters, then one Linear layer, no weight decay) and a
weighted k-nearest-neighbour vote (DINO's protocol: cosine similarity, k = 20,
each neighbour's vote weighted by exp(similarity / 0.07)). Neither touches the encoder.

    python tools/probe.py --train-features runs/features/train --val-features runs/features/val [--json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import train  # noqa: E402
from tools import extract  # noqa: E402


@dataclass
class ProbeConfig:
    train_features: str = ""              # folder written by tools/extract.py for the training list
    val_features: str = ""                # ... for the validation list
    epochs: int = 100                     # linear probe: passes over the training features
    lr: float = 0.1                       # linear probe: SGD (momentum 0.9) peak lr, cosine to 0
    batch_size: int = 256                 # linear probe: features per step
    k: int = 20                           # k-NN: neighbours (DINO: 20)
    temperature: float = 0.07             # k-NN: vote weight exp(cosine / T) (DINO: 0.07)
    seed: int = 0                         # linear probe: initialisation and batch order
    json: bool = False                    # print the results as one JSON line


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, epochs: int = 100, lr: float = 0.1, batch_size: int = 256,
                 seed: int = 0) -> dict:
    """Logistic regression on frozen features: BatchNorm1d(affine=False) + Linear, trained with
    SGD (momentum 0.9, cosine lr, no weight decay) on (N, D) features; returns train and val top-1 %."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6),
                         nn.Linear(train_x.shape[1], num_classes))
    with torch.no_grad():
        nn.init.trunc_normal_(head[1].weight, std=0.01, generator=gen)   # MAE: std 0.01, bias 0
        head[1].bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    n = len(train_x)
    bs = min(batch_size, n)
    steps_per_epoch = max(1, n // bs)
    total = epochs * steps_per_epoch
    step = 0
    head.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * bs:(b + 1) * bs]
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.eval()
    with torch.no_grad():
        train_acc = (head(train_x).argmax(-1) == train_y).double().mean().item() * 100
        val_acc = (head(val_x).argmax(-1) == val_y).double().mean().item() * 100
    return {"train_top1": train_acc, "top1": val_acc}


def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> dict:
    """Weighted k-NN (DINO): cosine similarities to the training features, the k most similar
    vote for their class with weight exp(sim / T); returns top-1 %."""
    a = F.normalize(train_x.float(), dim=1)                               # (N, D)
    b = F.normalize(val_x.float(), dim=1)                                 # (M, D)
    k = min(k, len(a))
    sim, idx = (b @ a.T).topk(k, dim=1)                                   # (M, k)
    votes = torch.zeros(len(b), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return {"top1": (votes.argmax(1) == val_y).double().mean().item() * 100, "k": k}


def probe_features(train: dict, val: dict, pcfg: ProbeConfig) -> dict:
    """Linear probe and k-NN from two load_features() results."""
    if train["features"].shape[1:] != val["features"].shape[1:]:
        raise ValueError(f"train features have dim {train['features'].shape[1:]}, val features "
                         f"{val['features'].shape[1:]}: extracted with different encoders")
    tx, vx = torch.from_numpy(train["features"]), torch.from_numpy(val["features"])
    ty, vy = torch.from_numpy(train["labels"]), torch.from_numpy(val["labels"])
    classes = int(max(ty.max(), vy.max())) + 1
    lin = linear_probe(tx, ty, vx, vy, classes, pcfg.epochs, pcfg.lr, pcfg.batch_size, pcfg.seed)
    knn = knn_classify(tx, ty, vx, vy, classes, pcfg.k, pcfg.temperature)
    return {"linear": lin, "knn": knn, "classes": classes, "train": len(tx), "val": len(vx),
            "chance": 100.0 * np.bincount(vy.numpy(), minlength=classes).max() / len(vy)}


def load_features(folder: str) -> dict:
    """extract.load_features, after checking meta.json and every line of index.tsv: a garbage one is an
    error naming the file and the line."""
    meta_path, index_path = os.path.join(folder, "meta.json"), os.path.join(folder, "index.tsv")
    again = f"extract the features again (python tools/extract.py ... --out {folder})"
    if not os.path.exists(meta_path):
        return extract.load_features(folder)                               # its own message: none there
    try:
        with open(meta_path, errors="replace") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}:{e.lineno}: not JSON ({e.msg}); {again}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("rows"), int):
        raise ValueError(f"{meta_path}:1: expected tools/extract.py's meta.json (an object with its 'rows'), got "
                         f"{json.dumps(meta)[:60]}; {again}")
    with open(index_path, errors="replace") as f:
        for n, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            ints = [fields[i] for i in (0, 2, 3, 4)] if len(fields) == 5 else []
            if n > 1 and not (ints and all(x.lstrip("-").isdigit() for x in ints)):
                raise ValueError(f"{index_path}:{n}: expected row, path, label, views, start (tab-separated, "
                                 f"integers but the path), got {line.strip()[:60]!r}; {again}")
    return extract.load_features(folder)


def check_distinct(train_f: dict, val_f: dict, pcfg: ProbeConfig) -> None:
    """A probe measured on its own training features says nothing: refuse one folder, or the same features, twice."""
    same = os.path.realpath(pcfg.train_features) == os.path.realpath(pcfg.val_features)
    key = train_f["meta"].get("key")
    if same or key and key == val_f["meta"].get("key"):
        what = "are the same folder" if same else "hold the same features (one list, one checkpoint, one setting)"
        raise ValueError(f"--train-features {pcfg.train_features} and --val-features {pcfg.val_features} {what}; "
                         f"extract the validation list into a folder of its own")


def run(pcfg: ProbeConfig) -> dict:
    train_f, val_f = load_features(pcfg.train_features), load_features(pcfg.val_features)
    check_distinct(train_f, val_f, pcfg)
    res = probe_features(train_f, val_f, pcfg)
    if pcfg.json:
        print(json.dumps(res))
    else:
        print(f"{res['train']} train / {res['val']} val features, {res['classes']} classes (majority class "
              f"{res['chance']:.1f}%): linear probe top-1 {res['linear']['top1']:.1f} (train "
              f"{res['linear']['train_top1']:.1f}), k-NN (k={res['knn']['k']}) top-1 {res['knn']['top1']:.1f}")
    return res


def build_parser() -> argparse.ArgumentParser:
    return extract.tool_parser("probe.py", __doc__, None, ((ProbeConfig, {}),))


def main(argv=None) -> dict:
    ap = build_parser()
    _, pcfg = extract.split_flags(vars(ap.parse_args(argv)), ProbeConfig)
    if not pcfg.train_features or not pcfg.val_features:
        ap.error("probe needs --train-features DIR and --val-features DIR (folders written by tools/extract.py)")
    return train.run_cli("probe.py", run, pcfg)


if __name__ == "__main__":
    main()
