"""Janus / Janus-Pro (``JanusForConditionalGeneration``) -> anygen.

What maps where:

- LLaMA decoder (``model.language_model``) -> ``blocks``, ``norm``; its ``embed_tokens`` / ``lm_head``
  rows -> the routed ``text`` table and head, reordered by the ``IdMap`` (special roles moved out of
  the text range). A tied ``lm_head`` (not in the file) reuses ``embed_tokens``.
- Generation path -> the routed ``image`` table and head with Janus's shapes
  (``AnyGenConfig.image_embed_dim`` / ``image_head_dim``): ``generation_embeddings`` +
  ``generation_aligner`` (Linear -> GELU -> Linear) embed the codes, ``generation_head``
  (Linear -> GELU -> Linear) scores them.
- Understanding: the vision tower is a SigLIP (``projection_layer`` is SigLIP's ``out_proj``) -> ``und.tower``;
  the aligner (``fc1`` -> GELU -> ``hidden_layers.0``) -> ``und.aligner``.
- ``JanusVQVAE`` -> the image tokenizer (``HFImageTokenizer``), so generated codes decode to pixels.

Roles: ``<|bos|> <|eos|> <|pad|>`` are the tokenizer's, ``<|boi|> <|eoi|>`` its ``<begin_of_image>``
``<end_of_image>``, ``<|und|>`` the ``image_token_id`` placeholder; ``<|null|>`` copies the pad row,
because Janus's unconditional prompt is the prompt with every token but BOS and BOI replaced by pad.
Layout: ``<|boi|>`` then ``num_patches``² codes, no size tokens, no row ends (``ImageLayout``).
"""

from __future__ import annotations

import warnings
from typing import Any

from anygen.config import AnyGenConfig
from anygen.convert.common import (
    HFCheckpoint,
    IdMap,
    Imported,
    Timer,
    decoder_fields,
    decoder_state,
    load_vq,
    pixel_affine,
    siglip_state,
    token_id,
)
from anygen.generation.generator import SamplingDefaults
from anygen.generation.sampling import SamplingConfig
from tokenizers_mm.hf_adapters import HFImageTokenizer, HFTextTokenizer
from tokenizers_mm.layout import ImageLayout
from tokenizers_mm.multimodal import MultimodalTokenizer

_GELU = ("gelu",)  # exact GELU: nn.GELU() in anygen's aligners and heads


def load(ckpt: HFCheckpoint, timer: Timer) -> Imported:
    cfg = ckpt.config
    text, vision, vq = (dict(cfg.get(k) or {}) for k in ("text_config", "vision_config", "vq_config"))
    if text.get("model_type", "llama") != "llama":
        raise ValueError(f"unsupported Janus language model {text.get('model_type')!r}; only LLaMA is supported")
    fields = decoder_fields(text, "Janus (LLaMA)")
    d = fields["d_model"]
    _check_janus(vision, vq, d)

    ref_size = int(text["vocab_size"])
    tok = ckpt.tokenizer()
    roles = {
        "bos": token_id(tok, ckpt.token_string("bos_token", "<｜begin▁of▁sentence｜>"), "BOS", ref_size),
        "eos": token_id(tok, ckpt.token_string("eos_token", "<｜end▁of▁sentence｜>"), "EOS", ref_size),
        "boi": token_id(tok, ckpt.token_string("boi_token", "<begin_of_image>"), "begin-of-image", ref_size),
        "eoi": token_id(tok, ckpt.token_string("eoi_token", "<end_of_image>"), "end-of-image", ref_size),
        "und": int(cfg.get("image_token_id", 100581)),
    }
    pad = token_id(tok, ckpt.token_string("pad_token", "<｜▁pad▁｜>"), "pad", ref_size)
    aliases = {"null": pad}
    (aliases if pad in roles.values() else roles)["pad"] = pad  # a pad that doubles as another role is copied
    side = int(vision["image_size"]) // int(vision["patch_size"])  # the VQ grid Janus generates: num_patches²
    k = int(vq["num_embeddings"])
    id_map = IdMap.build(ref_size, roles, aliases=aliases, image_codebook_size=k, max_height=side, max_width=side)
    v = id_map.vocab
    timer(f"janus: vocabulary {ref_size} ids -> text {v.text_size} + specials; image codes {k} (own table), "
          f"{side}x{side} per image")

    config = AnyGenConfig(
        **v.to_dict(), **fields, qk_norm="none", head_mode="routed",
        image_embed_dim=int(vq["embed_dim"]), image_head_dim=int(vq["projection_dim"]),
        und_encoder=_siglip_kwargs(vision), und_image_size=int(vision["image_size"]),
    )
    state, sources = decoder_state(ckpt, "model.language_model.", fields["n_layer"])
    embed_name = "model.language_model.embed_tokens.weight"
    embed = ckpt.get(embed_name)
    head = ckpt.get("lm_head.weight") if ckpt.has("lm_head.weight") else _tied(ckpt, embed)
    state["embed.text.weight"] = id_map.permute_rows(embed, v.image_offset, name=embed_name)
    state["head.text.weight"] = id_map.permute_rows(head, v.image_offset, name="lm_head.weight")
    sources["embed.text.weight"], sources["head.text.weight"] = embed_name, "lm_head.weight"
    del embed, head
    state["embed.image.0.weight"] = ckpt.get("model.generation_embeddings.weight")
    sources["embed.image.0.weight"] = "model.generation_embeddings.weight"
    linears = {  # anygen's nn.Sequential indices: Linear, GELU, Linear
        "embed.image.1": "model.generation_aligner.fc1", "embed.image.3": "model.generation_aligner.hidden_layers.0",
        "head.image.0": "model.generation_head.proj_out", "head.image.2": "model.generation_head.vision_head",
        "und.aligner.0": "model.aligner.fc1", "und.aligner.2": "model.aligner.hidden_layers.0",
    }
    for ours, theirs in linears.items():
        for p in ("weight", "bias"):
            state[f"{ours}.{p}"], sources[f"{ours}.{p}"] = ckpt.get(f"{theirs}.{p}"), f"{theirs}.{p}"
    zero = state["norm.weight"].new_zeros((1, d))  # the unused one-code video table and head
    state["embed.video.weight"], state["head.video.weight"] = zero, zero.clone()
    tower, tower_sources = siglip_state(ckpt, "model.vision_model.")
    state.update(tower)
    sources.update(tower_sources)
    timer(f"janus: {len(state)} decoder / understanding tensors mapped")

    pre = ckpt.preprocessor_config
    if any(abs(float(x) - 0.5) > 1e-3 for key in ("image_mean", "image_std") for x in _as_list(pre.get(key, 0.5))):
        warnings.warn(f"{ckpt.directory}/preprocessor_config.json normalises with mean {pre.get('image_mean')} / std "
                      f"{pre.get('image_std')}; anygen feeds the understanding encoder pixels in [-1, 1] "
                      "(mean 0.5 / std 0.5), so understood images will read differently", stacklevel=2)
    image = HFImageTokenizer.from_config("janus", {**vq, "num_patches": side}, **pixel_affine(ckpt.preprocessor_config))
    load_vq(image, ckpt)
    tokenizer = MultimodalTokenizer(
        HFTextTokenizer(tok, id_map.text_ids), image, None,
        image_size=side * image.downsample, und_tokens=side * side, und_image_size=int(vision["image_size"]),
        max_height=side, max_width=side, max_frames=1,
        layout=ImageLayout(size_tokens=False, row_end=False, default_size=(side, side), guidance="masked"),
    )
    # the reference's published image sampling (Janus-Pro's generation_inference.py: temperature 1, cfg_weight 5)
    sampling = SamplingDefaults(image=SamplingConfig(temperature=1.0, guidance_scale=5.0))
    return Imported(config, state, sources, tokenizer, id_map, sampling)


def _check_janus(vision: dict[str, Any], vq: dict[str, Any], d: int) -> None:
    problems = []
    if vision.get("use_qk_norm"):
        problems.append("vision_config.use_qk_norm (SigLIP has no QK-norm)")
    if int(vision.get("depth", 2)) != 2:
        problems.append(f"vision_config.depth {vision.get('depth')} (anygen's aligner has 2 layers)")
    if int(vq.get("num_hidden_layers", 2)) != 2:
        problems.append(f"vq_config.num_hidden_layers {vq.get('num_hidden_layers')} (the generation aligner has 2)")
    for where, cfg in (("vision_config", vision), ("vq_config", vq)):
        if cfg.get("hidden_act", "gelu") not in _GELU:
            problems.append(f"{where}.hidden_act {cfg.get('hidden_act')!r} (anygen's aligners use exact GELU)")
    if int(vision.get("projection_dim", d)) != d or int(vq.get("projection_dim", d)) != d:
        problems.append(f"aligner width (projection_dim) differs from the decoder width {d}")
    if int(vq.get("image_token_embed_dim", d)) != d:
        problems.append(f"vq_config.image_token_embed_dim {vq.get('image_token_embed_dim')} != hidden size {d}")
    for key in ("image_size", "patch_size"):
        if not isinstance(vision.get(key), int):
            problems.append(f"vision_config.{key} {vision.get(key)!r} (a square int is supported)")
    if problems:
        raise ValueError("unsupported Janus checkpoint: " + "; ".join(problems))


def _siglip_kwargs(vision: dict[str, Any]) -> dict[str, Any]:
    """``SiglipVisionConfig`` kwargs that rebuild Janus's vision tower exactly."""
    hidden = int(vision["hidden_size"])
    return {
        "hidden_size": hidden, "intermediate_size": int(hidden * float(vision.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(vision["num_hidden_layers"]),
        "num_attention_heads": int(vision["num_attention_heads"]),
        "num_channels": int(vision.get("num_channels", 3)), "patch_size": int(vision["patch_size"]),
        "image_size": int(vision["image_size"]), "hidden_act": vision.get("hidden_act", "gelu"),
        "layer_norm_eps": float(vision.get("layer_norm_eps", 1e-6)),
    }


def _as_list(value: float | list[float]) -> list[float]:
    return value if isinstance(value, list) else [value]


def _tied(ckpt: HFCheckpoint, embed):
    if ckpt.config.get("tie_word_embeddings", True) or ckpt.config.get("text_config", {}).get("tie_word_embeddings"):
        return embed  # transformers drops a tied lm_head from the file
    raise ValueError(f"{ckpt.directory} lacks lm_head.weight and its config does not tie it to the embeddings")
