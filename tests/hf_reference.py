"""transformers' own VideoLLaMA3 reference functions, usable without torchvision.

`video_processing_video_llama_3` imports torchvision at module level, which has no CPU build
here. Its `_get_compression_mask` is pure torch, so we compile that one method from the
installed transformers source file and call it unbound: the formula under test is
transformers' code, not a copy of ours.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch


@functools.cache
def _method(module: str, cls: str, name: str) -> Callable:
    spec = importlib.util.find_spec("transformers")
    assert spec is not None and spec.origin is not None
    path = Path(spec.origin).parent / "models" / "video_llama_3" / f"{module}.py"
    tree = ast.parse(path.read_text())
    klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    fn = next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == name)
    source = textwrap.dedent(ast.get_source_segment(path.read_text(), fn) or "")
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
