"""The code blocks of a Markdown page, and a runner that executes them in order as a newcomer would.

A ```python or ```bash block is a snippet (```text, ```csv and the others are not run). Python snippets share one
namespace per page, as cells of a notebook; bash snippets run with `bash -euo pipefail`, in the page's folder. A
comment `<!-- needs: WHAT (why) -->` on the line before a fence names what the snippet needs beyond the suite's
machine (ray, gpu, tritonserver, bf16, network; setup and time are never met inside the suite); the runner skips
the snippets whose needs are listed as unmet, and says so.

    python -m support.snippets PAGE [--unmet NEED ...]     # exit 1 and the page:line of the first failure
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^```(\S*)\s*$")
NEEDS = re.compile(r"^<!--\s*needs:\s*([a-z0-9-]+)\b.*-->\s*$")
LANGUAGES = ("python", "bash")
BASH_TIMEOUT_S = 900


@dataclass(frozen=True)
class Snippet:
    page: str
    line: int  # of the first line of code
    language: str
    code: str
    need: str | None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def snippets(page: Path, every_block: bool = False) -> list[Snippet]:
    """The page's python and bash blocks (`every_block`: every fenced block, whatever its language)."""
    found, lines, n = [], page.read_text().splitlines(), 0
    while n < len(lines):
        opening = FENCE.match(lines[n])
        if not opening:
            n += 1
            continue
        need = NEEDS.match(lines[n - 1]) if n else None
        end = next((m for m in range(n + 1, len(lines)) if lines[m].rstrip() == "```"), None)
        if end is None:
            raise ValueError(f"{page}:{n + 1}: a code block that never closes")
        if every_block or opening.group(1) in LANGUAGES:
            found.append(Snippet(str(page), n + 2, opening.group(1), "\n".join(lines[n + 1:end]) + "\n",
                                 need.group(1) if need else None))
        n = end + 1
    return found


def run(page: Path, unmet=()) -> int:
    namespace = {"__name__": "__main__"}
    for snippet in snippets(page):
        if snippet.need in unmet:
            print(f"{snippet.where}: skipped ({snippet.need} is not available here)", flush=True)
            continue
        print(f"{snippet.where}: {snippet.language}", flush=True)
        if snippet.language == "python":
            try:  # line numbers as in the page, for tracebacks
                exec(compile("\n" * (snippet.line - 1) + snippet.code, snippet.page, "exec"), namespace)
            except BaseException:
                traceback.print_exc()
                print(f"{snippet.where}: the python snippet failed", flush=True)
                return 1
        else:
            sys.stdout.flush()
            code = _bash(snippet.code)
            if code != 0:
                print(f"{snippet.where}: the bash snippet failed ({code})", flush=True)
                return 1
    return 0


def _bash(code: str):
    """Runs a bash snippet in a process group of its own; what it left running in the background (a server whose
    snippet failed before stopping it) is stopped with it."""
    process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", code], start_new_session=True)
    try:
        return process.wait(timeout=BASH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("page", type=Path)
    parser.add_argument("--unmet", action="append", default=[])
    arguments = parser.parse_args()
    sys.exit(run(arguments.page, arguments.unmet))
