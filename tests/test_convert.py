"""Remote-code VideoLLaMA3 -> native conversion, on scaled-down synthetic checkpoints."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, VideoLlama3ForConditionalGeneration

from livelens.model.convert import (
    ConversionError,
    convert_checkpoint,
    convert_config,
    convert_state_dict,
    is_remote_code_config,
)
from livelens.model.prompt import PromptFormat
from livelens.model.tiny import tiny_checkpoint

# Field names as in the released config.json (Videollama3Qwen2Config = Qwen2Config + extras),
# with tiny sizes. The attention fields reflect what the original pins at load time.
REMOTE_CONFIG: dict = {
    "architectures": ["Videollama3Qwen2ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_videollama3.Videollama3Qwen2Config",
        "AutoModelForCausalLM": "modeling_videollama3.Videollama3Qwen2ForCausalLM",
    },
    "model_type": "videollama3_qwen2",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 48,
    "max_position_embeddings": 512,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 512,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 96,
    "image_token_index": 151665,
    "mm_projector_type": "mlp2x_gelu",
    "use_token_compression": True,
    "vision_encoder": None,
    "_attn_implementation": "flash_attention_2",
    "vision_encoder_config": {
        "model_type": "videollama3_vision_encoder",
        "attention_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 16,
        "intermediate_size": 24,
        "layer_norm_eps": 1e-06,
        "num_attention_heads": 2,
        "num_channels": 3,
        "num_hidden_layers": 2,
        "patch_size": 14,
    },
}


def remote_state_dict(config: dict, *, lm_head: bool = True, seed: int = 0) -> dict:
    """Every tensor of a remote-code checkpoint, real key names, shapes from `config`."""
    gen = torch.Generator().manual_seed(seed)
    vis = config["vision_encoder_config"]
    v, vi, p = vis["hidden_size"], vis["intermediate_size"], vis["patch_size"]
    c = vis["num_channels"]
    h, i, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]

    shapes: dict[str, tuple[int, ...]] = {
        "model.vision_encoder.embeddings.patch_embedding.weight": (v, c, p, p),
        "model.vision_encoder.embeddings.patch_embedding.bias": (v,),
        "model.vision_encoder.post_layernorm.weight": (v,),
        "model.vision_encoder.post_layernorm.bias": (v,),
        "model.mm_projector.readout.0.weight": (h, v),
        "model.mm_projector.readout.0.bias": (h,),
        "model.mm_projector.readout.2.weight": (h, h),
        "model.mm_projector.readout.2.bias": (h,),
        "model.embed_tokens.weight": (vocab, h),
        "model.norm.weight": (h,),
    }
    for n in range(vis["num_hidden_layers"]):
        layer = f"model.vision_encoder.encoder.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{layer}.self_attn.{proj}.weight"] = (v, v)
            shapes[f"{layer}.self_attn.{proj}.bias"] = (v,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{layer}.{norm}.weight"] = (v,)
            shapes[f"{layer}.{norm}.bias"] = (v,)
        shapes[f"{layer}.mlp.fc1.weight"] = (vi, v)
        shapes[f"{layer}.mlp.fc1.bias"] = (vi,)
        shapes[f"{layer}.mlp.fc2.weight"] = (v, vi)
        shapes[f"{layer}.mlp.fc2.bias"] = (v,)
    for n in range(config["num_hidden_layers"]):
        layer = f"model.layers.{n}"
        shapes[f"{layer}.self_attn.q_proj.weight"] = (h, h)
        shapes[f"{layer}.self_attn.q_proj.bias"] = (h,)
        shapes[f"{layer}.self_attn.k_proj.weight"] = (kv, h)
        shapes[f"{layer}.self_attn.k_proj.bias"] = (kv,)
        shapes[f"{layer}.self_attn.v_proj.weight"] = (kv, h)
        shapes[f"{layer}.self_attn.v_proj.bias"] = (kv,)
        shapes[f"{layer}.self_attn.o_proj.weight"] = (h, h)
        shapes[f"{layer}.mlp.gate_proj.weight"] = (i, h)
        shapes[f"{layer}.mlp.up_proj.weight"] = (i, h)
        shapes[f"{layer}.mlp.down_proj.weight"] = (h, i)
        shapes[f"{layer}.input_layernorm.weight"] = (h,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (h,)
    if lm_head:
        shapes["lm_head.weight"] = (vocab, h)
    return {key: torch.randn(shape, generator=gen) for key, shape in shapes.items()}


def tied_config() -> dict:
    config = copy.deepcopy(REMOTE_CONFIG)
    config["tie_word_embeddings"] = True
    return config


def test_detects_remote_code_config() -> None:
    assert is_remote_code_config(REMOTE_CONFIG)
    assert is_remote_code_config({"architectures": ["Videollama3Qwen2ForCausalLM"]})
    assert not is_remote_code_config({"model_type": "video_llama_3"})
    assert not is_remote_code_config({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})


@pytest.mark.parametrize(
    ("text", "tied"),
    [
        # 2B: Qwen2.5-1.5B text model.
        (dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
              num_key_value_heads=2, intermediate_size=8960, vocab_size=151936), True),
        # 7B: Qwen2.5-7B text model.
        (dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, intermediate_size=18944, vocab_size=152064), False),
    ],
)  # fmt: skip
def test_convert_config_real_sizes(text: dict, tied: bool) -> None:
    remote = copy.deepcopy(REMOTE_CONFIG) | text | {"tie_word_embeddings": tied}
    remote["vision_encoder_config"] |= dict(
        hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304
    )
    native = convert_config(remote)

    for key, value in text.items():
        assert getattr(native.text_config, key) == value
    assert native.text_config.rope_parameters["rope_theta"] == 1000000.0
    assert native.text_config.sliding_window is None
    assert native.text_config.eos_token_id == 151645
    vision = native.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers) == (1152, 27)
    assert (vision.num_attention_heads, vision.intermediate_size) == (16, 4304)
    assert vision.patch_size == 14
    assert vision.rope_parameters == {"rope_type": "axial", "rope_theta": 10000.0}
    assert native.image_token_id == native.video_token_id == 151665
    assert native.tie_word_embeddings is tied
    assert native.architectures == ["VideoLlama3ForConditionalGeneration"]
    # flash_attention_2 from the original must not be carried over: the default backend applies.
    assert "flash" not in native.to_json_string()


def test_convert_config_rejects_other_formats() -> None:
    with pytest.raises(ConversionError, match="not a remote-code"):
        convert_config({"model_type": "video_llama_3"})
    with pytest.raises(ConversionError, match="linear"):
        convert_config(REMOTE_CONFIG | {"mm_projector_type": "linear"})
    with pytest.raises(ConversionError, match="vision_encoder_config"):
        convert_config(REMOTE_CONFIG | {"vision_encoder_config": {}, "vision_encoder": "navit"})


@pytest.mark.parametrize("config", [REMOTE_CONFIG, None], ids=["with-config", "inferred"])
def test_every_key_maps_and_loads_strictly(config: dict | None) -> None:
    remote = remote_state_dict(REMOTE_CONFIG)
    converted = convert_state_dict(remote, config)

    assert len(converted) == len(remote)
    model = VideoLlama3ForConditionalGeneration(convert_config(REMOTE_CONFIG))
    model.load_state_dict(converted, strict=True)
    state = model.state_dict()
    for key, tensor in converted.items():
        assert torch.equal(state[key], tensor), key


def test_tensors_land_in_the_right_place() -> None:
    remote = remote_state_dict(REMOTE_CONFIG)
    converted = convert_state_dict(remote, REMOTE_CONFIG)

    pairs = {
        "model.layers.1.self_attn.q_proj.weight":
            "model.language_model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.bias":
            "model.language_model.layers.0.self_attn.k_proj.bias",
        "model.layers.1.mlp.down_proj.weight": "model.language_model.layers.1.mlp.down_proj.weight",
        "model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
        "model.norm.weight": "model.language_model.norm.weight",
        "lm_head.weight": "lm_head.weight",
        "model.vision_encoder.encoder.layers.1.self_attn.q_proj.weight":
            "model.vision_model.encoder.layers.1.self_attn.q_proj.weight",
        "model.vision_encoder.encoder.layers.0.self_attn.out_proj.bias":
            "model.vision_model.encoder.layers.0.self_attn.out_proj.bias",
        "model.vision_encoder.encoder.layers.1.layer_norm2.weight":
            "model.vision_model.encoder.layers.1.layer_norm2.weight",
        "model.vision_encoder.embeddings.patch_embedding.weight":
            "model.vision_model.embeddings.patch_embedding.weight",
        "model.vision_encoder.post_layernorm.bias": "model.vision_model.post_layernorm.bias",
        "model.mm_projector.readout.0.weight": "model.projector.readout.0.weight",
        "model.mm_projector.readout.2.bias": "model.projector.readout.2.bias",
    }  # fmt: skip
    for src, dst in pairs.items():
        assert converted[dst] is remote[src], (src, dst)

    model = VideoLlama3ForConditionalGeneration(convert_config(REMOTE_CONFIG))
    model.load_state_dict(converted, strict=True)
    q_proj = model.model.language_model.layers[1].self_attn.q_proj.weight
    assert torch.equal(q_proj, remote["model.layers.1.self_attn.q_proj.weight"])
    fc1 = model.model.vision_model.encoder.layers[0].mlp.fc1.bias
    assert torch.equal(fc1, remote["model.vision_encoder.encoder.layers.0.mlp.fc1.bias"])
    readout = model.model.projector.readout[2].weight
    assert torch.equal(readout, remote["model.mm_projector.readout.2.weight"])


@pytest.mark.parametrize("config", [tied_config(), None], ids=["with-config", "inferred"])
def test_tied_embeddings_without_lm_head(config: dict | None) -> None:
    remote = remote_state_dict(tied_config(), lm_head=False)
    converted = convert_state_dict(remote, config)

    assert converted["lm_head.weight"] is remote["model.embed_tokens.weight"]
    model = VideoLlama3ForConditionalGeneration(convert_config(tied_config()))
    model.load_state_dict(converted, strict=True)
    assert torch.equal(model.lm_head.weight, remote["model.embed_tokens.weight"])


def test_training_code_encoder_nesting_is_accepted() -> None:
    remote = {
        key.replace("model.vision_encoder.", "model.vision_encoder.vision_encoder."): tensor
        for key, tensor in remote_state_dict(REMOTE_CONFIG).items()
    }
    converted = convert_state_dict(remote, REMOTE_CONFIG)
    src = "model.vision_encoder.vision_encoder.encoder.layers.1.mlp.fc2.weight"
    assert converted["model.vision_model.encoder.layers.1.mlp.fc2.weight"] is remote[src]


def test_unknown_keys_are_named() -> None:
    remote = remote_state_dict(REMOTE_CONFIG)
    remote["model.vision_encoder.embeddings.position_embedding.weight"] = torch.zeros(4, 16)
    remote["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    with pytest.raises(ConversionError) as info:
        convert_state_dict(remote, REMOTE_CONFIG)
    message = str(info.value)
    assert "model.vision_encoder.embeddings.position_embedding.weight" in message
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in message


def test_missing_keys_are_reported() -> None:
    remote = remote_state_dict(REMOTE_CONFIG)
    del remote["model.layers.1.self_attn.v_proj.bias"]
    del remote["model.vision_encoder.encoder.layers.0.layer_norm1.weight"]
    with pytest.raises(ConversionError) as info:
        convert_state_dict(remote)
    message = str(info.value)
    assert "model.language_model.layers.1.self_attn.v_proj.bias" in message
    assert "model.vision_model.encoder.layers.0.layer_norm1.weight" in message


def test_missing_trailing_layer_and_untied_lm_head_are_reported_against_config() -> None:
    remote = remote_state_dict(REMOTE_CONFIG, lm_head=False)
    remote = {key: value for key, value in remote.items() if not key.startswith("model.layers.1.")}
    with pytest.raises(ConversionError) as info:
        convert_state_dict(remote, REMOTE_CONFIG)
    message = str(info.value)
    assert "model.language_model.layers.1.mlp.up_proj.weight" in message
    assert "lm_head.weight" in message


def test_layers_beyond_configured_depth_are_reported() -> None:
    deeper = copy.deepcopy(REMOTE_CONFIG) | {"num_hidden_layers": 3}
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.mlp\.gate_proj\.weight"):
        convert_state_dict(remote_state_dict(deeper), REMOTE_CONFIG)


def test_two_spellings_of_one_key_are_rejected() -> None:
    remote = remote_state_dict(REMOTE_CONFIG)
    remote["model.vision_encoder.vision_encoder.post_layernorm.weight"] = torch.zeros(16)
    with pytest.raises(ConversionError, match="same native key"):
        convert_state_dict(remote, REMOTE_CONFIG)


def write_remote_snapshot(path: Path, config: dict, state: dict, n_shards: int) -> None:
    """A downloaded remote-code snapshot: config, safetensors shards with index, tokenizer files."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    keys = list(state)
    weight_map = {}
    for n in range(n_shards):
        name = f"model-{n + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {key: state[key].contiguous() for key in keys[n::n_shards]}
        save_file(part, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    tokenizer_config = {
        "added_tokens_decoder": {"151665": {"content": "<image>", "special": True}},
        "auto_map": {"AutoProcessor": "processing_videollama3.Videollama3Qwen2Processor"},
        "processor_class": "Videollama3Qwen2Processor",
        "model_max_length": 16384,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (path / "vocab.json").write_text('{"a": 0}')
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "modeling_videollama3.py").write_text("# remote code, must not be copied\n")


@pytest.mark.parametrize(
    ("config", "lm_head"), [(REMOTE_CONFIG, True), (tied_config(), False)], ids=["untied", "tied"]
)
def test_checkpoint_round_trip(tmp_path: Path, config: dict, lm_head: bool) -> None:
    state = remote_state_dict(config, lm_head=lm_head, seed=1)
    src, dst = tmp_path / "remote", tmp_path / "native"
    write_remote_snapshot(src, config, state, n_shards=3)

    assert convert_checkpoint(src, dst) == dst

    assert sorted(p.name for p in tmp_path.iterdir()) == ["native", "remote"]  # no temp dir left
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert all(key.startswith(("model.vision_model.", "model.projector.", "model.language_model.",
                               "lm_head.")) for key in index["weight_map"])  # fmt: skip
    tokenizer_config = json.loads((dst / "tokenizer_config.json").read_text())
    assert "auto_map" not in tokenizer_config and "processor_class" not in tokenizer_config
    assert tokenizer_config["model_max_length"] == 16384
    assert (dst / "vocab.json").read_text() == '{"a": 0}'
    assert not (dst / "modeling_videollama3.py").exists()

    model = VideoLlama3ForConditionalGeneration.from_pretrained(dst)
    assert model.config.image_token_id == model.config.video_token_id == 151665
    loaded = model.state_dict()
    expected = convert_state_dict(state, config)
    assert set(loaded) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


def test_checkpoint_single_file(tmp_path: Path) -> None:
    state = remote_state_dict(REMOTE_CONFIG, seed=2)
    src, dst = tmp_path / "remote", tmp_path / "out" / "native"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(REMOTE_CONFIG))
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})

    convert_checkpoint(src, dst)

    assert not (dst / "model.safetensors.index.json").exists()
    model = VideoLlama3ForConditionalGeneration.from_pretrained(dst)
    bias = model.model.projector.readout[0].bias
    assert torch.equal(bias, state["model.mm_projector.readout.0.bias"])


def test_checkpoint_with_wrong_shape_writes_nothing(tmp_path: Path) -> None:
    state = remote_state_dict(REMOTE_CONFIG)
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(40, 32)
    src, dst = tmp_path / "remote", tmp_path / "native"
    write_remote_snapshot(src, REMOTE_CONFIG, state, n_shards=2)

    with pytest.raises(ConversionError, match=r"model\.language_model\.layers\.0\.mlp\.up_proj"):
        convert_checkpoint(src, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["remote"]


def test_checkpoint_refuses_to_overwrite(tmp_path: Path) -> None:
    src, dst = tmp_path / "remote", tmp_path / "native"
    write_remote_snapshot(src, REMOTE_CONFIG, remote_state_dict(REMOTE_CONFIG), n_shards=1)
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_checkpoint(src, dst)
    assert (dst / "keep.txt").read_text() == "mine"


# The released checkpoints' processor template, reduced to what text content exercises: no system
# turn unless the caller passes add_system_prompt; turns framed by <|im_start|> / <|im_end|>.
VL3_SYSTEM = (
    "You are VideoLLaMA3 created by Alibaba DAMO Academy, a helpful assistant to help people "
    "understand images and videos."
)
VL3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if add_system_prompt and loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + VL3_SYSTEM + "<|im_end|>\\n' -}}"
    "{% endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{- '<|im_start|>assistant\\n' -}}{% endif %}"
)
# Qwen2.5-Instruct's template (tool branches left out): a default system turn when none is given.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def write_tokenizer(
    path: Path, tiny: Path, *, config_template: str | None, processor_file: dict | str | None
) -> None:
    """Replace a snapshot's tokenizer files by a loadable tokenizer (the tiny model's vocabulary)
    with the remote-code keys of the released tokenizer_config.json and the given templates."""
    for name in ("vocab.json", "merges.txt"):
        (path / name).unlink()
    shutil.copy(tiny / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((tiny / "tokenizer_config.json").read_text())
    config |= {
        "auto_map": {"AutoProcessor": "processing_videollama3.Videollama3Qwen2Processor"},
        "processor_class": "Videollama3Qwen2Processor",
    }
    if config_template is not None:
        config["chat_template"] = config_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if processor_file is not None:
        (path / "chat_template.json").write_text(json.dumps(processor_file))


@pytest.mark.parametrize(
    ("config_template", "processor_file"),
    [
        (None, {"chat_template": VL3_TEMPLATE}),
        (QWEN25_TEMPLATE, {"chat_template": VL3_TEMPLATE}),
        (QWEN25_TEMPLATE, VL3_TEMPLATE),  # a bare JSON string is accepted too
    ],
    ids=["config-without-template", "config-with-qwen-template", "bare-string"],
)
def test_converted_tokenizer_renders_the_processor_template(
    tmp_path: Path,
    model_cache: Path,
    config_template: str | None,
    processor_file: dict | str,
) -> None:
    src, dst = tmp_path / "remote", tmp_path / "native"
    write_remote_snapshot(src, REMOTE_CONFIG, remote_state_dict(REMOTE_CONFIG), n_shards=1)
    tiny = tiny_checkpoint(model_cache)
    write_tokenizer(src, tiny, config_template=config_template, processor_file=processor_file)

    convert_checkpoint(src, dst)

    assert (dst / "chat_template.jinja").read_text() == VL3_TEMPLATE
    assert "chat_template" not in json.loads((dst / "tokenizer_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(dst)
    messages = [{"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    prompt = PromptFormat.from_tokenizer(tokenizer, video_token_id)
    # As the original's inference code renders it (add_system_prompt=True).
    assert prompt.prefix == f"<|im_start|>system\n{VL3_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    assert prompt.suffix == "<|im_end|>\n<|im_start|>assistant\n"


def test_malformed_processor_template_is_refused(tmp_path: Path, model_cache: Path) -> None:
    src, dst = tmp_path / "remote", tmp_path / "native"
    write_remote_snapshot(src, REMOTE_CONFIG, remote_state_dict(REMOTE_CONFIG), n_shards=1)
    tiny = tiny_checkpoint(model_cache)
    write_tokenizer(src, tiny, config_template=None, processor_file={"template": VL3_TEMPLATE})
    with pytest.raises(ConversionError, match="chat_template"):
        convert_checkpoint(src, dst)
    assert not dst.exists()
