"""The dropped-rows log that normalize and tokenize write under `data.on_invalid: drop`."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

DROPPED_FILE = "dropped.jsonl"


class DroppedLog:
    """Dropped rows, one JSON object per line, counted by reason."""

    def __init__(self, path: Path):
        self.handle = open(path, "w", encoding="utf-8")
        self.count, self.by_reason = 0, Counter()

    def add(self, entry: dict) -> None:
        self.handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.count += 1
        self.by_reason[entry["rule"]] += 1

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "DroppedLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
