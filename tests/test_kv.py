"""The growable KV layer behaves exactly like transformers' DynamicLayer, without re-copying."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from livelens.model.kv import GrowableKVLayer, new_session_cache, reserved_bytes


def _kv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)


def test_matches_dynamic_layer_through_appends_and_crops():
    ours, ref = GrowableKVLayer(), DynamicLayer()
    # Appends across the 1024-token reservation step, crops (question removal), re-appends.
    steps = [("add", 700), ("add", 500), ("crop", -37), ("add", 1), ("add", 900), ("crop", -900)]
    for seed, (op, n) in enumerate(steps):
        if op == "add":
            k, v = _kv(n, seed)
            got, want = ours.update(k, v), ref.update(k, v)
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        else:
            ours.crop(n)
            ref.crop(n)
        assert ours.get_seq_length() == ref.get_seq_length()
    torch.testing.assert_close(ours.keys, ref.keys, rtol=0, atol=0)


def test_appends_within_capacity_write_in_place():
    layer = GrowableKVLayer()
    layer.update(*_kv(10, 0))
    buffer = layer.keys.untyped_storage().data_ptr()
    for seed in range(1, 20):
        layer.update(*_kv(10, seed))
    assert layer.keys.untyped_storage().data_ptr() == buffer
    assert layer.get_seq_length() == 200
    assert layer.reserved_bytes == 2 * 1 * 2 * 1024 * 8 * 4


def test_growth_is_geometric():
    layer = GrowableKVLayer()
    reallocations, last = 0, None
    for seed in range(300):
        layer.update(*_kv(100, seed))
        ptr = layer.keys.untyped_storage().data_ptr()
        reallocations += ptr != last
        last = ptr
    assert layer.get_seq_length() == 30_000
    assert reallocations <= 10


def test_session_cache_has_one_layer_per_decoder_layer(tiny_model):
    cache = new_session_cache(tiny_model.model.config.text_config)
    assert len(cache.layers) == tiny_model.model.config.text_config.num_hidden_layers
    assert reserved_bytes(cache) == 0
