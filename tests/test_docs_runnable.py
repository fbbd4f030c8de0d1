"""Every runnable block of README.md and docs/*.md runs as written (the convention: docs/jobs.md,
"Runnable examples").

A fenced block whose info string is `bash runnable` (or `python runnable`) is run in a fresh
empty working folder, with HOME an empty folder, the venv's bin/ first on PATH and the
repository root in $VITLENS_REPO: bash blocks under `set -euo pipefail`, python blocks with
the venv's python. One test per block, named FILE:LINE, so a failure names the block.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
RUNNERS = ("bash", "python")
BLOCK_TIMEOUT_S = 180


def runnable_blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line of the opening fence, language, code) of every `LANG runnable` block in `path`."""
    blocks, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, words = match.group("fence"), match.group("info").split()
        end = i + 1
        while end < len(lines) and not (lines[end].strip().startswith(fence[0] * len(fence))
                                        and not lines[end].strip().strip(fence[0])):
            end += 1
        if len(words) >= 2 and words[0] in RUNNERS and "runnable" in words[1:]:
            blocks.append((i + 1, words[0], "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


def _all_blocks() -> list:
    params = []
    for path in DOCS:
        for line, language, code in runnable_blocks(path):
            name = f"{path.relative_to(REPO)}:{line}"
            params.append(pytest.param(language, code, id=name))
    return params


BLOCKS = _all_blocks()


def test_there_are_runnable_blocks_in_the_readme_and_the_docs():
    names = [p.id for p in BLOCKS]
    assert any(n.startswith("README.md:") for n in names), names
    assert any(n.startswith("docs/") for n in names), names
    assert {p.values[0] for p in BLOCKS} <= set(RUNNERS)


def test_block_extraction(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("text\n```bash\nnot me\n```\n````bash runnable\necho 1\n```\nstill inside\n````\n"
                    "```python runnable\nprint(2)\n```\n```bashrunnable\nno\n```\n", encoding="utf-8")
    assert runnable_blocks(page) == [(5, "bash", "echo 1\n```\nstill inside\n"), (10, "python", "print(2)\n")]


@pytest.mark.parametrize("language,code", BLOCKS)
def test_runnable_block(language: str, code: str, tmp_path: Path):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VITLENS_"))}
    env.update(HOME=str(home), VITLENS_REPO=str(REPO), PYTHONUNBUFFERED="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    if language == "bash":
        command = ["bash", "-c", "set -euo pipefail\n" + code]
    else:
        command = [sys.executable, "-c", code]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert done.returncode == 0, (
        f"exit {done.returncode}\n--- block ---\n{code}--- stdout ---\n{done.stdout[-4000:]}"
        f"--- stderr ---\n{done.stderr[-4000:]}")
