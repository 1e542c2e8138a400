"""Chameleon / Anole (``ChameleonForConditionalGeneration``) -> anygen.

What maps where:

- the decoder (``model.layers``) -> ``blocks``: per-head LayerNorm QK-norm (``q_norm`` / ``k_norm``
  weights and biases of shape ``(heads, head_dim)``, epsilon fixed at 1e-5 as transformers' Chameleon
  has it) and, with ``swin_norm``, anygen's post-norm blocks;
- the one embedding table and head -> anygen's ``shared`` table and head, rows reordered by the ``IdMap``;
- the image codes live inside the text vocabulary as ``IMGIMG…Z`` tokens whose letters spell the
  code (``config.vocabulary_map``) -> image code ``k`` at ``image_offset + k``;
- ``ChameleonVQVAE`` -> the image tokenizer: it encodes images to codes; transformers ships no
  decoder for it, so generated codes stay codes (``HFImageTokenizer.can_decode`` is False).

Roles: BOS / EOS / pad from the tokenizer, ``<|boi|>`` = ``<racm3:break>``, ``<|eoi|>`` = ``<eoss>``;
``<|null|>`` copies the pad row. Layout: ``<|boi|>`` + ``(resolution / 16)²`` codes + ``<|eoi|>``,
no size tokens, no row ends. Image generation is enabled: the reference's ``forward`` masks image
codes out of its logits (text only); anygen's grammar allows them inside image spans alone.
"""

from __future__ import annotations

from anygen.config import AnyGenConfig
from anygen.convert.common import (
    HFCheckpoint,
    IdMap,
    Imported,
    Timer,
    decoder_fields,
    decoder_state,
    load_vq,
    pad_id,
    pixel_affine,
    token_id,
)
from tokenizers_mm.hf_adapters import HFImageTokenizer, HFTextTokenizer
from tokenizers_mm.layout import ImageLayout
from tokenizers_mm.multimodal import MultimodalTokenizer

QK_NORM_EPS = 1e-5  # transformers' ChameleonLayerNorm hard-codes it, whatever rms_norm_eps says


def image_code(name: str) -> int:
    """The VQ code an ``IMGIMG…Z`` token stands for: its letters are digits (A = 0 … J = 9)."""
    return int("".join(str(ord(c) - ord("A")) if "A" <= c <= "J" else c for c in name[len("IMGIMG"):-1]))


def load(ckpt: HFCheckpoint, timer: Timer) -> Imported:
    cfg = ckpt.config
    vq = dict(cfg.get("vq_config") or {})
    fields = decoder_fields(cfg, "Chameleon")
    ref_size = int(cfg["vocab_size"])
    k = int(vq.get("num_embeddings", 8192))
    images = sorted((image_code(name), tid) for name, tid in (cfg.get("vocabulary_map") or {}).items()
                    if name.startswith("IMGIMG"))
    if [code for code, _ in images] != list(range(k)):
        raise ValueError(f"config.vocabulary_map lists {len(images)} IMGIMG image tokens, expected codes 0..{k - 1} "
                         "(vq_config.num_embeddings)")

    tok = ckpt.tokenizer()
    roles = {
        "bos": token_id(tok, ckpt.token_string("bos_token", "<s>"), "BOS", ref_size),
        "eos": token_id(tok, ckpt.token_string("eos_token", "</s>"), "EOS", ref_size),
        "boi": token_id(tok, ckpt.token_string("boi_token", "<racm3:break>"), "begin-of-image", ref_size),
        "eoi": token_id(tok, ckpt.token_string("eoi_token", "<eoss>"), "end-of-image", ref_size),
    }
    pad = pad_id(tok, ckpt, "<pad>", roles["eos"], ref_size)
    aliases = {"null": pad}
    (aliases if pad in roles.values() else roles)["pad"] = pad
    downsample = 2 ** (len(vq.get("channel_multiplier", (1, 1, 2, 2, 4))) - 1)
    side = int(vq.get("resolution", 512)) // downsample
    id_map = IdMap.build(ref_size, roles, aliases=aliases, image_ids=[tid for _, tid in images],
                         image_codebook_size=k, max_height=side, max_width=side)
    v = id_map.vocab
    timer(f"chameleon: vocabulary {ref_size} ids -> text {v.text_size} + specials + {k} image codes, "
          f"{side}x{side} per image")

    config = AnyGenConfig(**v.to_dict(), **fields, qk_norm="layernorm", qk_norm_eps=QK_NORM_EPS,
                          post_norm=bool(cfg.get("swin_norm", False)), head_mode="shared")
    state, sources = decoder_state(ckpt, "model.", fields["n_layer"], qk_norm=True)
    head_name = "lm_head.weight" if ckpt.has("lm_head.weight") else "model.embed_tokens.weight"
    state["embed.shared.weight"] = id_map.permute_rows(ckpt.get("model.embed_tokens.weight"),
                                                       name="model.embed_tokens.weight")
    state["head.shared.weight"] = id_map.permute_rows(ckpt.get(head_name), name=head_name)
    sources.update({"embed.shared.weight": "model.embed_tokens.weight", "head.shared.weight": head_name})
    timer(f"chameleon: {len(state)} decoder tensors mapped")

    image = HFImageTokenizer.from_config("chameleon", vq, **pixel_affine(ckpt.preprocessor_config))
    load_vq(image, ckpt)
    tokenizer = MultimodalTokenizer(
        HFTextTokenizer(tok, id_map.text_ids), image, None, image_size=side * downsample,
        max_height=side, max_width=side, max_frames=1,
        layout=ImageLayout(size_tokens=False, row_end=False, default_size=(side, side)),
    )
    return Imported(config, state, sources, tokenizer, id_map)
