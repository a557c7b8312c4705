"""VideoLLaMA3's video prompt: `Time {t:.1f}s:` + kept video tokens per frame, joined with `,`.

The chat frame (system/user/assistant markers) comes from the checkpoint's own chat template, so
a real checkpoint is prompted exactly as its processor would prompt it. The streaming session
and the offline reference both build their text from this one class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

_SENTINEL = "\u0000LIVELENS_CONTENT\u0000"


@dataclass(frozen=True)
class PromptFormat:
    """The text pieces around the video and the question for one tokenizer."""

    prefix: str
    """Chat template text before the user's content (system turn, user marker)."""
    suffix: str
    """Chat template text after the user's content, through the assistant generation marker."""
    video_token: str
    """The placeholder token each kept visual token stands on (`<|video_pad|>`, or `<image>`)."""
    frame_separator: str = ","
    question_separator: str = "\n"

    @classmethod
    def from_tokenizer(cls, tokenizer: object, video_token_id: int) -> PromptFormat:
        # add_system_prompt: VideoLLaMA3's template adds its own system turn only when asked, and
        # the original's inference code always asks; templates without the flag ignore it.
        rendered = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": _SENTINEL}],
            tokenize=False,
            add_generation_prompt=True,
            add_system_prompt=True,
        )
        if rendered.count(_SENTINEL) != 1:
            raise ValueError("the tokenizer's chat template does not render user text content")
        prefix, suffix = rendered.split(_SENTINEL)
        token = tokenizer.convert_ids_to_tokens(video_token_id)  # type: ignore[attr-defined]
        return cls(prefix=prefix, suffix=suffix, video_token=token)

    def frame_label(self, index: int, time: float) -> str:
        """Text before frame `index`'s visual tokens."""
        label = f"Time {time:.1f}s:"
        return label if index == 0 else self.frame_separator + label

    def question_text(self, question: str) -> str:
        """Text after the last frame: the question and the end of the user turn."""
        return self.question_separator + question + self.suffix

    def full_prompt(self, times: Sequence[float], kept: Sequence[int], question: str) -> str:
        """The whole prompt as one string, as an offline processor would build it."""
        frames = "".join(
            self.frame_label(i, t) + self.video_token * n
            for i, (t, n) in enumerate(zip(times, kept, strict=True))
        )
        return self.prefix + frames + self.question_text(question)
