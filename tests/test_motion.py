"""The motion experiment's rules (docs/motion.md §4, §6) as tools/motion.py applies them: the
few-label subsets, the verdict of a paired comparison, the data-leak check."""
import collections

import pytest

from tools import motion


def _list(tmp_path, classes=2, n=200):
    src = tmp_path / "train.txt"
    src.write_text("".join(f"train/{k:06d}.mp4 {k % classes}\n" for k in range(n)))
    return str(src)


@pytest.mark.parametrize("classes", [2, 6])
def test_few_label_subsets_are_balanced_and_fixed_by_the_seed(tmp_path, classes):
    src = _list(tmp_path, classes)
    a = open(motion.few_label_list(src, str(tmp_path / "a.txt"), 20, seed=1)).read().split("\n")[:-1]
    b = open(motion.few_label_list(src, str(tmp_path / "b.txt"), 20, seed=1)).read().split("\n")[:-1]
    c = open(motion.few_label_list(src, str(tmp_path / "c.txt"), 20, seed=2)).read().split("\n")[:-1]
    assert a == b and a != c and len(a) == len(set(a)) == 20
    counts = collections.Counter(line.split()[1] for line in a)
    assert len(counts) == classes and min(counts.values()) >= 20 // classes        # 10 + 10, or >= 3 of each of 6
    assert set(a) <= set(open(src).read().split("\n"))                             # rows of the list, unchanged


@pytest.mark.parametrize("a, b, minimum, verdict", [
    ({0: 60, 1: 55, 2: 70, 3: 50}, {0: 50, 1: 55, 2: 50, 3: 52}, 0.0, "supported"),     # mean +7, 3 of 4 >= 0
    ({0: 50, 1: 50, 2: 50, 3: 80}, {0: 55, 1: 55, 2: 55, 3: 50}, 0.0, "inconclusive"),  # mean +3.75 but 1 of 4
    ({0: 40, 1: 45, 2: 50, 3: 60}, {0: 50, 1: 55, 2: 60, 3: 55}, 0.0, "contradicted"),  # mean -3.75, 3 of 4 < 0
    ({0: 54, 1: 53, 2: 52, 3: 55}, {0: 50, 1: 50, 2: 50, 3: 50}, 5.0, "inconclusive"),  # H3: +3.5 < 5 points
    ({0: 60, 1: 53, 2: 56, 3: 55}, {0: 50, 1: 50, 2: 50, 3: 50}, 5.0, "supported"),     # H3: +6
    ({0: 60, 1: 55, 2: 70}, {0: 50, 1: 55, 2: 50}, 0.0, "pending"),                       # 3 seeds: not yet
])
def test_paired_verdicts_follow_the_registered_rule(a, b, minimum, verdict):
    assert motion.outcome(a, b, minimum)[0] == verdict


def test_a_leak_in_the_temporal_controls_invalidates_the_motion_outcomes():
    cells = {}
    for s in range(4):
        for row, normal in (("BEVT-V", 80), ("BEVT-V Random-3D", 60)):
            cells[f"finetune|{row}|motion|s{s}"] = {"normal": normal + s, "single-frame": 50, "shuffle": 50}
    text = motion.report_text(cells)
    h1 = [line for line in text.splitlines() if line.startswith("| H1") and "few-label" in line][0]
    assert "supported" in h1 and "invalid" not in h1
    for s in range(4):
        cells[f"finetune|BEVT-V|motion|s{s}"]["shuffle"] = 75                       # order-free evaluation: 75%
    h1 = [line for line in motion.report_text(cells).splitlines() if line.startswith("| H1") and "few-label" in line][0]
    assert "invalid" in h1 and "BEVT-V" in h1


def test_the_experiment_refuses_a_version3_set(tmp_path):
    (tmp_path / "DONE").write_text('{"version": 3}')
    args = motion.build_parser().parse_args(["run", "--data", str(tmp_path), "--video-steps", "1000"])
    with pytest.raises(ValueError, match="version 3 .* runs on version 4"):
        motion.Experiment(args)


def test_report_draws_a_chart_of_the_cells_on_file(tmp_path):
    from PIL import Image
    cells = {f"finetune|{row}|motion|s{s}": {"normal": 50 + 10 * s} for row in motion.ROWS for s in range(2)}
    path = tmp_path / "motion.png"
    motion.draw_chart(cells, str(path))
    img = Image.open(path)
    assert img.size[0] == 900 and img.size[1] > 400 and len(img.getcolors(2 ** 16)) > 3


def test_post_hoc_cells_are_reported_apart_and_never_enter_a_verdict():
    """The full-label finetunes (docs/motion.md §12) were not registered: their own section, and the
    registered outcomes are the same with or without them."""
    cells = {f"finetune|{row}|motion|s{s}": {"normal": 50.0 + s * (row == "BEVT-V"), "single-frame": 50, "shuffle": 50}
             for row in motion.ROWS for s in range(4)}
    before = motion.report_text(cells)
    assert "Post-hoc" not in before
    for s in range(4):
        cells[f"finetune-full|BEVT-V|motion|s{s}"] = {"normal": 100.0, "single-frame": 50.0, "shuffle": 50.0}
        cells[f"finetune-full|scratch|motion|s{s}"] = {"normal": 60.0, "single-frame": 50.0, "shuffle": 50.0}
    after = motion.report_text(cells)
    assert after.startswith(before) and "not registered" in after[len(before):]
    assert "| BEVT-V | 100.0 ± 0.0 (4) | 50.0 ± 0.0 (4) | 50.0 ± 0.0 (4) |" in after
