"""Reads a JSONL trace: a request a line: arrival time, prompt (token ids or text), max tokens."""
from __future__ import annotations

import json
from pathlib import Path

from bench.serving.workload import BenchRequest


class TraceError(ValueError):
    """A trace line that cannot be replayed; the message names the file, the line and the field."""


def load_trace(path: str | Path) -> tuple[list[float], list[BenchRequest]]:
    """Lines like {"t": 0.5, "prompt_ids": [1, 2], "max_tokens": 64} or {"t": 0.7, "text": "...", ...};
    returns send offsets (shifted so the first is 0, sorted) and the requests in that order."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
            t, max_tokens = float(row["t"]), int(row["max_tokens"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise TraceError(f"{where}: needs a JSON object with numbers 't', 'max_tokens' ({e})") from None
        if ("prompt_ids" in row) == ("text" in row):
            raise TraceError(f"{where}: give exactly one of 'prompt_ids' or 'text'")
        if max_tokens < 1 or t < 0:
            raise TraceError(f"{where}: 't' must be >= 0 and 'max_tokens' >= 1")
        if "text" in row:
            req = BenchRequest(max_tokens=max_tokens, text=str(row["text"]))
        else:
            req = BenchRequest(max_tokens=max_tokens, prompt_ids=tuple(int(x) for x in row["prompt_ids"]))
        rows.append((t, req))
    if not rows:
        raise TraceError(f"{path}: no requests")
    rows.sort(key=lambda r: r[0])
    start = rows[0][0]
    return [t - start for t, _ in rows], [r for _, r in rows]
