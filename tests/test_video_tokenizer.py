"""VideoTokenizer: shapes, exact image / causality equivalences, save / load, input errors, a tiny overfit."""

from __future__ import annotations

import json

import pytest
import torch

from tokenizers_mm.io import save_module
from tokenizers_mm.video import VideoTokenizer, VideoTokenizerConfig


@pytest.fixture(scope="module")
def tokenizer() -> VideoTokenizer:
    torch.manual_seed(0)
    return VideoTokenizer(VideoTokenizerConfig.tiny()).eval()


def random_clip(frames: int, height: int = 16, width: int = 16, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=generator) * 2 - 1


def smooth_clip(frames: int = 5, size: int = 16) -> torch.Tensor:
    """A moving pattern a tiny autoencoder can fit, unlike noise: ``[1, 3, T, size, size]``."""
    t = torch.arange(frames).view(frames, 1, 1).float()
    y = torch.arange(size).view(1, size, 1).float()
    x = torch.arange(size).view(1, 1, size).float()
    channels = [torch.sin((x + 2 * t) / 4), torch.cos((y - t) / 5), torch.sin((x + y) / 6 + t / 3)]
    return 0.8 * torch.stack([c.expand(frames, size, size) for c in channels]).unsqueeze(0)


# ---------------------------------------------------------------------- shapes


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_decode_shapes(tokenizer: VideoTokenizer, frames: int) -> None:
    clip = random_clip(frames, 16, 24)
    latent_frames = 1 + (frames - 1) // 4
    codes = tokenizer.encode(clip)
    assert codes.shape == (2, latent_frames, 2, 3) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < tokenizer.codebook_size
    assert tokenizer.num_latent_frames(frames) == latent_frames and tokenizer.num_frames(latent_frames) == frames
    recon = tokenizer.decode(codes)
    assert recon.shape == clip.shape and recon.dtype == torch.float32
    assert recon.min() >= -1 and recon.max() <= 1
    out, train_codes, aux_loss = tokenizer(clip)
    assert out.shape == clip.shape and torch.equal(train_codes, codes)
    assert aux_loss.shape == () and aux_loss.item() == 0.0


def test_properties(tokenizer: VideoTokenizer) -> None:
    assert tokenizer.codebook_size == 125 == tokenizer.config.codebook_size
    assert tokenizer.downsample == 8 and tokenizer.temporal_downsample == 4
    assert tokenizer.config == VideoTokenizerConfig.tiny()
    assert sum(p.numel() for p in tokenizer.parameters()) < 100_000


# ---------------------------------------------------------------------- exact equivalences


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_image_tokens_equal_first_latent_frame(tokenizer: VideoTokenizer, frames: int) -> None:
    clip = random_clip(frames, seed=frames)
    image_codes = tokenizer.encode_image(clip[:, :, 0])
    assert image_codes.shape == (2, 2, 2)
    assert torch.equal(image_codes, tokenizer.encode(clip)[:, 0])
    assert torch.equal(tokenizer.decode_image(image_codes), tokenizer.decode(image_codes[:, None])[:, :, 0])


@pytest.mark.parametrize("kept", [0, 1])
def test_encoding_is_causal(tokenizer: VideoTokenizer, kept: int) -> None:
    """Frames ``1 + 4 * kept`` onwards never reach latent frames ``0 .. kept``."""
    clip = random_clip(9)
    codes = tokenizer.encode(clip)
    changed = clip.clone()
    changed[:, :, 1 + 4 * kept :] = random_clip(9, seed=1)[:, :, 1 + 4 * kept :]
    assert torch.equal(tokenizer.encode(changed)[:, : kept + 1], codes[:, : kept + 1])
    # a prefix clip tokenizes to the prefix of the codes
    assert torch.equal(tokenizer.encode(clip[:, :, : 1 + 4 * kept]), codes[:, : kept + 1])


def test_decoding_is_causal(tokenizer: VideoTokenizer) -> None:
    codes = tokenizer.encode(random_clip(9))
    assert torch.equal(tokenizer.decode(codes[:, :2]), tokenizer.decode(codes)[:, :, :5])


# ---------------------------------------------------------------------- save / load


def test_save_load_gives_identical_codes(tokenizer: VideoTokenizer, tmp_path) -> None:
    path = tokenizer.save(tmp_path / "video.safetensors")
    loaded = VideoTokenizer.load(path)
    assert loaded.config == tokenizer.config
    clip = random_clip(5)
    codes = tokenizer.encode(clip)
    assert torch.equal(loaded.encode(clip), codes)
    assert torch.equal(loaded.decode(codes), tokenizer.decode(codes))


def test_load_rejects_mismatched_weights(tokenizer: VideoTokenizer, tmp_path) -> None:
    default_config = VideoTokenizerConfig.default().to_dict()
    path = save_module(tokenizer, default_config, tmp_path / "bad.safetensors", "video_tokenizer")
    with pytest.raises(ValueError, match="do not match the VideoTokenizerConfig"):
        VideoTokenizer.load(path)


def test_load_rejects_other_kind_and_missing_file(tokenizer: VideoTokenizer, tmp_path) -> None:
    path = save_module(tokenizer, tokenizer.config.to_dict(), tmp_path / "img.safetensors", "image_tokenizer")
    with pytest.raises(ValueError, match="expected 'video_tokenizer'"):
        VideoTokenizer.load(path)
    with pytest.raises(FileNotFoundError):
        VideoTokenizer.load(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("clip", "error", "match"),
    [
        ([[0.0]], TypeError, "float tensor"),
        (torch.zeros(1, 3, 5, 16, 16, dtype=torch.uint8), TypeError, "dtype torch.uint8"),
        (torch.zeros(1, 3, 16, 16), ValueError, "5-D.*encode_image"),
        (torch.zeros(1, 1, 5, 16, 16), ValueError, r"3 \(RGB\) channels"),
        (torch.zeros(1, 3, 6, 16, 16), ValueError, r"T=6 frames.*1 \+ 4k.*nearest: 5 or 9.*fit_frame_count"),
        (torch.zeros(1, 3, 0, 16, 16), ValueError, "positive int"),
        (torch.zeros(1, 3, 5, 12, 16), ValueError, "multiples of 8, got 12x16"),
        (torch.full((1, 3, 5, 16, 16), 2.0), ValueError, r"\[-1, 1\], got range \[2, 2\]"),
        (torch.full((1, 3, 5, 16, 16), float("nan")), ValueError, "NaN"),
    ],
)
def test_encode_rejects_bad_input(tokenizer: VideoTokenizer, clip, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tokenizer.encode(clip)


def test_encode_image_rejects_video(tokenizer: VideoTokenizer) -> None:
    with pytest.raises(ValueError, match=r"4-D tensor \[B, 3, H, W\]"):
        tokenizer.encode_image(torch.zeros(1, 3, 1, 16, 16))


@pytest.mark.parametrize(
    ("codes", "error", "match"),
    [
        (torch.zeros(1, 2, 2, 2), TypeError, "integer tensor"),
        (torch.zeros(1, 2, 2, dtype=torch.long), ValueError, "decode_image"),
        (torch.full((1, 2, 2, 2), 125), ValueError, r"\[0, 125\), got range \[125, 125\]"),
        (torch.full((1, 2, 2, 2), -1), ValueError, r"\[0, 125\)"),
    ],
)
def test_decode_rejects_bad_codes(tokenizer: VideoTokenizer, codes, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tokenizer.decode(codes)


def test_num_latent_frames_rejects_bad_count(tokenizer: VideoTokenizer) -> None:
    with pytest.raises(ValueError, match="nearest: 13 or 17"):
        tokenizer.num_latent_frames(14)


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize("preset", [VideoTokenizerConfig.tiny, VideoTokenizerConfig.default])
def test_config_round_trips_through_json(preset) -> None:
    config = preset()
    assert VideoTokenizerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_presets_take_overrides() -> None:
    assert VideoTokenizerConfig.tiny(fps=4).fps == 4.0
    assert VideoTokenizerConfig.default(fsq_levels=[7, 5, 5]).codebook_size == 175
    with pytest.raises(ValueError, match="unknown VideoTokenizerConfig keys"):
        VideoTokenizerConfig.tiny(width=3)


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown VideoTokenizerConfig keys \['levels'\]; accepted keys: .*fsq_lev"):
        VideoTokenizerConfig.from_dict({"levels": [8, 5]})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"fsq_levels": [2, 5]}, "fsq_levels"),
        ({"fsq_levels": []}, "fsq_levels"),
        ({"width_mult": [1, 2, 4]}, "width_mult"),
        ({"spatial_downsample": 6}, "spatial_downsample"),
        ({"temporal_downsample": 3}, "temporal_downsample"),
        ({"base_width": 1}, "base_width"),
        ({"latent_channels": 0}, "latent_channels"),
        ({"fps": 0}, "fps"),
    ],
)
def test_config_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"VideoTokenizerConfig.{field}"):
        VideoTokenizerConfig(**overrides)


def test_default_preset_size() -> None:
    model = VideoTokenizer(VideoTokenizerConfig.default())
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 4_000_000
    assert model.codebook_size == 1000


# ---------------------------------------------------------------------- training


def test_short_overfit_lowers_reconstruction_error() -> None:
    """30 Adam steps on one fixed 5-frame 16×16 clip cut the MSE of decode(encode(x)) at least 4× (~10-20× seen)."""
    torch.manual_seed(0)
    model = VideoTokenizer(VideoTokenizerConfig.tiny())
    clip = smooth_clip()
    before = (model.decode(model.encode(clip)) - clip).square().mean().item()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        recon, _, aux_loss = model(clip)
        loss = (recon - clip).square().mean() + aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = (model.decode(model.encode(clip)) - clip).square().mean().item()
    assert after < before / 4, (before, after)
