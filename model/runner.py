"""Tensor work of one engine step on transformers' VideoLLaMA3 modules, over a paged KV cache.

`ModelRunner.execute(plan, inputs)` runs everything a `StepPlan` (model/scheduler.py) asks for,
batched across sessions and answers:

1. the plan's copy-on-write block copies;
2. ONE packed vision pass over every frame of the step (one `video_grid_thw` row per frame, so
   the vision tower's per-frame `cu_seqlens` keep frames independent and sessions may differ in
   grid), after which DiffFP's keep masks select the kept visual tokens;
3. ONE forward of the Qwen2 decoder over the concatenation of every session's new frame tokens,
   every forked question's prompt and every answer's decode token, with each token's position
   in its own sequence. The decoder's attention layers call `PagedKVCache.update`, which writes
   the step's keys and values at the plan's slots and hands back the keys each sequence may read.
   The mask is prebuilt (`attention_mask={"full_attention": ...}`), so transformers' mask builder
   is skipped and its registered attention interface (sdpa here) does the arithmetic.

The logits of a question's last prompt token and of every decode token come back per request;
sampling is the engine's. The same code runs on the CPU and the GPU; only the kernel behind
transformers' attention interface differs (see docs/engine.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from livelens.model.kv import BlockCopy, KVLayout
from livelens.model.loading import LoadedModel
from livelens.model.scheduler import Frame, StepPlan

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


FrameKey = tuple[str, int, bool]
"""(session id, frame index, rebuild): how a plan's frame finds its input."""


def frame_key(session_id: str, frame: Frame) -> FrameKey:
    return (session_id, frame.index, frame.rebuild)


@dataclass(frozen=True)
class FrameInput:
    """One frame as the runner needs it: DiffFP's output (or, for a frame prefilled again into
    a rebuilt window, its cached features) and the label tokens before it."""

    label_ids: tuple[int, ...]
    """Text tokens before the kept visual tokens (empty when the frame keeps no token: its
    label then joins the next frame's text)."""
    patches: torch.Tensor | None = None
    """(gh * gw, 3 * p * p) normalized pixel patches, VideoLLaMA3 patch order."""
    gh: int = 0
    gw: int = 0
    keep: torch.Tensor | None = None
    """(tokens,) bool: the merged visual tokens DiffFP keeps."""
    anchor: bool = False
    """Keep all of the frame's projected features (`StepResult.full`): a rebuilt window may
    start at it, and its first frame shows every token."""
    features: torch.Tensor | None = None
    """Projected visual features to prefill instead of encoding pixels (a rebuilt window)."""

    @property
    def kept(self) -> int:
        if self.features is not None:
            return int(self.features.shape[0])
        assert self.keep is not None
        return int(self.keep.sum())


class PagedKVCache:
    """Per-layer K and V storage of the block pool, addressed by slot (block * size + offset).

    transformers' attention layers call `update(key, value, layer_idx, kwargs=...)` once per
    layer: the step's new keys go to `write` slots, and the keys at `read` slots (every sequence
    of the step, concatenated) come back for the attention kernel. On the GPU the storage is
    allocated once for the whole pool; on the CPU it grows with the highest block in use (the
    pool hands out freed blocks before fresh ones), so a large budget costs nothing until used.
    """

    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
        preallocate: bool,
    ) -> None:
        self.layout = layout
        self.block_size = layout.block_size
        self.num_blocks = num_blocks
        self.device, self.dtype = device, dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0
        self.write: torch.Tensor | None = None
        self.read: torch.Tensor | None = None
        self.ensure(num_blocks if preallocate else min(num_blocks, 64))

    def ensure(self, blocks: int) -> None:
        """Make block ids < `blocks` addressable (geometric growth, capped at the pool)."""
        if blocks <= self.capacity:
            return
        if blocks > self.num_blocks:
            raise ValueError(f"block {blocks - 1} is outside the pool of {self.num_blocks}")
        capacity = min(self.num_blocks, max(blocks, 2 * self.capacity))
        shape = (capacity * self.block_size, self.layout.kv_heads, self.layout.head_dim)
        grown = []
        for old in (*self.keys, *self.values) or [None] * (2 * self.layout.layers):
            new = torch.zeros(shape, device=self.device, dtype=self.dtype)
            if old is not None:
                new[: old.shape[0]] = old
            grown.append(new)
        self.keys, self.values = grown[: self.layout.layers], grown[self.layout.layers :]
        self.capacity = capacity

    @property
    def allocated_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def copy_blocks(self, copies: Sequence[BlockCopy]) -> None:
        """Copy-on-write: slots [0, count) of each `src` block into its `dst` block."""
        if not copies:
            return
        size = self.block_size
        src = torch.tensor(
            [c.src * size + i for c in copies for i in range(c.count)], device=self.device
        )
        dst = torch.tensor(
            [c.dst * size + i for c in copies for i in range(c.count)], device=self.device
        )
        for store in (*self.keys, *self.values):
            store.index_copy_(0, dst, store.index_select(0, src))

    def bind(self, write: torch.Tensor, read: torch.Tensor) -> None:
        self.write, self.read = write, read

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """(1, kv_heads, tokens, dim) new keys in; (1, kv_heads, read, dim) keys out."""
        assert self.write is not None and self.read is not None, "bind() before the forward"
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(0, self.write, key_states[0].transpose(0, 1).to(self.dtype))
        values.index_copy_(0, self.write, value_states[0].transpose(0, 1).to(self.dtype))
        k = keys.index_select(0, self.read).transpose(0, 1).unsqueeze(0)
        v = values.index_select(0, self.read).transpose(0, 1).unsqueeze(0)
        return k, v


@dataclass
class _Layout:
    """One sequence's new tokens before embedding: token ids and visual features, in order."""

    pieces: list[Sequence[int] | torch.Tensor]
    start: int
    table: tuple[int, ...]
    request_id: str | None = None


@dataclass
class _Sequence:
    """One sequence's share of the packed forward."""

    embeds: list[torch.Tensor]
    start: int
    table: tuple[int, ...]
    request_id: str | None = None
    """Set for questions and decodes: the logits of its last token are wanted."""

    @property
    def tokens(self) -> int:
        return sum(e.shape[0] for e in self.embeds)


@dataclass(frozen=True)
class Segment:
    """One sequence in a packed step: its query rows and the key rows gathered for it."""

    query_start: int
    queries: int
    key_start: int
    keys: int
    """All of the sequence's positions up to its last new token: query i (of `queries`, the
    last ones) sees keys [0, keys - queries + i]."""


@dataclass(frozen=True)
class PackedLayout:
    """How the packed step's queries and gathered keys split into sequences."""

    segments: tuple[Segment, ...]


PACKED_ATTENTION = "livelens_packed"


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: PackedLayout,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention of a packed step, sequence by sequence, through torch's sdpa.

    query (1, heads, queries, dim); key/value (1, kv_heads, keys, dim) as `PagedKVCache.update`
    gathered them, sequence after sequence. Each sequence attends only to its own keys, causally
    from its first new position, so the work is the sum over sequences of queries x keys, not
    all queries x all keys as one dense mask would be.
    """
    outputs = []
    for seg in attention_mask.segments:
        q = query[:, :, seg.query_start : seg.query_start + seg.queries]
        k = key[:, :, seg.key_start : seg.key_start + seg.keys]
        v = value[:, :, seg.key_start : seg.key_start + seg.keys]
        mask = None
        if seg.queries > 1:
            first = seg.keys - seg.queries
            rows = torch.arange(seg.queries, device=query.device)[:, None]
            mask = torch.arange(seg.keys, device=query.device)[None] <= first + rows
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True
            )
        )
    out = torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


@dataclass(frozen=True)
class StepResult:
    logits: dict[str, torch.Tensor]
    """Request id -> float32 logits of its next token (vocabulary,)."""
    features: dict[tuple[str, int], torch.Tensor]
    """(session id, frame index) -> the kept projected visual features a live frame prefilled."""
    full: dict[tuple[str, int], torch.Tensor]
    """(session id, frame index) -> every projected feature of an anchor frame."""


class ModelRunner:
    """The model's tensor operations for the engine; owns the paged KV storage."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self._embed = self.model.get_input_embeddings()
        self.merge_size = 2
        self.patch_size = int(self.model.config.vision_config.patch_size)
        self.text_config = self.model.config.text_config
        self.kv: PagedKVCache | None = None

    # --------------------------------------------------------------- storage
    def kv_layout(self, block_size: int) -> KVLayout:
        return KVLayout.from_text_config(
            self.text_config, _DTYPE_NAMES.get(self.dtype, "float32"), block_size
        )

    def allocate_kv(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """The storage of a pool of `num_blocks` blocks (all of it up front on an accelerator)."""
        self.kv = PagedKVCache(
            self.kv_layout(block_size),
            num_blocks,
            device=self.device,
            dtype=self.dtype,
            preallocate=self.device.type != "cpu",
        )
        return self.kv

    # ------------------------------------------------------------- one step
    @torch.inference_mode()
    def execute(self, plan: StepPlan, frames: Mapping[FrameKey, FrameInput]) -> StepResult:
        """Run a plan; `frames` holds the input of every frame the plan prefills."""
        kv = self.kv
        if kv is None:
            raise RuntimeError("allocate_kv() before execute()")
        highest = max((b for p in plan.placements for b in p.allocated), default=-1)
        kv.ensure(highest + 1)
        kv.copy_blocks(plan.copies)

        wanted = [
            frame_key(prefill.session_id, frame)
            for prefill in plan.frames
            for frame in prefill.frames
            if not frame.rebuild
            and frames[frame_key(prefill.session_id, frame)].features is None
            and (frame.tokens or frames[frame_key(prefill.session_id, frame)].anchor)
        ]
        encoded = self.encode([frames[key] for key in wanted])
        kept = {key[:2]: k for key, (k, _) in zip(wanted, encoded, strict=True)}
        full = {key[:2]: f for key, (_, f) in zip(wanted, encoded, strict=True) if f is not None}

        # Each sequence's pieces in order: token ids or visual features.
        layouts: list[_Layout] = [
            _Layout([(d.token_id,)], d.placement.start, d.block_table, d.request_id)
            for d in plan.decodes
        ]
        layouts += [
            _Layout([q.token_ids], q.placement.start, q.block_table, q.request_id)
            for q in plan.questions
        ]
        for prefill in plan.frames:
            pieces: list[Sequence[int] | torch.Tensor] = []
            for frame in prefill.frames:
                if not frame.tokens:
                    continue
                item = frames[frame_key(prefill.session_id, frame)]
                visual = (
                    item.features.to(self.device, self.dtype)
                    if item.features is not None
                    else kept[(prefill.session_id, frame.index)]
                )
                pieces += [item.label_ids, visual]
            if pieces:
                layouts.append(_Layout(pieces, prefill.placement.start, prefill.block_table))
        sequences = self._embed_layouts(layouts)
        logits = self.forward(sequences) if sequences else {}
        return StepResult(logits=logits, features=kept, full=full)

    def _embed_layouts(self, layouts: list[_Layout]) -> list[_Sequence]:
        """Every token id of the step through the embedding table in ONE lookup."""
        texts = [p for layout in layouts for p in layout.pieces if not isinstance(p, torch.Tensor)]
        flat = [i for ids in texts for i in ids]
        embedded = iter(self.embed_tokens(flat).split([len(ids) for ids in texts]) if flat else ())
        return [
            _Sequence(
                [p if isinstance(p, torch.Tensor) else next(embedded) for p in layout.pieces],
                layout.start,
                layout.table,
                layout.request_id,
            )
            for layout in layouts
        ]

    def encode(
        self, frames: Sequence[FrameInput]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """ONE vision pass over `frames` (any grids) -> per frame (kept features (n_i, D), all
        of its features for an anchor, else None)."""
        if not frames:
            return []
        # Consecutive frames of one grid share a grid row (t, gh, gw): the vision tower's
        # position code runs per row, its attention per frame either way.
        rows: list[tuple[int, int, int]] = []
        for f in frames:
            if rows and rows[-1][1:] == (f.gh, f.gw):
                rows[-1] = (rows[-1][0] + 1, f.gh, f.gw)
            else:
                rows.append((1, f.gh, f.gw))
        patches = [f.patches for f in frames]
        assert all(p is not None for p in patches), "a live frame comes with its patches"
        out = self.encode_frames(torch.cat(patches), rows)  # type: ignore[arg-type]
        per_frame = [
            feats for row, (t, _, _) in zip(out, rows, strict=True) for feats in row.chunk(t)
        ]
        # An anchor's features outlive the step (the window keeps them): a copy, not a view
        # that would keep the whole packed output of the step alive with it.
        return [
            (feats[f.keep.to(feats.device)], feats.clone() if f.anchor else None)  # type: ignore[union-attr]
            for feats, f in zip(per_frame, frames, strict=True)
        ]

    @torch.inference_mode()
    def encode_frames(
        self, patches: torch.Tensor, rows: Sequence[tuple[int, int, int]]
    ) -> list[torch.Tensor]:
        """Vision tower + projector over packed frames, grid rows (t, gh, gw) -> per row
        (t * tokens, D) features."""
        grid = torch.tensor(list(rows), device=self.device)
        merge = torch.full((len(rows),), self.merge_size, device=self.device)
        out = self.model.model.get_video_features(
            pixel_values_videos=patches.to(self.device, self.dtype),
            video_grid_thw=grid,
            video_merge_sizes=merge,
            return_dict=True,
        )
        return list(out.pooler_output)

    @torch.inference_mode()
    def embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        return self._embed(torch.tensor(list(ids), device=self.device, dtype=torch.long))

    @torch.inference_mode()
    def forward(self, sequences: list[_Sequence]) -> dict[str, torch.Tensor]:
        """The packed decoder forward; returns the logits of each request's last token."""
        kv = self.kv
        assert kv is not None
        size = kv.block_size
        write, read, positions, segments, last = [], [], [], [], {}
        queries = keys = 0
        for seq in sequences:
            end = seq.start + seq.tokens
            table = torch.tensor(seq.table, dtype=torch.long)
            span = torch.arange(end)
            slots = table[span // size] * size + span % size
            write.append(slots[seq.start :])
            read.append(slots)
            positions.append(span[seq.start :])
            segments.append(Segment(queries, seq.tokens, keys, end))
            queries += seq.tokens
            keys += end
            if seq.request_id is not None:
                last[seq.request_id] = queries - 1
        kv.bind(torch.cat(write).to(self.device), torch.cat(read).to(self.device))
        embeds = torch.cat([e for seq in sequences for e in seq.embeds]).to(self.dtype)
        hidden = self.prefill_packed(
            embeds, torch.cat(positions).to(self.device), PackedLayout(tuple(segments)), kv
        )
        if not last:
            return {}
        rows = torch.tensor(list(last.values()), device=self.device)
        logits = self.logits(hidden[rows], list(last))
        return dict(zip(last, logits, strict=True))

    @torch.inference_mode()
    def prefill_packed(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        layout: PackedLayout,
        kv: PagedKVCache,
    ) -> torch.Tensor:
        """The decoder over packed (L, D) embeddings -> (L, D) last hidden states.

        The layout rides in transformers' `attention_mask` slot (a prebuilt mask mapping skips
        its mask builder) and reaches the `livelens_packed` attention interface, which the
        decoder's layers use for this call only.
        """
        language_model = self.model.model.language_model
        config = language_model.config
        previous = config._attn_implementation
        config._attn_implementation = PACKED_ATTENTION
        try:
            out = language_model(
                inputs_embeds=embeds.unsqueeze(0),
                position_ids=positions.unsqueeze(0),
                attention_mask={"full_attention": layout},
                cache=kv,
                use_cache=True,
            )
        finally:
            config._attn_implementation = previous
        return out.last_hidden_state[0]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, request_ids: Sequence[str]) -> torch.Tensor:
        """(n, D) hidden states of `request_ids`' last tokens -> (n, vocab) float32 logits."""
        return self.model.lm_head(hidden).float()
