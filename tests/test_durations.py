"""Durations in config and policy files: "30s", "15m", "2h", "1d", decimals and bare seconds."""

from __future__ import annotations

import pytest

from approvals.core.render import duration
from approvals.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        ("0.5s", 0.5),
        (" 10m ", 600.0),
        ("45", 45.0),
        (45, 45.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_accepts_units_decimals_and_bare_seconds(
    text: int | float | str, seconds: float
) -> None:
    """Each accepted form yields its length in seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "m", "10 minutes", "10M", "1w", "500ms", "-5s", "1e3s", ".5h", "1h30m", "ten", "1.h"],
)
def test_parse_duration_rejects_malformed_text_with_an_example(text: str) -> None:
    """A string that is not <amount><s|m|h|d> is refused with a message showing the accepted forms."""
    with pytest.raises(ValueError, match=r'must be a duration like "30s", "15m", "2h" or "1d"'):
        parse_duration(text)


@pytest.mark.parametrize("value", ["0s", "0", 0, 0.0, -3, float("inf"), float("nan"), 10**400])
def test_parse_duration_rejects_zero_negative_and_non_finite(value: int | float | str) -> None:
    """A duration must be finite and greater than 0."""
    with pytest.raises(ValueError, match="greater than 0"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False, None, [], {"m": 1}])
def test_parse_duration_rejects_other_types(value: object) -> None:
    """Booleans, null and containers are not durations, even though bool is an int in Python."""
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["30s", "15m", "2h", "1d", "90s", "36h"])
def test_rendered_durations_parse_back_to_the_same_length(text: str) -> None:
    """A configured duration as people see it (render.duration) reads back as the same length."""
    amount, unit = duration(parse_duration(text)).split()
    assert parse_duration(amount + unit[0]) == parse_duration(text)
