"""Tests of data.read_video's frame contract (issue 18) on a matrix of codecs x containers.

The contract: frame i is the i-th picture that decoding the stream from its
start outputs, whatever the timestamps say, and the frame count is the number
of those pictures. The matrix is written here with PyAV: 60 frames of 64 x 64
at 25 fps, frame i painting i in binary as 8 vertical stripes (most
significant bit on the left, white = 1), a keyframe every 12 frames, the
codecs with B-frames writing B-frames, and the stream starting at time 0 or 7
frames later. Expected values are the painted indices or PyAV's own decode of
every frame, never data.py's output. Each case is about 0.1 s. Run: python -m pytest -q tests/test_video_decode.py
"""

from fractions import Fraction

import av
import numpy as np
import pytest

import data
from tools import prepare_data

N, FPS, SIZE, GOP = 60, 25, 64, 12
BITS = 8                                   # 8 stripes of 8 px: indices up to 255

# codec name in the matrix -> (encoder, pixel format, encoder options, writes B-frames)
X264 = {"x264-params": f"bframes=3:b-adapt=0:keyint={GOP}:min-keyint={GOP}:scenecut=0"}
X265 = {"x265-params": f"bframes=3:b-adapt=0:keyint={GOP}:min-keyint={GOP}:scenecut=0:log-level=error"}
CODECS = {
    "h264": ("libx264", "yuv420p", X264, True),
    "hevc8": ("libx265", "yuv420p", X265, True),
    "hevc10": ("libx265", "yuv420p10le", X265, True),
    "vp9": ("libvpx-vp9", "yuv420p", {"g": str(GOP), "deadline": "realtime", "cpu-used": "8"}, False),
    "mpeg4": ("mpeg4", "yuv420p", {"bf": "2", "g": str(GOP)}, True),        # MPEG-4 Part 2 (Xvid/DivX)
    "mpeg2": ("mpeg2video", "yuv420p", {"bf": "2", "g": str(GOP)}, True),
    "av1": ("libsvtav1", "yuv420p", {"g": str(GOP), "preset": "12"}, False),
    "mjpeg": ("mjpeg", "yuvj420p", {}, False),
    "prores": ("prores", "yuv422p10le", {}, False),
}
# The valid pairs: what each container can carry (and common data sets store).
CONTAINERS = {
    "h264": ("mp4", "mkv", "mov", "ts", "flv", "avi"),
    "hevc8": ("mp4", "mkv", "mov", "ts"),
    "hevc10": ("mp4", "mkv", "mov", "ts"),
    "vp9": ("webm", "mkv", "mp4"),
    "mpeg4": ("avi", "mp4", "mkv", "mov", "ts"),                        # AVI: how UCF101 / HMDB51 are stored
    "mpeg2": ("mpg", "ts", "mkv"),
    "av1": ("mp4", "mkv", "webm"),
    "mjpeg": ("avi", "mkv", "mov"),
    "prores": ("mov", "mkv"),
}
FORMATS = {"ts": "mpegts", "mpg": "mpeg"}        # muxer names where the extension is not one
MATRIX = [(c, ext, start) for c, exts in CONTAINERS.items() for ext in exts for start in (0, 7)]

ASKS = {                                      # indices at the start, the middle and the end
    "start": [0, 1, 2, 3],
    "middle": [29, 30, 31],
    "end": [44, 58, 59],
    "last": [59],
    "clips": [[13, 25, 37, 49], [59, 0, 30, 30]],   # (clips, T), unordered and repeated (looping clips)
}


def paint(i: int) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: i in binary, one 8-px stripe per bit, white = 1, MSB on the left."""
    img = np.full((SIZE, SIZE, 3), 16, np.uint8)
    w = SIZE // BITS
    for b in range(BITS):
        if (i >> (BITS - 1 - b)) & 1:
            img[:, b * w:(b + 1) * w] = 235
    return img


def painted(frames: np.ndarray) -> np.ndarray:
    """Decoded frames (..., H, W, 3) -> the index each paints (stripe interiors, away from block edges)."""
    w = SIZE // BITS
    bands = np.stack([frames[..., 4:-4, b * w + 2:(b + 1) * w - 2, :].mean(axis=(-3, -2, -1))
                      for b in range(BITS)], -1)                       # (..., BITS)
    return ((bands > 125) * (1 << np.arange(BITS - 1, -1, -1))).sum(-1)


def encoder(name: str) -> None:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        pytest.skip(f"this PyAV's FFmpeg has no {name} encoder")


def write(path, codec: str, start: int = 0, n: int = N, options=None, fmt=None, gap: int = 0):
    """The painted clip, frame i at pts i + start (time base 1/FPS), plus `gap` from frame n/2 on."""
    enc, pix_fmt, opts, _ = CODECS[codec] if codec in CODECS else (codec, "yuv420p", {}, None)
    encoder(enc)
    with av.open(str(path), "w", format=fmt or FORMATS.get(path.suffix[1:])) as container:
        stream = container.add_stream(enc, rate=FPS, options=dict(options if options is not None else opts))
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, pix_fmt
        stream.codec_context.time_base = Fraction(1, FPS)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(paint(i), format="rgb24")
            frame.pts, frame.time_base = i + start + (gap if i >= n // 2 else 0), Fraction(1, FPS)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def has_b_frames(path) -> bool:
    """Whether the decoder meets B-frames (shown in another order than decoded): the hard case."""
    from av.video.frame import PictureType
    with av.open(str(path)) as c:
        return any(f.pict_type == PictureType.B for f in c.decode(c.streams.video[0]))


def pyav_frames(path) -> np.ndarray:
    """(N, H, W, 3) uint8: every frame PyAV decodes from the start, in output order (the reference)."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


# -----------------------------------------------------------------------------
# The matrix


@pytest.mark.parametrize("codec,ext,start", MATRIX, ids=[f"{c}-{e}-start{s}" for c, e, s in MATRIX])
def test_matrix_frames_asked_are_frames_returned(tmp_path, codec, ext, start):
    path = write(tmp_path / f"{codec}_{start}.{ext}", codec, start)
    if CODECS[codec][3]:                                        # the hard case is really there
        assert has_b_frames(path), f"{path.name} was written without B-frames"
    if codec == "hevc10":
        with av.open(str(path)) as c:
            assert c.streams.video[0].codec_context.pix_fmt.startswith("yuv420p10")

    assert data.count_frames(path) == N
    for name, ask in ASKS.items():
        frames, idx, n = data.read_video(path, lambda n, ask=ask: np.array(ask))
        assert n == N
        np.testing.assert_array_equal(painted(frames), ask, err_msg=f"{path.name}, {name}")
    frames, idx, n = data.read_video(path)                      # every frame
    assert n == N and frames.shape == (N, SIZE, SIZE, 3)
    np.testing.assert_array_equal(painted(frames), np.arange(N))
    # The same with the count given, as the data sets do from their second epoch.
    frames, _, _ = data.read_video(path, lambda n: np.array(ASKS["end"]), num_frames=N)
    np.testing.assert_array_equal(painted(frames), ASKS["end"])


# -----------------------------------------------------------------------------
# Files whose timestamps mislead: frames are bit-exact against PyAV's own decode


OPEN_GOP = {"x265-params": "keyint=15:min-keyint=15:scenecut=0:open-gop=1:bframes=3:b-adapt=0:log-level=error"}
EXACT = {                     # name -> (codec, extension, encoder options or None for the codec's)
    "h264-mp4-bframes": ("h264", "mp4", None),
    "mpeg4-avi-bframes": ("mpeg4", "avi", None),       # Xvid-style AVI: derived timestamps start at 1
    "h264-avi-bframes": ("h264", "avi", None),         # AVI timestamps follow decode order, not display order
    "hevc-mp4-open-gop": ("hevc8", "mp4", OPEN_GOP),   # leading pictures shown before their CRA keyframe
    "mpeg1-mpg-bframes": ("mpeg1video", "mpg", {"bf": "2", "g": "15"}),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_frames_equal_pyav_decoding_everything(tmp_path, name):
    """read_video(idx) == every frame PyAV decodes, indexed by idx: bit-exact, at the start, the middle and
    the end, unordered and repeated; also with threads and a given count."""
    codec, ext, options = EXACT[name]
    path = write(tmp_path / f"{name}.{ext}", codec, options=options)
    if codec in ("h264", "mpeg4"):
        assert has_b_frames(path), f"{path.name} was written without B-frames"
    ref = pyav_frames(path)
    assert len(ref) == N and data.count_frames(path) == N
    np.testing.assert_array_equal(painted(ref), np.arange(N))      # the reference is right too
    for ask in ASKS.values():
        for threads, count in ((1, None), (0, N)):
            frames, idx, n = data.read_video(path, lambda n, ask=ask: np.array(ask), threads, count)
            assert n == N
            np.testing.assert_array_equal(frames, ref[np.array(ask)], err_msg=f"{name}, {ask}")
    frames, _, _ = data.read_video(path)
    np.testing.assert_array_equal(frames, ref)


def test_avi_drop_frames_count_what_decodes(tmp_path):
    """AVI cannot store a start time: FFmpeg writes empty 'drop frame' chunks, which the header counts
    but nothing decodes. The count is what decodes, and frame i is still the i-th picture."""
    path = write(tmp_path / "late.avi", "mjpeg", start=7)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames > N                    # the header's count includes the drops
    assert data.count_frames(path) == N
    frames, _, n = data.read_video(path, lambda n: np.array([20, 21, 59]))
    assert n == N
    np.testing.assert_array_equal(painted(frames), [20, 21, 59])


@pytest.mark.parametrize("cut", [5, 13])
def test_mp4_edit_list_cut_counts_what_decodes(tmp_path, cut):
    """A stream-copy cut (ffmpeg -ss ... -c copy) keeps the packets from the keyframe before the cut and
    writes an edit list: the frames before the cut are decoded as references but never shown. MP4's
    stored count includes them; the count is what decodes, and the last frames are not 'missing'."""
    src = write(tmp_path / "src.mp4", "h264")
    path = tmp_path / f"cut{cut}.mp4"
    with av.open(str(src)) as inp, av.open(str(path), "w") as out:
        ins = inp.streams.video[0]
        outs = out.add_stream_from_template(ins)
        shift = cut * int(1 / (ins.time_base * FPS))          # `cut` frames before time 0: cut by the edit list
        for packet in inp.demux(ins):
            if packet.dts is not None:
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, outs
                out.mux(packet)
    ref = pyav_frames(path)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames > len(ref)           # the stored count is wrong
    assert painted(ref[0]) == cut and data.count_frames(path) == len(ref) == N - cut
    frames, _, n = data.read_video(path, lambda n: np.array([[0, n // 2, n - 1]]))
    assert n == N - cut
    np.testing.assert_array_equal(frames[0], ref[[0, n // 2, n - 1]])


@pytest.mark.parametrize("codec,ext", [("mjpeg", "avi"), ("mpeg4", "avi"), ("h264", "mp4"), ("h264", "mkv")])
def test_a_gap_in_time_is_not_a_missing_frame(tmp_path, codec, ext):
    """5 frame durations with no frame after frame 29 (a capture drop, variable frame rate): frame 30
    is the 31st picture, not the one at 30 / fps."""
    path = write(tmp_path / f"gap.{ext}", codec, gap=5)
    assert data.count_frames(path) == N
    for ask in ([29, 30, 31], [40, 41], [0, 35, 59]):
        frames, _, n = data.read_video(path, lambda n, ask=ask: np.array(ask))
        assert n == N
        np.testing.assert_array_equal(painted(frames), ask)


def test_frame_threads_change_nothing(tmp_path):
    """Decoder frame threads delay the output; placement must not depend on them."""
    path = write(tmp_path / "clip.mp4", "h264")
    for threads in (0, 2, 4):
        frames, _, _ = data.read_video(path, lambda n: np.array([[5, 6, 7], [40, 41, 59]]), threads=threads)
        np.testing.assert_array_equal(painted(frames), [[5, 6, 7], [40, 41, 59]])


# -----------------------------------------------------------------------------
# Bad files, and `python tools/prepare_data.py check`


def test_truncated_and_corrupt_files_are_bad_media(tmp_path):
    """A file cut short raises BadMedia for the frames it lost, never returns other frames; its first
    frames still read."""
    raw = write(tmp_path / "good.mkv", "h264").read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(raw[: len(raw) // 2])                  # Matroska: counted by demuxing what is there
    n = data.count_frames(cut)
    assert 0 < n < N
    with pytest.raises(data.BadMedia, match="truncated"):
        data.read_video(cut, lambda m: np.array([N - 1]), num_frames=N)     # a count cached before the cut
    frames, _, _ = data.read_video(cut, lambda m: np.array([0, 1]))
    np.testing.assert_array_equal(painted(frames), [0, 1])
    (tmp_path / "corrupt.avi").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    with pytest.raises(data.BadMedia):
        data.read_video(tmp_path / "corrupt.avi")


def test_check_reports_bad_files_and_passes_good_ones(tmp_path, capsys):
    good = write(tmp_path / "good.mp4", "h264")
    write(tmp_path / "good.avi", "h264")                  # B-frames in AVI: fine, nothing to report
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    raw = good.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(raw[: len(raw) // 2])          # PyAV writes the index last
    ann = tmp_path / "list.txt"
    ann.write_text("good.mp4 0\ngood.avi 1\ncorrupt.mp4 2\ntruncated.mp4 3\n")
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["check", "--video-list", str(ann), "--video-root", str(tmp_path)])
    assert e.value.code == 1                                                 # bad files fail the check
    out = capsys.readouterr().out.splitlines()
    bad = sorted(line.split(":")[0] for line in out if line.startswith("BAD "))
    assert bad == [f"BAD {tmp_path / 'corrupt.mp4'}", f"BAD {tmp_path / 'truncated.mp4'}"]
    assert out[-1] == "2 bad file(s); 0 missing of 4 listed"
