"""Image loading and the crop / pad resize policy of ``tokenizers_mm.preprocess``."""

import numpy as np
import PIL.Image
import pytest
import torch

from tokenizers_mm.preprocess import PAD_VALUE, load_image, preprocess_image, tensor_to_pil, to_tensor


def _solid(width: int, height: int, value: int = 255) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (width, height), (value, value, value))


# -- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16"])
def test_load_image_any_pil_mode_to_rgb(mode):
    image = load_image(_solid(7, 5).convert(mode))
    assert image.mode == "RGB" and image.size == (7, 5)


@pytest.mark.parametrize(
    "array",
    [
        np.full((5, 7), 200, dtype=np.uint8),
        np.full((5, 7, 3), 200, dtype=np.uint8),
        np.full((5, 7, 4), 200, dtype=np.uint8),
        np.full((5, 7, 3), 200 / 255, dtype=np.float32),
        np.full((5, 7), 200 / 255, dtype=np.float64),
    ],
    ids=["gray-u8", "rgb-u8", "rgba-u8", "rgb-f32", "gray-f64"],
)
def test_load_image_numpy(array):
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (7, 5)
    assert np.asarray(image).min() == np.asarray(image).max() == 200


def test_load_image_tensor_and_file_round_trip(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(tmp_path / "x.png")
    for src in (tmp_path / "x.png", str(tmp_path / "x.png"), to_tensor(PIL.Image.fromarray(pixels))):
        assert np.array_equal(np.asarray(load_image(src)), pixels)


def test_load_image_applies_exif_rotation(tmp_path):
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    _solid(20, 10).save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (10, 20)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no image file at"):
        load_image("/nonexistent/picture.png")
    with pytest.raises(FileNotFoundError):
        preprocess_image("/nonexistent/picture.png", 16)


def test_corrupt_file_and_directory(tmp_path):
    (tmp_path / "x.png").write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(ValueError, match=r"x\.png is not a readable image \(PIL: "):
        load_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="is a directory"):
        load_image(tmp_path)


def test_truncated_file(tmp_path):
    _solid(64, 64).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a readable image"):
        load_image(tmp_path / "cut.png")


@pytest.mark.parametrize(
    ("src", "error", "match"),
    [
        (
            np.zeros((3, 8, 8), np.uint8),
            ValueError,
            r"shape \(3, 8, 8\).*accepted: \(H, W\), \(H, W, 3\) or \(H, W, 4\)",
        ),
        (np.zeros((8, 8, 2), np.uint8), ValueError, r"shape \(8, 8, 2\)"),
        (np.zeros((1, 8, 8, 3), np.uint8), ValueError, r"shape \(1, 8, 8, 3\)"),
        (np.zeros((0, 8, 3), np.uint8), ValueError, "empty"),
        (np.zeros((8, 8, 3), np.int64), ValueError, "dtype int64"),
        (np.full((8, 8, 3), 255.0), ValueError, r"\[0, 1\], found min 255 max 255"),
        (np.full((8, 8, 3), np.nan), ValueError, "NaN"),
        (torch.zeros(1, 3, 8, 8), ValueError, r"\(3, H, W\), got \(1, 3, 8, 8\)"),
        (torch.zeros(8, 8, 3), ValueError, r"\(3, H, W\), got \(8, 8, 3\)"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), ValueError, "float in \\[-1, 1\\], got dtype torch.uint8"),
        (torch.full((3, 8, 8), 2.0), ValueError, r"\[-1, 1\], found min 2 max 2"),
        ([[0, 1], [1, 0]], TypeError, "cannot load an image from list"),
        (None, TypeError, "NoneType"),
    ],
)
def test_bad_inputs(src, error, match):
    with pytest.raises(error, match=match):
        load_image(src)
    with pytest.raises(error, match=match):
        preprocess_image(src, 8)


def test_tensor_pil_round_trip_and_clamp():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    t = to_tensor(PIL.Image.fromarray(pixels))
    assert t.shape == (3, 4, 5) and t.dtype == torch.float32 and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(t)), pixels)
    clamped = np.asarray(tensor_to_pil(torch.tensor([-3.0, 0.0, 3.0]).view(3, 1, 1)))
    assert clamped.reshape(-1).tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match=r"\(3, H, W\), got \(1, 3, 4, 5\)"):
        tensor_to_pil(t[None])
    with pytest.raises(TypeError, match="PIL.Image"):
        to_tensor(pixels)


# -- the resize policy -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("src_size", [(64, 32), (32, 64), (37, 23), (16, 16), (5, 300)])  # PIL (width, height)
@pytest.mark.parametrize("size", [16, (16, 32), (48, 16)])
def test_exact_target_size(mode, src_size, size):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (*src_size[::-1], 3), dtype=np.uint8))
    out = preprocess_image(image, size, factor=8, mode=mode)
    height, width = (size, size) if isinstance(size, int) else size
    assert out.shape == (3, height, width) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("scale", [1, 4])  # without and with a resize
def test_pad_keeps_aspect_with_bands(scale):
    wide = preprocess_image(_solid(32 * scale, 16 * scale), 32, mode="pad")  # 2:1 -> 32x16 centred in 32x32
    assert torch.all(wide[:, :8] == PAD_VALUE) and torch.all(wide[:, 24:] == PAD_VALUE)
    assert torch.allclose(wide[:, 8:24], torch.ones(3, 16, 32), atol=1e-3)
    tall = preprocess_image(_solid(16 * scale, 32 * scale), 32, mode="pad")  # 1:2 -> bands left and right
    assert torch.all(tall[:, :, :8] == PAD_VALUE) and torch.all(tall[:, :, 24:] == PAD_VALUE)
    assert torch.allclose(tall[:, :, 8:24], torch.ones(3, 32, 16), atol=1e-3)


def test_pad_odd_leftover_goes_bottom_right():
    out = preprocess_image(_solid(32, 15), 32, mode="pad")  # 15 rows of image in 32: 8 above, 9 below
    rows = (out[0] > 0).any(dim=1).nonzero().flatten()
    assert rows.min() == 8 and rows.max() == 22


@pytest.mark.parametrize("scale", [1, 4])
def test_crop_keeps_aspect_and_centre(scale):
    # 2:1 image: black quarter at each side, white middle half. A centre crop to a square keeps exactly the
    # white half (the antialiasing filter may bleed a little black into the outermost column); a squash
    # (aspect not kept) would bring a black quarter in.
    pixels = np.zeros((16 * scale, 32 * scale, 3), np.uint8)
    pixels[:, 8 * scale : 24 * scale] = 255
    wide = preprocess_image(pixels, 16, mode="crop")
    tall = preprocess_image(np.ascontiguousarray(pixels.transpose(1, 0, 2)), 16, mode="crop").transpose(1, 2)
    for out in (wide, tall):
        assert out.shape == (3, 16, 16)
        assert out[:, :, 1:-1].min() > 0.99 and out.min() > 0.5


def test_same_size_is_not_resampled():
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    for mode in ("crop", "pad"):
        assert torch.equal(
            preprocess_image(pixels, (16, 24), factor=8, mode=mode), to_tensor(PIL.Image.fromarray(pixels))
        )


def test_tensor_input_is_resized_in_float():
    t = torch.linspace(-1, 1, 3 * 40 * 40).view(3, 40, 40)
    out = preprocess_image(t, 16)
    assert out.shape == (3, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert not torch.allclose(out * 127.5, (out * 127.5).round())  # no trip through uint8


@pytest.mark.parametrize(
    ("size", "factor", "match"),
    [
        (30, 8, r"size 30 is not accepted with factor 8"),
        ((32, 20), 16, r"size \(32, 20\) is not accepted with factor 16"),
        (0, 1, "size 0 is not accepted"),
        ((16, -16), 1, "positive multiples"),
        ((16, 16, 16), 1, "int or a \\(height, width\\) pair"),
        (16.0, 1, "int or a \\(height, width\\) pair"),
        (16, 0, "factor must be a positive int"),
    ],
)
def test_bad_size_or_factor(size, factor, match):
    with pytest.raises(ValueError, match=match):
        preprocess_image(_solid(8, 8), size, factor=factor)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode must be 'crop' or 'pad', got 'stretch'"):
        preprocess_image(_solid(8, 8), 8, mode="stretch")
