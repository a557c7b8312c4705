"""transformers' own offline VideoLLaMA3 answer over a whole clip: the exactness oracle.

Built only from transformers' parts: the PIL image processor for normalized patches, the video
processor's `_get_compression_mask` for DiffFP, the tokenizer's chat template over the whole
prompt string, and `VideoLlama3ForConditionalGeneration.forward` / `.generate`. It shares no code
with `VideoSession`, so a session that agrees with it token for token is exact by construction
(tests/test_exactness.py, benchmarks/grounding.py). Answers are decoded as the original
VideoLLaMA3 `generate` decodes them: `generate(inputs_embeds=...)` with the checkpoint's
repetition penalty, which then counts the answer's own tokens only.

`video_processing_video_llama_3` imports torchvision at module level, which has no CPU build on
the dev machines. `_get_compression_mask` is pure torch, so that one method is compiled from the
installed transformers source file and called unbound: the formula is transformers' code, not a
copy of ours.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from livelens.model.loading import LoadedModel


@functools.cache
def _method(module: str, cls: str, name: str) -> Callable:
    spec = importlib.util.find_spec("transformers")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "models" / "video_llama_3" / f"{module}.py"
    text = path.read_text()
    tree = ast.parse(text)
    klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    fn = next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == name)
    source = textwrap.dedent(ast.get_source_segment(text, fn) or "")
    namespace: dict = {"torch": torch}
    exec(compile(source, str(path), "exec"), namespace)
    return namespace[name]


def compression_mask(
    pixel_values_videos: torch.Tensor,
    video_grid_thw: torch.Tensor,
    video_merge_sizes: torch.Tensor,
    threshold: float = 0.1,
    min_tokens: int = 1,
) -> torch.Tensor:
    """transformers' `VideoLlama3VideoProcessor._get_compression_mask` (DiffFP keep mask)."""
    fn = _method(
        "video_processing_video_llama_3", "VideoLlama3VideoProcessor", "_get_compression_mask"
    )
    return fn(
        None,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
        video_merge_sizes=video_merge_sizes,
        threshold=threshold,
        min_tokens=min_tokens,
    )


def stop_token_ids(loaded: LoadedModel) -> list[int]:
    """Ids that end an answer: the tokenizer's and generation config's eos, Qwen's two markers."""
    tok = loaded.tokenizer
    eos = loaded.model.generation_config.eos_token_id
    ids = {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tok.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tok.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


class OfflineReference:
    """One clip (uint8 frames at the session grid and their media times) ready for questions.

    Patches and the DiffFP mask are computed once; every question is one whole-prompt forward
    (`logits`) or one greedy `model.generate` (`generate`), as an offline processor would run it.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        frames: np.ndarray,
        times: Sequence[float],
        *,
        threshold: float = 0.1,
        min_tokens: int = 1,
        mask: torch.Tensor | None = None,
    ) -> None:
        """mask: (frames, merged tokens per frame) bool, the tokens each frame keeps, instead of
        DiffFP over `frames` (a context whose frames were pruned against other neighbours: the
        engine's recalled frames)."""
        from transformers.models.video_llama_3.image_processing_pil_video_llama_3 import (
            VideoLlama3ImageProcessorPil,
        )

        if len(frames) != len(times) or not len(times):
            raise ValueError(f"{len(frames)} frames but {len(times)} times")
        self.loaded = loaded
        self.times = [float(t) for t in times]
        processor = VideoLlama3ImageProcessorPil(do_resize=False, merge_size=2)
        self.pixel_values = torch.cat(
            [torch.from_numpy(processor(f, return_tensors="np")["pixel_values"]) for f in frames]
        )
        patch = int(loaded.model.config.vision_config.patch_size)
        height, width = frames.shape[1:3]
        self.grid = torch.tensor([[len(frames), height // patch, width // patch]])
        self.merge = torch.tensor([2])
        if mask is None:
            self.mask = compression_mask(
                pixel_values_videos=self.pixel_values,
                video_grid_thw=self.grid,
                video_merge_sizes=self.merge,
                threshold=threshold,
                min_tokens=min_tokens,
            )
        else:
            tokens = (height // patch // 2) * (width // patch // 2)
            if tuple(mask.shape) != (len(frames), tokens) or mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool ({len(frames)}, {tokens}), got {mask.shape}")
            self.mask = mask.reshape(-1)
        self.kept: list[int] = self.mask.view(len(frames), -1).sum(dim=1).tolist()
        self.stop_ids = stop_token_ids(loaded)

    def prompt(self, question: str) -> str:
        """The whole prompt: VideoLLaMA3's frame labels and tokens inside the chat template.

        add_system_prompt as the original's inference passes it (templates without it ignore it).
        """
        tok = self.loaded.tokenizer
        video_token = tok.convert_ids_to_tokens(self.loaded.video_token_id)
        video = ",".join(
            f"Time {t:.1f}s:" + video_token * n for t, n in zip(self.times, self.kept, strict=True)
        )
        return tok.apply_chat_template(
            [{"role": "user", "content": video + "\n" + question}],
            tokenize=False,
            add_generation_prompt=True,
            add_system_prompt=True,
        )

    def input_ids(self, question: str) -> list[int]:
        return self.inputs(question)["input_ids"][0].tolist()

    def inputs(self, question: str) -> dict[str, torch.Tensor]:
        """The model inputs of the whole prompt (ids, patches, grid, DiffFP mask)."""
        tok = self.loaded.tokenizer
        ids = tok(self.prompt(question), add_special_tokens=False, return_tensors="pt")
        device, dtype = self.loaded.device, self.loaded.dtype
        return {
            "input_ids": ids["input_ids"].to(device),
            "pixel_values_videos": self.pixel_values.to(device, dtype),
            "video_grid_thw": self.grid.to(device),
            "video_merge_sizes": self.merge.to(device),
            "video_compression_mask": self.mask.to(device),
        }

    @torch.inference_mode()
    def logits(self, question: str) -> torch.Tensor:
        """Logits of the first answer token, from one forward over the whole prompt."""
        return self.loaded.model(**self.inputs(question)).logits[0, -1].float()

    @torch.inference_mode()
    def embeddings(self, question: str) -> torch.Tensor:
        """(1, L, D): what transformers' own forward feeds its LLM, visual features scattered in."""
        model = self.loaded.model
        captured: dict[str, torch.Tensor] = {}

        def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured["embeds"] = kwargs["inputs_embeds"]

        hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(**self.inputs(question))
        finally:
            hook.remove()
        return captured["embeds"]

    @torch.inference_mode()
    def generate(self, question: str, max_new_tokens: int) -> list[int]:
        """Greedy answer token ids (stop token excluded), as the original `generate` makes them.

        The original hands transformers `inputs_embeds` and no `input_ids`, so the checkpoint's
        repetition penalty (Qwen2.5-Instruct ships 1.1) sees only the answer's tokens.
        """
        from transformers import GenerationConfig

        penalty = self.loaded.model.generation_config.repetition_penalty
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            repetition_penalty=1.0 if penalty is None else float(penalty),
            eos_token_id=self.stop_ids,
            pad_token_id=self.stop_ids[0],
        )
        with warnings.catch_warnings():
            # transformers notes that the penalty then applies to new tokens only: the point.
            warnings.filterwarnings("ignore", message=".*only to newly generated tokens.*")
            out = self.loaded.model.generate(
                inputs_embeds=self.embeddings(question), generation_config=config
            )
        answer = out[0].tolist()
        ends = [i for i, token in enumerate(answer) if token in self.stop_ids]
        return answer[: ends[0]] if ends else answer
