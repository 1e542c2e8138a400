"""Training modules on the CPU at toy size: fits, overfitting one batch, loss masking, staged freezing,
resume equivalence, export round trips, the sample logger and the CLI end to end.

Data comes from tiny in-test data modules (deterministic, no shuffling) so the tests do not depend on
``trainers.data``; ``TinyTokenData`` is also used by class path from a YAML in the CLI test.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from anygen.api import AnyGen
from anygen.data.shards import TokenizedDocument
from anygen.model import routed_cross_entropy
from anygen.testing import random_engine
from tokenizers_mm.image import ImageTokenizer
from tokenizers_mm.multimodal import MultimodalTokenizer
from tokenizers_mm.segments import Image, Understand, Video
from tokenizers_mm.video import VideoTokenizer
from trainers.callbacks import HeldoutEval, SampleLogger
from trainers.cli import bf16_cpu_warning, cpu_has_native_bf16, show_anygen_logs
from trainers.cli import fit as cli_fit
from trainers.export import export_checkpoint
from trainers.export import main as export_main
from trainers.image_tokenizer import ImageTokenizerModule
from trainers.losses import LPIPS, PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from trainers.unified import NO_LOSS_SPECIALS, UnifiedModule, parameter_groups, resolve_groups
from trainers.video_tokenizer import VideoTokenizerModule

SEQ_LEN = 80


# -- tiny data -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    """A tiny MultimodalTokenizer (BPE 300, 125-code image / video FSQ, 16 <|und|> per image) on disk."""
    directory = tmp_path_factory.mktemp("tokenizer")
    random_engine("tiny").tokenizer.save(directory)
    return str(directory)


def token_batches(tokenizer: MultimodalTokenizer, n_docs: int, batch_size: int, seq_len: int = SEQ_LEN,
                  seed: int = 0) -> list[dict]:
    """Deterministic batches of interleaved documents (text, image, video, understood image), one per row."""
    g = torch.Generator().manual_seed(seed)
    words = ["a red circle", "a blue square", "a green triangle moves", "make it yellow"]
    docs = []
    for i in range(n_docs):
        image = Image(codes=torch.randint(0, tokenizer.vocab.image_codebook_size, (3, 3), generator=g))
        video = Video(codes=torch.randint(0, tokenizer.vocab.video_codebook_size, (2, 2, 2), generator=g))
        pixels = PIL.Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).byte().numpy())
        docs.append(tokenizer.encode([words[i % 4], image, "then", video, Understand(pixels)]))
    batches = []
    for start in range(0, n_docs, batch_size):
        seqs = docs[start:start + batch_size]
        ids = torch.full((len(seqs), seq_len + 1), tokenizer.vocab.pad)
        for row, seq in enumerate(seqs):
            assert len(seq) <= seq_len + 1
            ids[row, :len(seq)] = seq.ids
        mask = ids[:, :-1] != tokenizer.vocab.pad
        targets = ids[:, 1:].clone()
        targets[targets == tokenizer.vocab.pad] = -100
        batches.append({"ids": ids[:, :-1].contiguous(), "targets": targets, "attention_mask": mask,
                        "document_ids": torch.zeros_like(ids[:, :-1]),
                        "und_pixels": torch.cat([s.und_pixels for s in seqs])})
    return batches


class _ListData(torch.utils.data.Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def _loader(items: list) -> DataLoader:
    return DataLoader(_ListData(items), batch_size=None, shuffle=False)  # items are whole batches


class ResumableBatches:
    """Fixed batches in order, with the ``state_dict`` / ``load_state_dict`` Lightning uses to resume mid-epoch.

    Stands in for the real data modules' resumable loaders, so resume tests see exactly the batches
    an uninterrupted run would.
    """

    def __init__(self, items: list) -> None:
        self.items, self.position = items, 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        while self.position < len(self.items):
            self.position += 1
            yield self.items[self.position - 1]
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class TinyTokenData(L.LightningDataModule):
    """``TokenDataModule``'s batch format from a tokenizer directory, deterministic, for tests."""

    def __init__(self, tokenizer_dir: str, n_docs: int = 6, batch_size: int = 2) -> None:
        super().__init__()
        self.batches = token_batches(MultimodalTokenizer.load(tokenizer_dir), n_docs, batch_size)

    def train_dataloader(self) -> DataLoader:
        return _loader(self.batches)

    def val_dataloader(self) -> DataLoader:
        return _loader(self.batches[:1])


def smooth_pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    """Smooth random pixels in [-1, 1]: ``(B, 3, H, W)`` or ``(B, 3, T, H, W)``."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(*shape[:-2], 4, 4, generator=g) * 2 - 1
    if len(shape) == 4:
        return torch.nn.functional.interpolate(coarse, size=shape[-2:], mode="bilinear", align_corners=False)
    return torch.nn.functional.interpolate(coarse, size=shape[-3:], mode="trilinear", align_corners=False)


def image_batches(n: int = 3, batch_size: int = 2, size: int = 16) -> list[dict]:
    return [{"pixels": smooth_pixels(batch_size, 3, size, size, seed=i)} for i in range(n)]


def video_batches() -> list[dict]:
    """Joint training: a batch of images (T=1) and a batch of 5-frame clips."""
    return [{"pixels": smooth_pixels(2, 3, 1, 16, 16, seed=0)}, {"pixels": smooth_pixels(1, 3, 5, 16, 16, seed=1)}]


def trainer(max_steps: int, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0)
    return L.Trainer(max_steps=max_steps, **{**defaults, **kwargs})


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def tiny_unified(tok_dir: str, **kwargs) -> UnifiedModule:
    torch.manual_seed(0)
    return UnifiedModule(tok_dir, **{"lr": 3e-3, "warmup_steps": 2, **kwargs})


def tiny_image(**kwargs) -> ImageTokenizerModule:
    torch.manual_seed(0)
    return ImageTokenizerModule(**{"tokenizer": {"preset": "tiny", "image_size": 16}, "lr": 3e-3, **kwargs})


def tiny_video(**kwargs) -> VideoTokenizerModule:
    torch.manual_seed(0)
    return VideoTokenizerModule(**{"tokenizer": {"preset": "tiny"}, "lr": 3e-3, **kwargs})


GAN = {"gan_weight": 0.5, "gan_start_step": 1, "disc_channels": 8, "disc_layers": 1}


# -- tiny fits ---------------------------------------------------------------------------------------------


def test_unified_tiny_fit(tok_dir):
    module = tiny_unified(tok_dir)
    t = trainer(3)
    t.fit(module, _loader(token_batches(module.tokenizer, 6, 2)))
    assert t.global_step == 3
    assert math.isfinite(float(t.callback_metrics["train/loss"]))
    for m in ("text", "image", "video"):
        assert f"train/ce_{m}" in t.callback_metrics


@pytest.mark.parametrize("gan, quantizer", [(False, "fsq"), (True, "fsq"), (False, "vq")], ids=["recon", "gan", "vq"])
def test_image_tokenizer_tiny_fit(gan, quantizer):
    torch.manual_seed(0)
    module = ImageTokenizerModule(tokenizer={"preset": "tiny", "image_size": 16, "quantizer": quantizer},
                                  **(GAN if gan else {}))
    t = trainer(3)
    t.fit(module, _loader(image_batches()))
    assert t.global_step == 3  # with a GAN too: the discriminator's step is not a training step
    metrics = t.callback_metrics
    assert {"train/loss", "train/psnr", "train/codebook_usage"} <= set(metrics)
    if gan:
        assert {"train/g_loss", "train/d_loss", "train/d_weight"} <= set(metrics)


def test_video_tokenizer_tiny_fit():
    module = tiny_video(**GAN)
    t = trainer(2)
    t.fit(module, _loader(video_batches()))
    assert t.global_step == 2
    assert {"train/mse_image", "train/mse_video", "train/d_loss"} <= set(t.callback_metrics)


@pytest.mark.parametrize("kind", ["unified", "image_gan"])
def test_bf16_mixed_precision(tok_dir, kind):
    if kind == "unified":
        module = tiny_unified(tok_dir)
        data = _loader(token_batches(module.tokenizer, 4, 2))
    else:
        module, data = tiny_image(**GAN), _loader(image_batches())
    t = trainer(2, precision="bf16-mixed")
    t.fit(module, data)
    assert t.global_step == 2 and math.isfinite(float(t.callback_metrics["train/loss"]))


def test_validation_logs_codebook_usage_and_psnr():
    module = tiny_image()
    t = trainer(1, limit_val_batches=2)
    t.validate(module, _loader(image_batches()), verbose=False)
    metrics = t.callback_metrics
    assert 0 < float(metrics["val/codebook_usage"]) <= 1
    assert float(metrics["val/psnr"]) > 0


# -- overfitting one batch ---------------------------------------------------------------------------------


def test_unified_overfits_one_batch(tok_dir):
    """Cross-entropy on one fixed batch falls at least 5x within 150 AdamW steps."""
    module = tiny_unified(tok_dir)
    batch = token_batches(module.tokenizer, 2, 2)[0]
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    first = None
    for step in range(150):
        out = module.compute_loss(batch)
        first = first if first is not None else float(out["ce"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if float(out["ce"]) * 5 <= first:
            break
    assert float(out["ce"]) * 5 <= first, (first, float(out["ce"]), step)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_tokenizer_overfits_one_batch(kind):
    """Reconstruction MSE on one fixed batch falls at least 3x (image: <= 60 steps, video: <= 80)."""
    if kind == "image":
        module, x, steps = tiny_image(), smooth_pixels(4, 3, 16, 16), 60
    else:
        module, x, steps = tiny_video(), smooth_pixels(1, 3, 5, 16, 16), 80
    opt = module.configure_optimizers()["optimizer"]
    first = None
    for step in range(steps):
        out = module.reconstruction_losses(x)
        first = first if first is not None else float(out["mse"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        if float(out["mse"]) * 3 <= first:
            break
    assert float(out["mse"]) * 3 <= first, (first, float(out["mse"]), step)


# -- the unified loss --------------------------------------------------------------------------------------


def test_structural_targets_carry_no_loss(tok_dir):
    module = tiny_unified(tok_dir)
    v = module.vocab
    batch = token_batches(module.tokenizer, 2, 2)[0]
    targets = batch["targets"]
    mask = module.loss_mask(targets, batch["attention_mask"])
    for name in NO_LOSS_SPECIALS:
        assert not mask[targets == v.special(name)].any(), name
    for counted in (v.boi, v.bov, v.eos):  # the model's choices: they count
        assert mask[targets == counted].all()
    sizes = (targets >= v.h_offset) & (targets < v.image_offset)
    assert sizes.any() and mask[sizes].all()

    with torch.no_grad():
        base = module.compute_loss(batch)["loss"]

        def loss_with(position: tuple[int, int], value: int) -> torch.Tensor:
            changed = {**batch, "targets": targets.clone()}
            changed["targets"][position] = value
            return module.compute_loss(changed)["loss"]

        eol = tuple(int(i) for i in (targets == v.eol).nonzero()[0])
        assert torch.equal(loss_with(eol, v.eoi), base)  # one structural target for another
        assert torch.equal(loss_with(eol, -100), base)
        text = tuple(int(i) for i in ((targets >= 0) & (targets < v.special_offset)).nonzero()[0])
        assert not torch.equal(loss_with(text, (int(targets[text]) + 1) % v.text_size), base)


def test_code_noise_replaces_only_codes_within_their_modality(tok_dir):
    module = tiny_unified(tok_dir, code_noise=0.3)
    v = module.vocab
    ids = torch.cat([torch.arange(v.size)] * 40)[None]  # every id of the vocabulary, 40 times
    torch.manual_seed(1)
    noisy = module.corrupt_codes(ids)
    image = (ids >= v.image_offset) & (ids < v.video_offset)
    video = ids >= v.video_offset
    assert torch.equal(noisy[~(image | video)], ids[~(image | video)])  # text, specials, sizes: never touched
    assert ((noisy[image] >= v.image_offset) & (noisy[image] < v.video_offset)).all()
    assert ((noisy[video] >= v.video_offset) & (noisy[video] < v.size)).all()
    for codes in (image, video):  # replaced with chance 0.3; a draw of the same code (1 in K) looks unchanged
        changed = (noisy[codes] != ids[codes]).float().mean().item()
        assert 0.25 < changed < 0.35, changed


def test_code_noise_corrupts_training_inputs_only(tok_dir):
    batch = token_batches(MultimodalTokenizer.load(tok_dir), 2, 2)[0]
    seen = []

    def recording(module: UnifiedModule) -> UnifiedModule:  # compute_loss records the batch it is given
        module.compute_loss = lambda b: (seen.append(b), {"loss": torch.zeros(()), "ce": torch.zeros(()),
                                                          "ce_sum": torch.zeros(3), "count": torch.ones(3)})[1]
        module.log_dict = module.log = lambda *a, **k: None
        return module

    module = recording(tiny_unified(tok_dir, code_noise=0.5))
    module.training_step(batch, 0)
    module.validation_step(batch, 0)
    trained, validated = seen
    assert torch.equal(trained["targets"], batch["targets"]) and not torch.equal(trained["ids"], batch["ids"])
    assert torch.equal(validated["ids"], batch["ids"])  # validation reads the true codes
    recording(tiny_unified(tok_dir)).training_step(batch, 0)
    assert seen[-1] is batch  # 0 (the default): the batch as it came
    for bad in (-0.1, 1.0, "0.1", True, {"audio": 0.1}, {"image": 1.5}):
        with pytest.raises(ValueError, match="code_noise must be a number in"):
            UnifiedModule(tok_dir, code_noise=bad)


def test_code_noise_per_modality(tok_dir):
    module = tiny_unified(tok_dir, code_noise={"image": 0.5})  # video: 0
    v = module.vocab
    ids = torch.cat([torch.arange(v.size)] * 40)[None]
    torch.manual_seed(2)
    noisy = module.corrupt_codes(ids)
    video = ids >= v.video_offset
    image = (ids >= v.image_offset) & ~video
    assert torch.equal(noisy[video], ids[video])
    assert 0.4 < (noisy[image] != ids[image]).float().mean().item() < 0.55


def test_und_code_targets_are_the_latent_under_each_patch(tok_dir):
    module = tiny_unified(tok_dir, und_code_loss=1.0)
    vq = module.tokenizer.image
    module._und_block = 2  # 2x2 codes a patch, so the row-major order inside a patch is tested too
    pixels = smooth_pixels(3, 3, 32, 32)
    codes = vq.encode(pixels)  # (3, 4, 4)
    grid = vq.code_vectors()  # (K, C)
    targets = module.und_code_targets(pixels)
    assert targets.shape == (3, 4, 4 * grid.shape[1])
    for n in range(3):
        for gi in range(2):
            for gj in range(2):
                under = codes[n, 2 * gi:2 * gi + 2, 2 * gj:2 * gj + 2].flatten()  # row-major within the patch
                assert torch.equal(targets[n, gi * 2 + gj], grid[under].flatten()), (n, gi, gj)


def test_und_code_loss_adds_the_weighted_latent_error(tok_dir):
    batch = token_batches(MultimodalTokenizer.load(tok_dir), 2, 2)[0]
    plain, aux = tiny_unified(tok_dir), tiny_unified(tok_dir, und_code_loss=2.0)
    aux.model.load_state_dict(plain.model.state_dict())
    base, out = plain.compute_loss(batch), aux.compute_loss(batch)
    with torch.no_grad():
        feats = aux.model.und(batch["und_pixels"])
        expected = ((aux.und_code_head(feats) - aux.und_code_targets(batch["und_pixels"])) ** 2).mean()
    assert torch.allclose(out["und_code"], expected, atol=1e-6)
    assert torch.allclose(out["loss"], base["loss"] + 2.0 * expected, atol=1e-5)
    no_und = {k: v for k, v in batch.items() if k != "und_pixels"}
    no_und["ids"] = no_und["ids"].masked_fill(no_und["ids"] == aux.vocab.special("und"), aux.vocab.pad)
    assert aux.compute_loss(no_und)["und_code"].item() == 0.0  # a batch without understood images
    for bad in (-1.0, float("nan"), "1.0", True):
        with pytest.raises(ValueError, match="und_code_loss must be a finite number"):
            UnifiedModule(tok_dir, und_code_loss=bad)


def test_und_code_loss_trains_the_encoder_and_is_not_exported(tok_dir, tmp_path):
    module = tiny_unified(tok_dir, und_code_loss=1.0)
    data = token_batches(module.tokenizer, 2, 2)
    first = module.compute_loss(data[0])["und_code"].item()
    ckpt = _fit_with_checkpoint(module, _loader(data * 15), tmp_path / "ckpt", steps=30)
    assert module.compute_loss(data[0])["und_code"].item() < 0.5 * first
    assert any(k.startswith("und_code_head.") for k in torch.load(ckpt, weights_only=True)["state_dict"])
    assert export_main([str(ckpt), "--out", str(tmp_path / "export"), "--tokenizer-dir", tok_dir]) == 0
    engine = AnyGen.from_pretrained(tmp_path / "export")
    for key, value in module.model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[key], value), key


def test_loss_is_modality_weighted_mean_with_z_loss(tok_dir):
    """loss = Σ w_m CE_m / N + z · mean(log Z²); with unit weights it is routed_cross_entropy's own z-loss."""
    batch = token_batches(MultimodalTokenizer.load(tok_dir), 2, 2)[0]
    module = tiny_unified(tok_dir, z_loss_weight=1e-2)
    with torch.no_grad():
        out = module.compute_loss(batch)
        logits = module.model(batch["ids"], attention_mask=batch["attention_mask"], und_pixels=batch["und_pixels"],
                              document_ids=batch["document_ids"])
        mask = module.loss_mask(batch["targets"], batch["attention_mask"])
        reference = routed_cross_entropy(logits, batch["targets"], module.vocab, mask, z_loss_weight=1e-2)
    torch.testing.assert_close(out["loss"], reference)
    assert (out["count"] > 0).all()

    weighted = tiny_unified(tok_dir, loss_weights={"image": 0.0, "video": 2.0})
    with torch.no_grad():
        out = weighted.compute_loss(batch)
    expected = (out["ce_sum"] * torch.tensor([1.0, 0.0, 2.0])).sum() / out["count"].sum()
    torch.testing.assert_close(out["loss"], expected)


def test_unknown_names_are_rejected(tok_dir):
    with pytest.raises(ValueError, match="unknown parameter groups"):
        resolve_groups(["decoder", "encoderz"])
    with pytest.raises(ValueError, match=r"unknown parameter groups \['block.x'\].*block.<i>"):
        resolve_groups(["block.x"])
    with pytest.raises(ValueError, match=r"train names \['block.7'\], but the model has blocks block.0 .. block.1"):
        tiny_unified(tok_dir, train=["block.7"])
    with pytest.raises(ValueError, match="unknown loss_weights"):
        UnifiedModule(tok_dir, loss_weights={"audio": 1.0})
    with pytest.raises(ValueError, match="unknown AnyGenConfig fields"):
        UnifiedModule(tok_dir, model={"n_layers": 3})
    with pytest.raises(FileNotFoundError, match="tokenizer_dir"):
        UnifiedModule(str(Path(tok_dir) / "missing"))


def test_model_vocabulary_follows_the_tokenizer(tok_dir):
    tokenizer = MultimodalTokenizer.load(tok_dir)
    # the preset's vocabulary fields are overwritten, the rest is kept
    module = UnifiedModule(tok_dir, model={"text_size": 5, "n_layer": 1})
    assert module.model.vocab == tokenizer.vocab and module.model.config.n_layer == 1
    with pytest.raises(ValueError, match="<\\|und\\|> positions"):
        UnifiedModule(tok_dir, model={"und_image_size": 64, "und_encoder": {"patch_size": 8, "hidden_size": 32,
                                                                             "num_hidden_layers": 1,
                                                                             "num_attention_heads": 2,
                                                                             "intermediate_size": 64}})


# -- staged freezing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [
    "all",
    ["aligner", "image_embeddings", "video_embeddings", "heads"],  # stage 1
    ["embeddings", "heads", "decoder", "aligner"],  # stage 2
    ["decoder"],
    ["block.1"],  # one block, e.g. the one a grow_depth stage added, with the rest of the model frozen
])
def test_staged_freezing_trains_exactly_the_named_groups(tok_dir, train):
    # image_grid_embed: its row / column tables belong to image_embeddings (sessions 10-25 left them out of every
    # group, so no stage ever trained them)
    module = tiny_unified(tok_dir, train=train, weight_decay=0.0, model={"image_grid_embed": True})
    groups = parameter_groups(module.model)
    trained = {id(p) for name in resolve_groups(train) for p in groups[name]}
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer(2).fit(module, _loader(token_batches(module.tokenizer, 4, 2)))
    for name, p in module.model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (id(p) in trained), (name, changed)
        assert p.requires_grad == (id(p) in trained), name
    assert module.model.config.und_trainable == ("und_encoder" in resolve_groups(train))


@pytest.mark.parametrize("extra", [{"image_embed_dim": 8, "image_head_dim": 16}, {"head_mode": "shared"},
                                   {"image_copy_hint": True, "image_copy_logit": True}])
def test_every_parameter_is_in_a_group(tok_dir, extra):
    """train: all must train every tensor, whatever the model's options add."""
    options = {"image_grid_embed": True, **extra}
    module = tiny_unified(tok_dir, model=options)
    grouped = {id(p) for params in parameter_groups(module.model).values() for p in params}
    missing = [name for name, p in module.model.named_parameters() if id(p) not in grouped]
    assert not missing
    assert all(p.requires_grad for p in module.model.parameters())


def test_grid_lr_scale_gives_the_grid_tables_their_own_rate(tok_dir):
    module = tiny_unified(tok_dir, lr=1e-3, warmup_steps=0, grid_lr_scale=10.0, model={"image_grid_embed": True})
    optimizer = module.configure_optimizers()["optimizer"]
    tables = {id(p) for p in module.model.grid_embed.parameters()}
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert set(rates) == {id(p) for p in module.model.parameters()}  # every tensor once
    assert all(rates[i] == pytest.approx(1e-2) for i in tables)
    assert all(r == pytest.approx(1e-3) for i, r in rates.items() if i not in tables)
    plain = tiny_unified(tok_dir, model={"image_grid_embed": True}).configure_optimizers()["optimizer"]
    assert len(plain.param_groups) == 2  # 1: no group of their own (checkpoints resume as before)
    for bad in (0, -1.0, float("nan"), True, "10"):
        with pytest.raises(ValueError, match="grid_lr_scale"):
            tiny_unified(tok_dir, grid_lr_scale=bad)
    with pytest.warns(UserWarning, match="grid_lr_scale=10.0 does nothing"):
        tiny_unified(tok_dir, grid_lr_scale=10.0)  # no image_grid_embed


def test_lr_scales_give_named_groups_their_own_rate(tok_dir):
    """A grown block at 5x the rate: its tensors (decayed and not) in groups of their own, the rest at ``lr``."""
    module = tiny_unified(tok_dir, lr=1e-3, warmup_steps=0, lr_scales={"block.1": 5})
    optimizer = module.configure_optimizers()["optimizer"]
    block = {id(p) for p in module.model.blocks[1].parameters()}
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert set(rates) == {id(p) for p in module.model.parameters() if p.requires_grad}  # every tensor once
    assert all(rates[i] == pytest.approx(5e-3) for i in block)
    assert all(r == pytest.approx(1e-3) for i, r in rates.items() if i not in block)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    norm = module.model.blocks[1].attn.q_norm.weight
    assert decay[id(norm)] == 0.0 and decay[id(module.model.blocks[1].attn.q_proj.weight)] > 0
    for bad, match in (({"block.99": 2}, "not a parameter group"), ({"heads": 0}, r"lr_scales\['heads'\]"),
                       ({"heads": True}, "finite number"), (["heads"], "must be a mapping")):
        with pytest.raises(ValueError, match=match):
            tiny_unified(tok_dir, lr_scales=bad)
    with pytest.raises(ValueError, match="does not train"):
        tiny_unified(tok_dir, train="heads", lr_scales={"block.0": 2})


def test_grow_depth_list_puts_the_new_blocks_where_asked(tok_dir, tmp_path):
    """``grow_depth: [0]``: one new block right after old block 0 (a zero-writer copy of it), the model unchanged;
    a list of the wrong length or naming a block the weights lack is refused."""
    pretrained = tiny_unified(tok_dir).model
    n = pretrained.config.n_layer
    path = tmp_path / "shallow"
    AnyGen(pretrained, MultimodalTokenizer.load(tok_dir)).save_pretrained(path)
    deep = tiny_unified(tok_dir, init_from=str(path), grow_depth=[0], model={"n_layer": n + 1})
    ids = torch.randint(0, pretrained.vocab.text_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(deep.model.eval()(ids), pretrained.eval()(ids), atol=1e-5)
    old, new = pretrained.state_dict(), deep.model.state_dict()
    assert torch.equal(new["blocks.1.attn.q_proj.weight"], old["blocks.0.attn.q_proj.weight"])
    assert not new["blocks.1.attn.o_proj.weight"].any() and not new["blocks.1.mlp.down_proj.weight"].any()
    for i in range(1, n):  # the old blocks after it move up by one
        assert torch.equal(new[f"blocks.{i + 1}.mlp.down_proj.weight"], old[f"blocks.{i}.mlp.down_proj.weight"])
    for bad in ([0, 0], [n], [-1], [True], "0"):
        with pytest.raises(ValueError, match="grow_depth lists the old blocks"):
            tiny_unified(tok_dir, init_from=str(path), grow_depth=bad, model={"n_layer": n + 1})


# -- checkpoints: resume, export, init_from ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unified", "image_gan"])
def test_resume_gives_the_same_loss_curve(tok_dir, tmp_path, kind):
    """6 steps straight == 3 steps (mid-epoch: 4 batches an epoch), checkpoint, resume to 6: same losses, weights."""
    def setup():
        if kind == "unified":
            module = tiny_unified(tok_dir, max_steps=6)  # the schedule's length, as a run killed at 3 would have
            return module, ResumableBatches(token_batches(module.tokenizer, 8, 2))
        return tiny_image(**GAN), ResumableBatches(image_batches(4))

    module, data = setup()
    straight = LossRecorder()
    trainer(6, callbacks=[straight]).fit(module, data)
    final = {k: v.clone() for k, v in module.state_dict().items()}

    module, data = setup()
    first = trainer(3)
    first.fit(module, data)
    ckpt = tmp_path / "half.ckpt"
    first.save_checkpoint(ckpt)
    module, data = setup()
    resumed = LossRecorder()
    trainer(6, callbacks=[resumed]).fit(module, data, ckpt_path=ckpt)

    assert len(straight.losses) == 6 and len(resumed.losses) == 3
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(straight.losses[3:]), rtol=1e-5, atol=1e-6)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=1e-5, atol=1e-6, msg=key)


class LrRecorder(Callback):
    """The autoencoder optimizer's learning rate as each training batch starts."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("gan", [False, True])
def test_tokenizer_lr_schedule_follows_the_global_step(tmp_path, gan):
    """Warm-up 1 step, cosine to 0.1·lr at max_steps 5, with and without the GAN's manual optimization;
    resumed at step 2 (also from a checkpoint saved with another schedule), the remaining steps match."""
    lr, kw = 3e-3, {"warmup_steps": 1, "min_lr_ratio": 0.1, **(GAN if gan else {})}
    expected = [lr * (1 if s < 1 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 4))) for s in range(5)]

    straight = LrRecorder()
    trainer(5, callbacks=[straight]).fit(tiny_image(**kw), ResumableBatches(image_batches(5)))
    torch.testing.assert_close(torch.tensor(straight.lrs), torch.tensor(expected))

    first = trainer(2)
    first.fit(tiny_image(**kw), ResumableBatches(image_batches(5)))
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed = LrRecorder()
    trainer(5, callbacks=[resumed]).fit(tiny_image(**kw), ResumableBatches(image_batches(5)),
                                        ckpt_path=tmp_path / "half.ckpt")
    torch.testing.assert_close(torch.tensor(resumed.lrs), torch.tensor(expected[2:]))


def test_tokenizer_lr_schedule_is_checked():
    with pytest.raises(ValueError, match="min_lr_ratio in"):
        tiny_image(min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="warmup_steps must be"):
        tiny_image(warmup_steps=-1)


def _fit_with_checkpoint(module: L.LightningModule, data: DataLoader, directory: Path, steps: int = 2) -> Path:
    checkpoint = ModelCheckpoint(dirpath=directory, save_last=True)
    trainer(steps, enable_checkpointing=True, callbacks=[checkpoint]).fit(module, data)
    return directory / "last.ckpt"


def test_export_unified_loads_and_generates(tok_dir, tmp_path):
    module = tiny_unified(tok_dir)
    ckpt = _fit_with_checkpoint(module, _loader(token_batches(module.tokenizer, 4, 2)), tmp_path / "ckpt")
    out = tmp_path / "export"
    assert export_main([str(ckpt), "--out", str(out), "--tokenizer-dir", tok_dir]) == 0
    engine = AnyGen.from_pretrained(out)
    for key, value in module.model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[key], value), key
    result = engine.generate("a red circle", start_with="image", image_size=(2, 2), max_new_tokens=12, seed=0)
    assert len(result.images) == 1
    # the tokenizer directory recorded in the checkpoint is the default
    assert export_checkpoint(ckpt, tmp_path / "export2").is_dir()


def test_export_in_bf16_halves_the_weights_and_loads_back_as_fp32(tok_dir, tmp_path):
    module = tiny_unified(tok_dir)
    ckpt = _fit_with_checkpoint(module, _loader(token_batches(module.tokenizer, 4, 2)), tmp_path / "ckpt")
    assert export_main([str(ckpt), "--out", str(tmp_path / "fp32")]) == 0
    assert export_main([str(ckpt), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    full, half = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("fp32", "bf16"))
    assert half < 0.55 * full
    engine = AnyGen.from_pretrained(tmp_path / "bf16")
    for key, value in module.model.state_dict().items():
        loaded = engine.model.state_dict()[key]
        assert loaded.dtype == torch.float32, key
        assert torch.equal(loaded, value.to(torch.bfloat16).float()), key  # rounded once, nothing else
    result = engine.generate("a red circle", start_with="image", image_size=(2, 2), max_new_tokens=12, seed=0)
    assert len(result.images) == 1
    # a training stage starts from the bf16 directory as from any other
    stage2 = UnifiedModule(tok_dir, init_from=str(tmp_path / "bf16"))
    assert all(torch.equal(stage2.model.state_dict()[k], v) for k, v in engine.model.state_dict().items())


def test_export_dtype_is_checked(tok_dir, tmp_path, capsys):
    module = tiny_unified(tok_dir)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        AnyGen(module.model, module.tokenizer).save_pretrained(tmp_path / "x", dtype=torch.int8)
    image = _fit_with_checkpoint(tiny_image(), _loader(image_batches(1)), tmp_path / "img", steps=1)
    assert export_main([str(image), "--out", str(tmp_path / "tok"), "--dtype", "bf16"]) == 1
    assert "--dtype applies to unified checkpoints only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--dtype must be one of fp32, bf16, fp16"):
        export_checkpoint(image, tmp_path / "tok", dtype="int8")


def test_export_rejects_foreign_files(tmp_path, capsys):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, path)
    assert export_main([str(path), "--out", str(tmp_path / "x")]) == 1
    assert "not written by an anygen training module" in capsys.readouterr().err
    assert export_main([str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")]) == 1


@pytest.mark.parametrize("kind", ["image", "video"])
def test_export_tokenizer_writes_its_safetensors(tmp_path, kind):
    if kind == "image":
        module, data, cls = tiny_image(), _loader(image_batches(1)), ImageTokenizer
        x = smooth_pixels(1, 3, 16, 16)
    else:
        module, data, cls = tiny_video(), _loader(video_batches()[:1]), VideoTokenizer
        x = smooth_pixels(1, 3, 1, 16, 16)
    ckpt = _fit_with_checkpoint(module, data, tmp_path / "ckpt", steps=1)
    path = export_checkpoint(ckpt, tmp_path / "tok")  # a directory gets the MultimodalTokenizer file name
    assert path.name == f"{kind}_tokenizer.safetensors"
    loaded = cls.load(path)
    module.tokenizer.eval()
    assert torch.equal(loaded.encode(x), module.tokenizer.encode(x))


@pytest.mark.parametrize("source", ["ckpt", "pretrained"])
def test_init_from_an_earlier_stage(tok_dir, tmp_path, source):
    stage1 = tiny_unified(tok_dir, train=["aligner", "heads"])
    ckpt = _fit_with_checkpoint(stage1, _loader(token_batches(stage1.tokenizer, 2, 2)), tmp_path / "ckpt", steps=1)
    path = ckpt if source == "ckpt" else export_checkpoint(ckpt, tmp_path / "pretrained")
    torch.manual_seed(1)  # a different random init, overwritten by init_from
    stage2 = UnifiedModule(tok_dir, train=["embeddings", "heads", "decoder", "aligner"], init_from=str(path))
    for key, value in stage1.model.state_dict().items():
        assert torch.equal(stage2.model.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="init_from"):
        UnifiedModule(tok_dir, init_from=str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="do not fit"):
        UnifiedModule(tok_dir, model={"n_layer": 1}, init_from=str(path))
    if source == "pretrained":  # rotary settings add no tensors: the weights load, and the change is said
        with pytest.warns(UserWarning, match=r"other rotary positions \(rope_grid 0 -> 1\)"):
            grid = UnifiedModule(tok_dir, model={"rope_grid": 1}, init_from=str(path))
        assert grid.model.config.rope_grid == 1
        assert torch.equal(grid.model.state_dict()["norm.weight"], stage1.model.state_dict()["norm.weight"])



def _refined_tokenizer_dir(tok_dir: str, tmp_path: Path) -> tuple[str, Path]:
    """``tok_dir`` with its image VQ swapped for a finer FSQ grid over the same latent (5x5x5 -> 8x8x8)."""
    tokenizer = MultimodalTokenizer.load(tok_dir)
    coarse = tmp_path / "coarse_image.safetensors"
    tokenizer.image.save(coarse)
    fine = ImageTokenizer(type(tokenizer.image.config).from_dict({**tokenizer.image.config.to_dict(),
                                                                   "fsq_levels": [8, 8, 8]}))
    fine.load_state_dict(tokenizer.image.state_dict())
    v = tokenizer.vocab
    refined = MultimodalTokenizer(tokenizer.text, fine, tokenizer.video, image_size=tokenizer.image_size,
                                  video_size=tokenizer.video_size, und_tokens=tokenizer.und_tokens,
                                  und_image_size=tokenizer.und_image_size, max_height=v.max_height,
                                  max_width=v.max_width, max_frames=v.max_frames, layout=tokenizer.layout)
    refined.save(tmp_path / "refined")
    return str(tmp_path / "refined"), coarse


def test_init_image_codes_carries_a_model_across_a_refined_codebook(tok_dir, tmp_path):
    stage1 = tiny_unified(tok_dir)
    pretrained = stage1.model
    path = tmp_path / "stage1"
    AnyGen(pretrained, stage1.tokenizer).save_pretrained(path)
    refined_dir, coarse = _refined_tokenizer_dir(tok_dir, tmp_path)
    with pytest.raises(ValueError, match="vocabulary"):  # a plain init_from refuses the other codebook
        UnifiedModule(refined_dir, init_from=str(path))
    with pytest.raises(ValueError, match="set init_from"):
        UnifiedModule(refined_dir, init_image_codes=str(coarse))
    torch.manual_seed(1)
    stage2 = UnifiedModule(refined_dir, init_from=str(path), init_image_codes=str(coarse))
    assert stage2.model.vocab.image_codebook_size == 512 != pretrained.vocab.image_codebook_size
    old, new = ImageTokenizer.load(coarse), stage2.tokenizer.image
    old_vectors, new_vectors = old.code_vectors(), new.code_vectors()
    for code in range(0, 512, 37):  # each fine code starts from the coarse code nearest to its grid point
        distances = (old_vectors - new_vectors[code]).norm(dim=1)
        nearest = int(distances.argmin())
        assert torch.equal(stage2.model.embed["image"].weight[code], pretrained.embed["image"].weight[nearest])
        assert torch.equal(stage2.model.head["image"].weight[code], pretrained.head["image"].weight[nearest])
    # a coarse grid point is also a fine one here (0 and +-1 are on both grids): it maps onto itself
    same = [i for i in range(512) if (old_vectors - new_vectors[i]).norm(dim=1).min() == 0]
    assert same and all(int((old_vectors - new_vectors[i]).norm(dim=1).argmin()) in range(125) for i in same)
    for key, value in pretrained.state_dict().items():
        if not key.startswith(("embed.image", "head.image")):
            assert torch.equal(stage2.model.state_dict()[key], value), key
    # the text rows mean strings of one BPE table: a checkpoint made with another one is refused
    other = json.loads((path / "text_tokenizer.json").read_text())
    other["model"]["merges"] = other["model"]["merges"][::-1]
    (path / "text_tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="another text tokenizer"):
        UnifiedModule(refined_dir, init_from=str(path), init_image_codes=str(coarse))

def test_reinit_keeps_the_named_rows_fresh_and_loads_the_rest(tok_dir, tmp_path):
    """The 16x16 recipe starts from the shipped 8x model: another image tokenizer, so its image rows start
    afresh (``reinit``) while text, video, understanding and the transformer come from ``init_from``."""
    pretrained = tiny_unified(tok_dir).model
    path = tmp_path / "stage1"
    AnyGen(pretrained, MultimodalTokenizer.load(tok_dir)).save_pretrained(path)
    torch.manual_seed(1)
    fresh = UnifiedModule(tok_dir).model.state_dict()
    torch.manual_seed(1)  # the same fresh init, then init_from over all but the image rows
    warm = UnifiedModule(tok_dir, init_from=str(path), reinit=["embed.image", "head.image"]).model.state_dict()
    renewed = [k for k in warm if k.startswith(("embed.image.", "head.image."))]
    assert renewed == ["embed.image.weight", "head.image.weight"]
    for key, value in warm.items():
        source = fresh if key in renewed else pretrained.state_dict()
        assert torch.equal(value, source[key]), key
    assert not torch.equal(fresh["embed.image.weight"], pretrained.state_dict()["embed.image.weight"])
    # another image codebook size is accepted once both image rows start afresh, refused otherwise
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("embed.image.weight", "head.image.weight"):
        state[key] = torch.zeros(7, state[key].shape[1])
    save_file(state, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["vocab"]["image_codebook_size"] = 7
    (path / "config.json").write_text(json.dumps(config))
    UnifiedModule(tok_dir, init_from=str(path), reinit=["embed.image", "head.image"])
    with pytest.raises(ValueError, match="vocabulary"):
        UnifiedModule(tok_dir, init_from=str(path), reinit=["embed.image"])
    with pytest.raises(ValueError, match="name no parameter.*embed.image"):
        UnifiedModule(tok_dir, init_from=str(path), reinit=["embed.images"])
    with pytest.raises(ValueError, match="list of parameter-name prefixes"):
        UnifiedModule(tok_dir, init_from=str(path), reinit="embed.image")
    with pytest.raises(ValueError, match="set init_from too"):
        UnifiedModule(tok_dir, reinit=["embed.image"])



def test_grow_depth_spreads_the_old_blocks_and_starts_the_new_ones_as_identities(tok_dir, tmp_path):
    """Block expansion: a deeper model warm-started from a shallower one computes exactly what it did, its new
    blocks (copies with zeroed output projections) sit evenly between the old ones, and they do learn."""
    pretrained = tiny_unified(tok_dir).model
    n = pretrained.config.n_layer
    path = tmp_path / "shallow"
    AnyGen(pretrained, MultimodalTokenizer.load(tok_dir)).save_pretrained(path)
    deep = tiny_unified(tok_dir, init_from=str(path), grow_depth=True, model={"n_layer": n + 3})
    assert deep.model.config.n_layer == n + 3
    ids = torch.randint(0, pretrained.vocab.text_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(deep.model.eval()(ids), pretrained.eval()(ids), atol=1e-5)
    old = pretrained.state_dict()
    new = deep.model.state_dict()
    # blocks.0 .. are the old ones in order with a copy after some of them; which is which, from the weights
    layout = []
    for i in range(n + 3):
        source = [j for j in range(n) if torch.equal(new[f"blocks.{i}.attn.q_proj.weight"],
                                                     old[f"blocks.{j}.attn.q_proj.weight"])]
        copy = not new[f"blocks.{i}.attn.o_proj.weight"].any()
        layout.append((source[0], copy))
        if copy:
            assert not new[f"blocks.{i}.mlp.down_proj.weight"].any()
        else:
            assert torch.equal(new[f"blocks.{i}.mlp.down_proj.weight"], old[f"blocks.{source[0]}.mlp.down_proj.weight"])
    assert [j for j, copy in layout if not copy] == list(range(n))  # the old blocks keep their order
    assert sum(copy for _, copy in layout) == 3 and all(layout[i - 1][0] == j for i, (j, c) in enumerate(layout) if c)
    for key in ("embed.text.weight", "head.image.weight", "norm.weight"):
        assert torch.equal(new[key], old[key]), key
    # the zeroed projections get gradients: the new blocks train
    deep.model.train()
    batch = {"ids": ids, "targets": torch.roll(ids, -1, 1)}
    deep.training_step(batch, 0).backward()
    zeroed = [i for i, (_, c) in enumerate(layout) if c][0]
    assert deep.model.blocks[zeroed].attn.o_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="only adds blocks"):
        tiny_unified(tok_dir, init_from=str(path), grow_depth=True, model={"n_layer": max(1, n - 1)})
    with pytest.raises(ValueError, match="set init_from too"):
        tiny_unified(tok_dir, grow_depth=True)
    with pytest.raises(ValueError, match="do not fit"):  # without grow_depth a deeper model is refused by name
        tiny_unified(tok_dir, init_from=str(path), model={"n_layer": n + 3})


def test_a_grid_model_warm_starts_from_one_without_grid_tables(tok_dir, tmp_path):
    """``image_grid_embed`` on a model trained without it: ``reinit: [grid_embed]`` leaves its (zero) tables to
    the new model, so it starts out computing exactly what the checkpoint did; without it the load is refused."""
    pretrained = tiny_unified(tok_dir).model
    path = tmp_path / "plain"
    AnyGen(pretrained, MultimodalTokenizer.load(tok_dir)).save_pretrained(path)
    grid = {"image_grid_embed": True}
    with pytest.raises(ValueError, match="missing.*grid_embed"):
        UnifiedModule(tok_dir, model=grid, init_from=str(path))
    warm = UnifiedModule(tok_dir, model=grid, init_from=str(path), reinit=["grid_embed"]).model.eval()
    assert all(not t.weight.any() for t in warm.grid_embed.values())
    v = warm.vocab
    ids = torch.tensor([[v.bos, 5, 6, v.boi, v.h_token(1), v.w_token(2), v.image_offset + 3, v.image_offset + 4,
                         v.eol, v.eoi, v.eos]])
    with torch.no_grad():
        torch.testing.assert_close(warm(ids), pretrained.eval()(ids), atol=1e-5, rtol=0)

# -- sample logger -----------------------------------------------------------------------------------------


def test_sample_logger_writes_generations(tok_dir, tmp_path):
    module = tiny_unified(tok_dir)
    sampler = SampleLogger(every_n_steps=2, prompts=["a red circle", "a square"], image_size=(2, 2),
                           video_size=(1, 2, 2), text_tokens=4)
    trainer(2, callbacks=[sampler], default_root_dir=tmp_path).fit(
        module, _loader(token_batches(module.tokenizer, 4, 2)))
    names = sorted(p.name for p in sampler.written)
    assert names == ["prompt0_image0.png", "prompt1_image0.png", "samples.txt", "video0.png"]
    assert all(p.is_file() and p.parent.name == "step_0000002" for p in sampler.written)
    assert module.model.training and module.model.blocks[0].attn.kv_cache is None


def test_sample_logger_draws_at_the_tokenizers_grid_when_no_size_is_given(tok_dir, tmp_path):
    import PIL.Image

    module = tiny_unified(tok_dir)
    tok = module.tokenizer
    tok.image_size = (2 * tok.image.downsample, 3 * tok.image.downsample)  # a grid no default could stand for
    grid = tok.image_grid
    assert grid == (2, 3)
    sampler = SampleLogger(every_n_steps=2, prompts=["a red circle"], image_size=None, text_tokens=0)
    trainer(2, callbacks=[sampler], default_root_dir=tmp_path).fit(
        module, _loader(token_batches(module.tokenizer, 4, 2)))
    (image,) = [p for p in sampler.written if p.suffix == ".png"]
    with PIL.Image.open(image) as im:
        assert im.size == (grid[1] * tok.image.downsample, grid[0] * tok.image.downsample)



def test_heldout_eval_logs_the_harness_scores_for_checkpointing(tok_dir, tmp_path, monkeypatch):
    """The callback runs the harness with its own settings and logs each headline score and their mean, where a
    ModelCheckpoint monitoring heldout/score finds them. (A tiny random model scores 0 everywhere, so the harness
    is stood in for by one that records its call and returns known scores.)"""
    import anygen.eval.harness as harness

    calls = []

    def fake_run_eval(ctx, categories):
        calls.append((ctx.num, ctx.seed, ctx.sampling, list(categories), ctx.engine.model.training))
        return {name: harness.CategoryResult(name, ctx.num, "m", score, {}, [], 0.0)
                for name, score in zip(categories, (0.25, 0.75))}

    monkeypatch.setattr(harness, "run_eval", fake_run_eval)
    module = tiny_unified(tok_dir)
    heldout = HeldoutEval(num=2, categories=["t2i_single", "caption"], seed=7, batch_size=2)
    best = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="heldout/score", mode="max", save_top_k=1)
    data = _loader(token_batches(module.tokenizer, 4, 2))
    trainer(2, enable_checkpointing=True, callbacks=[heldout, best], val_check_interval=2, limit_val_batches=1,
            check_val_every_n_epoch=None).fit(module, data, data)
    assert calls == [(2, 7, harness.eval_sampling(), ["t2i_single", "caption"], False)]  # in eval mode
    assert heldout.history == [{"step": 2, "heldout/t2i_single": 0.25, "heldout/caption": 0.75,
                                "heldout/score": 0.5}]
    assert (tmp_path / "best.ckpt").is_file() and float(best.best_model_score) == pytest.approx(0.5)
    assert module.model.training and module.model.blocks[0].attn.kv_cache is None
    with pytest.raises(ValueError, match="unknown or unscored"):
        HeldoutEval(categories=["tokenizer"])


def test_heldout_eval_runs_the_real_harness(tok_dir):
    """Unpatched, on a real (tiny) engine: every category yields a score in [0, 1] and the cache is released."""
    module = tiny_unified(tok_dir)
    heldout = HeldoutEval(num=2, categories=["t2i_single", "caption", "video"], batch_size=2)
    data = _loader(token_batches(module.tokenizer, 4, 2))
    trainer(2, callbacks=[heldout], val_check_interval=2, limit_val_batches=1,
            check_val_every_n_epoch=None).fit(module, data, data)
    (logged,) = heldout.history
    assert set(logged) == {"step", "heldout/t2i_single", "heldout/caption", "heldout/video", "heldout/score"}
    assert all(0.0 <= v <= 1.0 for k, v in logged.items() if k != "step")
    assert module.model.blocks[0].attn.kv_cache is None

@pytest.mark.parametrize("kind", ["image", "video"])
def test_sample_logger_writes_reconstructions(tmp_path, kind):
    module, data = (tiny_image(), image_batches(2)) if kind == "image" else (tiny_video(), video_batches())
    sampler = SampleLogger(every_n_steps=2, num_reconstructions=2)
    csv = L.pytorch.loggers.CSVLogger(tmp_path)
    trainer(2, callbacks=[sampler], logger=csv).fit(module, _loader(data))
    # the video module trains on images and clips: it shows one of each
    names = ["reconstructions.png"] if kind == "image" else ["reconstructions_t1.png", "reconstructions_t5.png"]
    assert [p.name for p in sampler.written] == names  # at step 2, not again when training ends there
    assert PIL.Image.open(sampler.written[0]).size[0] > 16
    assert module.tokenizer.training
    csv.save()
    logged = (Path(csv.log_dir) / "metrics.csv").read_text()
    key = "" if kind == "image" else "_t5"
    assert f"samples/codebook_usage{key}" in logged and f"samples/psnr{key}" in logged


# -- GAN and LPIPS pieces ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_image, tiny_video], ids=["image", "video"])
def test_chroma_loss_is_the_error_of_the_deviation_from_grey(make):
    """A grey reconstruction of a coloured input costs exactly chroma_weight · mean((x - mean_rgb x)²) more."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    if make is tiny_video:
        x = x.unsqueeze(2)
    grey = x.mean(dim=1, keepdim=True).expand_as(x)
    chroma = (x - grey).square().mean()
    for weight in (0.0, 3.0):
        module = make(chroma_weight=weight)
        module.tokenizer.forward = lambda inp: (grey, torch.zeros(1, dtype=torch.long), torch.zeros(()))
        terms = module.reconstruction_losses(x)
        plain = terms["l1"] + terms["mse"]
        assert torch.allclose(terms["rec"], plain + weight * chroma)
        assert ("chroma" in terms) == (weight > 0)
    with pytest.raises(ValueError, match="chroma_weight"):
        make(chroma_weight=-1.0)



@pytest.mark.parametrize("make", [tiny_image, tiny_video], ids=["image", "video"])
def test_edge_loss_is_the_error_of_neighbouring_differences(make):
    """A reconstruction off by a constant has no edge error; one sharp step blurred away has exactly its own."""
    x = torch.full((1, 3, 16, 16), -0.5)
    x[..., 4:10, 4:10] = 0.5  # a square
    offset = x + 0.1
    blurred = x.clone()
    blurred[..., 4:10, 4:10] = 0.0  # the step halved: every difference across the border is off by 0.5
    if make is tiny_video:
        x, offset, blurred = x.unsqueeze(2), offset.unsqueeze(2), blurred.unsqueeze(2)
    module = make(edge_weight=2.0)
    for recon, expected in ((offset, 0.0), (blurred, 0.5 * 4 * 6 * 3 / x.numel())):  # 4 sides x 6 pixels x RGB
        module.tokenizer.forward = lambda inp, r=recon: (r, torch.zeros(1, dtype=torch.long), torch.zeros(()))
        terms = module.reconstruction_losses(x)
        assert torch.allclose(terms["edge"], torch.tensor(expected), atol=1e-6)
        assert torch.allclose(terms["rec"], terms["l1"] + terms["mse"] + 2.0 * terms["edge"], atol=1e-6)
    assert "edge" not in make().reconstruction_losses(x)
    with pytest.raises(ValueError, match="edge_weight"):
        make(edge_weight=-1.0)



@pytest.mark.parametrize("gan", [False, True], ids=["plain", "gan"])
def test_decoder_only_training_keeps_every_code(gan):
    module = tiny_image(trainable="decoder", **(GAN if gan else {}))
    x = image_batches(1)[0]["pixels"]
    before = {k: v.clone() for k, v in module.tokenizer.state_dict().items()}
    codes = module.tokenizer.encode(x)
    trainer(3).fit(module, _loader(image_batches(2)))
    after = module.tokenizer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)[:5]
    assert torch.equal(module.tokenizer.encode(x), codes)
    with pytest.raises(ValueError, match="trainable"):
        tiny_image(trainable="encoder")

@pytest.mark.parametrize("make", [tiny_image, tiny_video], ids=["image", "video"])
def test_tokenizer_init_from_a_coarser_codebook(make, tmp_path):
    coarse = make()
    path = coarse.tokenizer.save(tmp_path / "coarse.safetensors")
    fine = make(tokenizer={"preset": "tiny", "fsq_levels": [8, 8, 8]}, init_from=str(path))
    assert fine.tokenizer.codebook_size == 512 != coarse.tokenizer.codebook_size
    for key, value in coarse.tokenizer.state_dict().items():
        assert torch.equal(fine.tokenizer.state_dict()[key], value), key
    # a wider latent (3 FSQ channels -> 4, or 5 for the video tokenizer, whose FSQ projects from 4 latent
    # channels and so keeps its projections): the tensors around it grow, the old channels keep their weights
    levels = [4, 4, 4, 4] if make is tiny_image else [4, 4, 4, 4, 4]
    torch.manual_seed(5)
    fresh = make(tokenizer={"preset": "tiny", "fsq_levels": levels}).tokenizer.state_dict()
    torch.manual_seed(5)
    wide = make(tokenizer={"preset": "tiny", "fsq_levels": levels}, init_from=str(path)).tokenizer.state_dict()
    grown = 0
    for key, value in coarse.tokenizer.state_dict().items():
        if wide[key].shape == value.shape:
            assert torch.equal(wide[key], value), key
            continue
        grown += 1
        lead = tuple(slice(0, n) for n in value.shape)
        assert torch.equal(wide[key][lead], value), key
        rest = torch.ones_like(wide[key], dtype=torch.bool)
        rest[lead] = False
        assert torch.equal(wide[key][rest], fresh[key][rest]), key  # the new channels keep their fresh init
    assert grown >= (4 if make is tiny_image else 2)  # around the latent: encoder out ... decoder in
    with pytest.raises(FileNotFoundError):
        make(init_from=str(tmp_path / "missing.safetensors"))
    other = ImageTokenizerModule(tokenizer={"preset": "tiny", "base_channels": 8, "norm_num_groups": 4})
    if make is tiny_image:
        wrong = other.tokenizer.save(tmp_path / "narrow.safetensors")
        with pytest.raises(ValueError, match="does not fit"):
            make(init_from=str(wrong))
    else:
        with pytest.raises(ValueError, match="video_tokenizer"):  # an image tokenizer file is refused by kind
            make(init_from=str(other.tokenizer.save(tmp_path / "image.safetensors")))

def test_foreground_weight_counts_a_small_shape_like_the_background():
    """The error on one bright pixel of a flat image weighs 1 + w·|x - median| against the background's 1."""
    x = torch.full((1, 3, 16, 16), -0.8)
    x[0, :, 3, 4] = 0.6  # one "shape" pixel, RGB distance 1.4·√3 from the background (the median)
    recon = x.clone()
    recon[0, :, 3, 4] = -0.8  # the reconstruction misses it: error 1.4 per channel, only there
    for weight in (0.0, 10.0):
        module = tiny_image(foreground_weight=weight)
        module.tokenizer.forward = lambda inp: (recon, torch.zeros(1, dtype=torch.long), torch.zeros(()))
        terms = module.reconstruction_losses(x)
        w_fg = 1 + weight * 1.4 * 3 ** 0.5
        per_pixel = 3 * (1.4 + 1.4**2)  # l1 + l2 over the three channels of the missed pixel
        expected = w_fg * per_pixel / (3 * (255 + w_fg))  # weighted mean over 3·256 entries / mean weight
        assert torch.allclose(terms["rec"], torch.tensor(expected), rtol=1e-5)
        assert torch.allclose(terms["mse"], torch.tensor(3 * 1.4**2 / (3 * 256)), rtol=1e-5)  # logged unweighted


def test_gan_losses_and_adaptive_weight():
    disc = PatchDiscriminator(channels=8, n_layers=2)
    assert disc(torch.zeros(2, 3, 16, 16)).shape[:2] == (2, 1)
    assert disc(torch.zeros(1, 3, 5, 16, 16)).shape[0] == 5  # a clip is judged frame by frame
    with pytest.raises(ValueError, match="disc_layers"):
        disc(torch.zeros(1, 3, 8, 8))
    assert float(hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0
    assert float(hinge_g_loss(torch.ones(3))) == -1.0
    w = torch.ones(3, requires_grad=True)
    rec, g = (w * 2).sum(), (w * 4).sum()  # gradient norms 2√3 and 4√3
    assert abs(float(adaptive_weight(rec, g, w)) - 0.5) < 1e-3


def test_lpips_only_from_local_weights(tmp_path):
    with pytest.raises(ValueError, match="LPIPS weights not found at"):
        ImageTokenizerModule(tokenizer={"preset": "tiny"}, lpips_weight=1.0, lpips_path=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="LPIPS weights not found at None"):
        ImageTokenizerModule(tokenizer={"preset": "tiny"}, lpips_weight=1.0)
    reference = LPIPS()
    for lin in reference.lins:
        lin.weight.data.abs_()  # LPIPS' learned weights are non-negative
    path = tmp_path / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    module = ImageTokenizerModule(tokenizer={"preset": "tiny", "image_size": 16}, lpips_weight=1.0,
                                  lpips_path=str(path))
    x = smooth_pixels(2, 3, 16, 16)
    assert float(module.lpips(x, x)) == 0.0 and float(module.lpips(x, -x)) > 0
    assert "lpips" in module.reconstruction_losses(x)
    # the frozen VGG is left out of checkpoints and restored from lpips_path on load
    ckpt = _fit_with_checkpoint(module, _loader(image_batches(1)), tmp_path / "ckpt", steps=1)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert not any(k.startswith("lpips.") for k in state)
    ImageTokenizerModule.load_from_checkpoint(ckpt, weights_only=True)


# -- the CLI end to end ------------------------------------------------------------------------------------


@pytest.fixture
def anygen_logger(monkeypatch):
    """The ``anygen`` logger as a fresh process has it; restored afterwards (the CLI adds a handler)."""
    logger = logging.getLogger("anygen")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    return logger


def test_the_cli_prints_anygen_info_lines_once(anygen_logger, capsys):
    show_anygen_logs()
    show_anygen_logs()
    logging.getLogger("anygen.data").info("mixture of shards: shapes/t2i x1")
    assert capsys.readouterr().err.count("mixture of shards: shapes/t2i x1") == 1


def _tiny_fit_config(tok_dir: str, path: Path, **trainer) -> Path:
    """A YAML at ``path`` for ``anygen fit``: the tiny unified model on ``TinyTokenData``, CPU, no logger;
    ``trainer`` adds or overrides trainer arguments."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "logger": False, "enable_model_summary": False, **trainer},
        "model": {"class_path": "trainers.unified.UnifiedModule",
                  "init_args": {"tokenizer_dir": tok_dir, "preset": "tiny", "warmup_steps": 1}},
        "data": {"class_path": "test_trainers.TinyTokenData", "init_args": {"tokenizer_dir": tok_dir}},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_fit_saves_config_checkpoints_and_resumes(tok_dir, tmp_path, capsys, anygen_logger):
    root = tmp_path / "run"
    path = _tiny_fit_config(tok_dir, tmp_path / "config.yaml", max_steps=2, default_root_dir=str(root),
                            limit_val_batches=1,
                            callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                        "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True}}])

    with pytest.raises(SystemExit) as exit_info:
        cli_fit(["--config", str(path), "--trainer.max_steps", "7", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == 7 and printed["model"]["init_args"]["lr"] == 3e-4

    assert cli_fit(["--config", str(path)]) == 0
    saved = yaml.safe_load((root / "config.yaml").read_text())  # SaveConfigCallback, resolved
    assert saved["model"]["init_args"]["weight_decay"] == 0.1 and saved["weights_only"] is True
    assert (root / "checkpoints" / "last.ckpt").is_file()
    assert cli_fit(["--config", str(path), "--trainer.max_steps", "3", "--ckpt_path", "last"]) == 0
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("class_path, final", [("lightning.pytorch.callbacks.ModelCheckpoint", 2),
                                               ("trainers.callbacks.LastStepCheckpoint", 3)])
def test_last_step_checkpoint_keeps_the_step_training_ended_on(tok_dir, tmp_path, anygen_logger, class_path, final):
    """3 steps, a checkpoint every 2: Lightning's own ``last.ckpt`` stays at step 2 (a 450-step stage saving every
    100 ended at step 400); ``LastStepCheckpoint`` writes step 3 (test_configs: every config's step checkpoint)."""
    root = tmp_path / "run"
    path = _tiny_fit_config(tok_dir, tmp_path / "config.yaml", max_steps=3, default_root_dir=str(root),
                            limit_val_batches=0,
                            callbacks=[{"class_path": class_path,
                                        "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True,
                                                      "every_n_train_steps": 2}}])
    assert cli_fit(["--config", str(path)]) == 0
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == final


def test_cpu_bf16_support_is_read_from_cpuinfo():
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    zen4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    assert cpu_has_native_bf16(avx2) is False
    assert cpu_has_native_bf16(zen4) is True and cpu_has_native_bf16(arm) is True
    assert cpu_has_native_bf16("") is None  # nothing to tell from: no warning either way


@pytest.mark.parametrize("precision, accelerator, cuda, native, warns", [
    ("bf16-mixed", "auto", False, False, True),    # emulated on this CPU: the case the warning is for
    ("bf16-true", "cpu", True, False, True),       # a GPU at hand but the run asks for the CPU
    ("bf16-mixed", "auto", True, False, False),    # lands on the GPU
    ("bf16-mixed", "auto", False, True, False),    # AVX512-BF16 / AMX: bf16 is the faster one
    ("bf16-mixed", "auto", False, None, False),    # unknown CPU
    ("32-true", "cpu", False, False, False),
    (None, "auto", False, False, False),
])
def test_bf16_on_a_cpu_without_it_is_warned_about(precision, accelerator, cuda, native, warns):
    message = bf16_cpu_warning(precision, accelerator, cuda, native)
    assert (message is not None) == warns
    if warns:
        assert "32-true" in message and "avx512_bf16" in message


def test_cli_fit_warns_before_an_emulated_bf16_run(tok_dir, tmp_path, monkeypatch, caplog):
    import trainers.cli

    monkeypatch.setattr(trainers.cli, "cpu_has_native_bf16", lambda: False)
    path = _tiny_fit_config(tok_dir, tmp_path / "config.yaml", max_steps=1, default_root_dir=str(tmp_path),
                            enable_checkpointing=False, limit_val_batches=0)
    with caplog.at_level(logging.WARNING, logger="anygen.fit"):
        assert cli_fit(["--config", str(path)]) == 0
    assert not [r for r in caplog.records if r.name == "anygen.fit"]  # fp32: nothing to say
    with caplog.at_level(logging.WARNING, logger="anygen.fit"):
        assert cli_fit(["--config", str(path), "--trainer.precision", "bf16-mixed"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "anygen.fit"]
    assert len(warned) == 1 and "bf16-mixed" in warned[0], warned


# -- copy_head: the copy-attention prior of a 2D-rotary block ------------------------------------------------


def test_copy_head_sets_the_named_head_from_the_shards_documents(tok_dir, tmp_path):
    from anygen.data.shards import ShardWriter

    tokenizer = MultimodalTokenizer.load(tok_dir)
    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(tmp_path / "shards")
    for i in range(6):
        codes = [torch.randint(0, tokenizer.vocab.image_codebook_size, (3, 4), generator=g) for _ in range(2)]
        seq = tokenizer.encode(["a red circle", Image(codes=codes[0]), "make it blue", Image(codes=codes[1])])
        writer.add(TokenizedDocument(f"doc-{i}", seq.ids.numpy().astype(np.int32)))
    index = {"format": "safetensors", "vocab": tokenizer.vocab.to_dict(), "docs": 6, "shards": writer.close()}
    (tmp_path / "shards" / "index.json").write_text(json.dumps(index))
    grid = {"rope_grid": 2, "rope_grid_layers": [1], "qk_norm": "rms"}
    module = tiny_unified(tok_dir, model=grid, copy_head={"block": 1, "shards": str(tmp_path / "shards"),
                                                           "scale": 5.0, "documents": 4})
    attn, hd = module.model.blocks[1].attn, module.model.config.head_dim
    assert torch.all(attn.q_norm.weight[0] == 5.0) and torch.all(attn.k_norm.weight[0] == 5.0)
    rows = attn.q_proj.weight[:hd]  # every row of head 0 is a multiple of one direction, the grid pairs' only
    nonzero = rows.norm(dim=1) > 0
    assert nonzero.sum() == 2 * 2 + 2  # two column pairs (cos, sin), two row pairs (1, 0)
    u = rows[nonzero][0] / rows[nonzero][0].norm()
    torch.testing.assert_close(rows[nonzero] / rows[nonzero].norm(dim=1, keepdim=True), u.expand(6, -1) *
                               torch.sign(rows[nonzero] @ u)[:, None])
    plain = tiny_unified(tok_dir, model=grid)
    assert torch.equal(plain.model.blocks[1].attn.q_proj.weight[hd:], attn.q_proj.weight[hd:])  # other heads kept
    with pytest.raises(ValueError, match="copy_head must be a mapping with block and shards"):
        tiny_unified(tok_dir, model=grid, copy_head={"block": 1})
    with pytest.raises(ValueError, match="block 0 has no 2D rotary pairs"):
        tiny_unified(tok_dir, model=grid, copy_head={"block": 0, "shards": str(tmp_path / "shards")})
