"""Inference: autoregressive generation with a decode cache for every mixer."""

from lclm.inference.generation import LAST_TIMES, GenerationTimes, generate
from lclm.inference.sampling import SamplingOptions, sample

__all__ = ["GenerationTimes", "LAST_TIMES", "SamplingOptions", "generate", "sample"]
