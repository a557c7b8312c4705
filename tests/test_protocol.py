"""docs/api.md's message examples are what the code accepts and sends."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from livelens.stream.protocol import (
    AnswerMessage,
    AskMessage,
    CancelMessage,
    ErrorMessage,
    PullRequest,
    StatusMessage,
    TokenMessage,
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
        if kind in ("ask", "cancel"):
            message = parse_client_message(json.dumps(example))
            assert isinstance(message, AskMessage | CancelMessage)
        elif kind in SERVER:
            model = SERVER[kind]
            assert model.model_validate(example).model_dump(mode="json").keys() == example.keys()
        elif "source" in example and "id" not in example:
            PullRequest.model_validate(example)
        else:
            continue
        kinds.append(kind or "pull")
    assert sorted(set(kinds)) == ["answer", "ask", "cancel", "error", "pull", "status", "token"]


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
