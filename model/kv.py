"""A session's KV cache: preallocated per layer, appended in place, cropped by moving a length.

transformers' DynamicLayer concatenates the whole cache on every update, so each question on a
long stream would copy the stream's entire KV (O(stream) per token). These layers grow their
buffers geometrically and write new tokens in place; cropping a question away is free.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, DynamicLayer

# Capacity is reserved in steps of this many tokens (one video frame is ~100 tokens).
_ROUND = 1024


class GrowableKVLayer(DynamicLayer):
    """DynamicLayer semantics (croppable, unbounded) over an in-place, amortized buffer."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._key_buf: torch.Tensor | None = None
        self._value_buf: torch.Tensor | None = None
        self._length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True
        self._reserve(key_states, value_states, key_states.shape[-2])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self._length, self._length + key_states.shape[-2]
        if end > self._key_buf.shape[-2]:
            self._reserve(key_states, value_states, end)
        self._key_buf[..., start:end, :].copy_(key_states)
        self._value_buf[..., start:end, :].copy_(value_states)
        self._set_length(end)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if self.is_initialized and tokens_to_remove:
            self._set_length(max(0, self._length + tokens_to_remove))

    def reset(self) -> None:
        self._key_buf = self._value_buf = None
        self._length = 0
        super().reset()

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    @property
    def reserved_bytes(self) -> int:
        if self._key_buf is None:
            return 0
        return self._key_buf.nbytes + self._value_buf.nbytes

    def _reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        old = 0 if self._key_buf is None else self._key_buf.shape[-2]
        capacity = max(needed, old + old // 2)
        capacity = -(-capacity // _ROUND) * _ROUND
        shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
        key_buf = key_states.new_empty(shape)
        value_buf = value_states.new_empty((*shape[:-1], value_states.shape[-1]))
        if self._length:
            key_buf[..., : self._length, :].copy_(self.keys)
            value_buf[..., : self._length, :].copy_(self.values)
        self._key_buf, self._value_buf = key_buf, value_buf
        self._set_length(self._length)

    def _set_length(self, length: int) -> None:
        self._length = length
        self.keys = self._key_buf[..., :length, :]
        self.values = self._value_buf[..., :length, :]


def new_session_cache(text_config: PreTrainedConfig) -> Cache:
    """One growable layer per decoder layer of the model's text config."""
    return Cache(layers=[GrowableKVLayer() for _ in range(text_config.num_hidden_layers)])


def reserved_bytes(cache: Cache) -> int:
    """Device memory the cache holds, including room reserved for growth."""
    return sum(getattr(layer, "reserved_bytes", 0) for layer in cache.layers)
