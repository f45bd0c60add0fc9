"""Durations as written in config and policy files: "30s", "15m", "2h", "1d", "1.5h" or bare seconds.

Pure; `parse_duration` raises `ValueError` whose message reads well after a field path
("approval.timeout: must be a duration like ..."). Durations are written back for people by
approvals.core.render.duration, in a form this parses again.
"""

from __future__ import annotations

import json
import math
import re

_PATTERN = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_HINT = 'must be a duration like "30s", "15m", "2h" or "1d"'


def parse_duration(text: int | float | str) -> float:
    """Seconds in `text`: a number of seconds, or a string "<amount><s|m|h|d>" such as "15m".

    The amount may be an integer or a decimal ("1.5h"); a string without a unit is seconds.
    The result must be finite and greater than 0.
    """
    if isinstance(text, bool):  # bool is an int subclass, and `true` is never a duration
        raise ValueError(f"{_HINT} (got {json.dumps(text)})")
    if isinstance(text, int | float):
        try:
            seconds = float(text)
        except OverflowError:  # an int too large for a float
            seconds = math.inf
    elif isinstance(text, str):
        match = _PATTERN.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"{_HINT} (got {json.dumps(text)})")
        seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
    else:
        raise ValueError(f"{_HINT} (got a {type(text).__name__})")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a finite duration greater than 0 (got {json.dumps(text)})")
    return seconds
