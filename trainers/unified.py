"""Training the any-to-any decoder: ``UnifiedModule``, next-token prediction over interleaved token shards.

What this module owns:

- building ``AnyGenModel`` for a ``MultimodalTokenizer`` directory: the model config is a preset plus
  overrides, and its vocabulary (and understanding-encoder size) always come from the tokenizer, so the
  two can never disagree;
- the loss: routed next-token cross-entropy (``anygen.model.routed_cross_entropy``), structural targets
  masked, per-modality weights, z-loss, and each modality's CE logged apart;
- staged training (Janus): which parameter groups train (``train:``), and starting from an earlier
  stage (``init_from:``), also across a refined image codebook (``init_image_codes:``) or another image
  tokenizer altogether (``reinit: [embed.image, head.image]``: the image rows start afresh, the rest is kept),
  or into a deeper model (``grow_depth:``, block expansion: the new blocks start as identities);
- input code noise (``code_noise``): in training only, image / video input codes replaced at random, targets
  kept, against exposure bias;
- an auxiliary loss on the understanding encoder (``und_code_loss``): its features regress the image
  tokenizer's latent of the same pixels, through a head that is not exported;
- AdamW with linear warm-up and cosine decay.

Loss::

    loss = Σ_i w[modality(target_i)] · CE_i / N  +  z_loss_weight · Σ_i log(Z_i)² / N
           +  und_code_loss · MSE(head(und features), FSQ latent of the understood pixels)

over the N counted targets. A target counts unless it is ``-100``, padding (``attention_mask``
False) or one of ``NO_LOSS_SPECIALS``: ``<|eol|> <|eoi|> <|eof|> <|eov|>`` are forced by the
generator once a span's size is known, ``<|pad|>`` is filler and ``<|und|>`` is filled by the
understanding encoder. Size tokens and ``<|boi|>`` / ``<|bov|>`` are the model's choices and do count.
The modality of a target is its id range: text (BPE, specials, sizes), image codes, video codes.

Parameter groups for ``train:`` (``"all"`` is every group)::

    embeddings = text_embeddings + image_embeddings + video_embeddings     (routed; "embeddings" in shared mode)
                 (image_embeddings holds the row / column tables of ``image_grid_embed`` too)
    heads      = text_head + image_head + video_head
    decoder    = the transformer blocks and the final norm
    block.<i>  = transformer block i alone (say the one a grow_depth stage added, with the rest frozen)
    copy_hint  = the image_copy_hint projection and the image_copy_logit gate (experimental; also in
                 image_embeddings / embeddings and image_head / heads)
    aligner    = the understanding encoder's MLP aligner
    und_encoder= the SigLIP tower (sets AnyGenConfig.und_trainable)

A tied embedding / head weight trains when either of its groups does.

Notable: a batch without understood images still adds ``0 · Σ aligner`` to the loss, so DDP sees every
trainable parameter in every step (no ``find_unused_parameters`` needed).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from torchmetrics import MeanMetric

from anygen.config import AnyGenConfig
from anygen.model import AnyGenModel, routed_cross_entropy
from tokenizers_mm.image import ImageTokenizer
from tokenizers_mm.multimodal import TEXT_FILE, MultimodalTokenizer
from tokenizers_mm.vocab import Vocab
from trainers.schedule import lr_factor

MODALITIES = ("text", "image", "video")
NO_LOSS_SPECIALS = ("eol", "eoi", "eof", "eov", "pad", "und")
BLOCK_GROUP = re.compile(r"block\.\d+")  # train: one transformer block by index (parameter_groups)
GROUPS = ("text_embeddings", "image_embeddings", "video_embeddings", "embeddings", "text_head", "image_head",
          "video_head", "heads", "decoder", "aligner", "und_encoder", "copy_hint")


# -- model config from a tokenizer -------------------------------------------------------------------


def build_model_config(tokenizer: MultimodalTokenizer, preset: str = "tiny", model: dict[str, Any] | None = None, *,
                       z_loss_weight: float | None = None, und_trainable: bool | None = None) -> AnyGenConfig:
    """``AnyGenConfig.preset(preset, **model)`` with the vocabulary and understanding sizes of ``tokenizer``.

    Raises:
        ValueError: unknown preset or field, or the tokenizer writes ``<|und|>`` runs of a length the
            model's understanding encoder does not produce.
    """
    base = AnyGenConfig.preset(preset, **dict(model or {}))
    data = {**base.to_dict(), **tokenizer.vocab.to_dict()}
    if tokenizer.und_tokens == 0:  # the tokenizer never writes <|und|>: an encoder would be dead weight
        data["und_encoder"], data["und_encoder_path"] = None, None
    elif base.und_encoder is None or base.und_tokens != tokenizer.und_tokens \
            or base.und_image_size != tokenizer.und_image_size:
        raise ValueError(
            f"the tokenizer writes {tokenizer.und_tokens} <|und|> positions per understood image at "
            f"{tokenizer.und_image_size} px, but the model config gives {base.und_tokens} at {base.und_image_size} px; "
            "set model.und_encoder (patch_size) and model.und_image_size to match the tokenizer")
    if z_loss_weight is not None:
        data["z_loss_weight"] = z_loss_weight
    if und_trainable is not None and data["und_encoder"] is not None:
        data["und_trainable"] = und_trainable
    return AnyGenConfig.from_dict(data)


# -- parameter groups ---------------------------------------------------------------------------------


def resolve_groups(train: str | list[str] | tuple[str, ...]) -> list[str]:
    """Expand ``train`` (``"all"``, one group name or a list) into a sorted list of group names.

    Raises:
        ValueError: an unknown group name (the message lists the accepted ones).
    """
    names = [train] if isinstance(train, str) else list(train)
    if not names:
        raise ValueError(f"train must name at least one parameter group; accepted: 'all', {', '.join(GROUPS)}, "
                         "block.<i>")
    if "all" in names:
        return sorted(GROUPS)
    unknown = sorted(n for n in set(names) - set(GROUPS) if not (isinstance(n, str) and BLOCK_GROUP.fullmatch(n)))
    if unknown:
        raise ValueError(f"unknown parameter groups {unknown} in train; accepted: 'all', {', '.join(GROUPS)}, "
                         "block.<i> (one transformer block, i from 0)")
    return sorted(set(names))


def parameter_groups(model: AnyGenModel) -> dict[str, list[nn.Parameter]]:
    """The named parameter groups of ``model`` (see the module docstring); absent parts give empty groups."""
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUPS}
    for kind in ("embed", "head"):
        umbrella = "embeddings" if kind == "embed" else "heads"
        for name, module in getattr(model, kind).items():
            params = list(module.parameters())
            groups[umbrella] += params
            if name in MODALITIES:
                groups[f"{name}_embeddings" if kind == "embed" else f"{name}_head"] += params
    if model.copy_hint is not None:  # image_copy_hint: its projection is part of an image code's embedding too
        hint = list(model.copy_hint.parameters())
        groups["embeddings"] += hint
        groups["image_embeddings"] += hint
        groups["copy_hint"] += hint
    if model.copy_gate is not None:  # image_copy_logit: its gate adds to the image head's logits
        gate = list(model.copy_gate.parameters())
        groups["heads"] += gate
        groups["image_head"] += gate
        groups["copy_hint"] += gate
    if model.grid_embed is not None:  # image_grid_embed: the row / column tables are part of an image code's embedding
        tables = list(model.grid_embed.parameters())
        groups["embeddings"] += tables
        if "image" in model.embed:  # routed: the image table's group as well (shared mode has "embeddings" only)
            groups["image_embeddings"] += tables
    groups["decoder"] = list(model.blocks.parameters()) + list(model.norm.parameters())
    for i, block in enumerate(model.blocks):
        groups[f"block.{i}"] = list(block.parameters())
    if model.und is not None:
        groups["aligner"] = list(model.und.aligner.parameters())
        groups["und_encoder"] = list(model.und.tower.parameters())
    return groups


def apply_trainable(model: AnyGenModel, names: list[str]) -> None:
    """Freeze every parameter of ``model``, then unfreeze the named groups.

    Raises:
        ValueError: a modality-specific group asked of a ``head_mode="shared"`` model.
    """
    groups = parameter_groups(model)
    absent = [n for n in names if n not in groups]
    if absent:
        raise ValueError(f"train names {absent}, but the model has blocks block.0 .. block.{model.config.n_layer - 1}")
    specific = [n for n in names if n.startswith(MODALITIES) and not groups[n]]
    if model.config.head_mode == "shared" and specific and set(names) != set(GROUPS):
        raise ValueError(f"head_mode='shared' has one embedding table and one head; groups {specific} do not "
                         "exist there, use 'embeddings' / 'heads'")
    model.requires_grad_(False)
    for name in names:
        for p in groups[name]:
            p.requires_grad_(True)


# -- loading an earlier stage -------------------------------------------------------------------------


def nearest_code_map(old: ImageTokenizer, new: ImageTokenizer) -> Tensor:
    """For every code of ``new``, the code of ``old`` whose quantized latent is nearest, ``(K_new,)`` long.

    Meant for a refined tokenizer warm-started from ``old`` (``ImageTokenizerModule(init_from=...)``: a finer
    FSQ grid, perhaps more latent channels): its codes mean roughly what their nearest coarse codes meant, so a
    decoder trained on the coarse codes can start the fine ones from their rows. When the new latent has more
    channels, codes are compared on the channels they share (the warm start keeps those, the new ones are new).

    Raises:
        ValueError: either tokenizer is not FSQ.
    """
    a, b = old.code_vectors(), new.code_vectors()  # (K_old, C_old), (K_new, C_new)
    shared = min(a.shape[1], b.shape[1])
    return torch.cdist(b[:, :shared], a[:, :shared]).argmin(dim=1)


def check_code_noise(value: Any) -> dict[str, float]:
    """``UnifiedModule(code_noise=)`` as ``{"image": p, "video": q}``: a number applies to both.

    Raises:
        ValueError: not a number in [0, 1), or a mapping with another key or such a value.
    """
    def number(v: Any) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, float)) and 0 <= v < 1

    if number(value):
        return {"image": float(value), "video": float(value)}
    if isinstance(value, dict) and set(value) <= {"image", "video"} and all(number(v) for v in value.values()):
        return {"image": float(value.get("image", 0.0)), "video": float(value.get("video", 0.0))}
    raise ValueError(f"code_noise must be a number in [0, 1) (the chance an input image / video code is replaced "
                     f"in training) or a mapping {{'image': p, 'video': q}} of such numbers, got {value!r}")


def check_lr_scales(model: AnyGenModel, value: Any, trained: list[str]) -> dict[str, float]:
    """``UnifiedModule(lr_scales=)`` checked against ``model`` after ``apply_trainable``: ``{group: multiple of lr}``
    over groups whose tensors all train.

    Raises:
        ValueError: not a mapping, a group the model does not have or that does not train, or a multiple that is
            not a finite number > 0.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"lr_scales must be a mapping {{group: multiple of lr}} such as {{'block.2': 5}}, got "
                         f"{value!r}")
    known = parameter_groups(model)
    out = {}
    for name, scale in value.items():
        if name not in known:
            raise ValueError(f"lr_scales names {name!r}, not a parameter group of this model; accepted: "
                             f"{', '.join(GROUPS)}, block.0 .. block.{model.config.n_layer - 1}")
        if not known[name] or not all(p.requires_grad for p in known[name]):  # apply_trainable has run
            raise ValueError(f"lr_scales names {name!r}, which train: does not train (train: {trained})")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"lr_scales[{name!r}] must be a finite number > 0 (a multiple of lr), got {scale!r}")
        out[name] = float(scale)
    return out


def _bpe_table(path: Path) -> Any:
    model = json.loads(path.read_text()).get("model", {})
    return model.get("vocab"), model.get("merges")


def check_reinit(model: AnyGenModel, reinit: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``reinit`` as a tuple of state-dict prefixes, each naming at least one of ``model``'s tensors.

    A prefix matches a key equal to it or starting with it and a dot (``embed.image`` matches
    ``embed.image.weight``, never ``embed.images``).

    Raises:
        ValueError: not a list of strings, or a prefix that names nothing (the accepted top-level names are listed).
    """
    if reinit is None:
        return ()
    if isinstance(reinit, str) or not all(isinstance(r, str) and r for r in reinit):
        raise ValueError(f"reinit must be a list of parameter-name prefixes such as ['embed.image', 'head.image'], "
                         f"got {reinit!r}")
    keys = list(model.state_dict())
    unknown = [r for r in reinit if not any(_under(k, r) for k in keys)]
    if unknown:
        tops = sorted({".".join(k.split(".")[:2]) for k in keys if not k.startswith("blocks.")} | {"blocks"})
        raise ValueError(f"reinit prefixes {unknown} name no parameter of this model; accepted prefixes start with "
                         f"one of {tops} (e.g. embed.image, head.image, blocks.0)")
    return tuple(reinit)


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix.rstrip(".") + ".")


# the linear layers that write a block's output into the residual stream: zeroed, they make the block an identity
RESIDUAL_WRITERS = ("attn.o_proj.", "mlp.down_proj.")


def expand_blocks(state: dict[str, Tensor], n_layer: int, after: list[int] | None = None) -> dict[str, Tensor]:
    """``state`` with its transformer blocks spread over ``n_layer`` blocks (LLaMA-Pro's block expansion).

    The old blocks keep their order; after old block ``i`` come ``floor((i + 1)·e / n) - floor(i·e / n)`` new ones
    (``e = n_layer - n`` new blocks spread evenly over the ``n`` old ones: 4 -> 6 puts one after blocks 1 and 3),
    each a copy of block ``i`` whose residual writers (``RESIDUAL_WRITERS``: the attention output and the MLP down
    projection) are zero. A zeroed block adds nothing to the residual stream, so the grown model computes exactly
    what the old one did, and training starts from there with the extra depth to use. Other tensors are unchanged.

    ``after`` places the new blocks instead: one after each old block it lists (an index twice: two there), so
    a block meant to read what the low blocks still hold (``trainers.copy_head``) can go low in the stack.

    Raises:
        ValueError: ``state`` has no blocks, or more than ``n_layer``; ``after`` names a block the weights do not
            have, or not ``n_layer - N`` of them.
    """
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    n = len(indices)
    if n == 0 or indices != list(range(n)):
        raise ValueError(f"grow_depth needs weights with blocks.0 .. blocks.N-1, got block indices {indices[:8]}")
    if n_layer < n:
        raise ValueError(f"grow_depth only adds blocks: the weights have {n}, the model config asks for {n_layer} "
                         f"(set model.n_layer to {n} or more)")
    extra = n_layer - n
    if after is None:  # spread evenly
        after = [i for i in range(n) for _ in range((i + 1) * extra // n - i * extra // n)]
    elif (isinstance(after, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in after)
          or len(after) != extra or not all(0 <= i < n for i in after)):
        raise ValueError(f"grow_depth lists the old blocks (0..{n - 1}) to put a new block after, one entry per new "
                         f"block: {extra} entries for {n} -> {n_layer} blocks, got {after!r}")
    order: list[tuple[int, bool]] = []  # (old block, is a zeroed copy) for each new index
    for i in range(n):
        order.append((i, False))
        order += [(i, True)] * list(after).count(i)
    out = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    for new, (old, copy) in enumerate(order):
        prefix = f"blocks.{old}."
        for key, value in state.items():
            if key.startswith(prefix):
                rest = key[len(prefix):]
                zero = copy and rest.startswith(RESIDUAL_WRITERS)
                out[f"blocks.{new}.{rest}"] = torch.zeros_like(value) if zero else value.clone()
    return out


def load_initial_weights(model: AnyGenModel, path: str | Path, *, image_code_map: Tensor | None = None,
                         text_tokenizer: Path | None = None, reinit: tuple[str, ...] = (),
                         grow_depth: bool | list[int] = False) -> None:
    """Load weights from a ``save_pretrained`` directory or a Lightning ``.ckpt`` of a ``UnifiedModule``.

    A ``.ckpt`` is read with ``torch.load(weights_only=True)``: tensors and plain values only.

    Args:
        model: the model to fill.
        path: the directory or checkpoint.
        image_code_map: ``(K_new,)`` old image code for each of ``model``'s (``nearest_code_map``): the
            checkpoint may then have another image codebook size, and the image embedding and image head
            rows are gathered through the map; every other tensor loads as it is.
        text_tokenizer: this run's ``text_tokenizer.json``; a directory ``path`` with another BPE table is refused
            (same sizes, other strings: nothing else would notice).
        reinit: state-dict prefixes (``check_reinit``) not loaded: those tensors keep ``model``'s own
            initialisation, and may be absent from ``path`` or have another shape there. When both image rows
            (``embed.image`` and ``head.image``) are reinitialised, the image codebook size may differ too.
        grow_depth: ``path`` may have fewer transformer blocks than ``model``: they are spread over its depth and
            the new ones start as identities (``expand_blocks``); a list names the old blocks to put them after.

    Raises:
        FileNotFoundError: ``path`` is neither.
        ValueError: the vocabulary or the tensors do not match ``model``.
    """
    path = Path(path)
    if path.is_dir():
        config_file, weights = path / "config.json", path / "model.safetensors"
        if not config_file.is_file() or not weights.is_file():
            raise FileNotFoundError(f"init_from directory {path} lacks config.json / model.safetensors "
                                    "(expected a save_pretrained / anygen export directory)")
        meta = json.loads(config_file.read_text())
        if text_tokenizer is not None and (path / TEXT_FILE).is_file() \
                and _bpe_table(path / TEXT_FILE) != _bpe_table(text_tokenizer):
            raise ValueError(f"init_from {path} was trained with another text tokenizer than {text_tokenizer} "
                             "(the BPE vocabularies or merges differ): its text rows would mean other strings")
        _warn_on_position_changes(meta.get("model") or {}, model.config, path)
        vocab = meta.get("vocab")
        fresh_image = all(any(_under(f"{part}.image.weight", r) for r in reinit) for part in ("embed", "head"))
        if vocab is not None and (image_code_map is not None or fresh_image):  # the image codebook may differ
            vocab = {**vocab, "image_codebook_size": model.vocab.image_codebook_size}
        if vocab is not None and Vocab.from_dict(vocab) != model.vocab:
            raise ValueError(f"init_from {path} has vocabulary {vocab}, the tokenizer gives {model.vocab.to_dict()}")
        try:
            with safe_open(str(weights), framework="pt") as f:
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{weights} is not a readable safetensors file: {err}") from err
    elif path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError(f"init_from {path} is not a Lightning checkpoint (no state_dict)")
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    else:
        raise FileNotFoundError(f"init_from {path} does not exist; pass a save_pretrained directory or a .ckpt file")
    if image_code_map is not None:
        if model.config.head_mode != "routed" or model.config.image_embed_dim or model.config.image_head_dim:
            raise ValueError("init_image_codes needs routed heads with plain image tables (no Janus image MLPs)")
        for key in ("embed.image.weight", "head.image.weight"):
            if key in state:
                rows = state[key].shape[0]
                if int(image_code_map.max()) >= rows:
                    raise ValueError(f"init_image_codes maps onto {int(image_code_map.max()) + 1} old codes, but "
                                     f"{path} has {rows} rows in {key}: the tokenizer is not the one it trained on")
                state[key] = state[key][image_code_map.to(state[key].device)]
    if grow_depth is not False:
        state = expand_blocks(state, model.config.n_layer, None if grow_depth is True else list(grow_depth))
    if reinit:
        own = model.state_dict()
        state = {k: v for k, v in state.items() if not any(_under(k, r) for r in reinit)}
        state.update({k: v for k, v in own.items() if any(_under(k, r) for r in reinit)})
    load_model_state(model, state, str(path))


def _warn_on_position_changes(saved: dict[str, Any], config: AnyGenConfig, path: Path) -> None:
    """Warn when ``init_from`` was trained with other rotary settings: they add no tensors, so the weights load
    either way, but the attention they learned meets positions it never saw until training adapts it (turning
    ``rope_grid`` on is what ``unified_16x16_grid.yaml`` means to do; turning it off silently is not)."""
    defaults = {"rope_grid": 0, "rope_theta": 10000.0}
    changed = [f"{name} {saved.get(name, default)} -> {getattr(config, name)}" for name, default in defaults.items()
               if float(saved.get(name, default)) != float(getattr(config, name))]
    if saved.get("rope_grid_layers") != config.rope_grid_layers and config.rope_grid:
        changed.append(f"rope_grid_layers {saved.get('rope_grid_layers')} -> {config.rope_grid_layers}")
    if changed:
        rank_zero_warn(f"init_from {path} was trained with other rotary positions ({', '.join(changed)}): its "
                       "attention starts out reading positions it was not trained on")


def load_model_state(model: AnyGenModel, state: dict[str, Tensor], source: str) -> None:
    """Strictly load ``state`` into ``model`` (tied heads may be absent), naming any mismatch."""
    expected = model.state_dict()
    optional = {k for k in expected if k.startswith("head.")} if model.config.tie_embeddings else set()
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label}: {items[:4]}{' …' if len(items) > 4 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                 if items]
        raise ValueError(f"weights from {source} do not fit this model config: " + "; ".join(parts))
    model.load_state_dict(state, strict=not optional)


# -- the Lightning module -----------------------------------------------------------------------------


class UnifiedModule(LightningModule):
    """Next-token training of ``AnyGenModel`` on batches from ``trainers.data.TokenDataModule``.

    A batch is a dict: ``ids`` / ``targets`` ``(B, L)`` long (``-100`` = no target), optional
    ``document_ids`` ``(B, L)``, ``attention_mask`` ``(B, L)`` bool and ``und_pixels`` ``(N, 3, S, S)``.

    Args:
        tokenizer_dir: a ``MultimodalTokenizer`` directory; the model's vocabulary is taken from it.
        model: ``AnyGenConfig`` fields merged onto ``preset`` (vocabulary fields are overwritten).
        preset: ``AnyGenConfig`` preset name.
        lr: peak AdamW learning rate.
        betas: AdamW betas.
        weight_decay: AdamW weight decay (matrices only; norms and biases are not decayed).
        warmup_steps: linear warm-up steps.
        max_steps: step at which the cosine decay reaches ``min_lr_ratio * lr``; None uses
            ``trainer.max_steps`` (constant after warm-up when that is -1).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        loss_weights: per-modality weights ``{"text", "image", "video"}``; missing keys weigh 1.
        z_loss_weight: weight of ``log(Z)^2`` (PaLM / Chameleon); None keeps the model config's value.
        train: parameter groups to train: ``"all"``, one name or a list (module docstring).
        init_from: a ``save_pretrained`` directory or a ``.ckpt`` to start from (later stages).
        init_image_codes: the image tokenizer ``.safetensors`` that ``init_from``'s model was trained on, when
            ``tokenizer_dir`` holds a refined one (a finer FSQ grid, perhaps more latent channels): each new code's
            embedding and image-head row start from its nearest old code (``nearest_code_map``).
        reinit: parameter-name prefixes that ``init_from`` does not fill (``check_reinit``): those keep their
            fresh initialisation. ``[embed.image, head.image]`` carries a model to another image tokenizer (say
            the 4x one of the 16x16 recipe from the shipped 8x one): text, video, understanding and the
            transformer are kept, the image codes are learned anew.
        code_noise: in training steps only, the chance that each input image / video code is replaced by a
            uniformly drawn code of its modality (``corrupt_codes``); targets stay the true codes, so the model
            learns to go on correctly after a wrong code, as it must after its own sampling mistakes (exposure
            bias). Validation and generation never see it. A number applies to both modalities; a mapping
            ``{"image": p, "video": q}`` sets each (a missing key: 0). 0: off.
        und_code_loss: weight of an auxiliary loss on the understanding encoder (0: off). A linear head reads
            each ``<|und|>`` feature (the aligner's output, what the decoder reads) and regresses the image
            tokenizer's quantized latent of the pixels under that patch: the FSQ grid points of the
            ``(patch / downsample)²`` codes it covers, MSE. Trained from scratch through the captions alone, the
            encoder keeps less of a scene than an untrained one (``bench/und_probe.py``); this gives it a signal
            that every understood image carries, whatever its text says. Training and validation only: the head
            is not part of the model, and export and ``init_from`` skip it. Needs an FSQ image tokenizer whose
            codes tile the encoder's patches.
        grow_depth: ``init_from`` may have fewer transformer blocks than ``model.n_layer``: block expansion
            (``expand_blocks``): its blocks are spread over the deeper stack and each new block starts as a copy
            of the one before it with its output projections zeroed, so training starts from exactly the old
            model's function with more depth to learn in. A list of old block indices puts one new block after
            each instead (``[1]``: 8 -> 9 blocks with the new one at index 2). Needs ``init_from``.
        grid_lr_scale: the learning rate of the ``image_grid_embed`` row / column tables, as a multiple of ``lr``
            (same schedule). They start at zero while every other tensor of a warm start is trained: at a late
            stage's peak (1e-4) they grew to an RMS of 0.0005 in 100 steps against the code table's 0.029
            (session 26). 1: no group of their own.
        lr_scales: ``{group: multiple}`` for ``train:`` groups (``block.2``, ``heads``, ...) that learn at their own
            multiple of ``lr`` (same schedule): a block grown into a trained model starts with zero output
            projections and grows them slowly at a late stage's peak. A tensor in two listed groups takes the
            first's rate. ``{}``: none.
        copy_head: ``{"block": i, "shards": dir}`` (optionally ``head`` 0, ``scale`` 3.0, ``column_offset`` 1,
            ``documents`` 64): after ``init_from`` (and ``grow_depth``), set query head ``head`` of block ``i``, which
            must have 2D rotary pairs (``model.rope_grid_layers``), to attend from an image code to the code one
            column to the right in earlier images (``trainers.copy_head``), its direction read off the first
            ``documents`` documents of ``shards`` that hold image codes. For a block grown onto a trained model,
            so that edits and stories can copy the earlier image cell by cell.
    """

    def __init__(
        self,
        tokenizer_dir: str,
        model: dict[str, Any] | None = None,
        preset: str = "tiny",
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        loss_weights: dict[str, float] | None = None,
        z_loss_weight: float | None = None,
        train: str | list[str] = "all",
        init_from: str | None = None,
        init_image_codes: str | None = None,
        reinit: list[str] | None = None,
        code_noise: float | dict[str, float] = 0.0,
        und_code_loss: float = 0.0,
        grow_depth: bool | list[int] = False,
        grid_lr_scale: float = 1.0,
        copy_head: dict[str, Any] | None = None,
        lr_scales: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.code_noise = check_code_noise(code_noise)
        weights = {m: 1.0 for m in MODALITIES}
        unknown = sorted(set(loss_weights or {}) - set(MODALITIES))
        if unknown:
            raise ValueError(f"unknown loss_weights keys {unknown}; accepted: {list(MODALITIES)}")
        weights.update({k: float(v) for k, v in (loss_weights or {}).items()})
        if any(v < 0 for v in weights.values()):
            raise ValueError(f"loss_weights must be >= 0, got {weights}")
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"warmup_steps must be >= 0 and min_lr_ratio in [0, 1], got {warmup_steps}, "
                             f"{min_lr_ratio}")
        if not Path(tokenizer_dir).is_dir():
            raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} is not a directory; expected a MultimodalTokenizer "
                                    "directory (tokenizer_config.json, text_tokenizer.json, VQ .safetensors)")
        self.tokenizer_dir = str(Path(tokenizer_dir).resolve())
        self.tokenizer = MultimodalTokenizer.load(tokenizer_dir)  # a plain attribute: not in the state dict
        self.groups = resolve_groups(train)
        config = build_model_config(self.tokenizer, preset, model, z_loss_weight=z_loss_weight,
                                    und_trainable="und_encoder" in self.groups)
        self.model = AnyGenModel(config)
        if init_image_codes is not None and init_from is None:
            raise ValueError("init_image_codes maps the image codes of init_from's model; set init_from too")
        reinit_prefixes = check_reinit(self.model, reinit)
        if reinit_prefixes and init_from is None:
            raise ValueError(f"reinit {list(reinit_prefixes)} names what init_from should not fill; set init_from too")
        if grow_depth is not False and init_from is None:
            raise ValueError("grow_depth deepens init_from's model; set init_from too")
        if init_from is not None:
            code_map = None
            if init_image_codes is not None:
                if self.tokenizer.image is None:
                    raise ValueError(f"init_image_codes is set but the tokenizer in {tokenizer_dir} has no image VQ")
                code_map = nearest_code_map(ImageTokenizer.load(init_image_codes), self.tokenizer.image)
            load_initial_weights(self.model, init_from, image_code_map=code_map,
                                 text_tokenizer=Path(tokenizer_dir) / TEXT_FILE, reinit=reinit_prefixes,
                                 grow_depth=grow_depth)
        if copy_head is not None:
            self._init_copy_head(copy_head)
        apply_trainable(self.model, self.groups)
        empty = [n for n in self.groups if not parameter_groups(self.model)[n]]
        if empty and train != "all":
            rank_zero_warn(f"UnifiedModule: parameter groups {empty} are empty for this model and train nothing")
        self.lr, self.betas, self.weight_decay = float(lr), tuple(betas), float(weight_decay)
        self.warmup_steps, self.max_steps, self.min_lr_ratio = warmup_steps, max_steps, float(min_lr_ratio)
        if isinstance(grid_lr_scale, bool) or not isinstance(grid_lr_scale, (int, float)) \
                or not math.isfinite(grid_lr_scale) or grid_lr_scale <= 0:
            raise ValueError(f"grid_lr_scale must be a finite number > 0 (1: the tables train at lr), "
                             f"got {grid_lr_scale!r}")
        self.grid_lr_scale = float(grid_lr_scale)
        if self.grid_lr_scale != 1.0 and self.model.grid_embed is None:
            rank_zero_warn(f"UnifiedModule: grid_lr_scale={grid_lr_scale} does nothing: the model has no grid tables "
                           "(model.image_grid_embed is off)")
        self.lr_scales = check_lr_scales(self.model, lr_scales, self.groups)
        self.register_buffer("modality_weights", torch.tensor([weights[m] for m in MODALITIES]), persistent=False)
        v = self.model.vocab
        self.register_buffer("no_loss_ids", torch.tensor([v.special(n) for n in NO_LOSS_SPECIALS]), persistent=False)
        self.eval_metrics = nn.ModuleDict({name: MeanMetric() for name in ("loss", "ce", *MODALITIES)})
        if isinstance(und_code_loss, bool) or not isinstance(und_code_loss, (int, float)):
            raise ValueError(f"und_code_loss must be a finite number >= 0, got {und_code_loss!r}")
        self.und_code_loss = float(und_code_loss)
        self.und_code_head: nn.Linear | None = None
        if self.und_code_loss:
            self._init_und_code_head()

    def _init_copy_head(self, options: dict[str, Any]) -> None:
        """``copy_head``: set one head of a 2D-rotary block to read the next cell of earlier images
        (``trainers.copy_head``), its direction taken from the first documents with image codes in ``shards``."""
        from anygen.data.shards import TokenShards
        from trainers.copy_head import copy_head_direction, init_copy_head

        accepted = {"block", "shards", "head", "scale", "column_offset", "documents"}
        if not isinstance(options, dict) or not {"block", "shards"} <= set(options) or set(options) - accepted:
            raise ValueError(f"copy_head must be a mapping with block and shards (and optionally head, scale, "
                             f"column_offset, documents), got {options!r}")
        count = options.get("documents", 64)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"copy_head documents must be an int >= 1, got {count!r}")
        shards, v = TokenShards(options["shards"]), self.model.vocab
        chosen = []
        for i in range(len(shards)):
            ids = torch.from_numpy(shards.ids(i).astype("int64"))
            if ((ids >= v.image_offset) & (ids < v.video_offset)).any() and not (ids == v.special("und")).any():
                chosen.append(ids)
                if len(chosen) == count:
                    break
        direction = copy_head_direction(self.model, chosen, options["block"])
        init_copy_head(self.model, options["block"], direction, head=options.get("head", 0),
                       scale=options.get("scale", 3.0), column_offset=options.get("column_offset", 1))

    def _init_und_code_head(self) -> None:
        """The ``und_code_loss`` head, ``d_model -> block² · latent channels``, and the hook that keeps the
        understanding encoder's output of the current forward for it."""
        if not math.isfinite(self.und_code_loss) or self.und_code_loss < 0:
            raise ValueError(f"und_code_loss must be a finite number >= 0, got {self.und_code_loss}")
        und, image = self.model.und, self.tokenizer.image
        if und is None:
            raise ValueError("und_code_loss > 0 needs a model with an understanding encoder (the tokenizer writes no "
                             "<|und|> positions)")
        if image is None or image.config.quantizer != "fsq":
            raise ValueError("und_code_loss > 0 needs an FSQ image tokenizer in tokenizer_dir (its codes' grid points "
                             "are the targets)")
        patch = und.image_size // int(math.isqrt(und.num_tokens))
        if patch % image.downsample:
            raise ValueError(f"und_code_loss: the understanding encoder's {patch}-px patches are not a whole number "
                             f"of the image tokenizer's {image.downsample}-px codes")
        self._und_block = patch // image.downsample
        self._und_vq = image  # a plain attribute: the tokenizer is not trained and not in the state dict
        self.und_code_head = nn.Linear(self.model.config.d_model, self._und_block ** 2 * len(image.config.fsq_levels))
        self._und_feats: Tensor | None = None
        und.register_forward_hook(lambda module, args, out: setattr(self, "_und_feats", out))

    def und_code_targets(self, pixels: Tensor) -> Tensor:
        """``(N, 3, S, S)`` understood pixels -> ``(N, und_tokens, block² · C)``: per patch, the FSQ grid points
        of the codes under it, row-major within the patch."""
        vq = self._und_vq.to(pixels.device)
        codes = vq.encode(pixels.to(next(vq.parameters()).dtype))  # (N, h, w)
        vectors = vq.quantizer.indices_to_codes(codes).float()  # (N, C, h, w)
        n, c, h, w = vectors.shape
        b = self._und_block
        vectors = vectors.view(n, c, h // b, b, w // b, b).permute(0, 2, 4, 3, 5, 1)  # (N, gh, gw, b, b, C)
        return vectors.reshape(n, (h // b) * (w // b), b * b * c)

    @property
    def vocab(self) -> Vocab:
        return self.model.vocab

    # -- loss ------------------------------------------------------------------------------------------
    def loss_mask(self, targets: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``(B, L)`` bool: targets that carry loss (not -100, not padding, not a structural token)."""
        mask = (targets >= 0) & (targets < self.vocab.size) & ~torch.isin(targets, self.no_loss_ids)
        return mask if attention_mask is None else mask & attention_mask

    def target_modality(self, targets: Tensor) -> Tensor:
        """``(B, L)`` long: 0 text (BPE, specials, sizes), 1 image code, 2 video code."""
        v = self.vocab
        return (targets >= v.image_offset).long() + (targets >= v.video_offset).long()

    def corrupt_codes(self, ids: Tensor) -> Tensor:
        """``ids`` with each image / video code replaced, with its modality's chance in ``code_noise``, by a
        uniformly drawn code of the same modality (it may draw the same code); every other id is kept."""
        v = self.vocab
        draw = torch.rand(ids.shape, device=ids.device)
        image = (draw < self.code_noise["image"]) & (ids >= v.image_offset) \
            & (ids < v.image_offset + v.image_codebook_size)
        video = (draw < self.code_noise["video"]) & (ids >= v.video_offset) \
            & (ids < v.video_offset + v.video_codebook_size)
        if v.image_codebook_size:
            ids = torch.where(image, torch.randint_like(ids, v.image_codebook_size) + v.image_offset, ids)
        if v.video_codebook_size:
            ids = torch.where(video, torch.randint_like(ids, v.video_codebook_size) + v.video_offset, ids)
        return ids

    def compute_loss(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Forward a batch; return ``loss`` (what trains), ``ce`` and ``z_loss`` (means over counted targets),
        ``ce_sum`` / ``count`` per modality ``(3,)`` tensors, in ``MODALITIES`` order."""
        ids, targets = batch["ids"], batch["targets"]
        if ids.shape != targets.shape:
            raise ValueError(f"ids {tuple(ids.shape)} and targets {tuple(targets.shape)} must have the same shape")
        attention_mask = batch.get("attention_mask")
        und_pixels = batch.get("und_pixels")
        logits = self.model(ids, attention_mask=attention_mask, document_ids=batch.get("document_ids"),
                            und_pixels=und_pixels)  # (B, L, V)
        mask = self.loss_mask(targets, attention_mask)
        cfg = self.model.config
        ce = routed_cross_entropy(logits, targets, self.vocab, mask, head_mode=cfg.head_mode,
                                  reduction="none")  # (B, L), 0 where masked
        modality = self.target_modality(targets)
        one_hot = (modality[..., None] == torch.arange(3, device=ids.device)) & mask[..., None]  # (B, L, 3)
        counts = one_hot.sum(dim=(0, 1))  # (3,)
        ce_sums = (ce[..., None] * one_hot).sum(dim=(0, 1))  # (3,)
        n = mask.sum().clamp(min=1)
        loss = (ce_sums * self.modality_weights).sum() / n
        out = {"ce": ce_sums.sum() / n, "ce_sum": ce_sums.detach(), "count": counts}
        if cfg.z_loss_weight:
            # log Z of each target's own slice: CE = log Z - logit[target]
            target_logit = logits.gather(-1, targets.clamp(0, self.vocab.size - 1)[..., None]).squeeze(-1).float()
            lse = torch.where(mask, ce + target_logit, torch.zeros_like(ce))
            out["z_loss"] = lse.square().sum() / n
            loss = loss + cfg.z_loss_weight * out["z_loss"]
        if self.und_code_head is not None:
            if und_pixels is not None and self._und_feats is not None:
                pred = self.und_code_head(self._und_feats.float())
                out["und_code"] = nn.functional.mse_loss(pred, self.und_code_targets(und_pixels))
            else:  # no understood image in this batch: keep the head in the graph for DDP
                out["und_code"] = 0.0 * sum(p.sum() for p in self.und_code_head.parameters())
            self._und_feats = None
            loss = loss + self.und_code_loss * out["und_code"]
        if und_pixels is None and self.model.und is not None:
            # keep every trainable parameter in the graph, so DDP needs no find_unused_parameters
            unused = [p.sum() for p in self.model.und.parameters() if p.requires_grad]
            if unused:
                loss = loss + 0.0 * torch.stack(unused).sum()
        out["loss"] = loss
        return out

    # -- steps -----------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if any(self.code_noise.values()):
            batch = {**batch, "ids": self.corrupt_codes(batch["ids"])}
        out = self.compute_loss(batch)
        b = batch["ids"].shape[0]
        counts = out["count"].tolist()  # one host sync per step, for the per-modality logs
        metrics = {"train/loss": out["loss"].detach(), "train/ce": out["ce"].detach(),
                   "train/tokens": float(sum(counts))}
        for i, m in enumerate(MODALITIES):
            if counts[i]:
                metrics[f"train/ce_{m}"] = out["ce_sum"][i] / counts[i]
        if "z_loss" in out:
            metrics["train/z_loss"] = out["z_loss"].detach()
        if "und_code" in out:
            metrics["train/und_code"] = out["und_code"].detach()
        self.log_dict(metrics, batch_size=b)
        self.log("loss", out["loss"].detach(), prog_bar=True, logger=False, batch_size=b)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_step(self, batch: dict[str, Any]) -> None:
        out = self.compute_loss(batch)
        n = out["count"].sum()
        self.eval_metrics["loss"].update(out["loss"].detach(), weight=n)
        self.eval_metrics["ce"].update(out["ce"].detach(), weight=n)
        for i, m in enumerate(MODALITIES):
            count = out["count"][i]
            self.eval_metrics[m].update(out["ce_sum"][i] / count.clamp(min=1), weight=count)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, stage: str) -> None:
        for name, metric in self.eval_metrics.items():
            value = metric.compute()  # synced over DDP ranks; NaN when no rank saw this modality
            if bool(torch.isfinite(value)):  # a modality the set never had stays unlogged
                key = f"{stage}/{name}" if name in ("loss", "ce") else f"{stage}/ce_{name}"
                self.log(key, value, prog_bar=name == "loss")
            metric.reset()

    # -- optimizer ---------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        head = [] if self.und_code_head is None else list(self.und_code_head.named_parameters(prefix="und_code_head"))
        for name, p in [*self.model.named_parameters(), *head]:
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if self.grid_lr_scale != 1.0 and self.model.grid_embed is not None:  # the grid tables, at their own rate
            tables = {id(p) for p in self.model.grid_embed.parameters() if p.requires_grad}
            groups[0]["params"] = [p for p in decay if id(p) not in tables]
            groups.append({"params": [p for p in decay if id(p) in tables], "weight_decay": self.weight_decay,
                           "lr": self.lr * self.grid_lr_scale})
        named = parameter_groups(self.model)
        for group, scale in self.lr_scales.items():  # listed groups, each at its own rate
            own = {id(p) for p in named[group]}
            for g in list(groups):
                if "lr" in g:  # already a group of its own
                    continue
                mine = [p for p in g["params"] if id(p) in own]
                g["params"] = [p for p in g["params"] if id(p) not in own]
                groups.append({"params": mine, "weight_decay": g["weight_decay"], "lr": self.lr * scale})
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=self.betas)
        total = self.max_steps
        if total is None and self._trainer is not None and self._trainer.max_steps > 0:
            total = self._trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.warmup_steps, total, self.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- checkpoints and export --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # plain values only: anygen export reads checkpoints with torch.load(weights_only=True)
        checkpoint["anygen_module"] = "unified"
        checkpoint["anygen_config"] = self.model.config.to_dict()
        checkpoint["tokenizer_dir"] = self.tokenizer_dir

    def engine(self):  # -> anygen.api.AnyGen; imported here so training never pulls in the generator
        """An ``AnyGen`` over this module's model and tokenizer (puts the model in eval mode)."""
        from anygen.api import AnyGen

        return AnyGen(self.model, self.tokenizer)

