"""Tiny random reference checkpoints, built with ``transformers`` itself: what the import tests convert.

Each ``save_tiny_*`` writes a Hugging Face directory the way ``save_pretrained`` does (``config.json``,
``model.safetensors``, ``tokenizer.json`` + ``tokenizer_config.json``) with a width-32, 2-layer
decoder, a small VQ model and a tokenizer that carries the family's real special-token strings,
appended after the BPE ids as the published tokenizers have them. Nothing is downloaded.

``janus_config(**shape)`` also serves the memory / time measurement at the Janus-Pro-1B shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CORPUS = ["a red circle on a blue square", "draw a cat on a mat", "hello world 123 4*4 8*8", "what is in the picture?",
          "the quick brown fox jumps over the lazy dog", "1*1 2*2 3*3 16*16 12*8"] * 4

JANUS_SPECIALS = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                  "pad_token": "<｜▁pad▁｜>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>",
                  "image_token": "<image_placeholder>"}
EMU3_SPECIALS = {"bos_token": "<|extra_203|>", "eos_token": "<|extra_204|>", "pad_token": "<|endoftext|>",
                 "boi_token": "<|image start|>", "eoi_token": "<|image end|>", "image_wrapper_token": "<|image token|>",
                 "eof_token": "<|extra_201|>", "image_token": "<image>"}
CHAMELEON_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "boi_token": "<racm3:break>",
                      "eoi_token": "<eoss>", "image_token": "<image>", "sep_token": "<reserved08706>"}


def tiny_tokenizer(specials: dict[str, str], *, extra: list[str] = (), sentencepiece: bool = False,
                   vocab_size: int = 300):
    """A BPE trained on ``CORPUS`` with ``specials`` (and ``extra`` plain added tokens) appended after it.

    ``sentencepiece=True`` builds what LLaMA-family ``tokenizer.json`` files hold (Metaspace
    pre-tokenizer, byte fallback) instead of byte-level BPE.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if sentencepiece:
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        alphabet = [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=["<unk>", *alphabet],
                                      show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    named = {k: v for k, v in specials.items() if k in ("bos_token", "eos_token", "pad_token", "sep_token")}
    others = {k: v for k, v in specials.items() if k not in named}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named, extra_special_tokens=others)
    if extra:
        fast.add_tokens(list(extra))
    return fast


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Replace transformers' small-std init by O(1) random weights, so logits differ clearly between ids.

    Matrices get std ``1/sqrt(fan_in)`` (unit-variance activations), vectors (norm scales, biases)
    ``1 + 0.2 N(0, 1)`` or ``0.2 N(0, 1)``: a parity test then compares logits of magnitude ~1, not ~0.01.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                fan_in = p[0].numel() if "embed" not in name else 1
                p.copy_(noise / fan_in**0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def _save(model, tokenizer, directory: str | Path) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def janus_config(vocab_size: int, image_token_id: int, *, d: int = 32, n_layer: int = 2, n_head: int = 4,
                 n_kv_head: int = 2, intermediate: int = 64, vision: dict[str, Any] | None = None,
                 vq: dict[str, Any] | None = None, max_positions: int = 512):
    """A ``JanusConfig`` of the given decoder shape (tiny by default)."""
    from transformers import JanusConfig

    vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
              **(vision or {}), "projection_dim": d}
    vq = {"embed_dim": 8, "num_embeddings": 64, "latent_channels": 32, "base_channels": 32,
          "channel_multiplier": [1, 2], "num_res_blocks": 1, **(vq or {}), "projection_dim": d,
          "image_token_embed_dim": d}
    text = {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": d, "intermediate_size": intermediate,
            "num_hidden_layers": n_layer, "num_attention_heads": n_head, "num_key_value_heads": n_kv_head,
            "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6}
    side = vision["image_size"] // vision["patch_size"]
    return JanusConfig(text_config=text, vision_config={**vision, "num_image_tokens": side * side}, vq_config=vq,
                       image_token_id=image_token_id)


def save_tiny_janus(directory: str | Path, *, seed: int = 0, n_kv_head: int = 2, extra_rows: int = 3) -> Path:
    """A random ``JanusForConditionalGeneration`` (LLaMA decoder, SigLIP-style tower, VQ-16-style VQ) and tokenizer."""
    from transformers import JanusForConditionalGeneration

    tok = tiny_tokenizer(JANUS_SPECIALS, extra=["<|User|>", "<|Assistant|>"])
    config = janus_config(len(tok) + extra_rows, tok.convert_tokens_to_ids("<image_placeholder>"),
                          n_kv_head=n_kv_head)
    model = randomize_(JanusForConditionalGeneration(config).eval(), seed)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = tok.bos_token_id, tok.eos_token_id
    gen.pad_token_id = tok.pad_token_id
    gen.generation_kwargs = {"boi_token_id": tok.convert_tokens_to_ids("<begin_of_image>")}
    return _save(model, tok, directory)


def save_tiny_emu3(directory: str | Path, *, seed: int = 0, n_kv_head: int = 2, codebook: int = 64) -> Path:
    """A random ``Emu3ForConditionalGeneration`` (GQA decoder, one shared head, visual tokens in the vocabulary)."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    visual = [f"<|visual token {k:06d}|>" for k in range(codebook)]
    tok = tiny_tokenizer(EMU3_SPECIALS, extra=["<|extra_200|>", *visual])
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in EMU3_SPECIALS.items()}
    config = Emu3Config(
        text_config={"vocab_size": len(tok) + 2, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": n_kv_head, "max_position_embeddings": 512,
                     "pad_token_id": ids["pad_token"], "bos_token_id": ids["bos_token"],
                     "eos_token_id": ids["eos_token"],
                     "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}},
        vq_config={"codebook_size": codebook, "embed_dim": 4, "latent_channels": 4, "base_channels": 32,
                   "channel_multiplier": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "hidden_size": 64,
                   "num_attention_heads": 1, "temporal_downsample_factor": 4},
        vocabulary_map=tok.get_vocab(),
    )
    model = randomize_(Emu3ForConditionalGeneration(config).eval(), seed)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
    return _save(model, tok, directory)


def chameleon_image_token(code: int) -> str:
    """Chameleon's name for VQ code ``code``: its digits written as letters (0 -> A), between IMGIMG and Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"


def save_tiny_chameleon(directory: str | Path, *, seed: int = 0, n_kv_head: int = 2, swin_norm: bool = False,
                        codebook: int = 64) -> Path:
    """A random ``ChameleonForConditionalGeneration`` (per-head LayerNorm QK-norm, optional swin-norm)."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    tok = tiny_tokenizer(CHAMELEON_SPECIALS, extra=[chameleon_image_token(k) for k in range(codebook)],
                         sentencepiece=True)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in CHAMELEON_SPECIALS.items()}
    config = ChameleonConfig(
        vocab_size=len(tok) + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_head, swin_norm=swin_norm, max_position_embeddings=512,
        bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"],
        vq_config={"embed_dim": 8, "num_embeddings": codebook, "latent_channels": 8, "resolution": 16,
                   "base_channels": 32, "channel_multiplier": [1, 2], "num_res_blocks": 1},
        vocabulary_map=tok.get_vocab(),
    )
    model = randomize_(ChameleonForConditionalGeneration(config).eval(), seed)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
    return _save(model, tok, directory)
