"""Video files in and out of the tokenizer's layout, and the frame-count policy.

Owns: decoding a file into a ``[3, T, H, W]`` float clip in ``[-1, 1]`` (``load_video``), fitting a clip to
the ``T = 1 + 4k`` frame counts the causal ``VideoTokenizer`` accepts (``fit_frame_count``), and writing
clips back as H.264 mp4 (``write_video``), lossless animated PNG (``write_apng``) or GIF (``write_gif``).
Containers FFmpeg reads (mp4, webm, mkv, ...) are decoded with PyAV (torchvision 0.29 no longer ships video
decoding), imported only when such a file is read or written; animated images (``.apng``, ``.png``, ``.gif``,
``.webp``) are decoded with Pillow, so they need no PyAV (``anygen data shapes --clip-format apng`` writes its
clips so, for machines without FFmpeg). Resizing uses ``torchvision.transforms.v2.functional`` on uint8 frames.

Animated images store a duration per frame, and their writers merge identical consecutive frames into one
longer frame. Their frames are therefore expanded back to a constant rate first: the rate is the file's own
``fps`` text chunk (``write_apng`` stores one), else one frame per shortest duration; each frame is repeated
``round(duration × rate)`` times (at least once). The policies below then apply as to any video.

Policies, in the order ``load_video`` applies them:

1. Frame rate. ``fps=None`` keeps every decoded frame and returns the stream's own rate. ``fps=r``
   resamples by nearest timestamp: target times are ``t0 + k / r`` for ``k = 0, 1, ...`` (``t0`` the first
   frame's timestamp) up to the last frame's timestamp, and each target takes the decoded frame whose
   timestamp is nearest (the earlier one on a tie). Frames are dropped when ``r`` is below the source
   rate and repeated when above; no frames are blended.
2. Size. ``size=None`` keeps the native size; ``size=s`` (int) resizes so the shorter side is ``s``,
   keeping the aspect ratio; ``size=(h, w)`` resizes, keeping the aspect ratio, to the smallest size that
   covers ``h × w``. In every case the frame is then center-cropped to multiples of 8 (``(h, w)`` must
   already be multiples of 8), so the result always fits the tokenizer's 8× spatial downsampling.
3. Frame count. With ``num_frames=n`` (``n`` must be ``1 + 4k``) the clip is exactly ``n`` frames: the
   first ``n`` (decoding stops there), or all of them followed by copies of the last frame when the video
   is shorter. Without it, ``fit_frame_count(frames, frame_policy)`` applies: ``"trim"`` keeps the first
   ``1 + 4k`` frames for the largest such count ``<= T``; ``"pad"`` repeats the last frame up to the
   smallest ``1 + 4k >= T``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageSequence
from torchvision.transforms.v2 import functional as TF

FramePolicy = Literal["trim", "pad"]
ANIMATED_IMAGE_SUFFIXES = (".apng", ".png", ".gif", ".webp")  # decoded with Pillow: no PyAV needed
_DEFAULT_FRAME_MS = 100.0  # what browsers show a GIF frame that declares no (or a zero) delay for
TEMPORAL_DOWNSAMPLE = 4  # VideoTokenizerConfig.temporal_downsample of the shipped tokenizers
SPATIAL_MULTIPLE = 8  # VideoTokenizerConfig.spatial_downsample of the shipped tokenizers
_RANGE_TOLERANCE = 1e-3


def fitted_frame_count(num_frames: int, policy: FramePolicy = "trim", *, temporal_downsample: int = 4) -> int:
    """The frame count ``fit_frame_count`` turns ``num_frames`` into.

    Args:
        num_frames: frames available, ``>= 1``.
        policy: ``"trim"`` for the largest ``1 + temporal_downsample * k <= num_frames``, ``"pad"`` for the
            smallest ``1 + temporal_downsample * k >= num_frames``.
        temporal_downsample: the tokenizer's temporal factor.

    Raises:
        ValueError: ``num_frames < 1`` or an unknown policy.
    """
    _check_policy(policy)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    if isinstance(temporal_downsample, bool) or not isinstance(temporal_downsample, int) or temporal_downsample < 1:
        raise ValueError(f"temporal_downsample must be a positive int, got {temporal_downsample!r}")
    groups = (num_frames - 1) // temporal_downsample
    if policy == "pad" and (num_frames - 1) % temporal_downsample:
        groups += 1
    return 1 + temporal_downsample * groups


def fit_frame_count(
    frames: torch.Tensor, policy: FramePolicy = "trim", *, temporal_downsample: int = 4
) -> torch.Tensor:
    """Trim or pad a clip along time to ``1 + temporal_downsample * k`` frames.

    Args:
        frames: a clip with time at dim -3: ``[C, T, H, W]`` or ``[B, C, T, H, W]``, any dtype.
        policy: ``"trim"`` drops trailing frames down to the largest accepted count ``<= T``; ``"pad"``
            repeats the last frame up to the smallest accepted count ``>= T``.
        temporal_downsample: the tokenizer's temporal factor (4 for the shipped configs).

    Returns:
        The clip with ``T' = fitted_frame_count(T, policy)`` frames; ``frames`` itself when ``T`` already fits.

    Raises:
        TypeError: ``frames`` is not a tensor.
        ValueError: fewer than 3 dims, zero frames, or an unknown policy.
    """
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a tensor [C, T, H, W] or [B, C, T, H, W], got {type(frames).__name__}")
    if frames.ndim < 3:
        raise ValueError(f"frames must have time at dim -3 ([C, T, H, W]), got shape {tuple(frames.shape)}")
    num_frames = frames.shape[-3]
    if num_frames == 0:
        raise ValueError("cannot fit a clip with zero frames")
    target = fitted_frame_count(num_frames, policy, temporal_downsample=temporal_downsample)
    return _set_frame_count(frames, target)


def load_video(
    path: str | Path,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    size: int | tuple[int, int] | None = None,
    frame_policy: FramePolicy = "trim",
) -> tuple[torch.Tensor, float]:
    """Decode a video file into a tokenizer-ready clip (see the module docstring for the policies).

    Args:
        path: any container / codec FFmpeg reads (mp4, webm, mkv, gif, ...); the first video stream is used.
        num_frames: exact output length, ``1 + 4k``; ``None`` applies ``frame_policy`` to the whole video.
        fps: resample to this frame rate by nearest timestamp; ``None`` keeps the source rate.
        size: ``None`` (native), shorter side ``s``, or ``(h, w)`` multiples of 8; always center-cropped to
            multiples of 8.
        frame_policy: ``"trim"`` or ``"pad"``, used when ``num_frames`` is ``None``.

    Returns:
        ``(frames, fps)``: float32 ``[3, T, H, W]`` in ``[-1, 1]`` and the frame rate of ``frames``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable video, has no video stream or no frames, or an argument is invalid.
    """
    path = Path(path)
    if num_frames is not None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int or None, got {num_frames!r}")
        if (num_frames - 1) % TEMPORAL_DOWNSAMPLE:
            below = fitted_frame_count(num_frames, "trim")
            raise ValueError(
                f"num_frames must be 1 + {TEMPORAL_DOWNSAMPLE}k, got {num_frames} "
                f"(nearest: {below} or {below + TEMPORAL_DOWNSAMPLE})"
            )
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf):
        raise ValueError(f"fps must be a positive number or None, got {fps!r}")
    _check_size(size)
    size = tuple(size) if isinstance(size, list) else size
    _check_policy(frame_policy)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}")

    if path.suffix.lower() in ANIMATED_IMAGE_SUFFIXES:
        decoded, source_fps = _animated_image_frames(path)
        frames = _decode_frames(decoded, source_fps, fps, num_frames, size)
    else:
        av = _import_av(f"reading {path.name}")
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise ValueError(f"{path} has no video stream (streams: {list(container.streams)})")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                source_fps = _stream_fps(stream)
                decoded = ((frame.to_ndarray(format="rgb24"), index / source_fps if frame.time is None else frame.time)
                           for index, frame in enumerate(container.decode(stream)))
                frames = _decode_frames(decoded, source_fps, fps, num_frames, size)
        except av.FFmpegError as err:
            raise ValueError(f"{path} is not a readable video: {err}") from err
    if not frames:
        raise ValueError(f"{path} has a video stream but no frames could be decoded")

    clip = torch.stack(frames, dim=1)  # (3, T, H, W) uint8
    if num_frames is not None:
        clip = _set_frame_count(clip, num_frames)
    else:
        clip = fit_frame_count(clip, frame_policy)
    return clip.float() / 127.5 - 1.0, float(fps) if fps is not None else source_fps


def write_video(path: str | Path, frames: torch.Tensor, fps: float, *, crf: int = 18) -> Path:
    """Write a clip as an H.264 (libx264, yuv420p) mp4, byte-identical for identical frames.

    yuv420p stores color at half resolution, so H.264 needs even sizes: an odd height or width is padded
    by repeating the last row / column (tokenizer outputs, multiples of 8, are never padded).
    One encoder thread, an explicit RGB → yuv420p conversion and x264's ``mbtree=0`` make the bytes a
    function of the frames alone (with the defaults a few percent of small clips differed from run to
    run, and the thread pool cost ~0.1 s per tiny clip).

    Args:
        path: output file, usually ``.mp4``; parent folders are created.
        frames: float ``[3, T, H, W]`` in ``[-1, 1]``.
        fps: frame rate stored in the file.
        crf: x264 constant rate factor, 0 (lossless) to 51; 18 is visually lossless.

    Returns:
        ``path``.

    Raises:
        TypeError / ValueError: ``frames`` or ``fps`` is not as described.
    """
    pixels = _to_uint8_frames(frames)  # (T, H, W, 3)
    _check_fps(fps)
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an int in [0, 51], got {crf!r}")
    height, width = pixels.shape[1:3]
    pixels = np.pad(pixels, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    path = Path(path)
    av = _import_av(f"writing {path.name} (write_apng or write_gif need no PyAV)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        options = {"crf": str(crf), "threads": "1", "x264-params": "mbtree=0"}
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.height, stream.width = pixels.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1
        for t, image in enumerate(pixels):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed (B-)frames
    return path


def write_gif(path: str | Path, frames: torch.Tensor, fps: float) -> Path:
    """Write a clip as a looping GIF (via Pillow; 256-color palette per frame, delays in whole milliseconds).

    Args:
        path: output file, usually ``.gif``; parent folders are created.
        frames: float ``[3, T, H, W]`` in ``[-1, 1]``.
        fps: playback rate.

    Returns:
        ``path``.
    """
    _check_fps(fps)
    return _save_animated(path, frames, "GIF", duration=round(1000 / fps))


def write_apng(path: str | Path, frames: torch.Tensor, fps: float) -> Path:
    """Write a clip as a lossless, looping animated PNG through Pillow (no PyAV needed).

    The exact rate goes into an ``fps`` text chunk: Pillow stores whole-millisecond delays and merges identical
    consecutive frames, and ``load_video`` uses the chunk to give back every frame at ``fps``.

    Args:
        path: output file, usually ``.apng``; parent folders are created.
        frames: float ``[3, T, H, W]`` in ``[-1, 1]``.
        fps: frame rate.

    Returns:
        ``path``.
    """
    from PIL import PngImagePlugin

    _check_fps(fps)
    info = PngImagePlugin.PngInfo()
    info.add_text("fps", repr(float(fps)))
    return _save_animated(path, frames, "PNG", duration=1000 / fps, pnginfo=info)


# ---------------------------------------------------------------------- helpers


def _save_animated(path: str | Path, frames: torch.Tensor, image_format: str, **options) -> Path:
    """Save a clip through Pillow as a looping animated image of ``image_format`` (``"GIF"``, ``"PNG"``); the
    caller has checked the frame rate its ``duration`` option came from."""
    pixels = _to_uint8_frames(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(image) for image in pixels]
    images[0].save(path, format=image_format, save_all=True, append_images=images[1:], loop=0, **options)
    return path


def _check_fps(fps: float) -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf:
        raise ValueError(f"fps must be a positive number, got {fps!r}")


def _decode_frames(
    decoded: Iterable[tuple[np.ndarray, float]],
    source_fps: float,
    fps: float | None,
    num_frames: int | None,
    size: int | tuple[int, int] | None,
) -> list[torch.Tensor]:
    """Resample ``(RGB uint8 (H, W, 3) frame, time in s)`` by nearest timestamp and resize; ``[3, H, W]`` uint8."""
    out: list[torch.Tensor] = []
    previous: tuple[np.ndarray, float] | None = None
    t0: float | None = None
    for image, time in decoded:
        if fps is None:
            out.append(_resize(image, size))
        else:
            t0 = time if t0 is None else t0
            # Emit every target time up to this frame; each takes the nearer of this frame and the previous one.
            while num_frames is None or len(out) < num_frames:
                target = t0 + len(out) / fps
                if target > time + 1e-9:
                    break
                if previous is not None and target - previous[1] <= time - target:
                    out.append(_resize(previous[0], size))
                else:
                    out.append(_resize(image, size))
            previous = (image, time)
        if num_frames is not None and len(out) >= num_frames:
            break
    return out


def _animated_image_frames(path: Path) -> tuple[list[tuple[np.ndarray, float]], float]:
    """An animated image's frames at a constant rate (module docstring) with their times, and that rate."""
    try:
        with Image.open(path) as image:
            declared = image.info.get("fps")
            frames, durations = [], []
            for frame in ImageSequence.Iterator(image):
                frames.append(np.array(frame.convert("RGB")))
                duration = frame.info.get("duration")
                durations.append(float(duration) if duration and duration > 0 else _DEFAULT_FRAME_MS)
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's UnidentifiedImageError is an OSError
        kinds = ", ".join(ANIMATED_IMAGE_SUFFIXES)
        raise ValueError(f"{path} is not a readable animated image ({kinds}): {err}") from err
    try:
        rate = float(declared) if declared is not None else 1000.0 / min(durations)
    except ValueError:
        raise ValueError(f"{path} declares fps={declared!r}, not a number") from None
    if not 0 < rate < math.inf:
        raise ValueError(f"{path} declares fps={declared!r}; it must be a positive number")
    out: list[tuple[np.ndarray, float]] = []
    for frame, duration in zip(frames, durations):
        for _ in range(max(1, round(duration * rate / 1000.0))):
            out.append((frame, len(out) / rate))
    return out, rate


def _import_av(purpose: str):
    """PyAV, or an ImportError that says what needs it and what works without it."""
    try:
        import av
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs PyAV (pip install av), which is not installed; animated images "
            f"({', '.join(ANIMATED_IMAGE_SUFFIXES)}) are read without it, and write_apng / write_gif write clips "
            "without it") from err
    return av


def _resize(frame: np.ndarray, size: int | tuple[int, int] | None) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` resized per ``size`` and center-cropped to multiples of 8, as ``[3, H, W]``."""
    image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)  # (3, H, W)
    height, width = image.shape[1:]
    if size is None:
        crop = (height // SPATIAL_MULTIPLE * SPATIAL_MULTIPLE, width // SPATIAL_MULTIPLE * SPATIAL_MULTIPLE)
    else:
        if isinstance(size, int):
            scale = size / min(height, width)
        else:
            scale = max(size[0] / height, size[1] / width)
        new = (max(1, round(height * scale)), max(1, round(width * scale)))
        if isinstance(size, int):  # pin the shorter side to exactly `size` against rounding
            new = (size, new[1]) if height <= width else (new[0], size)
            crop = (new[0] // SPATIAL_MULTIPLE * SPATIAL_MULTIPLE, new[1] // SPATIAL_MULTIPLE * SPATIAL_MULTIPLE)
        else:
            new = (max(new[0], size[0]), max(new[1], size[1]))
            crop = size
        if new != (height, width):
            image = TF.resize(image, list(new), antialias=True)
    if crop[0] == 0 or crop[1] == 0:
        raise ValueError(f"a {height}x{width} frame is smaller than {SPATIAL_MULTIPLE} pixels; pass a larger size")
    if crop != tuple(image.shape[1:]):
        image = TF.center_crop(image, list(crop))
    return image


def _stream_fps(stream) -> float:  # an av VideoStream
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    raise ValueError("the video stream declares no frame rate")


def _set_frame_count(frames: torch.Tensor, target: int) -> torch.Tensor:
    """Cut to ``target`` frames along dim -3, or repeat the last frame up to ``target``."""
    num_frames = frames.shape[-3]
    if num_frames >= target:
        return frames if num_frames == target else frames[..., :target, :, :]
    last = frames[..., -1:, :, :]
    repeats = [1] * frames.ndim
    repeats[-3] = target - num_frames
    return torch.cat([frames, last.repeat(*repeats)], dim=-3)


def _to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """``[3, T, H, W]`` float in ``[-1, 1]`` → ``(T, H, W, 3)`` uint8."""
    if not isinstance(frames, torch.Tensor) or not frames.is_floating_point():
        kind = frames.dtype if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise TypeError(f"frames must be a float tensor [3, T, H, W] in [-1, 1], got {kind}")
    if frames.ndim != 4 or frames.shape[0] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be a non-empty [3, T, H, W] tensor, got shape {tuple(frames.shape)}")
    frames = frames.detach().cpu().float()
    if not torch.isfinite(frames).all():
        raise ValueError("frames hold NaN or inf values")
    low, high = frames.min().item(), frames.max().item()
    if low < -1 - _RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"frame values must lie in [-1, 1], got range [{low:.3g}, {high:.3g}]")
    pixels = ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().numpy()  # (T, H, W, 3)


def _check_policy(policy: str) -> None:
    if policy not in ("trim", "pad"):
        raise ValueError(f"frame_policy must be 'trim' or 'pad', got {policy!r}")


def _check_size(size: int | tuple[int, int] | None) -> None:
    if size is None:
        return
    if isinstance(size, int) and not isinstance(size, bool):
        if size < SPATIAL_MULTIPLE:
            raise ValueError(f"size must be at least {SPATIAL_MULTIPLE}, got {size}")
        return
    if (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 and s % SPATIAL_MULTIPLE == 0 for s in size)
    ):
        return
    raise ValueError(f"size must be None, an int >= 8, or (height, width) multiples of 8; got {size!r}")
