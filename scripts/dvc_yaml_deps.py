"""Rewrite the project-code deps of every stage in dvc.yaml from the stages' imports.

`tests/test_dvc_deps.py` fails when dvc.yaml misses a file a stage executes; this script writes the
lists it expects, leaving every other line of dvc.yaml as it is, then writes vision/dvc.yaml again
from it (`scripts/dvc_yaml_vision.py`) and rounds/dvc.yaml (`scripts/dvc_yaml_rounds.py`):

    python scripts/dvc_yaml_deps.py
"""

from __future__ import annotations

import re

import dvc_yaml_rounds
import dvc_yaml_vision
from code_deps import PACKAGES, ROOT, needed_deps


def rewrite(text: str) -> str:
    out, stage, in_deps = [], None, False
    for line in text.splitlines():
        match = re.match(r"^  ([\w-]+):\s*$", line)
        if match:
            stage, in_deps = match.group(1), False
        if re.match(r"^    deps:\s*$", line) and stage:
            out.append(line)
            out.extend(f"      - {dep}" for dep in sorted(needed_deps(stage)))
            in_deps = True
            continue
        if in_deps:
            item = re.match(r"^      - (\S+)", line)
            if item and item.group(1).split("/")[0] in PACKAGES:
                continue  # a project-code dep: rewritten above
            if not item:
                in_deps = False
        out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    path = ROOT / "dvc.yaml"
    path.write_text(rewrite(path.read_text()))
    print(f"rewrote the code deps of {path}")
    (ROOT / "vision" / "dvc.yaml").write_text(dvc_yaml_vision.render())
    print("wrote vision/dvc.yaml")
    (ROOT / "rounds" / "dvc.yaml").write_text(dvc_yaml_rounds.render())
    print("wrote rounds/dvc.yaml")
