"""KV cache memory: the paged block pool of the serving engine, and the contiguous session cache.

The block pool (issue 11) is pure bookkeeping, no tensors: a pool of fixed-size blocks sized
once from a memory budget (`--kv-budget`), a free list, reference counts, and one block table
per sequence (a session's video, or a question forked off it). It decides which block slots a
step writes and which partial block is copied on write; the runner owns the tensors.

`GrowableKVLayer` / `new_session_cache` are the contiguous per-session cache the live service
still uses (model/worker.py, model/session.py) until the runner executes plans over the pool.
transformers' DynamicLayer concatenates the whole cache on every update, so each question on a
long stream would copy the stream's entire KV (O(stream) per token). These layers grow their
buffers geometrically and write new tokens in place; cropping a question away is free.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

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


# ------------------------------------------------------------------------------ paged pool

DEFAULT_BLOCK_SIZE = 16
"""Tokens per block: small enough that a question's copied partial block is cheap, large enough
that block tables stay short (a 1-fps stream adds ~100-200 tokens per second)."""

DEFAULT_KV_BUDGET = "0.8"
"""`--kv-budget` default: 80% of the device memory free after the model is loaded, leaving the
rest for activations of the batched vision pass and prefill."""

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


class KVBudgetError(ValueError):
    """A `--kv-budget` value that cannot be understood or cannot hold a single block."""


@dataclass(frozen=True)
class KVBudget:
    """How much memory the block pool takes: a byte count, or a fraction of free memory."""

    bytes: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.fraction is None):
            raise KVBudgetError("a KV budget is either bytes or a fraction, not both or neither")
        if self.bytes is not None and self.bytes <= 0:
            raise KVBudgetError(f"the KV budget must be positive, got {self.bytes} bytes")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise KVBudgetError(f"a KV budget fraction must be in (0, 1], got {self.fraction}")

    @classmethod
    def parse(cls, text: str) -> KVBudget:
        """`"8GiB"`, `"512MB"`, `"1073741824"` (bytes) or `"0.8"` (a fraction of free memory).

        A bare number is a fraction when it is at most 1 and written with a decimal point or
        is exactly 1; any other bare number is bytes.
        """
        match = _BUDGET.match(text)
        if match is None or match.group(2).lower() not in _UNITS:
            raise KVBudgetError(
                f"cannot read KV budget {text!r}: use bytes with a unit (8GiB, 512MB) "
                "or a fraction of free device memory (0.8)"
            )
        number, unit = match.group(1), match.group(2).lower()
        if not unit and ("." in number or number == "1"):
            value = float(number)
            if value > 1:
                raise KVBudgetError(f"a KV budget fraction must be in (0, 1], got {number}")
            return cls(fraction=value)
        return cls(bytes=int(float(number) * _UNITS[unit]))

    def resolve(self, free_bytes: int) -> int:
        """Bytes for the pool given the device's free memory now."""
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None
        return int(free_bytes * self.fraction)


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class KVLayout:
    """The shape of one KV block across the whole decoder (what one block id stands for)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    block_size: int = DEFAULT_BLOCK_SIZE
    """Tokens per block."""

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim", "dtype_bytes", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_text_config(
        cls, config: PreTrainedConfig, dtype: str, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> KVLayout:
        """Layout of a Qwen2-style decoder config; `dtype` is the cache dtype's name."""
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"unknown KV dtype {dtype!r}; known: {sorted(_DTYPE_BYTES)}")
        return cls(
            layers=int(config.num_hidden_layers),
            kv_heads=kv_heads,
            head_dim=int(head_dim),
            dtype_bytes=_DTYPE_BYTES[dtype],
            block_size=block_size,
        )

    @property
    def bytes_per_block(self) -> int:
        """layers x (K and V) x kv_heads x head_dim x dtype size x block_size."""
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype_bytes * self.block_size

    def blocks_in(self, budget_bytes: int) -> int:
        """Whole blocks that fit in `budget_bytes`; a budget below one block is an error."""
        blocks = budget_bytes // self.bytes_per_block
        if blocks < 1:
            raise KVBudgetError(
                f"a KV budget of {budget_bytes} bytes holds no block "
                f"of {self.bytes_per_block} bytes"
            )
        return blocks


class PoolExhausted(RuntimeError):
    """The pool has fewer free blocks than asked for (callers check `num_free` first)."""


class BlockPool:
    """Block ids 0..n-1 with reference counts; free blocks are reused oldest-freed first."""

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"{n} blocks asked, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def retain(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            if self._refs[block] < 1:
                raise ValueError(f"block {block} is free; only held blocks can be shared")
            self._refs[block] += 1

    def release(self, blocks: Sequence[int]) -> list[int]:
        """Drop one reference from each block; returns the blocks that became free."""
        freed = []
        for block in blocks:
            if self._refs[block] < 1:
                raise ValueError(f"block {block} is already free")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                freed.append(block)
                self._free.append(block)
        return freed


@dataclass(frozen=True)
class BlockWrite:
    """`count` token slots of `block` starting at slot `start` receive new KV this step."""

    block: int
    start: int
    count: int


@dataclass(frozen=True)
class BlockCopy:
    """Copy slots [0, count) of block `src` into block `dst` before the step writes anything."""

    src: int
    dst: int
    count: int


@dataclass(frozen=True)
class Placement:
    """Where one sequence's next tokens go: positions [start, start + tokens)."""

    start: int
    tokens: int
    writes: tuple[BlockWrite, ...]
    copy: BlockCopy | None
    allocated: tuple[int, ...]


@dataclass
class _Table:
    blocks: list[int] = field(default_factory=list)
    tokens: int = 0
    reserved: int = 0
    """Blocks promised to this sequence and not yet allocated (see `KVCacheManager.reserve`)."""


class KVCacheManager:
    """Block tables over one pool: append, fork (shares blocks), copy-on-write, free.

    Copy-on-write: a sequence about to write into a partially filled last block that another
    sequence also references copies that block's filled slots into a fresh block first, and
    drops its reference to the shared one. A question forked off a session's video therefore
    copies the video's partial last block at its first write, and the video, once it is the
    only holder again, keeps filling that block in place.

    Reservations: a sequence can be promised blocks ahead of time (a session's minimum, an
    answer's worst case); `available` excludes every outstanding promise, and a sequence's own
    allocations draw on its promise first.
    """

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self._tables: dict[Hashable, _Table] = {}

    # ----------------------------------------------------------------- views
    def __contains__(self, key: Hashable) -> bool:
        return key in self._tables

    def blocks(self, key: Hashable) -> tuple[int, ...]:
        return tuple(self._tables[key].blocks)

    def tokens(self, key: Hashable) -> int:
        return self._tables[key].tokens

    def reserved(self, key: Hashable) -> int:
        return self._tables[key].reserved

    @property
    def available(self) -> int:
        """Free blocks not promised to any sequence."""
        return self.pool.num_free - sum(t.reserved for t in self._tables.values())

    def blocks_needed(self, key: Hashable, tokens: int) -> int:
        """New blocks `append(key, tokens)` would allocate (a copy-on-write block included)."""
        table = self._tables[key]
        total = -(-(table.tokens + tokens) // self.block_size)
        return max(0, total - len(table.blocks)) + int(tokens > 0 and self._shared_tail(table))

    def can_allocate(self, key: Hashable, blocks: int, *, keep_free: int = 0) -> bool:
        """Whether `key` may take `blocks` new blocks, leaving `keep_free` unpromised ones."""
        return blocks <= self._tables[key].reserved + max(0, self.available - keep_free)

    # ------------------------------------------------------------- mutations
    def open(self, key: Hashable) -> None:
        if key in self._tables:
            raise KeyError(f"sequence {key!r} already has a block table")
        self._tables[key] = _Table()

    def reserve(self, key: Hashable, blocks: int) -> None:
        """Promise `key` up to `blocks` more blocks; fails unless that many are available."""
        if blocks > self.available:
            raise PoolExhausted(f"{blocks} blocks to reserve, {self.available} available")
        self._tables[key].reserved += blocks

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """A new sequence that sees the parent's tokens, sharing (not copying) its blocks."""
        source = self._tables[parent]
        self.open(child)
        shared = source.blocks[: -(-source.tokens // self.block_size)]
        self.pool.retain(shared)
        self._tables[child].blocks = list(shared)
        self._tables[child].tokens = source.tokens

    def append(self, key: Hashable, tokens: int) -> Placement:
        """Place `tokens` more tokens of `key`: allocate, copy a shared tail, list the writes."""
        table = self._tables[key]
        needed = self.blocks_needed(key, tokens)
        if not self.can_allocate(key, needed):
            raise PoolExhausted(f"{key!r} needs {needed} blocks, {self.available} available")
        allocated = self._allocate(table, needed)
        copy = None
        fill = table.tokens % self.block_size
        if tokens and self._shared_tail(table):
            index = table.tokens // self.block_size
            copy = BlockCopy(src=table.blocks[index], dst=allocated[0], count=fill)
            self.pool.release([copy.src])
            table.blocks[index] = copy.dst
            table.blocks += allocated[1:]
        else:
            table.blocks += allocated
        start, writes, position = table.tokens, [], table.tokens
        while position < table.tokens + tokens:
            block, slot = divmod(position, self.block_size)
            count = min(self.block_size - slot, table.tokens + tokens - position)
            writes.append(BlockWrite(table.blocks[block], slot, count))
            position += count
        table.tokens += tokens
        return Placement(start, tokens, tuple(writes), copy, tuple(allocated))

    def free(self, key: Hashable) -> list[int]:
        """Forget `key`'s table and promise; returns the blocks that became free."""
        table = self._tables.pop(key)
        return self.pool.release(table.blocks)

    def _allocate(self, table: _Table, n: int) -> list[int]:
        blocks = self.pool.allocate(n)
        table.reserved = max(0, table.reserved - n)
        return blocks

    def _shared_tail(self, table: _Table) -> bool:
        if table.tokens % self.block_size == 0:
            return False
        return self.pool.refcount(table.blocks[table.tokens // self.block_size]) > 1


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` tokens from an empty table."""
    return math.ceil(tokens / block_size)
