"""Tests of data.read_video's frame contract (issue 18) on a matrix of codecs x containers.

The contract: frame i is the i-th picture that decoding the stream from its
start outputs; in a constant-frame-rate stream, the one whose timestamp is
i / fps after the first frame's. The matrix is written here with PyAV: 60
frames of 64 x 64 at 25 fps, frame i painting i in binary as 8 vertical
stripes (most significant bit on the left, white = 1), a keyframe every 12
frames (so the middle and the end need seeks), the codecs with B-frames
writing B-frames, and the stream starting at time 0 or 7 frames later.
Expected values are the painted indices, never data.py's output. Each case
is about 0.1 s. Run: python -m pytest -q tests/test_video_decode.py
"""

import logging
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

# Where seeking must stay (the fast path): containers that store every frame's
# timestamp, and AVI from its start (the UCF101 case). AVI H.264 with B-frames
# has no usable timestamps: decode order, the slow path, by design. The others
# (MPEG-PS, AVI with a start offset, MPEG-TS) may take either path; both are exact.
FAST = ("mp4", "mov", "mkv", "webm", "flv")

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


def slow_path_records(caplog, path):
    return [r for r in caplog.records if r.name == "bevt.data" and str(path) in r.getMessage()
            and "slow path" in r.getMessage()]


# -----------------------------------------------------------------------------
# The matrix


@pytest.mark.parametrize("codec,ext,start", MATRIX, ids=[f"{c}-{e}-start{s}" for c, e, s in MATRIX])
def test_matrix_frames_asked_are_frames_returned(tmp_path, caplog, codec, ext, start):
    path = write(tmp_path / f"{codec}_{start}.{ext}", codec, start)
    if CODECS[codec][3]:                                        # the hard case is really there
        assert has_b_frames(path), f"{path.name} was written without B-frames"
    if codec == "hevc10":
        with av.open(str(path)) as c:
            assert c.streams.video[0].codec_context.pix_fmt.startswith("yuv420p10")

    with caplog.at_level(logging.WARNING, logger="bevt.data"):
        assert data.count_frames(path) == N
        for name, ask in ASKS.items():
            frames, idx, n = data.read_video(path, lambda n, ask=ask: np.array(ask))
            assert n == N
            np.testing.assert_array_equal(painted(frames), ask, err_msg=f"{path.name}, {name}")
        frames, idx, n = data.read_video(path)                  # every frame, from the start
        assert n == N and frames.shape == (N, SIZE, SIZE, 3)
        np.testing.assert_array_equal(painted(frames), np.arange(N))
        # The same with the count given, as the data sets do from their second epoch.
        frames, _, _ = data.read_video(path, lambda n: np.array(ASKS["end"]), num_frames=N)
        np.testing.assert_array_equal(painted(frames), ASKS["end"])

    slow = slow_path_records(caplog, path)
    assert len(slow) <= 1                                       # logged once per file
    if ext in FAST or (ext == "avi" and start == 0 and codec != "h264"):
        assert not slow, f"{path.name} should seek: {slow[0].getMessage()}"
    if (codec, ext) == ("h264", "avi"):
        assert len(slow) == 1                                   # no usable timestamps: decode order


# -----------------------------------------------------------------------------
# The cases of issue 18, and what each check is for


def test_avi_mpeg4_bframes_timestamps_start_at_one(tmp_path):
    """Issue 18, case 1 (Xvid AVI): FFmpeg's derived timestamps start at 1, the stream's start time is 0;
    frames are placed from the first decoded frame, and a clip that needs frame 0 is not 'broken'."""
    path = write(tmp_path / "xvid.avi", "mpeg4")
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        first = next(c.decode(s))
        assert (s.start_time or 0) == 0 and first.pts == 1     # the trap the old rule fell into
    for ask in ([29, 30, 31], [0, 8, 16, 24], [0, 59]):
        frames, _, _ = data.read_video(path, lambda n, ask=ask: np.array(ask))
        np.testing.assert_array_equal(painted(frames), ask)


def test_mpeg_ts_seek_past_the_last_keyframe(tmp_path):
    """Issue 18, case 2: a TS seek near the end gives no frame at all; read_video seeks earlier."""
    path = write(tmp_path / "clip.ts", "h264")
    for ask in ([44, 58, 59], [59], [57, 58]):
        frames, _, n = data.read_video(path, lambda n, ask=ask: np.array(ask))
        assert n == N
        np.testing.assert_array_equal(painted(frames), ask)


def test_mpeg_ps_retimed_landings_are_caught(tmp_path, caplog):
    """Issue 18, case 3: MPEG-PS seeks by byte position and re-derives timestamps from there, so a
    landing can carry another frame's timestamp, off the 1/fps grid or on it (then only the keyframe
    timestamps of the from-start scan tell). Every frame is asked first in a fresh copy of the file
    (a file that once took the slow path keeps it), so every landing meets the checks."""
    slow = 0
    for codec, bf, gop in (("mpeg2video", 2, 12), ("mpeg1video", 1, 15), ("mpeg1video", 2, 12)):
        src = write(tmp_path / f"{codec}.mpg", codec, options={"bf": str(bf), "g": str(gop)})
        for j in range(1, N - 1):
            path = tmp_path / f"{codec}_{bf}_{gop}_{j}.mpg"
            path.write_bytes(src.read_bytes())
            with caplog.at_level(logging.WARNING, logger="bevt.data"):
                frames, _, n = data.read_video(path, lambda n, j=j: np.array([j, j + 1]))
            assert n == N
            np.testing.assert_array_equal(painted(frames), [j, j + 1], err_msg=path.name)
            slow += len(slow_path_records(caplog, path))
    assert slow > 0                       # some landings were wrong (else this tests nothing), and were caught


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


@pytest.mark.parametrize("codec,ext", [("mjpeg", "avi"), ("mpeg4", "avi"), ("h264", "mp4"), ("h264", "mkv")])
def test_a_gap_in_time_is_not_a_missing_frame(tmp_path, caplog, codec, ext):
    """5 frame durations with no frame after frame 29 (a capture drop, variable frame rate): frame 30
    is the 31st picture, not the one at 30 / fps; timestamps cannot place frames, so decode order does."""
    path = write(tmp_path / f"gap.{ext}", codec, gap=5)
    assert data.count_frames(path) == N
    with caplog.at_level(logging.WARNING, logger="bevt.data"):
        for ask in ([29, 30, 31], [40, 41], [0, 35, 59]):
            frames, _, n = data.read_video(path, lambda n, ask=ask: np.array(ask))
            assert n == N
            np.testing.assert_array_equal(painted(frames), ask)
    assert len(slow_path_records(caplog, path)) == 1


def test_open_gop_landing_after_the_needed_frame_is_retried(tmp_path, caplog):
    """HEVC open GOPs in MP4: a seek for one of the pictures shown just before a CRA keyframe goes to
    that keyframe (MP4 seeks by decode time), and the decoder drops those pictures, so the landing
    is after the needed frame; read_video must seek earlier. The file is fine: no slow path."""
    x265 = {"x265-params": "keyint=15:min-keyint=15:scenecut=0:open-gop=1:bframes=3:b-adapt=0:log-level=error"}
    path = write(tmp_path / "open.mp4", "hevc8", options=x265)
    late = []                                                   # frames a plain seek overshoots
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        for j in range(1, N):
            c.seek((s.start_time or 0) + int(Fraction(j, FPS) / s.time_base), stream=s, backward=True)
            f = next(c.decode(s), None)
            if f is None or int(painted(f.to_ndarray(format="rgb24"))) > j:
                late.append(j)
    assert late, "no seek landed late: the test tests nothing"
    with caplog.at_level(logging.WARNING, logger="bevt.data"):
        for j in range(1, N):
            frames, _, _ = data.read_video(path, lambda n, j=j: np.array([j]))
            assert int(painted(frames)[0]) == j
    assert not slow_path_records(caplog, path)


def test_frame_threads_change_nothing(tmp_path):
    """Decoder frame threads delay the output; placement must not depend on them."""
    path = write(tmp_path / "clip.mp4", "h264")
    for threads in (0, 2, 4):
        frames, _, _ = data.read_video(path, lambda n: np.array([[5, 6, 7], [40, 41, 59]]), threads=threads)
        np.testing.assert_array_equal(painted(frames), [[5, 6, 7], [40, 41, 59]])


# -----------------------------------------------------------------------------
# The slow path and `python tools/prepare_data.py check`


def test_slow_path_is_logged_once_and_exact(tmp_path, caplog):
    """AVI H.264 with B-frames: FFmpeg's timestamps follow decode order, not display order."""
    path = write(tmp_path / "h264.avi", "h264")
    with caplog.at_level(logging.WARNING, logger="bevt.data"):
        for ask in ([30, 31, 32], [45, 50, 59], [12]):
            frames, _, _ = data.read_video(path, lambda n, ask=ask: np.array(ask))
            np.testing.assert_array_equal(painted(frames), ask)
    records = slow_path_records(caplog, path)
    assert len(records) == 1 and records[0].levelno == logging.WARNING


def test_check_reports_slow_path_files_beside_bad_ones(tmp_path, capsys):
    good = write(tmp_path / "good.mp4", "h264")
    write(tmp_path / "slow.avi", "h264")
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    raw = good.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(raw[: len(raw) // 2])          # PyAV writes the index last
    ann = tmp_path / "list.txt"
    ann.write_text("good.mp4 0\nslow.avi 1\ncorrupt.mp4 2\ntruncated.mp4 3\n")
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["check", "--ann", str(ann), "--root", str(tmp_path)])
    assert e.value.code == 1                                                 # bad files fail the check
    out = capsys.readouterr().out.splitlines()
    bad = sorted(line.split(":")[0] for line in out if line.startswith("BAD "))
    slow = [line for line in out if line.startswith("SLOW ")]
    assert bad == [f"BAD {tmp_path / 'corrupt.mp4'}", f"BAD {tmp_path / 'truncated.mp4'}"]
    assert len(slow) == 1 and slow[0].startswith(f"SLOW {tmp_path / 'slow.avi'}: ")
    assert out[-1].startswith("2 bad file(s); 1 ")
