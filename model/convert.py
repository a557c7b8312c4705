"""Convert original remote-code VideoLLaMA3 checkpoints into transformers' native format.

The video checkpoints `DAMO-NLP-SG/VideoLLaMA3-2B` / `-7B` ship as remote code (class
`Videollama3Qwen2ForCausalLM`, model_type `videollama3_qwen2`). The native classes
(`VideoLlama3ForConditionalGeneration`) hold the same modules under other names, so conversion is
a pure key rename: no tensor is reshaped, split or transposed.

Where the facts come from:

- Remote-code key names and config fields: DAMO-NLP-SG/VideoLLaMA3, files
  `inference/transformers_api/modeling_videollama3.py` (`Videollama3Qwen2ForCausalLM` subclasses
  `Qwen2ForCausalLM`: LLM under `model.*` + `lm_head`; `Videollama3MetaModel` adds
  `model.vision_encoder` and `model.mm_projector`, the latter `MlpGeluProjector.readout` =
  Linear, GELU, Linear for `mm_projector_type` "mlp2x_gelu"),
  `inference/transformers_api/modeling_videollama3_encoder.py` (`embeddings.patch_embedding`
  Conv2d, `encoder.layers.N.{layer_norm1,self_attn.{q,k,v,out}_proj,layer_norm2,mlp.fc1,fc2}`,
  `post_layernorm`; the 2D-RoPE `inv_freq` buffer is non-persistent, so not in checkpoints) and
  `inference/transformers_api/configuration_videollama3.py` (`Videollama3Qwen2Config(Qwen2Config)`
  with `vision_encoder`, `vision_encoder_config`, `mm_projector_type`, `use_token_compression`,
  `image_token_index`). Read through the mirror ykeselman/DAMO-NLP-SG-VideoLLaMA3.
- Training-code checkpoints (same repo, `videollama3/model/encoder.py`) wrap the encoder once
  more, giving `model.vision_encoder.vision_encoder.*`; both spellings are accepted.
- Native names: transformers 5.24 `models/video_llama_3/modeling_video_llama_3.py`
  (`model.vision_model`, `model.projector.readout.{0,2}`, `model.language_model`, `lm_head`,
  `_tied_weights_keys` lm_head -> embed_tokens). transformers ships no conversion script for this
  model (none under src/transformers/models/video_llama_3/), so the mapping here is our own.
- The `<image>` placeholder id 151665 (one id for images and video) is the released config's
  `image_token_index`; the original replaces those embeddings by visual features (`* 0.0 +`),
  exactly what the native `masked_scatter` does.
- Chat template: the original `Videollama3Qwen2Processor`
  (`inference/transformers_api/processing_videollama3.py`) is a `ProcessorMixin`, which loads its
  template from `chat_template.json` (`{"chat_template": "..."}`, the format transformers'
  processors read and write), falling back to the tokenizer's only when that file is absent.
- Sizes (not needed by the code, which reads the config): 2B text = Qwen2.5-1.5B (hidden 1536,
  28 layers, 12 / 2 KV heads, intermediate 8960, tied embeddings in Qwen2.5-1.5B); 7B text =
  Qwen2.5-7B (hidden 3584, 28 layers, 28 / 4 KV heads, intermediate 18944, untied); vision =
  hidden 1152, 27 layers, 16 heads, intermediate 4304, patch 14 (project architecture notes).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import VideoLlama3Config, VideoLlama3ForConditionalGeneration

logger = logging.getLogger(__name__)

# Bump when the converted folder's contents change, so cached conversions are redone
# (2: the processor's chat template is written as chat_template.jinja).
CONVERSION_VERSION = 2
REMOTE_MODEL_TYPE = "videollama3_qwen2"
REMOTE_ARCHITECTURE = "Videollama3Qwen2ForCausalLM"
DEFAULT_IMAGE_TOKEN_ID = 151665

# Qwen2 fields carried from the flat remote config into `text_config`; the rest (vision encoder,
# projector, attention backend, auto_map, ...) is either mapped elsewhere or dropped.
_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
)
_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "initializer_range",
)

_VISION_GLOBAL = (
    "embeddings.patch_embedding.weight",
    "embeddings.patch_embedding.bias",
    "post_layernorm.weight",
    "post_layernorm.bias",
)
_VISION_LAYER = tuple(
    f"encoder.layers.*.{module}.{param}"
    for module in (
        "layer_norm1",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm2",
        "mlp.fc1",
        "mlp.fc2",
    )
    for param in ("weight", "bias")
)
_PROJECTOR = ("readout.0.weight", "readout.0.bias", "readout.2.weight", "readout.2.bias")
_TEXT_GLOBAL = ("embed_tokens.weight", "norm.weight")
_TEXT_LAYER = tuple(
    f"layers.*.{name}"
    for name in (
        "self_attn.q_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.weight",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.weight",
        "self_attn.v_proj.bias",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    )
)

_VISION_DST = "model.vision_model."
_PROJECTOR_DST = "model.projector."
_TEXT_DST = "model.language_model."
_EMBED_KEY = _TEXT_DST + "embed_tokens.weight"
_LM_HEAD_KEY = "lm_head.weight"

# (source prefix, native prefix, allowed remainders). First matching prefix wins, so the longer
# vision/projector prefixes must come before the bare `model.` of the LLM.
_VISION_NAMES = frozenset(_VISION_GLOBAL + _VISION_LAYER)
_SECTIONS: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("model.vision_encoder.vision_encoder.", _VISION_DST, _VISION_NAMES),
    ("model.vision_encoder.", _VISION_DST, _VISION_NAMES),
    ("model.mm_projector.", _PROJECTOR_DST, frozenset(_PROJECTOR)),
    ("model.", _TEXT_DST, frozenset(_TEXT_GLOBAL + _TEXT_LAYER)),
    ("lm_head.", "lm_head.", frozenset({"weight"})),
)
_LAYER_INDEX = re.compile(r"(?<=layers\.)\d+(?=\.)")

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "generation_config.json",
)
# The original processor takes its template from chat_template.json; transformers' tokenizer reads
# chat_template.jinja first, then tokenizer_config.json (which in the released checkpoints holds
# none, or Qwen2.5's "You are Qwen" template). So the converted folder gets the processor's
# template as chat_template.jinja.
_PROCESSOR_TEMPLATE = "chat_template.json"
_TEMPLATE_FILE = "chat_template.jinja"
# Keys that would make transformers look for the remote processor code.
_REMOTE_TOKENIZER_KEYS = ("auto_map", "processor_class")


class ConversionError(ValueError):
    """A remote-code checkpoint or config that cannot be mapped onto the native classes."""


def is_remote_code_config(config: Mapping[str, Any]) -> bool:
    """True for the original remote-code VideoLLaMA3 config (not the native `video_llama_3`)."""
    architectures = config.get("architectures") or ()
    return config.get("model_type") == REMOTE_MODEL_TYPE or REMOTE_ARCHITECTURE in architectures


def convert_config(config: Mapping[str, Any]) -> VideoLlama3Config:
    """Build the native config from a remote-code `config.json` dict."""
    if not is_remote_code_config(config):
        raise ConversionError(
            f"not a remote-code VideoLLaMA3 config (model_type={config.get('model_type')!r}, "
            f"architectures={config.get('architectures')!r})"
        )
    projector = config.get("mm_projector_type", "mlp2x_gelu")
    if projector != "mlp2x_gelu":
        raise ConversionError(
            f"mm_projector_type {projector!r} has no native equivalent (only 'mlp2x_gelu')"
        )
    vision = config.get("vision_encoder_config") or {}
    if not vision.get("hidden_size"):
        raise ConversionError(
            "vision_encoder_config is missing; the config points at an external encoder "
            f"({config.get('vision_encoder')!r}) whose weights are not in this checkpoint"
        )

    token_id = config.get("image_token_index")
    if not isinstance(token_id, int) or token_id < 0:
        logger.warning(
            "image_token_index %r is unset; using the released checkpoints' <image> id %d",
            token_id,
            DEFAULT_IMAGE_TOKEN_ID,
        )
        token_id = DEFAULT_IMAGE_TOKEN_ID

    text_config = {key: config[key] for key in _TEXT_FIELDS if key in config}
    text_config["model_type"] = "qwen2"
    vision_config = {key: vision[key] for key in _VISION_FIELDS if key in vision}
    # The original encoder's 2D RoPE: theta 10000 over head_dim // 2 per axis, the native default.
    vision_config["rope_parameters"] = {"rope_type": "axial", "rope_theta": 10000.0}

    extra: dict[str, Any] = {}
    dtype = config.get("dtype", config.get("torch_dtype"))
    if dtype is not None:
        extra["dtype"] = dtype
    # Attention backend fields (`_attn_implementation`, `mm_attn_implementation`) are dropped on
    # purpose: the original pins flash_attention_2; the native default (sdpa) loads anywhere.
    native = VideoLlama3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_id,
        video_token_id=token_id,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        **extra,
    )
    native.architectures = ["VideoLlama3ForConditionalGeneration"]
    return native


def _native_key(key: str) -> str | None:
    """The native name of one remote-code key, or None when the key has no native place."""
    for src_prefix, dst_prefix, allowed in _SECTIONS:
        if key.startswith(src_prefix):
            rest = key[len(src_prefix) :]
            return dst_prefix + rest if _LAYER_INDEX.sub("*", rest) in allowed else None
    return None


def _expected_keys(n_vision_layers: int, n_text_layers: int) -> set[str]:
    """Every parameter key of the native model (lm_head included) for the given depths."""

    def expand(prefix: str, global_names: Iterable[str], layer_names: Iterable[str], n: int):
        keys = {prefix + name for name in global_names}
        for name in layer_names:
            keys.update(prefix + name.replace("*", str(i)) for i in range(n))
        return keys

    return (
        expand(_VISION_DST, _VISION_GLOBAL, _VISION_LAYER, n_vision_layers)
        | expand(_PROJECTOR_DST, _PROJECTOR, (), 0)
        | expand(_TEXT_DST, _TEXT_GLOBAL, _TEXT_LAYER, n_text_layers)
        | {_LM_HEAD_KEY}
    )


def _layer_count(native_keys: Iterable[str], prefix: str) -> int:
    indices = [
        int(match.group(0))
        for key in native_keys
        if key.startswith(prefix) and (match := _LAYER_INDEX.search(key))
    ]
    return max(indices) + 1 if indices else 0


def _plan(keys: Iterable[str], config: Mapping[str, Any] | None) -> tuple[dict[str, str], bool]:
    """Map every source key to its native key; return (renames, tied) or raise naming all faults.

    With a config, depths and embedding tying come from it; without one, depths are the highest
    layer index seen and the embeddings count as tied when the checkpoint has no lm_head.
    """
    renames: dict[str, str] = {}
    unknown: list[str] = []
    sources: dict[str, list[str]] = {}
    for key in keys:
        native = _native_key(key)
        if native is None:
            unknown.append(key)
        else:
            renames[key] = native
            sources.setdefault(native, []).append(key)
    duplicated = {native: srcs for native, srcs in sources.items() if len(srcs) > 1}

    produced = set(sources)
    if config is not None:
        native_config = convert_config(config)
        n_vision = native_config.vision_config.num_hidden_layers
        n_text = native_config.text_config.num_hidden_layers
        tied = native_config.tie_word_embeddings
    else:
        n_vision = _layer_count(produced, _VISION_DST)
        n_text = _layer_count(produced, _TEXT_DST)
        tied = _LM_HEAD_KEY not in produced
    expected = _expected_keys(n_vision, n_text)
    if tied:
        # A tied lm_head is the embedding matrix itself; a stored copy is redundant.
        expected.discard(_LM_HEAD_KEY)
        renames = {src: dst for src, dst in renames.items() if dst != _LM_HEAD_KEY}
        produced.discard(_LM_HEAD_KEY)
    missing = sorted(expected - produced)
    unexpected = sorted(src for src, dst in renames.items() if dst not in expected)

    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys with no native place: {sorted(unknown)}")
    if unexpected:
        problems.append(f"{len(unexpected)} keys beyond the configured depth: {unexpected}")
    if duplicated:
        problems.append(f"keys mapping to the same native key: {duplicated}")
    if missing:
        problems.append(f"{len(missing)} native keys with no source: {missing}")
    if problems:
        raise ConversionError("cannot convert state dict: " + "; ".join(problems))
    return renames, tied


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """Rename a remote-code state dict to native keys; tensors are passed through untouched.

    `config` (the remote `config.json` dict) fixes the expected depths and tying; without it they
    are inferred from the keys. A tied lm_head is returned as the embedding tensor itself, as the
    native model's own `state_dict()` does, so `load_state_dict(strict=True)` accepts the result.
    """
    renames, tied = _plan(state_dict.keys(), config)
    converted = {dst: state_dict[src] for src, dst in renames.items()}
    if tied:
        converted[_LM_HEAD_KEY] = converted[_EMBED_KEY]
    return converted


def _source_shards(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [src / name for name in sorted(set(weight_map.values()))]
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConversionError(f"{src} holds no model.safetensors or model.safetensors.index.json")


def _check_shapes(native_config: VideoLlama3Config, shapes: Mapping[str, list[int]]) -> None:
    """Compare stored shapes with the native model's, built on the meta device (no memory)."""
    with torch.device("meta"):
        reference = VideoLlama3ForConditionalGeneration(native_config).state_dict()
    wrong = {
        key: (list(shape), list(reference[key].shape))
        for key, shape in shapes.items()
        if list(reference[key].shape) != list(shape)
    }
    if wrong:
        raise ConversionError(f"shape mismatch (stored, expected by config): {wrong}")


def processor_chat_template(path: Path) -> str:
    """The template in a processor's chat_template.json: {"chat_template": "..."} or a string."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConversionError(f"{path}: not JSON ({exc})") from None
    template = data.get("chat_template") if isinstance(data, dict) else data
    if not isinstance(template, str) or not template.strip():
        raise ConversionError(f'{path}: expected {{"chat_template": "<jinja template>"}}')
    return template


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    template = None
    if (src / _PROCESSOR_TEMPLATE).is_file():
        template = processor_chat_template(src / _PROCESSOR_TEMPLATE)
        if (src / _TEMPLATE_FILE).is_file():
            logger.warning("%s: using %s over %s", src, _PROCESSOR_TEMPLATE, _TEMPLATE_FILE)
    elif (src / _TEMPLATE_FILE).is_file():
        template = (src / _TEMPLATE_FILE).read_text(encoding="utf-8")
    for name in _TOKENIZER_FILES:
        path = src / name
        if not path.is_file():
            continue
        if name == "tokenizer_config.json":
            data = json.loads(path.read_text())
            for key in _REMOTE_TOKENIZER_KEYS:
                data.pop(key, None)
            if template is not None:
                data.pop("chat_template", None)  # stale (Qwen2.5's); the .jinja file wins anyway
            (dst / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        else:
            shutil.copy2(path, dst / name)
    if template is not None:
        (dst / _TEMPLATE_FILE).write_text(template, encoding="utf-8")
    else:
        logger.warning(
            "%s has no %s: the tokenizer_config.json template applies", src, _PROCESSOR_TEMPLATE
        )


def convert_checkpoint(src: Path, dst: Path) -> Path:
    """Convert a remote-code snapshot directory into a native checkpoint directory at `dst`.

    Shards are read one at a time through `safe_open` and written as one output shard each, so
    peak memory is about one shard, not the model. Everything is written to a temporary sibling
    directory that is renamed to `dst` at the end; `dst` must not exist (or be an empty directory).
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not empty")
    remote_config = json.loads((src / "config.json").read_text())
    native_config = convert_config(remote_config)
    shards = _source_shards(src)

    shard_keys: dict[Path, list[str]] = {}
    shapes: dict[str, list[int]] = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as handle:
            shard_keys[shard] = list(handle.keys())
            for key in shard_keys[shard]:
                shapes[key] = handle.get_slice(key).get_shape()
    all_keys = [key for keys in shard_keys.values() for key in keys]
    renames, tied = _plan(all_keys, remote_config)
    _check_shapes(native_config, {renames[key]: shapes[key] for key in renames})

    # Shards left with nothing to write (a stored copy of a tied lm_head) are skipped.
    kept = [shard for shard in shards if any(key in renames for key in shard_keys[shard])]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        weight_map: dict[str, str] = {}
        total_size = 0
        for number, shard in enumerate(kept, start=1):
            name = (
                "model.safetensors"
                if len(kept) == 1
                else f"model-{number:05d}-of-{len(kept):05d}.safetensors"
            )
            with safe_open(shard, framework="pt") as handle:
                tensors = {
                    renames[key]: handle.get_tensor(key)
                    for key in shard_keys[shard]
                    if key in renames
                }
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            total_size += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
            weight_map.update(dict.fromkeys(tensors, name))
            logger.info("wrote %s (%d tensors) from %s", name, len(tensors), shard.name)
            del tensors
        if len(kept) > 1:
            weight_map = dict(sorted(weight_map.items()))
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        native_config.save_pretrained(tmp)
        _copy_tokenizer_files(src, tmp)
        if dst.exists():
            dst.rmdir()
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "converted %s -> %s (%d tensors, tied embeddings: %s)", src, dst, len(weight_map), tied
    )
    return dst
