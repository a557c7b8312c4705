"""`--model` resolution: tiny built offline and deterministic, remote-code dirs converted once."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_convert import REMOTE_CONFIG, remote_state_dict, write_remote_snapshot

from livelens.model.loading import ModelLoadError, load_model, resolve_checkpoint
from livelens.model.tiny import build_tiny_checkpoint


def test_tiny_is_deterministic_from_its_seed(tmp_path):
    a = build_tiny_checkpoint(tmp_path / "a", seed=3)
    b = build_tiny_checkpoint(tmp_path / "b", seed=3)
    c = build_tiny_checkpoint(tmp_path / "c", seed=4)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_tiny_loads_fp32_sdpa_on_cpu(tiny_model):
    assert tiny_model.dtype == torch.float32
    assert tiny_model.device.type == "cpu"
    assert tiny_model.model.config._attn_implementation == "sdpa"
    assert tiny_model.tokenizer.convert_ids_to_tokens(tiny_model.video_token_id) == "<|video_pad|>"
    assert resolve_checkpoint("tiny", tiny_model.path.parent) == tiny_model.path


def test_remote_code_directory_is_converted_once_and_cached(tmp_path):
    src = tmp_path / "VideoLLaMA3-2B"
    write_remote_snapshot(src, REMOTE_CONFIG, remote_state_dict(REMOTE_CONFIG), n_shards=2)
    cache = tmp_path / "cache"

    native = resolve_checkpoint(str(src), cache)
    assert native.parent == cache / "converted"
    assert json.loads((native / "config.json").read_text())["model_type"] == "video_llama_3"
    stamp = (native / "config.json").stat().st_mtime_ns
    assert resolve_checkpoint(str(src), cache) == native
    assert (native / "config.json").stat().st_mtime_ns == stamp


def test_changed_source_files_or_converter_are_converted_again(tmp_path, monkeypatch):
    from livelens.model import convert

    src = tmp_path / "VideoLLaMA3-2B"
    write_remote_snapshot(src, REMOTE_CONFIG, remote_state_dict(REMOTE_CONFIG), n_shards=1)
    cache = tmp_path / "cache"
    first = resolve_checkpoint(str(src), cache)

    (src / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    second = resolve_checkpoint(str(src), cache)
    assert second != first
    assert (second / "chat_template.jinja").read_text() == "{{ messages }}"

    monkeypatch.setattr(convert, "CONVERSION_VERSION", convert.CONVERSION_VERSION + 1)
    third = resolve_checkpoint(str(src), cache)
    assert third not in (first, second)
    assert sorted(p.name for p in (cache / "converted").iterdir()) == sorted(
        p.name for p in (first, second, third)
    )


def test_native_directory_is_used_in_place(tiny_model):
    assert resolve_checkpoint(str(tiny_model.path)) == tiny_model.path


def test_other_model_types_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="not VideoLLaMA3"):
        resolve_checkpoint(str(tmp_path), tmp_path / "cache")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"unreadable config\.json"):
        resolve_checkpoint(str(tmp_path), tmp_path / "cache")


@pytest.mark.parametrize("spec", ["", "../nope", "a/b/c", "white space/model"])
def test_malformed_specs(tmp_path, spec):
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model(spec, cache_dir=tmp_path)


def test_tiny_grounding_resolves_to_the_package_copy_or_says_how_to_train_it(tmp_path):
    """No download or build for it: the packaged checkpoint, or one clear error naming the fix."""
    from livelens.model.loading import TINY_GROUNDING_DIR

    if (TINY_GROUNDING_DIR / "config.json").is_file():
        assert resolve_checkpoint("tiny-grounding", tmp_path) == TINY_GROUNDING_DIR
        loaded = load_model("tiny-grounding", device="cpu")
        assert loaded.tokens_per_frame == 24
        size = sum(f.stat().st_size for f in TINY_GROUNDING_DIR.iterdir())
        assert size <= 25 * 2**20
    else:
        with pytest.raises(ModelLoadError, match=r"python -m livelens\.model\.training"):
            resolve_checkpoint("tiny-grounding", tmp_path)
    assert not any(tmp_path.iterdir()), "nothing is built or downloaded for it"


@pytest.mark.parametrize("value", [0, 15, "24", True, 2.5])
def test_bad_livelens_json_budget_is_refused(tmp_path, value):
    from livelens.model.loading import preferred_tokens_per_frame

    (tmp_path / "livelens.json").write_text(json.dumps({"tokens_per_frame": value}))
    with pytest.raises(ModelLoadError, match="tokens_per_frame"):
        preferred_tokens_per_frame(tmp_path)
    for text in ("{not json", "[24]"):
        (tmp_path / "livelens.json").write_text(text)
        with pytest.raises(ModelLoadError, match=r"livelens\.json"):
            preferred_tokens_per_frame(tmp_path)
    (tmp_path / "livelens.json").unlink()
    assert preferred_tokens_per_frame(tmp_path) is None
