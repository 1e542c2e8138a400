"""Generation: the grammar state machine, sampling, the batched streaming ``Generator`` and its events."""

from anygen.generation.generator import GenerationSettings, Generator
from anygen.generation.sampling import SamplingConfig

__all__ = ["GenerationSettings", "Generator", "SamplingConfig"]
