"""What a question may ask of the model: limits and decoding options, without torch.

The websocket protocol and the step scheduler validate against these
without importing the model code; `model/session.py` enforces them too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_QUESTION_CHARS = 2000
MAX_NEW_TOKENS = 1024
"""The longest answer, for every caller (websocket, CLI, API): it fits the answer reserve."""
MIN_TEMPERATURE = 1e-3
"""Smallest non-zero temperature. Below it, logits / temperature can overflow to inf (NaN
probabilities), and sampling that cold is greedy decoding anyway."""


class SessionError(ValueError):
    """Input the session cannot accept; the message is meant for the end user."""


@dataclass(frozen=True)
class SamplingParams:
    """Decoding options; temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float | None = None
    """HF semantics over the answer's own tokens; applied in greedy decoding too. None: the
    checkpoint's generation_config.json value (1.0, i.e. off, when it has none)."""

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise SessionError(
                f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {self.max_new_tokens}"
            )
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 10):
            raise SessionError(f"temperature must be in [0, 10], got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise SessionError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}")
        if not 0 < self.top_p <= 1:
            raise SessionError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SessionError(f"top_k must be >= 0, got {self.top_k}")
        penalty = self.repetition_penalty
        if penalty is not None and not (math.isfinite(penalty) and 0 < penalty <= 10):
            raise SessionError(f"repetition_penalty must be in (0, 10], got {penalty}")
