"""Tensor work on transformers' VideoLLaMA3 modules: vision encoding, prefill, decode steps.

The session calls the model's own submodules (vision tower + projector, Qwen2 decoder, lm_head)
instead of the top-level forward so that video prefill never pays for the vocabulary projection
and visual features can be masked by DiffFP before they enter the LLM.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from livelens.model.kv import new_session_cache
from livelens.model.loading import LoadedModel


class ModelRunner:
    """Stateless tensor operations over one loaded model; sessions own the caches."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self._embed = self.model.get_input_embeddings()
        self.merge_size = 2
        self.patch_size = int(self.model.config.vision_config.patch_size)

    def new_cache(self) -> Cache:
        return new_session_cache(self.model.config.text_config)

    @torch.inference_mode()
    def encode_frames(self, patches: torch.Tensor, frames: int, gh: int, gw: int) -> torch.Tensor:
        """Vision tower + projector for `frames` frames of gh x gw patches -> (frames*tokens, D).

        Vision attention is per frame (cu_seqlens per frame), so a chunk encodes exactly as the
        same frames would inside a whole-video forward.
        """
        grid = torch.tensor([[frames, gh, gw]], device=self.device)
        merge = torch.tensor([self.merge_size], device=self.device)
        out = self.model.model.get_video_features(
            pixel_values_videos=patches.to(self.device, self.dtype),
            video_grid_thw=grid,
            video_merge_sizes=merge,
            return_dict=True,
        )
        return torch.cat(out.pooler_output, dim=0)

    @torch.inference_mode()
    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        return self._embed(torch.tensor(ids, device=self.device, dtype=torch.long))

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Run (L, D) embeddings through the decoder, appending to `cache`; returns last hidden."""
        out = self.model.model.language_model(
            inputs_embeds=embeds.unsqueeze(0).to(self.dtype), cache=cache, use_cache=True
        )
        return out.last_hidden_state[0, -1]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()
