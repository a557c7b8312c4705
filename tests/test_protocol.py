"""docs/api.md's message examples are what the code accepts and sends."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from livelens.stream.protocol import (
    CLIENT_TYPES,
    AlertRequest,
    AnswerMessage,
    AskMessage,
    CancelMessage,
    ErrorMessage,
    ProtocolError,
    PullRequest,
    StatusMessage,
    TokenMessage,
    json_depth,
    parse_client_message,
)

API = Path(__file__).parents[1] / "docs" / "api.md"
SERVER = {
    "token": TokenMessage,
    "answer": AnswerMessage,
    "status": StatusMessage,
    "error": ErrorMessage,
}


def _examples() -> list[dict]:
    blocks = re.findall(r"```json\n(.*?)```", API.read_text(), flags=re.DOTALL)
    return [json.loads(block) for block in blocks]


def test_every_json_example_in_the_api_doc_validates() -> None:
    kinds = []
    for example in _examples():
        kind = example.get("type")
        if kind in CLIENT_TYPES:
            message = parse_client_message(json.dumps(example))
            assert message.type == kind
        elif "condition" in example and kind is None and "id" not in example:
            AlertRequest.model_validate(example)
            kind = "alert_request"
        elif kind in SERVER:
            model = SERVER[kind]
            assert model.model_validate(example).model_dump(mode="json").keys() == example.keys()
        elif "source" in example and "id" not in example:
            PullRequest.model_validate(example)
        else:
            continue
        kinds.append(kind or "pull")
    assert sorted(set(kinds)) == [
        "alert_request",
        "answer",
        "ask",
        "cancel",
        "error",
        "pull",
        "status",
        "token",
        "unwatch",
        "watch",
    ]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\xff\xfe", "invalid_json"),
        ("null", "invalid_message"),
        ('{"type": "ask", "id": "", "question": "q"}', "invalid_message"),
        ('{"type": "ask", "id": "a", "question": "q", "extra": 1}', "invalid_message"),
        ('{"type": "ask", "id": "a", "question": "q", "top_p": 0}', "invalid_message"),
        ('{"type": "ask", "id": "a", "question": "q", "repetition_penalty": 0}', "invalid_message"),
        (
            '{"type": "ask", "id": "a", "question": "q", "repetition_penalty": 11}',
            "invalid_message",
        ),
        (
            '{"type": "ask", "id": "a", "question": "q", "repetition_penalty": NaN}',
            "invalid_message",
        ),
        ('{"id": "a"}', "unknown_type"),
        # Each of these raised out of the parser (or passed it) before it was hardened.
        ("[" * 5000 + "]" * 5000, "message_too_deep"),
        ('{"type": "cancel", "id": "\\ud800"}', "invalid_json"),
        (
            '{"type": "ask", "id": "a", "question": "q", "seed": 1' + "0" * 5000 + "}",
            "invalid_json",
        ),
        (
            '{"type": "ask", "id": "a", "question": "q", "seed": 1180591620717411303424}',
            "invalid_message",
        ),
        (
            '{"type": "ask", "id": "a", "question": "q", "top_k": 18446744073709551616}',
            "invalid_message",
        ),
        ('{"type": "ask", "id": "a", "question": "q", "top_p": NaN}', "invalid_message"),
        # logits / 1e-300 overflows to inf: NaN probabilities inside the model worker.
        ('{"type": "ask", "id": "a", "question": "q", "temperature": 1e-300}', "invalid_message"),
        ('{"type": "ask", "id": "a", "question": "q", "temperature": Infinity}', "invalid_message"),
    ],
)
def test_refusals_have_stable_codes(raw: str | bytes, code: str) -> None:
    from livelens.stream.protocol import ProtocolError

    with pytest.raises(ProtocolError) as refused:
        parse_client_message(raw)
    assert refused.value.code == code


def test_repetition_penalty_defaults_to_the_checkpoint() -> None:
    ask = parse_client_message('{"type": "ask", "id": "a", "question": "q"}')
    assert isinstance(ask, AskMessage) and ask.repetition_penalty is None
    ask = parse_client_message(
        '{"type": "ask", "id": "a", "question": "q", "repetition_penalty": 1.2}'
    )
    assert isinstance(ask, AskMessage) and ask.repetition_penalty == 1.2


def test_json_depth_counts_brackets_outside_strings_only() -> None:
    assert json_depth('{"type": "ask"}') == 1
    assert json_depth('{"a": [[1], {"b": []}]}') == 4
    assert json_depth('{"q": "[[[[{{{{ \\" ]]]]"}') == 1
    assert json_depth(b"[[[") == 3  # not valid JSON: still counted, never parsed
    assert json_depth("") == 0


def test_extreme_but_valid_values_are_accepted() -> None:
    for seed in (-(2**63), 0, 2**64 - 1):
        raw = json.dumps({"type": "ask", "id": "a", "question": "q", "seed": seed})
        message = parse_client_message(raw)
        assert isinstance(message, AskMessage) and message.seed == seed


def test_one_limit_for_answer_length_and_temperature() -> None:
    """The websocket and the model session accept exactly the same values (one definition)."""
    from livelens.model.sampling import (
        MAX_NEW_TOKENS,
        MIN_TEMPERATURE,
        SamplingParams,
        SessionError,
    )

    def ask(**fields: object) -> AskMessage | CancelMessage:
        return parse_client_message(
            json.dumps({"type": "ask", "id": "a", "question": "q", **fields})
        )

    assert (
        ask(max_new_tokens=MAX_NEW_TOKENS).max_new_tokens
        == SamplingParams(max_new_tokens=MAX_NEW_TOKENS).max_new_tokens
    )
    for refused in ({"max_new_tokens": MAX_NEW_TOKENS + 1}, {"temperature": MIN_TEMPERATURE / 2}):
        with pytest.raises(ProtocolError):
            ask(**refused)
        with pytest.raises(SessionError):
            SamplingParams(**refused)  # type: ignore[arg-type]
    assert ask(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE
    assert ask(temperature=0).temperature == 0


def test_protocol_imports_without_torch() -> None:
    """The websocket protocol (to be shared with clients) and the sampling limits it checks need
    no torch: importing them with torch made unimportable must work. (The step scheduler is not
    torch-free yet: model/kv.py still holds the contiguous cache the live session uses.)"""
    code = (
        "import sys; sys.modules['torch'] = None; "
        "import livelens.stream.protocol, livelens.model.sampling"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
