"""KV memory: the paged block pool's bookkeeping (exact block ids, no tensors) and budget
parsing."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config

from livelens.model.kv import (
    BlockCopy,
    BlockPool,
    BlockWrite,
    KVBudget,
    KVBudgetError,
    KVCacheManager,
    KVLayout,
    Placement,
    PoolExhausted,
)


# ------------------------------------------------------------------------- budget, layout
@pytest.mark.parametrize(
    ("text", "budget"),
    [
        ("8GiB", KVBudget(bytes=8 * 2**30)),
        ("512MB", KVBudget(bytes=512 * 10**6)),
        ("1.5 gib", KVBudget(bytes=3 * 2**29)),
        ("1073741824", KVBudget(bytes=2**30)),
        ("0.8", KVBudget(fraction=0.8)),
        ("1", KVBudget(fraction=1.0)),
        ("1.0", KVBudget(fraction=1.0)),
    ],
)
def test_budget_parses_bytes_and_fractions(text: str, budget: KVBudget) -> None:
    assert KVBudget.parse(text) == budget


@pytest.mark.parametrize("text", ["", "abc", "-1", "0", "0.0", "1.5", "8XB", "8 GiB free", "nan"])
def test_budget_rejects_nonsense(text: str) -> None:
    with pytest.raises(KVBudgetError):
        KVBudget.parse(text)


def test_budget_resolves_against_free_memory() -> None:
    assert KVBudget.parse("0.5").resolve(free_bytes=1000) == 500
    assert KVBudget.parse("2KiB").resolve(free_bytes=1000) == 2048


def test_bytes_per_block_from_a_text_config() -> None:
    # Qwen2.5-1.5B's decoder (VideoLLaMA3-2B's LLM): 28 layers, 2 KV heads of 128.
    config = Qwen2Config(
        num_hidden_layers=28, hidden_size=1536, num_attention_heads=12, num_key_value_heads=2
    )
    layout = KVLayout.from_text_config(config, "bfloat16", block_size=16)
    assert (layout.layers, layout.kv_heads, layout.head_dim) == (28, 2, 128)
    assert layout.bytes_per_block == 28 * 2 * 2 * 128 * 2 * 16 == 458_752
    assert layout.blocks_in(KVBudget.parse("1GiB").resolve(0)) == 2**30 // 458_752 == 2340
    with pytest.raises(KVBudgetError):
        layout.blocks_in(458_751)
    with pytest.raises(ValueError, match="unknown KV dtype"):
        KVLayout.from_text_config(config, "int3")


# ------------------------------------------------------------------------------ block pool
def test_pool_reuses_the_oldest_freed_blocks_before_fresh_ones() -> None:
    pool = BlockPool(num_blocks=5, block_size=16)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.release([1, 0]) == [1, 0]
    assert pool.allocate(1) == [1]  # recycled before block 3 is ever used
    assert pool.high_water == 3
    assert pool.allocate(3) == [0, 3, 4]
    assert pool.high_water == 5
    assert pool.num_free == 0
    with pytest.raises(PoolExhausted):
        pool.allocate(1)
    with pytest.raises(ValueError, match="already free"):
        pool.release([2, 2])


def test_shared_blocks_are_freed_by_their_last_holder() -> None:
    pool = BlockPool(num_blocks=2, block_size=4)
    (block,) = pool.allocate(1)
    pool.retain([block])
    assert pool.release([block]) == []
    assert pool.refcount(block) == 1
    assert pool.release([block]) == [block]
    with pytest.raises(ValueError, match="is free"):
        pool.retain([block])


def test_append_places_tokens_across_blocks() -> None:
    kv = KVCacheManager(BlockPool(num_blocks=8, block_size=4))
    kv.open("video")
    assert kv.append("video", 6) == Placement(
        start=0,
        tokens=6,
        writes=(BlockWrite(0, 0, 4), BlockWrite(1, 0, 2)),
        copy=None,
        allocated=(0, 1),
    )
    assert kv.append("video", 1) == Placement(6, 1, (BlockWrite(1, 2, 1),), None, ())
    assert kv.blocks("video") == (0, 1)
    assert kv.tokens("video") == 7


def test_fork_shares_blocks_and_copies_the_partial_block_on_write() -> None:
    kv = KVCacheManager(BlockPool(num_blocks=8, block_size=4))
    kv.open("video")
    kv.append("video", 6)  # blocks 0 (full) and 1 (2 of 4 slots)
    kv.fork("video", "question")
    assert kv.blocks("question") == (0, 1)
    assert kv.tokens("question") == 6
    assert (kv.pool.refcount(0), kv.pool.refcount(1)) == (2, 2)
    # The question's first write copies the shared partial block's 2 filled slots.
    assert kv.blocks_needed("question", 3) == 2
    assert kv.append("question", 3) == Placement(
        start=6,
        tokens=3,
        writes=(BlockWrite(2, 2, 2), BlockWrite(3, 0, 1)),
        copy=BlockCopy(src=1, dst=2, count=2),
        allocated=(2, 3),
    )
    assert kv.blocks("question") == (0, 2, 3)
    assert (kv.pool.refcount(0), kv.pool.refcount(1)) == (2, 1)
    # The video holds block 1 alone again: it keeps filling it in place, no copy.
    assert kv.append("video", 2) == Placement(6, 2, (BlockWrite(1, 2, 2),), None, ())
    # Freeing the question returns only its own blocks; the video's survive.
    assert kv.free("question") == [2, 3]
    assert kv.pool.refcount(0) == 1
    assert kv.free("video") == [0, 1]
    assert kv.pool.num_free == 8


def test_the_video_copies_a_partial_block_it_shares_with_an_unwritten_fork() -> None:
    kv = KVCacheManager(BlockPool(num_blocks=8, block_size=4))
    kv.open("video")
    kv.append("video", 5)
    kv.fork("video", "question")
    placement = kv.append("video", 1)
    assert placement.copy == BlockCopy(src=1, dst=2, count=1)
    assert kv.blocks("video") == (0, 2)
    assert kv.append("question", 1) == Placement(5, 1, (BlockWrite(1, 1, 1),), None, ())


def test_a_fork_of_a_block_aligned_video_copies_nothing() -> None:
    kv = KVCacheManager(BlockPool(num_blocks=8, block_size=4))
    kv.open("video")
    kv.append("video", 8)
    kv.fork("video", "question")
    assert kv.append("question", 1) == Placement(8, 1, (BlockWrite(2, 0, 1),), None, (2,))


def test_reservations_hold_blocks_back_from_others() -> None:
    kv = KVCacheManager(BlockPool(num_blocks=6, block_size=4))
    kv.open("a")
    kv.open("b")
    kv.reserve("a", 3)
    assert kv.available == 3
    with pytest.raises(PoolExhausted):
        kv.reserve("b", 4)
    assert kv.can_allocate("a", 6) and not kv.can_allocate("b", 4)
    assert kv.can_allocate("b", 2, keep_free=1) and not kv.can_allocate("b", 3, keep_free=1)
    kv.append("a", 8)  # 2 blocks drawn from a's promise
    assert kv.reserved("a") == 1
    assert kv.available == 3
    with pytest.raises(PoolExhausted):
        kv.append("b", 16)
    assert kv.free("a") == [0, 1]
    assert kv.available == 6
