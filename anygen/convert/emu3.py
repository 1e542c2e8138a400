"""Emu3 (``Emu3ForConditionalGeneration``: Emu3-Gen, Emu3-Chat) -> anygen.

What maps where:

- the GQA decoder (``text_model``) -> ``blocks``, ``norm``; its one embedding table and one head over
  the whole vocabulary -> anygen's ``shared`` table and head, rows reordered by the ``IdMap``.
  Both on-disk layouts are read: ``text_model.model.*`` / ``text_model.lm_head`` / ``vqmodel.*``
  (the published files) and ``model.text_model.*`` / ``lm_head`` / ``model.vqmodel.*``.
- ``<|visual token k|>`` (from ``config.vocabulary_map``) -> image code ``k``.
- ``Emu3VQVAE`` -> the image tokenizer (``HFImageTokenizer``).

Roles: BOS / EOS / pad from the tokenizer, ``<|boi|>`` = ``<|image start|>``, ``<|eoi|>`` =
``<|image end|>``, ``<|eol|>`` = ``<|extra_200|>``, ``<|eof|>`` = ``<|extra_201|>``; ``<|null|>``
copies the pad row. Layout: ``<|boi|> "H*W<|image token|>" (codes <|eol|>)×H <|eof|> <|eoi|>``,
the size written as text in the header (``ImageLayout.header``); the default size is the one
``Emu3Processor`` asks for (``ratio="1:1"``, ``image_area=518400``: 90x90 tokens, 720 px).
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
from anygen.generation.generator import SamplingDefaults
from anygen.generation.sampling import SamplingConfig
from tokenizers_mm.hf_adapters import HFImageTokenizer, HFTextTokenizer
from tokenizers_mm.layout import ImageLayout
from tokenizers_mm.multimodal import MultimodalTokenizer

VISUAL_PREFIX = "<|visual token"
DEFAULT_SIZE = (90, 90)  # Emu3Processor.calculate_generate_size("1:1", 518400, 8)
MAX_SIDE = 128  # Emu3's image processor caps images at 1024x1024 px: 128 tokens a side


def load(ckpt: HFCheckpoint, timer: Timer) -> Imported:
    cfg = ckpt.config
    text, vq = dict(cfg.get("text_config") or {}), dict(cfg.get("vq_config") or {})
    fields = decoder_fields(text, "Emu3")
    ref_size = int(text["vocab_size"])
    vocab_map = cfg.get("vocabulary_map") or {}
    visual = sorted((int(name[-8:-2]), tid) for name, tid in vocab_map.items() if name.startswith(VISUAL_PREFIX))
    k = int(vq.get("codebook_size", 32768))
    if [code for code, _ in visual] != list(range(k)):
        raise ValueError(f"config.vocabulary_map lists {len(visual)} '<|visual token k|>' entries, expected codes "
                         f"0..{k - 1} (vq_config.codebook_size)")

    tok = ckpt.tokenizer()
    roles = {
        "bos": token_id(tok, ckpt.token_string("bos_token", "<|extra_203|>"), "BOS", ref_size),
        "eos": token_id(tok, ckpt.token_string("eos_token", "<|extra_204|>"), "EOS", ref_size),
        "boi": token_id(tok, ckpt.token_string("boi_token", "<|image start|>"), "begin-of-image", ref_size),
        "eoi": token_id(tok, ckpt.token_string("eoi_token", "<|image end|>"), "end-of-image", ref_size),
        "eol": token_id(tok, "<|extra_200|>", "end-of-line", ref_size),
        "eof": token_id(tok, ckpt.token_string("eof_token", "<|extra_201|>"), "end-of-frame", ref_size),
    }
    pad = pad_id(tok, ckpt, "<|endoftext|>", roles["eos"], ref_size)
    aliases = {"null": pad}
    (aliases if pad in roles.values() else roles)["pad"] = pad
    wrapper = ckpt.token_string("image_wrapper_token", "<|image token|>")
    token_id(tok, wrapper, "image-wrapper", ref_size)  # must exist: it closes every image header
    id_map = IdMap.build(ref_size, roles, aliases=aliases, image_ids=[tid for _, tid in visual],
                         image_codebook_size=k, max_height=MAX_SIDE, max_width=MAX_SIDE)
    v = id_map.vocab
    timer(f"emu3: vocabulary {ref_size} ids -> text {v.text_size} + specials + {k} image codes")

    config = AnyGenConfig(**v.to_dict(), **fields, qk_norm="none", head_mode="shared")
    legacy = ckpt.has("text_model.model.embed_tokens.weight")
    prefix, head_name, vq_prefix = (("text_model.model.", "text_model.lm_head.weight", "vqmodel.") if legacy
                                    else ("model.text_model.", "lm_head.weight", "model.vqmodel."))
    state, sources = decoder_state(ckpt, prefix, fields["n_layer"])
    embed_name = f"{prefix}embed_tokens.weight"
    head = ckpt.get(head_name) if ckpt.has(head_name) else ckpt.get(embed_name)  # tied: the head is the table
    state["embed.shared.weight"] = id_map.permute_rows(ckpt.get(embed_name), name=embed_name)
    state["head.shared.weight"] = id_map.permute_rows(head, name=head_name)
    sources.update({"embed.shared.weight": embed_name, "head.shared.weight": head_name})
    del head
    timer(f"emu3: {len(state)} decoder tensors mapped")

    image = HFImageTokenizer.from_config("emu3", vq, **pixel_affine(ckpt.preprocessor_config))
    load_vq(image, ckpt, vq_prefix)
    default = DEFAULT_SIZE
    tokenizer = MultimodalTokenizer(
        HFTextTokenizer(tok, id_map.text_ids), image, None,
        image_size=(default[0] * image.downsample, default[1] * image.downsample),
        max_height=MAX_SIDE, max_width=MAX_SIDE, max_frames=1,
        layout=ImageLayout(size_tokens=False, header="{h}*{w}" + wrapper, row_end=True, frame_end=True,
                           default_size=default),
    )
    # the reference's published image sampling (Emu3-Gen's model card: top_k 2048, classifier-free guidance 3)
    sampling = SamplingDefaults(image=SamplingConfig(temperature=1.0, top_k=2048, guidance_scale=3.0))
    return Imported(config, state, sources, tokenizer, id_map, sampling)
