"""A tiny random-weight VideoLLaMA3 built offline: real architecture, real tokenizer pipeline.

Tests and `make demo` use it because no checkpoint can be downloaded on the build machines. The
tokenizer is a byte-level BPE with Qwen2's pre-tokenizer regex and Qwen chat special tokens,
trained on a fixed generated corpus, so the same seed always gives the same files.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, VideoLlama3Config
from transformers.models.video_llama_3.configuration_video_llama_3 import VideoLlama3VisionConfig

logger = logging.getLogger(__name__)

# Bump when anything below changes what gets built, so cached copies are rebuilt.
TINY_FORMAT_VERSION = 1

# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2.5-style chat template (what VideoLLaMA3's LLM was tuned with); the video itself is
# placed by model/prompt.py, so this template only renders text content.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = (
    "the",
    "a",
    "an",
    "of",
    "in",
    "on",
    "at",
    "to",
    "from",
    "between",
    "and",
    "or",
    "is",
    "was",
    "were",
    "did",
    "when",
    "where",
    "what",
    "who",
    "which",
    "how",
    "many",
    "person",
    "people",
    "car",
    "van",
    "truck",
    "forklift",
    "dog",
    "ball",
    "player",
    "goal",
    "door",
    "aisle",
    "camera",
    "scene",
    "video",
    "frame",
    "second",
    "seconds",
    "time",
    "start",
    "end",
    "enter",
    "enters",
    "leave",
    "leaves",
    "park",
    "parks",
    "walk",
    "walks",
    "run",
    "runs",
    "open",
    "opens",
    "close",
    "closes",
    "red",
    "white",
    "blue",
    "green",
    "black",
    "yellow",
    "left",
    "right",
    "top",
    "bottom",
    "happened",
    "happen",
    "appear",
    "appears",
    "during",
    "after",
    "before",
    "first",
    "last",
    "minute",
    "minutes",
    "describe",
    "answer",
    "question",
    "yes",
    "no",
    "there",
    "it",
    "this",
    "that",
    "you",
    "are",
    "helpful",
    "assistant",
    "user",
    "system",
)


def _training_corpus(seed: int, extra: Sequence[str] = ()) -> list[str]:
    """A fixed, seed-determined corpus that covers the prompt's time labels and question words."""
    rng = random.Random(seed)
    lines = [f"Time {t / 10:.1f}s:" for t in range(0, 6000, 7)]
    lines += [
        f"from {a:.1f}s to {a + b:.1f}s"
        for a, b in zip(range(0, 600, 3), range(1, 201), strict=True)
    ]
    for _ in range(3000):
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))))
    return lines + list(extra)


def build_tokenizer(
    seed: int = 0, vocab_size: int = 1024, extra: Sequence[str] = ()
) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer and wrap it as a transformers fast tokenizer.

    `extra` lines join the corpus (the grounding model adds its questions and answers).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(seed, extra), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> VideoLlama3Config:
    """Real VideoLLaMA3 architecture at toy sizes (Qwen2 text model + 2D-RoPE ViT, patch 14)."""
    vision = VideoLlama3VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=14,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        # A wide init gives peaked logits, so greedy decoding is decided by clear margins rather
        # than by float rounding (the exactness tests compare greedy tokens).
        initializer_range=0.5,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    return VideoLlama3Config(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
    )


def build_tiny_checkpoint(dst: Path, seed: int = 0) -> Path:
    """Write config, tokenizer and random weights (deterministic from `seed`) to `dst`."""
    from transformers import VideoLlama3ForConditionalGeneration

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=dst.parent))
    try:
        tokenizer = build_tokenizer(seed)
        config = tiny_config(tokenizer)
        torch.manual_seed(seed)
        model = VideoLlama3ForConditionalGeneration(config).eval()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "livelens_tiny.json").write_text(
            json.dumps({"seed": seed, "format": TINY_FORMAT_VERSION}) + "\n"
        )
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny VideoLLaMA3 checkpoint (seed %d) at %s", seed, dst)
    return dst


def tiny_checkpoint(cache_dir: Path, seed: int = 0) -> Path:
    """Path of the cached tiny checkpoint for `seed`, building it on first use."""
    path = Path(cache_dir) / f"tiny-v{TINY_FORMAT_VERSION}-seed{seed}"
    if not (path / "livelens_tiny.json").exists():
        build_tiny_checkpoint(path, seed)
    return path
