"""Image loading and the one resize policy every image goes through before it is tokenized.

This module owns the pixel side of the image tokenizers: turning whatever a caller holds (a file
path, a ``PIL.Image``, a numpy array, a tensor) into an RGB image, and that image into the float
tensor ``(3, H, W)`` in ``[-1, 1]`` that ``ImageTokenizer.encode`` expects; and back again.

The policy of ``preprocess_image(src, size, factor, mode)``:

* The target ``(H, W)`` is ``size`` (an ``int`` means a square). Both sides must be positive
  multiples of ``factor`` (the tokenizer's downsampling factor), else ``ValueError``.
* The aspect ratio is always kept. ``mode="crop"`` (default) resizes so the image *covers* the
  target, then center-crops the overflow. ``mode="pad"`` resizes so the image *fits inside* the
  target, then centers it on a black canvas (``PAD_VALUE = -1``, i.e. letterbox bars); an odd
  leftover pixel goes to the bottom / right band.
* Resizing is bicubic with antialiasing (``torchvision.transforms.v2.functional.resize``) done in
  float and clamped back to ``[-1, 1]``; an image already at the target size is not resampled.
* Alpha channels are dropped (not composited), grayscale is replicated to RGB, and a file's EXIF
  orientation is applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

PAD_VALUE: float = -1.0  # black, in [-1, 1] pixel space: the letterbox colour of mode="pad"
_RANGE_TOLERANCE = 1e-3  # float inputs may overshoot their range by this much (e.g. after a resize)

ImageLike = str | Path | PIL.Image.Image | np.ndarray | torch.Tensor


def load_image(src: ImageLike) -> PIL.Image.Image:
    """Load ``src`` as an RGB ``PIL.Image``.

    Args:
        src: a path to an image file (``str`` or ``Path``); a ``PIL.Image`` of any mode; a numpy
            array ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``, either ``uint8`` in ``0..255`` or
            float in ``[0, 1]``; or a float tensor ``(3, H, W)`` in ``[-1, 1]``.

    Returns:
        The image in mode ``"RGB"`` (alpha dropped, grayscale replicated, EXIF rotation applied).

    Raises:
        FileNotFoundError: ``src`` is a path that does not exist.
        ValueError: the file is not a readable image, or an array / tensor has the wrong shape,
            dtype or value range.
        TypeError: ``src`` is none of the accepted types.
    """
    if isinstance(src, (str, Path)):
        return _open_file(Path(src))
    if isinstance(src, PIL.Image.Image):
        return src if src.mode == "RGB" else src.convert("RGB")
    if isinstance(src, np.ndarray):
        return _array_to_pil(src)
    if isinstance(src, torch.Tensor):
        return tensor_to_pil(_check_pixel_tensor(src))
    raise TypeError(
        f"cannot load an image from {type(src).__name__}; accepted: a file path (str or Path), a PIL.Image, "
        "a numpy array (H, W[, 3|4]) or a float tensor (3, H, W) in [-1, 1]"
    )


def preprocess_image(
    src: ImageLike,
    size: int | tuple[int, int],
    factor: int = 1,
    mode: Literal["crop", "pad"] = "crop",
) -> torch.Tensor:
    """Load ``src`` and bring it to exactly ``size`` with the module's resize policy.

    Args:
        src: anything ``load_image`` accepts. A tensor is resized in float, without a trip through uint8.
        size: target ``(height, width)``, or one ``int`` for a square.
        factor: both target sides must be multiples of it (pass the tokenizer's ``downsample``).
        mode: ``"crop"`` to cover the target and center-crop, ``"pad"`` to fit inside it and pad
            with ``PAD_VALUE``.

    Returns:
        A float32 tensor ``(3, H, W)`` in ``[-1, 1]``.

    Raises:
        ValueError: ``size``, ``factor`` or ``mode`` are invalid, or ``src`` cannot be read (see ``load_image``).
    """
    height, width = _check_size(size, factor)
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    if isinstance(src, torch.Tensor):
        image = _check_pixel_tensor(src).float()
    else:
        image = to_tensor(load_image(src))
    src_h, src_w = image.shape[-2:]

    if mode == "crop":
        scale = max(height / src_h, width / src_w)
        new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    else:
        scale = min(height / src_h, width / src_w)
        new_h, new_w = min(height, max(1, round(src_h * scale))), min(width, max(1, round(src_w * scale)))

    if (new_h, new_w) != (src_h, src_w):
        image = TF.resize(image, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
        image = image.clamp(-1.0, 1.0)  # bicubic overshoots at sharp edges

    if mode == "crop":
        image = TF.center_crop(image, [height, width])
    else:
        top, left = (height - new_h) // 2, (width - new_w) // 2
        image = TF.pad(image, [left, top, width - new_w - left, height - new_h - top], fill=PAD_VALUE)
    return image.contiguous()


def to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """Convert a ``PIL.Image`` (any mode) to a float32 tensor ``(3, H, W)`` in ``[-1, 1]``."""
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"to_tensor expects a PIL.Image, got {type(image).__name__}")
    pixels = TF.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))  # (3, H, W) uint8
    return pixels.float() / 127.5 - 1.0


def tensor_to_pil(t: torch.Tensor) -> PIL.Image.Image:
    """Convert a float tensor ``(3, H, W)`` in ``[-1, 1]`` to an RGB ``PIL.Image`` (values are clamped)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor_to_pil expects a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"tensor_to_pil expects a tensor of shape (3, H, W), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"tensor_to_pil expects a float tensor in [-1, 1], got dtype {t.dtype}")
    pixels = ((t.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return PIL.Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy(), mode="RGB")


# -- helpers -----------------------------------------------------------------------------------------


def _open_file(path: Path) -> PIL.Image.Image:
    if not path.exists():
        raise FileNotFoundError(f"no image file at {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not an image file")
    try:
        with PIL.Image.open(path) as image:
            image = PIL.ImageOps.exif_transpose(image)  # photos store their rotation in EXIF
            return image.convert("RGB")  # forces a full decode, so truncated files fail here
    except (PIL.UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{path} is not a readable image (PIL: {err})") from err


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    accepted = "accepted: (H, W), (H, W, 3) or (H, W, 4), uint8 in 0..255 or float in [0, 1]"
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"cannot read a numpy array of shape {array.shape} as an image; {accepted}")
    if min(array.shape[:2]) == 0:
        raise ValueError(f"cannot read an empty numpy array of shape {array.shape} as an image")
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("float image array contains NaN or inf values; expected floats in [0, 1]")
        low, high = float(array.min()), float(array.max())
        if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            raise ValueError(f"float image arrays must hold values in [0, 1], found min {low:.4g} max {high:.4g}")
        pixels = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    else:
        raise ValueError(f"cannot read a numpy array of dtype {array.dtype} as an image; {accepted}")
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return PIL.Image.fromarray(np.ascontiguousarray(pixels[:, :, :3]), mode="RGB")


def _check_pixel_tensor(t: torch.Tensor) -> torch.Tensor:
    if t.ndim != 3 or t.shape[0] != 3 or min(t.shape[1:]) == 0:
        raise ValueError(f"image tensors must have shape (3, H, W), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"image tensors must be float in [-1, 1], got dtype {t.dtype}")
    t = t.detach()
    if not bool(torch.isfinite(t).all()):
        raise ValueError("image tensor contains NaN or inf values; expected floats in [-1, 1]")
    low, high = float(t.min()), float(t.max())
    if low < -1 - _RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
        raise ValueError(f"image tensors must hold values in [-1, 1], found min {low:.4g} max {high:.4g}")
    return t.clamp(-1.0, 1.0)


def _check_size(size: int | tuple[int, int], factor: int) -> tuple[int, int]:
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    if isinstance(size, int) and not isinstance(size, bool):
        height = width = size
    elif (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in size)
    ):
        height, width = size
    else:
        raise ValueError(f"size must be an int or a (height, width) pair of ints, got {size!r}")
    if height < 1 or width < 1 or height % factor or width % factor:
        raise ValueError(
            f"size {size!r} is not accepted with factor {factor}: "
            f"height and width must be positive multiples of {factor}"
        )
    return height, width
