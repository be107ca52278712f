"""Version 4 of the synthetic set (docs/motion.md §2): a still background, three objects moving
the label's way; one frame and a shuffled clip tell nothing of the motion label. And version 3,
on which the published tables were measured, renders exactly as before."""
import hashlib
import json

import numpy as np
import pytest

from tools import synthetic as synth

H, W, T = 64, 80, 16


def _clip(k, version=4, split="train", seed=11):
    p = synth._syn_params(seed, split, k, H, W, version)
    return p, synth.render_synthetic(p, range(T), H, W).astype(np.float32)


def _saturated(frames):
    """The objects: the only saturated pixels (max - min channel > 90), (..., H, W) bool."""
    return frames.max(-1) - frames.min(-1) > 90


def test_version3_renders_exactly_as_before():
    # sha256 of these frames as rendered by version 3's code before version 4 was added (commit b1dfb92):
    # the published tables (assets/tables.json) were measured on them, so they must never change.
    h = hashlib.sha256()
    for k in range(20):
        for split in ("train", "img-val"):
            p = synth._syn_params(3, split, k, 64, 80)
            h.update(synth.render_synthetic(p, range(8), 64, 80).tobytes())
    assert h.hexdigest() == "71107c0d5e5ceb8f188ad71865613fde2676d6b686b6cc066aa44108c07c4600"


def test_version4_background_stands_still_and_objects_move_the_labels_way():
    for k in range(12):
        p, f = _clip(k)
        assert p["pan"] == 0 and len(p["objects"]) == synth.V4_OBJECTS
        t = np.arange(T, dtype=np.float32)[:, None, None]
        right = synth.MOTION_VECTORS[synth.MOTION_CLASSES[p["direction"]]]
        covered = sum(synth._object_alpha(o, t, right, H, W)[..., 0] for o in p["objects"]) > 0   # (T, H, W)
        still = ~(covered[1:] | covered[:-1])                # no object on the pixel in either of two frames
        assert still.mean() > 0.5 and np.abs(f[1:] - f[:-1]).max(-1)[still].max() == 0
        sat = _saturated(f)
        # The objects' mass moves the label's way: the best horizontal shift of the saturated mask
        # from frame t to t+2 (on the torus) is positive for "right", negative for "left".
        shifts = range(-12, 13)
        score = [sum(float((np.roll(sat[t], s, 1) & sat[t + 2]).sum()) for t in range(T - 2)) for s in shifts]
        best = list(shifts)[int(np.argmax(score))]
        assert (best > 0) == (synth.MOTION_CLASSES[p["direction"]] == "right") and best != 0, (k, best)


def _features(frame):
    """Single-frame features a classifier could use: a colour histogram of the saturated pixels,
    the objects' mass per column band and row band, an 8 x 10 grey thumbnail."""
    sat = _saturated(frame)
    hist = np.histogramdd(frame[sat], bins=(3, 3, 3), range=[(0, 256)] * 3)[0].ravel() / max(1, sat.sum())
    cols = sat.reshape(H, 8, W // 8).mean((0, 2))
    rows = sat.reshape(8, H // 8, W).mean((1, 2))
    thumb = frame.mean(-1).reshape(8, H // 8, 10, W // 10).mean((1, 3)).ravel() / 255
    return np.concatenate([hist, cols, rows, thumb, [1.0]])


def _ridge_accuracy(X, y, classes, n_train):
    Y = np.eye(classes)[y]
    Wt = np.linalg.solve(X[:n_train].T @ X[:n_train] + 1e-2 * np.eye(X.shape[1]), X[:n_train].T @ Y[:n_train])
    return float((np.argmax(X[n_train:] @ Wt, 1) == y[n_train:]).mean())


@pytest.mark.parametrize("view", ["single frame", "shuffled clip"])
def test_version4_one_frame_or_a_shuffled_clip_is_at_chance_on_motion(view):
    """Ridge classifiers: far above chance on appearance (the colour is in every frame), at chance
    on motion (2 classes, chance 0.5) from one random frame, or from a whole clip's frames
    as an unordered set (their mean features)."""
    rng = np.random.default_rng(0)
    X, ya, ym = [], [], []
    for k in range(360):
        p = synth._syn_params(11, "train", k, H, W, 4)
        if view == "single frame":
            X.append(_features(synth.render_synthetic(p, [int(rng.integers(32))], H, W)[0].astype(np.float32)))
        else:
            f = synth.render_synthetic(p, rng.permutation(8), H, W).astype(np.float32)
            X.append(np.mean([_features(x) for x in f], 0))
        ya.append(p["colour"])
        ym.append(p["direction"])
    X, ya, ym = np.array(X), np.array(ya), np.array(ym)
    assert _ridge_accuracy(X, ya, 6, 240) > 0.55                       # chance 1/6
    assert _ridge_accuracy(X, ym, 2, 240) < 0.5 + 0.14                 # 120 test clips: sd 0.046


def test_version4_set_records_its_version_and_is_not_taken_for_version3(tmp_path):
    tiny = dict(n_train=2, n_val=1, images_train=1, images_val=1, frames=4, height=32, width=40)
    root = synth.make_synthetic_set(tmp_path / "v4", seed=0, verbose=False, version=4, **tiny)
    assert json.loads((root / "info.json").read_text())["version"] == 4
    assert json.loads((root / synth.DONE_NAME).read_text())["version"] == 4
    with pytest.raises(ValueError, match="holds a synthetic data set made with"):
        synth.make_synthetic_set(root, seed=0, verbose=False, **tiny)      # version 3 asked: refused
