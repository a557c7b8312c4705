"""Resolve `--model` to a loaded transformers VideoLLaMA3 (native classes, no remote code).

Accepted specs: `tiny` (random weights, built offline), `tiny-grounding` (trained on generated
scenes, shipped in the package), a local directory, or a Hugging Face hub id. Checkpoints
in the original remote-code format (DAMO-NLP-SG/VideoLLaMA3-2B/-7B) are converted once into the
native format and the converted copy is cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "DAMO-NLP-SG/VideoLLaMA3-2B"
TINY = "tiny"
TINY_GROUNDING = "tiny-grounding"
# The trained toy model ships inside the package (model/tiny_grounding/, see model/training.py).
TINY_GROUNDING_DIR = Path(__file__).parent / "tiny_grounding"
# Optional file in a checkpoint: how LiveLens should feed it (written by model/training.py).
LIVELENS_JSON = "livelens.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Only what a VideoLLaMA3 checkpoint needs; skips the original repos' demo media and code.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "merges.txt"]


class ModelLoadError(RuntimeError):
    """The model spec cannot be resolved or loaded; the message says what to do instead."""


@dataclass(frozen=True)
class LoadedModel:
    """A ready model with what the session needs to build prompts for it."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    path: Path
    device: torch.device
    dtype: torch.dtype
    video_token_id: int
    tokens_per_frame: int | None = None
    """The per-frame token budget the checkpoint was trained at, when it says (livelens.json)."""


def default_cache_dir() -> Path:
    """Where built and converted checkpoints live (`LIVELENS_CACHE`, else ~/.cache/livelens)."""
    env = os.environ.get("LIVELENS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "livelens"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_checkpoint(spec: str, cache_dir: Path | None = None) -> Path:
    """Turn a model spec into a local directory holding a native-format checkpoint."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if spec == TINY:
        from livelens.model.tiny import tiny_checkpoint

        return tiny_checkpoint(cache_dir)
    if spec == TINY_GROUNDING:
        if not (TINY_GROUNDING_DIR / "config.json").is_file():
            raise ModelLoadError(
                f"the tiny grounding model is not in this installation ({TINY_GROUNDING_DIR} "
                "has no checkpoint): train it with `python -m livelens.model.training --out "
                f"{TINY_GROUNDING_DIR}`, or use --model tiny (random weights)"
            )
        return TINY_GROUNDING_DIR
    path = Path(spec).expanduser()
    if spec.strip() and path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec}: not a model directory (no config.json)")
        return _native_dir(path, cache_dir)
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise ModelLoadError(
            f"unknown model {spec!r}: give a hub id (owner/name), a local checkpoint directory, "
            "'tiny-grounding' (the offline toy model trained on generated scenes) or 'tiny' "
            "(random weights)"
        )
    return _native_dir(_download(spec), cache_dir)


def _download(repo_id: str) -> Path:
    # Short network timeouts: an unreachable hub must fail in seconds, not minutes.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # the hub client raises many unrelated types for "unreachable"
        raise ModelLoadError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}). "
            "Download it where the hub is reachable and pass the local directory with --model, "
            "or use --model tiny for the offline test model"
        ) from None


def _native_dir(path: Path, cache_dir: Path) -> Path:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable config.json ({exc})") from None
    from livelens.model.convert import (
        CONVERSION_VERSION,
        convert_checkpoint,
        is_remote_code_config,
    )

    if not is_remote_code_config(config):
        if config.get("model_type") != "video_llama_3":
            raise ModelLoadError(
                f"{path}: model_type {config.get('model_type')!r} is not VideoLLaMA3"
            )
        return path
    # Key the converted copy on the source's identity and the converter's version, so a new
    # snapshot or a changed conversion is converted again.
    ident = hashlib.sha256(f"{CONVERSION_VERSION}:{path.resolve()}".encode())
    read = {f for pattern in ("*.safetensors*", *_HUB_PATTERNS) for f in path.glob(pattern)}
    for f in sorted(read):
        st = f.stat()
        ident.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    dst = cache_dir / "converted" / f"{path.name}-{ident.hexdigest()[:16]}"
    if not (dst / "config.json").is_file():
        logger.info("converting remote-code checkpoint %s to the native format at %s", path, dst)
        try:
            convert_checkpoint(path, dst)
        except OSError:
            # Another process may have finished the same conversion first (atomic rename).
            if not (dst / "config.json").is_file():
                raise
    return dst


def demo_model() -> str:
    """The model demos use: `tiny-grounding` when installed, else the random `tiny` (logged)."""
    if (TINY_GROUNDING_DIR / "config.json").is_file():
        return TINY_GROUNDING
    logger.warning(
        "%s is not in this installation (not trained yet); the demo uses the random-weight "
        "'%s' model, whose answers are noise",
        TINY_GROUNDING,
        TINY,
    )
    return TINY


def checkpoint_meta(path: Path) -> dict:
    """A checkpoint's livelens.json ({} when it has none): its tokens per frame and, for one
    trained here, the TrainConfig it was trained with (under "train")."""
    try:
        meta = json.loads((Path(path) / LIVELENS_JSON).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable {LIVELENS_JSON} ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelLoadError(f"{path}: {LIVELENS_JSON} is not a JSON object")
    return meta


def preferred_tokens_per_frame(path: Path) -> int | None:
    """The token budget per frame a checkpoint asks for in its livelens.json, if any."""
    value = checkpoint_meta(path).get("tokens_per_frame")
    if value is None:
        return None
    from livelens.stream.grid import MIN_TOKENS_PER_FRAME

    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_TOKENS_PER_FRAME:
        raise ModelLoadError(
            f"{path}: {LIVELENS_JSON} tokens_per_frame must be an integer >= "
            f"{MIN_TOKENS_PER_FRAME}, got {value!r}"
        )
    return value


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a VideoLLaMA3 checkpoint: bf16 on CUDA, fp32 on CPU, sdpa attention by default."""
    from transformers import AutoTokenizer, VideoLlama3ForConditionalGeneration

    path = resolve_checkpoint(spec, cache_dir)
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = VideoLlama3ForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=attn_implementation
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot load checkpoint ({exc})") from None
    model.to(device).eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=spec,
        path=path,
        device=device,
        dtype=dtype,
        video_token_id=int(model.config.video_token_id),
        tokens_per_frame=preferred_tokens_per_frame(path),
    )
