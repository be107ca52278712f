"""Fitting the offline tokenizer's codebook (tokenizer.OfflineTokenizer): k-means over the 8x8 patches
of half-size images. Not part of the method, which only reads a fitted codebook; run it through
`python tools/tokenizer_tool.py fit` (tools/synthetic.py fits the synthetic set's tokenizer with it).
"""

import os
import sys
from typing import Union

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the component files

from tokenizer import OfflineTokenizer, _check_pixels, half_copy, half_patches, nearest_code   # noqa: E402


def kmeans(x: torch.Tensor, k: int, *, iters: int = 20, seed: int = 0, init: str = "kmeans++",
           verbose: bool = False) -> tuple[torch.Tensor, float]:
    """Lloyd's k-means of rows x (M, D) into k centroids: (centroids (k, D), mean squared error per value).
    Deterministic given `seed` (it drives the initialisation; Lloyd's steps are deterministic):
    "kmeans++" (Arthur & Vassilvitskii, O(k·M·D), fine up to a few thousand codes on a CPU) or
    "random" (k distinct rows). A cluster that empties is re-seeded with the row farthest from
    its centroid. Stops early when no assignment changes."""
    M, D = x.shape
    if M < k:
        raise ValueError(f"k-means needs at least as many patches as codes: {M} patches for vocabulary {k}")
    if init not in ("kmeans++", "random"):
        raise ValueError(f"unknown k-means init {init!r}; expected 'kmeans++' or 'random'")
    g = torch.Generator(device=x.device).manual_seed(seed)
    if init == "random":
        C = x[torch.randperm(M, generator=g, device=x.device)[:k]].clone()
    else:
        C = torch.empty(k, D, dtype=x.dtype, device=x.device)
        C[0] = x[torch.randint(M, (1,), generator=g, device=x.device)]
        d2 = (x - C[0]).pow(2).sum(1)                              # squared distance to the nearest chosen centre
        for i in range(1, k):
            total = d2.sum()
            if total > 0:
                j = torch.multinomial(d2 / total, 1, generator=g)  # D² sampling
            else:                                                  # fewer distinct rows than codes
                j = torch.randint(M, (1,), generator=g, device=x.device)
            C[i] = x[j]
            d2 = torch.minimum(d2, (x - C[i]).pow(2).sum(1))
    assign = None
    for it in range(iters):
        new_assign, dist = nearest_code(x, C)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(C).index_add_(0, assign, x)        # (k, D)
        counts = torch.bincount(assign, minlength=k)               # (k,)
        full = counts > 0
        C[full] = sums[full] / counts[full, None].to(x.dtype)
        empty = (~full).nonzero().flatten()
        if len(empty):                                             # re-seed with the worst-fitted rows
            C[empty] = x[dist.argsort(descending=True)[:len(empty)]]
        if verbose:
            print(f"k-means iter {it + 1}/{iters}: mse {dist.mean().item() / D:.5f}, {len(empty)} empty")
    _, dist = nearest_code(x, C)
    return C, dist.mean().item() / D


def fit(images: torch.Tensor, vocab_size: int, *, resample: str = "pil", **kw) -> OfflineTokenizer:
    """Fit on all patches of images (N, 3, H, W) in [0, 1]; `kw` goes to `fit_patches`."""
    return fit_patches(extract_patches(images, resample), vocab_size, resample=resample, **kw)


def fit_patches(feats: torch.Tensor, vocab_size: int, *, seed: int = 0, iters: int = 20, init: str = "kmeans++",
                resample: str = "pil", device: Union[str, torch.device] = "cpu", verbose: bool = False,
                **config) -> OfflineTokenizer:
    """k-means on patch features (M, 192) (`extract_patches`); `config` is stored with the codebook."""
    C, mse = kmeans(feats.to(device, torch.float32), vocab_size, iters=iters, seed=seed, init=init,
                    verbose=verbose)
    config.update(seed=seed, iters=iters, init=init, n_patches=int(feats.shape[0]), fit_mse=mse,
                  feature="raw RGB of 8x8 patches of the half-size image, [0, 1]")
    return OfflineTokenizer(C.cpu(), config, resample=resample)


def extract_patches(images: torch.Tensor, resample: str = "pil") -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] -> the offline tokenizer's features (N*H/16*W/16, 192)."""
    _check_pixels(images)
    f = half_patches(half_copy(images.to(torch.float32), resample))
    return f.reshape(-1, f.shape[-1])
