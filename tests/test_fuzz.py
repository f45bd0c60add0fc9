"""bench/fuzz.py, small and seeded, inside the suite: malformed requests never get an HTTP 500."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent.parent / "bench" / "fuzz.py"


def test_malformed_requests_never_get_a_500() -> None:
    """1,500 seeded malformed requests over every route: no 500, no leaked traceback, the gateway lives."""
    command = [sys.executable, str(FUZZ), "--requests", "1500", "--seed", "11", "--seconds", "60"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=100, check=False)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
    assert "1,500 requests" in done.stdout, done.stdout[-2000:]  # none skipped by the time bound
