"""JSON off the wire (issue 11, items 3 and 6): bounded nesting and finite numbers, refused at parse time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from approvals.jsonrpc import (
    INVALID_PARAMS,
    MAX_JSON_DEPTH,
    PARSE_ERROR,
    EnvelopeError,
    json_depth,
    parse_message,
)
from tests.approvals_kit import Held, start_held
from tests.conftest import TOKEN_A, StartGateway
from tests.rawmcp import RawSession


def nested(depth: int, leaf: Any = 1) -> Any:
    """`leaf` inside `depth` levels of alternating objects and arrays."""
    value = leaf
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


def call(arguments: Any, request_id: int | str = 7) -> dict[str, Any]:
    params = {"name": "send_email", "arguments": arguments}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


def parse_error(body: bytes) -> EnvelopeError:
    with pytest.raises(EnvelopeError) as caught:
        parse_message(body)
    return caught.value


# ---- item 6: depth ------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1_000, 100_000])
def test_parse_refuses_json_nested_past_the_limit(depth: int) -> None:
    """A body nested deeper than MAX_JSON_DEPTH is a -32700, not a RecursionError."""
    body = b"[" * depth + b"]" * depth
    assert parse_error(body).code == PARSE_ERROR
    unclosed = b'{"a":' * depth  # never closed: the decoder would still recurse all the way
    assert parse_error(unclosed).code == PARSE_ERROR


def test_parse_accepts_json_nested_to_the_limit() -> None:
    """A message whose deepest value sits exactly MAX_JSON_DEPTH levels down is accepted as is."""
    arguments = nested(MAX_JSON_DEPTH - 2)  # inside two levels: the envelope and params
    body = json.dumps(call(arguments)).encode()
    assert json_depth(body.decode()) == MAX_JSON_DEPTH
    assert parse_message(body).params["arguments"] == arguments


@pytest.mark.parametrize(
    "text",
    [
        '"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["',
        '["\\"[[[", "\\\\", "]\\\\\\"[", {"a": "{{{{"}, [[["}"]]]]',
        '{"a": [1, {"b": [[], {}]}], "c": "\\u005b"}',
        "[]",
        "7",
    ],
)
def test_depth_scan_treats_brackets_in_strings_as_text(text: str) -> None:
    """The scan's depth equals the decoded value's, escapes and brackets in strings included."""

    def depth(value: Any) -> int:
        if isinstance(value, dict):
            return 1 + max(map(depth, value.values()), default=0)
        if isinstance(value, list):
            return 1 + max(map(depth, value), default=0)
        return 0

    assert json_depth(text) == depth(json.loads(text))


def test_parse_accepts_many_brackets_inside_strings() -> None:
    """Thousands of brackets inside a string do not count as nesting."""
    body = json.dumps(call({"body": "[{" * 5_000})).encode()
    assert parse_message(body).params["arguments"] == {"body": "[{" * 5_000}


# ---- item 3: numbers ----------------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "1E+309", str(10**400), str(-(10**309))])
def test_parse_refuses_numbers_a_double_cannot_hold(literal: str) -> None:
    """1e400 (which Python reads as inf) and integers past the largest double are -32602, with the id."""
    body = json.dumps(call({"to": "x", "amount": 0})).replace('"amount": 0', f'"amount": {literal}')
    error = parse_error(body.encode())
    assert (error.code, error.request_id) == (INVALID_PARAMS, 7)
    assert "params.arguments.amount" in str(error)  # it says where


@pytest.mark.parametrize("literal", ["1e400", str(10**400)])
def test_parse_refuses_an_out_of_range_number_anywhere(literal: str) -> None:
    """The bound holds at any depth, in lists, and in a notification (which has no id)."""
    body = f'{{"jsonrpc":"2.0","method":"notifications/x","params":{{"a":[1,{{"b":{literal}}}]}}}}'
    error = parse_error(body.encode())
    assert (error.code, error.request_id) == (INVALID_PARAMS, None)


def test_parse_keeps_64_bit_ids_and_the_largest_double() -> None:
    """Ordinary big numbers pass untouched: 64-bit ids, the largest double, its integer value."""
    largest = int(1.7976931348623157e308)
    values = [2**64 - 1, -(2**63), 1.7976931348623157e308, -1.7976931348623157e308, largest, 5e-324]
    message = parse_message(json.dumps(call({"values": values}, request_id=2**63 - 1)).encode())
    assert message.id == 2**63 - 1
    assert message.params["arguments"]["values"] == values


# ---- through the gateway ------------------------------------------------------------------------


@pytest.fixture
async def held(start_gateway: StartGateway, tmp_path: Path) -> Held:
    """The gateway holding send_email for approval (demo upstream)."""
    return await start_held(start_gateway, tmp_path)


async def test_mcp_refuses_deep_and_infinite_json_before_the_gate(held: Held) -> None:
    """Over /mcp: a deep body is a 400 -32700, 1e400 a 400 -32602 with the id; nothing is held or sent."""
    async with aiohttp.ClientSession() as http:
        raw = RawSession(http, held.url(), TOKEN_A)
        await raw.initialize()
        deep = await raw.post(b"[" * 5_000 + b"]" * 5_000)
        assert deep.status == 400
        assert deep.last["error"]["code"] == PARSE_ERROR
        body = json.dumps(call({"to": "x@example.com", "amount": 1}, request_id="n1")).encode()
        infinite = await raw.post(body.replace(b'"amount": 1', b'"amount": 1e400'))
        assert infinite.status == 400
        assert (infinite.last["id"], infinite.last["error"]["code"]) == ("n1", INVALID_PARAMS)
    assert await held.gateway.service.store.list_approvals(limit=10) == []
    assert held.sent() == []
