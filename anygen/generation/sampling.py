"""Sampling settings per modality and a sampler with no host synchronisation.

``SamplingConfig`` is what a user sets (``temperature``, ``top_k``, ``top_p``, ``guidance_scale``,
``image_guidance_scale``, ``guidance_start``),
once for text, once for images and once for video. ``sample`` turns a ``(B, V)`` logits tensor into
``(B,)`` ids with per-row settings given as tensors, so one batch can hold rows writing text next
to rows drawing an image. It never calls ``.item()`` or branches on tensor values: the whole decode
step stays capturable by CUDA graphs / ``torch.compile``. Randomness is the exponential-race form
of categorical sampling (``argmax(p / E)``, ``E ~ Exp(1)``) driven by an explicit
``torch.Generator``, so a seed reproduces the output.

``sample_unfiltered`` is the fast path's sampler for the common image / video setting (no top-k,
no top-p): the same distribution without the sort over the vocabulary. It draws its noise in id
order, so for one seed it picks other (equally distributed) ids than ``sample``; greedy is identical.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch


@dataclass
class SamplingConfig:
    """How one modality is sampled.

    Args:
        temperature: softmax temperature; ``0`` means greedy (argmax).
        top_k: keep the ``k`` most likely ids (``0`` keeps all).
        top_p: nucleus sampling; keep the smallest set with this much mass (``1.0`` keeps all).
        guidance_scale: classifier-free guidance scale inside image / video spans (``1.0`` is off).
        image_guidance_scale: InstructPix2Pix's image guidance, for prompts that hold images or clips (editing,
            a story's next picture): a second twin reads only the prompt's VQ images and clips (``c_m``), and the
            guided logits are ``u + image_guidance_scale·(c_m − u) + guidance_scale·(c − c_m)``: the first scale
            weights the source against the empty context, the second the text against the source. None (the
            default) is plain guidance, ``u + guidance_scale·(c − u)`` (the same as setting it equal to
            ``guidance_scale``); a prompt without images or clips is guided plainly either way.
        guidance_start: the fraction of each image's or clip's codes drawn before guidance turns on (a guidance
            interval, as diffusion samplers limit guidance to part of the schedule): ``0.1`` draws the first tenth
            of the codes (an image's top rows) from the conditional alone and guides the rest; ``0`` (the
            default) guides every code. Must be in ``[0, 1)``.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float = 1.0
    image_guidance_scale: float | None = None
    guidance_start: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = no top-k), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.guidance_scale, (int, float)) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0 (1 = no guidance), got {self.guidance_scale!r}")
        if self.image_guidance_scale is not None and (not isinstance(self.image_guidance_scale, (int, float))
                                                      or isinstance(self.image_guidance_scale, bool)
                                                      or self.image_guidance_scale < 0):
            raise ValueError(f"image_guidance_scale must be None (off) or a number >= 0, got "
                             f"{self.image_guidance_scale!r}")
        if (not isinstance(self.guidance_start, (int, float)) or isinstance(self.guidance_start, bool)
                or not 0 <= self.guidance_start < 1):
            raise ValueError(f"guidance_start must be a fraction in [0, 1) of a span's codes (0: guide every code), "
                             f"got {self.guidance_start!r}")

    @property
    def source_scale(self) -> float:
        """The weight of the prompt's images and clips against the empty context: ``image_guidance_scale``, or
        ``guidance_scale`` when that is None (which makes the two-twin formula plain guidance)."""
        return self.guidance_scale if self.image_guidance_scale is None else float(self.image_guidance_scale)

    @property
    def guided(self) -> bool:
        """Whether a drawing with these settings runs guidance twins at all."""
        return self.guidance_scale != 1.0 or self.source_scale != 1.0

    @classmethod
    def coerce(cls, value: SamplingConfig | dict | None, name: str, default: SamplingConfig) -> SamplingConfig:
        """Accept a ``SamplingConfig``, a dict of its fields, or ``None`` (the default)."""
        if value is None:
            return default
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            accepted = {f.name for f in fields(cls)}
            unknown = set(value) - accepted
            if unknown:
                raise ValueError(f"unknown {name} sampling option(s) {sorted(unknown)}; accepted: {sorted(accepted)}")
            return cls(**{**asdict(default), **value})
        raise TypeError(f"{name} sampling settings must be a SamplingConfig or a dict, got {type(value).__name__}")


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one id per row.

    Args:
        logits: ``(B, V)`` float; ``-inf`` marks ids that are not allowed.
        temperature: ``(B,)``; rows with 0 take the argmax.
        top_k: ``(B,)`` long; 0 keeps all ids.
        top_p: ``(B,)`` float in (0, 1].
        generator: the source of randomness (seeded by the caller).
        noise: ``(B, V)`` ``Exp(1)`` draws to use instead of drawing from ``generator`` (what a compiled step
            takes as an input: ``torch.compile`` cannot trace a ``torch.Generator``).

    Returns:
        ``(B,)`` long ids.
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature.clamp_min(1e-5)[:, None]
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)  # (B, V)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    drop = rank >= k[:, None]
    probs = torch.softmax(sorted_logits, dim=-1)
    # keep the smallest prefix whose mass reaches top_p: drop an id when the mass before it already does
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator) if noise is None else noise
    choice = (probs / race).argmax(dim=-1)  # categorical sample without torch.multinomial's host sync
    sampled = sorted_idx.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(temperature > 0, sampled, greedy)


def sample_unfiltered(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None, *,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one id per row from ``softmax(logits / temperature)``: ``sample`` with ``top_k=0, top_p=1``, no sort.

    Args:
        logits: ``(B, N)`` float; ``-inf`` marks ids that are not allowed.
        temperature: one value for every row (a host float: the caller knows the setting); 0 is greedy.
        generator: the source of randomness.
        noise: ``(B, N)`` ``Exp(1)`` draws to use instead of drawing from ``generator``.

    Returns:
        ``(B,)`` long indices into the last dimension.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator) if noise is None else noise
    return (probs / race).argmax(dim=-1)  # the exponential race: a categorical draw with no host sync
