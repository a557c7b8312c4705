"""Probe: can one packed step over a paged KV cache run through transformers' Qwen2 on the CPU?

The engine's runner (issue 11) will run ONE varlen prefill and ONE decode over every session per
step, with the KV in model/kv.py's block pool. This script builds such steps with the real
bookkeeping (KVCacheManager: append, fork, copy-on-write), executes them through transformers'
Qwen2Model with the KV storage swapped for a paged one, and compares the logits of every new
token with a plain forward of that sequence alone (fp32). Attention paths tried:

- sdpa / eager: transformers' own attention interfaces over keys gathered from the pool by slot
  index (what its continuous batching does for sdpa/eager), one additive mask for the packed batch;
- flex: torch FlexAttention reading the whole pool in place (no gather), a BlockMask that maps
  each query to its own sequence's blocks by a block table (a question shares its video's
  blocks); run eagerly and through torch.compile (transformers' `flex_attention` interface).

Prints a markdown table, then one summary line
`max_abs_diff=<x> exact=<bool> fastest=<path> <path>_ms=<median>...`.
Run: python benchmarks/paged_attention.py [--hidden 1536 --layers 2 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM

from livelens.model.kv import BlockPool, KVCacheManager, Placement

BLOCK = 16


class PagedStorage:
    """Per-layer K/V tensors of shape (blocks * BLOCK, kv_heads, head_dim), addressed by slot.

    transformers' attention layers call `update(key, value, layer_idx, kwargs=...)`; this writes
    the step's new keys at their slots and returns what the attention path reads: the gathered
    keys of every sequence in the batch (`read` set), or the whole pool (`read` None).
    """

    def __init__(self, config: Qwen2Config, blocks: int) -> None:
        kv_heads, head_dim = (
            config.num_key_value_heads,
            config.hidden_size // config.num_attention_heads,
        )
        shape = (blocks * BLOCK, kv_heads, head_dim)
        self.keys = [torch.zeros(shape) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape) for _ in range(config.num_hidden_layers)]
        self.write: torch.Tensor | None = None
        self.read: torch.Tensor | None = None

    def copy_blocks(self, src: int, dst: int, count: int) -> None:
        for store in (*self.keys, *self.values):
            store[dst * BLOCK : dst * BLOCK + count] = store[src * BLOCK : src * BLOCK + count]

    def update(self, key, value, layer_idx, *args, **kwargs):
        # (1, heads, tokens, dim) <-> (slots, heads, dim)
        self.keys[layer_idx].index_copy_(0, self.write, key[0].transpose(0, 1))
        self.values[layer_idx].index_copy_(0, self.write, value[0].transpose(0, 1))
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.read is not None:
            k, v = k.index_select(0, self.read), v.index_select(0, self.read)
        return k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)


@dataclass
class Item:
    """One sequence's share of a step: its new tokens and where they go."""

    key: str
    ids: list[int]
    placement: Placement
    table: tuple[int, ...]


def slots(table: tuple[int, ...], positions: range) -> list[int]:
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in positions]


def gather_mask(items: list[Item]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read slots of every sequence (positions 0..end) and the packed additive causal mask."""
    q_seq, q_pos, k_seq, k_pos, read = [], [], [], [], []
    for i, item in enumerate(items):
        start, end = item.placement.start, item.placement.start + item.placement.tokens
        q_seq += [i] * (end - start)
        q_pos += list(range(start, end))
        k_seq += [i] * end
        k_pos += list(range(end))
        read += slots(item.table, range(end))
    allowed = (torch.tensor(q_seq)[:, None] == torch.tensor(k_seq)[None]) & (
        torch.tensor(k_pos)[None] <= torch.tensor(q_pos)[:, None]
    )
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return torch.tensor(read), mask[None, None]


def paged_block_mask(items: list[Item], pool_slots: int) -> BlockMask:
    """A mask over the whole pool: query -> its sequence's logical position of each slot."""
    blocks = pool_slots // BLOCK
    logical = torch.full((len(items), blocks), -1, dtype=torch.long)
    q_seq, q_pos = [], []
    for i, item in enumerate(items):
        for index, block in enumerate(item.table):
            logical[i, block] = index
        start = item.placement.start
        q_seq += [i] * item.placement.tokens
        q_pos += list(range(start, start + item.placement.tokens))
    q_seq_t, q_pos_t = torch.tensor(q_seq), torch.tensor(q_pos)

    def mask_mod(b, h, q, kv):
        index = logical[q_seq_t[q], kv // BLOCK]
        return (index >= 0) & (index * BLOCK + kv % BLOCK <= q_pos_t[q])

    return create_block_mask(mask_mod, 1, None, len(q_seq), pool_slots, device="cpu")


def eager_flex(module, query, key, value, attention_mask, scaling=None, **kwargs):
    out = flex_attention(
        query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("flex_eager", eager_flex)


def run_step(model, storage: PagedStorage, items: list[Item], path: str) -> torch.Tensor:
    """One packed forward of every item's new tokens; returns their logits (tokens, vocab)."""
    storage.write = torch.tensor(
        [
            s
            for item in items
            for s in slots(
                item.table,
                range(item.placement.start, item.placement.start + item.placement.tokens),
            )
        ]
    )
    if path in ("sdpa", "eager"):
        storage.read, mask = gather_mask(items)
    else:
        storage.read, mask = None, paged_block_mask(items, storage.keys[0].shape[0])
    ids = torch.tensor([[t for item in items for t in item.ids]])
    positions = torch.tensor(
        [
            [
                p
                for item in items
                for p in range(item.placement.start, item.placement.start + item.placement.tokens)
            ]
        ]
    )
    model.config._attn_implementation = {
        "flex": "flex_eager",
        "flex_compiled": "flex_attention",
    }.get(path, path)
    out = model.model(
        input_ids=ids,
        position_ids=positions,
        attention_mask={"full_attention": mask},
        cache=storage,
    )
    return model.lm_head(out.last_hidden_state[0])


def reference(model, ids: list[int], last: int) -> torch.Tensor:
    model.config._attn_implementation = "sdpa"
    return model(input_ids=torch.tensor([ids])).logits[0, -last:]


def scenario(config: Qwen2Config, contexts: list[int], question: int, extra: int, seed: int):
    """Step 1 prefills every session's video; step 2 forks a question off session 0 (copy-on-write
    of its partial block) while session 0 keeps appending, session 1 decodes one token, the rest
    append `extra` tokens."""
    g = torch.Generator().manual_seed(seed)

    def rand(n: int) -> list[int]:
        return torch.randint(0, config.vocab_size, (n,), generator=g).tolist()

    kv = KVCacheManager(BlockPool(4 * sum(contexts) // BLOCK + 64, BLOCK))
    videos = {f"s{i}": rand(n) for i, n in enumerate(contexts)}
    step1 = []
    for key, ids in videos.items():
        kv.open(key)
        step1.append(Item(key, ids, kv.append(key, len(ids)), ()))
    step1 = [Item(i.key, i.ids, i.placement, kv.blocks(i.key)) for i in step1]
    kv.fork("s0", "q")
    new = {"q": rand(question), "s0": rand(extra), "s1": rand(1)}
    new |= {key: rand(extra) for key in list(videos)[2:]}
    step2 = []
    for key, ids in new.items():
        step2.append(Item(key, ids, kv.append(key, len(ids)), ()))
    step2 = [Item(i.key, i.ids, i.placement, kv.blocks(i.key)) for i in step2]
    full = {key: videos.get(key, videos["s0"]) + ids for key, ids in new.items()}
    return kv, step1, step2, full


def check_generate_batch(model, contexts: list[int], new_tokens: int = 8) -> None:
    """transformers' own continuous batching on this machine: same greedy tokens as generate?"""
    from transformers import GenerationConfig

    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in contexts
    ]
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1)
    model.config._attn_implementation = "sdpa"
    started = time.perf_counter()
    batched = model.generate_batch(inputs=prompts, generation_config=config)
    seconds = time.perf_counter() - started
    got = [
        batched[key].generated_tokens
        for key in sorted(batched, key=lambda k: int(k.split("_")[-1]))
    ]
    want = [
        model.generate(torch.tensor([p]), generation_config=config)[0, len(p) :].tolist()
        for p in prompts
    ]
    print(
        f"\ngenerate_batch: {len(prompts)} prompts x {new_tokens} tokens in {seconds:.1f} s; "
        f"greedy tokens equal to generate: {got == want}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--contexts", default="45,70,20,33")
    parser.add_argument("--question", type=int, default=7)
    parser.add_argument("--extra", type=int, default=13)
    parser.add_argument("--paths", default="sdpa,eager,flex,flex_compiled")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument(
        "--generate-batch", action="store_true", help="also run transformers' generate_batch"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=8192,
    )
    model = Qwen2ForCausalLM(config).eval()
    contexts = [int(n) for n in args.contexts.split(",")]
    print(
        f"torch {torch.__version__}; hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads}/{args.kv_heads} heads; contexts {contexts}; fp32 CPU\n"
    )
    print("| path | max abs logit diff | step-2 tokens | first step-2 ms | median step-2 ms |")
    print("|---|---:|---:|---:|---:|")
    results: dict[str, tuple[float, float]] = {}
    with torch.inference_mode():
        for path in args.paths.split(","):
            kv, step1, step2, full = scenario(config, contexts, args.question, args.extra, seed=1)
            storage = PagedStorage(config, kv.pool.num_blocks)
            run_step(model, storage, step1, path)
            for item in step2:
                if item.placement.copy is not None:
                    c = item.placement.copy
                    storage.copy_blocks(c.src, c.dst, c.count)
            times, logits = [], None
            for _ in range(args.repeats):  # rewriting the same slots: same result each time
                started = time.perf_counter()
                logits = run_step(model, storage, step2, path)
                times.append((time.perf_counter() - started) * 1e3)
            expected = torch.cat([reference(model, full[i.key], len(i.ids)) for i in step2])
            diff = (logits - expected).abs().max().item()
            tokens = sum(len(i.ids) for i in step2)
            median = statistics.median(times[1:] or times)
            print(f"| {path} | {diff:.2e} | {tokens} | {times[0]:.1f} | {median:.1f} |")
            results[path] = (diff, median)
        if args.generate_batch:
            check_generate_batch(model, contexts)
    fastest = min(results, key=lambda p: results[p][1])
    worst = max(diff for diff, _ in results.values())
    ms = " ".join(f"{path}_ms={median:.1f}" for path, (_, median) in results.items())
    print(f"\nmax_abs_diff={worst:.2e} exact={worst <= 1e-4} fastest={fastest} {ms}")


if __name__ == "__main__":
    main()
