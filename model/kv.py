"""KV cache memory: the paged block pool of the serving engine.

The block pool (issue 11) is pure bookkeeping, no tensors: a pool of fixed-size blocks sized
once from a memory budget (`--kv-budget`), a free list, reference counts, and one block table
per sequence (a session's video, or a question forked off it). It decides which block slots a
step writes and which partial block is copied on write; the runner owns the tensors.
The runner's `PagedKVCache` (model/runner.py) holds the K/V tensors of the pool's blocks.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

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
    """Block ids 0..n-1 with reference counts.

    Freed blocks are reused oldest-freed first, and before any never-used block: the blocks in
    use stay packed at the low ids, so storage that grows with the highest id in use (the CPU
    runner's) grows with peak use, not with the pool.
    """

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._recycled: deque[int] = deque()
        self._fresh = 0
        """Blocks [_fresh, num_blocks) were never handed out."""
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._recycled) + self.num_blocks - self._fresh

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def high_water(self) -> int:
        """One past the highest block id ever handed out."""
        return self._fresh

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise PoolExhausted(f"{n} blocks asked, {self.num_free} free")
        blocks = [self._recycled.popleft() for _ in range(min(n, len(self._recycled)))]
        fresh = n - len(blocks)
        blocks += range(self._fresh, self._fresh + fresh)
        self._fresh += fresh
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
                self._recycled.append(block)
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

    def rename(self, key: Hashable, new_key: Hashable) -> None:
        """The same table (blocks, tokens, promise) under another key."""
        if new_key in self._tables:
            raise KeyError(f"sequence {new_key!r} already has a block table")
        self._tables[new_key] = self._tables.pop(key)

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
