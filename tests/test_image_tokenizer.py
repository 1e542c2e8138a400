"""The image VQ tokenizer: config round-trips, the encode / decode contract, save / load, input errors,
real images through preprocessing, and a short training run that must lower the reconstruction error."""

import json

import numpy as np
import pytest
import torch

from tokenizers_mm.image import ImageTokenizer, ImageTokenizerConfig
from tokenizers_mm.io import save_module
from tokenizers_mm.preprocess import preprocess_image


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machine's cores are shared: intra-op threads that spin-wait for a busy core make tiny
    # convolutions orders of magnitude slower, so this file runs single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(seed: int = 0, **overrides) -> ImageTokenizer:
    torch.manual_seed(seed)
    return ImageTokenizer(ImageTokenizerConfig.tiny(**overrides)).eval()


def _images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        ImageTokenizerConfig(),
        ImageTokenizerConfig.default(),
        ImageTokenizerConfig.tiny(),
        ImageTokenizerConfig.tiny(quantizer="vq", downsample=16, decoder_norm="spatial"),
        ImageTokenizerConfig(downsample=8, channel_mult=(1, 2, 2, 2), fsq_levels=(7, 5, 5, 5, 5)),
        ImageTokenizerConfig(downsample=4, norm_num_groups=1),  # the shipped default's shape
    ],
)
def test_config_round_trip(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert ImageTokenizerConfig.from_dict(data) == config
    assert len(config.channel_mult) == {4: 3, 8: 4, 16: 5}[config.downsample]


def test_config_unknown_key():
    with pytest.raises(ValueError, match=r"unknown ImageTokenizerConfig fields \['bogus'\]; accepted: \['downsample'"):
        ImageTokenizerConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"downsample": 2}, r"downsample must be 4, 8 or 16, got 2"),
        ({"downsample": 32}, r"downsample must be 4, 8 or 16, got 32"),
        ({"downsample": 8.0}, r"downsample must be 4, 8 or 16"),
        ({"channel_mult": [1, 2]}, r"channel_mult needs 5 entries for downsample 16"),
        ({"channel_mult": [1, 0, 1, 1, 1]}, r"channel_mult must be a list of ints >= 1"),
        ({"base_channels": 0}, r"base_channels must be an int >= 1"),
        ({"layers_per_block": 1.5}, r"layers_per_block must be an int"),
        ({"norm_num_groups": 7}, r"norm_num_groups=7 must divide every block width"),
        ({"decoder_norm": "batch"}, r"decoder_norm must be 'group' or 'spatial', got 'batch'"),
        ({"decoder_norm": "spatial"}, r"decoder_norm='spatial' needs every block width to be a multiple of 32"),
        ({"quantizer": "lfq"}, r"quantizer must be 'fsq' or 'vq', got 'lfq'"),
        ({"fsq_levels": [2, 5]}, r"fsq_levels must be a list of ints >= 3"),
        ({"fsq_levels": []}, r"fsq_levels must not be empty"),
        ({"vq_codebook_size": 0}, r"vq_codebook_size must be an int >= 1"),
        ({"vq_threshold_ema_dead_code": -1}, r"vq_threshold_ema_dead_code must be an int >= 0"),
        ({"vq_use_cosine_sim": 1}, r"vq_use_cosine_sim must be a bool"),
        ({"vq_decay": 1.0}, r"vq_decay must be in \[0, 1\)"),
        ({"vq_commitment_weight": -0.1}, r"vq_commitment_weight must be a non-negative number"),
        ({"image_size": 100}, r"image_size=100 must be a multiple of downsample=16"),
    ],
)
def test_config_validation_names_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        ImageTokenizerConfig(**overrides)


def test_presets():
    tiny, default = ImageTokenizerConfig.tiny(), ImageTokenizerConfig.default()
    assert sum(p.numel() for p in ImageTokenizer(tiny).parameters()) < 100_000
    n = sum(p.numel() for p in ImageTokenizer(default).parameters())
    assert 1_000_000 <= n <= 4_000_000 and n * 4 < 50 * 2**20  # fp32 weights far below the 50 MB budget
    assert default.downsample == 16 and default.codebook_size == 1000 and default.image_size == 256
    assert default.quantizer == "fsq" and default.vq_use_cosine_sim and default.vq_threshold_ema_dead_code > 0
    assert ImageTokenizerConfig.tiny(quantizer="vq").codebook_size == 64


# -- the encode / decode contract ------------------------------------------------------------------


@pytest.mark.parametrize("decoder_norm", ["group", "spatial"])
@pytest.mark.parametrize("downsample", [4, 8, 16])
@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_encode_decode_contract(quantizer, downsample, decoder_norm):
    model = _model(quantizer=quantizer, downsample=downsample, decoder_norm=decoder_norm)
    assert model.downsample == downsample and model.codebook_size == model.config.codebook_size
    x = _images(2, 2 * downsample, 3 * downsample)  # non-square
    codes = model.encode(x)
    assert codes.shape == (2, 2, 3) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < model.codebook_size
    y = model.decode(codes)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert -1 <= float(y.min()) and float(y.max()) <= 1
    assert model.decode(codes[:, :1, :2]).shape == (2, 3, downsample, 2 * downsample)


@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_forward_agrees_with_encode_then_decode(quantizer):
    model = _model(quantizer=quantizer)
    x = _images(2, 16, 24)
    recon, codes, aux_loss = model(x)
    assert torch.equal(codes, model.encode(x))
    assert torch.allclose(recon.clamp(-1, 1), model.decode(codes), atol=1e-5)
    assert aux_loss.ndim == 0 and float(aux_loss) == 0.0  # eval mode, or FSQ: no quantizer loss


def test_vq_training_loss_and_frozen_codebook_in_encode():
    model = _model(quantizer="vq").train()
    x = _images(2, 16, 16)
    codebook = model.quantizer.codebook.clone()
    model.encode(x)  # inference never moves the EMA codebook, even in training mode
    assert torch.equal(model.quantizer.codebook, codebook)
    _, _, aux_loss = model(x)
    assert aux_loss.ndim == 0 and float(aux_loss.detach()) > 0 and aux_loss.requires_grad
    assert not torch.equal(model.quantizer.codebook, codebook)


def test_codebook_usage():
    model = _model()
    assert model.codebook_usage(torch.arange(model.codebook_size).view(1, 5, -1)) == 1.0
    assert model.codebook_usage(torch.zeros(1, 2, 2, dtype=torch.long)) == 1 / model.codebook_size
    with pytest.raises(ValueError, match=r"code 125 is outside the codebook range \[0, 125\)"):
        model.codebook_usage(torch.tensor([[[125]]]))


# -- save / load -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("quantizer", "decoder_norm"), [("fsq", "group"), ("vq", "spatial")])
def test_save_load_identical(tmp_path, quantizer, decoder_norm):
    model = _model(quantizer=quantizer, decoder_norm=decoder_norm)
    model.train()(_images(2, 16, 16, seed=1))  # move the VQ codebook buffers off their initial values
    model.eval()
    path = model.save(tmp_path / "tok.safetensors")
    loaded = ImageTokenizer.load(path)
    assert loaded.config == model.config and not loaded.training
    x = _images(2, 16, 24)
    codes = model.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))


def test_load_errors(tmp_path):
    model = _model()
    with pytest.raises(FileNotFoundError, match="no image_tokenizer file"):
        ImageTokenizer.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ImageTokenizer.load(tmp_path / "junk.safetensors")
    save_module(model, model.config.to_dict(), tmp_path / "text.safetensors", kind="text_tokenizer")
    with pytest.raises(ValueError, match="holds a 'text_tokenizer' module, expected 'image_tokenizer'"):
        ImageTokenizer.load(tmp_path / "text.safetensors")
    save_module(model, {"downsample": 3}, tmp_path / "badcfg.safetensors", kind="image_tokenizer")
    with pytest.raises(ValueError, match="invalid ImageTokenizerConfig: .*downsample must be 4, 8 or 16"):
        ImageTokenizer.load(tmp_path / "badcfg.safetensors")
    for other in (ImageTokenizerConfig.tiny(downsample=16), ImageTokenizerConfig.tiny(base_channels=32)):
        save_module(model, other.to_dict(), tmp_path / "mismatch.safetensors", kind="image_tokenizer")
        with pytest.raises(ValueError, match="do not match the config stored with them: (missing|wrong shape)"):
            ImageTokenizer.load(tmp_path / "mismatch.safetensors")


# -- input errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        ([[0.0]], TypeError, "expected a float tensor .* got list"),
        (torch.zeros(3, 16, 16), ValueError, r"4-D tensor \(B, 3, H, W\), got shape \(3, 16, 16\)"),
        (torch.zeros(1, 1, 16, 16), ValueError, r"3 \(RGB\) channels .* got shape \(1, 1, 16, 16\)"),
        (torch.zeros(1, 16, 16, 3), ValueError, r"3 \(RGB\) channels"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), TypeError, "float tensor in \\[-1, 1\\], got dtype torch.uint8"),
        (torch.zeros(0, 3, 16, 16), ValueError, "non-empty batch"),
        (torch.zeros(1, 3, 20, 16), ValueError, "image height 20 is not a multiple of downsample 8"),
        (torch.zeros(1, 3, 16, 12), ValueError, "image width 12 is not a multiple of downsample 8"),
        (torch.full((1, 3, 16, 16), 255.0), ValueError, r"values must be in \[-1, 1\], found min 255 max 255"),
        (torch.linspace(-2, 0.5, 768).view(1, 3, 16, 16), ValueError, r"found min -2 max 0\.5"),
        (torch.full((1, 3, 16, 16), float("nan")), ValueError, "NaN or inf"),
    ],
)
def test_bad_images(x, error, match):
    model = _model()
    with pytest.raises(error, match=match):
        model.encode(x)
    with pytest.raises(error, match=match):
        model(x)


def test_small_overshoot_is_tolerated():
    assert _model().encode(torch.full((1, 3, 8, 8), 1.0005)).shape == (1, 1, 1)


@pytest.mark.parametrize(
    ("codes", "error", "match"),
    [
        (np.zeros((1, 2, 2), np.int64), TypeError, "integer tensor of codes .* got ndarray"),
        (torch.zeros(1, 2, 2), TypeError, r"integer codes \(torch.long\), got dtype torch.float32"),
        (torch.zeros(1, 2, 2, dtype=torch.bool), TypeError, "got dtype torch.bool"),
        (torch.zeros(2, 2, dtype=torch.long), ValueError, r"3-D tensor of codes \(B, h, w\), got shape \(2, 2\)"),
        (torch.zeros(0, 2, 2, dtype=torch.long), ValueError, "non-empty"),
        (torch.tensor([[[0, -1]]]), ValueError, r"code -1 is outside the codebook range \[0, 125\)"),
        (torch.tensor([[[0, 125]]]), ValueError, r"code 125 is outside the codebook range \[0, 125\)"),
    ],
)
def test_bad_codes(codes, error, match):
    with pytest.raises(error, match=match):
        _model().decode(codes)


def test_int32_codes_are_accepted():
    model = _model()
    codes = model.encode(_images(1, 16, 16))
    assert torch.equal(model.decode(codes.int()), model.decode(codes))


def test_bad_config_type():
    with pytest.raises(TypeError, match="expects an ImageTokenizerConfig, got dict"):
        ImageTokenizer({"downsample": 8})


# -- real images -----------------------------------------------------------------------------------


def _skimage(name):
    return getattr(pytest.importorskip("skimage.data"), name)()


def _sklearn(index):
    return pytest.importorskip("sklearn.datasets").load_sample_images().images[index]


@pytest.mark.parametrize(
    "load",
    [
        lambda: _skimage("astronaut"),
        lambda: _skimage("coffee"),
        lambda: _skimage("chelsea"),
        lambda: _sklearn(0),
        lambda: _sklearn(1),
    ],
    ids=["astronaut", "coffee", "chelsea", "china", "flower"],
)
@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_real_images_through_preprocess_and_tokenizer(load, mode):
    model = _model()
    pixels = load()
    assert pixels.dtype == np.uint8 and pixels.ndim == 3
    x = preprocess_image(pixels, (32, 48), factor=model.downsample, mode=mode)
    assert x.shape == (3, 32, 48) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert float(x.std()) > 0.05  # a real picture, not a blank canvas
    codes = model.encode(x[None])
    assert codes.shape == (1, 4, 6) and 0 <= int(codes.min()) and int(codes.max()) < model.codebook_size
    y = model.decode(codes)
    assert y.shape == (1, 3, 32, 48) and -1 <= float(y.min()) and float(y.max()) <= 1


# -- it learns -------------------------------------------------------------------------------------


def test_tiny_fsq_learns_to_reconstruct():
    # 40 Adam steps on one fixed batch of smooth images must cut the reconstruction MSE by at least 4x
    # (measured ~6x with this seed, 6-16x across seeds; ~2 s single-threaded).
    torch.manual_seed(0)
    model = ImageTokenizer(ImageTokenizerConfig.tiny()).train()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    batch = torch.stack([torch.stack([xx * s, yy * s, xx * yy * s]) for s in (1.0, -0.8, 0.6, -0.4)])

    def mse() -> float:
        with torch.no_grad():
            return float(torch.mean((model(batch)[0] - batch) ** 2))

    before = mse()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        recon, _, aux_loss = model(batch)
        loss = torch.mean((recon - batch) ** 2) + aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = mse()
    assert after < before / 4, f"reconstruction MSE went from {before:.4f} to {after:.4f}"
    model.eval()
    assert float(torch.mean((model.decode(model.encode(batch)) - batch) ** 2)) < before / 4
