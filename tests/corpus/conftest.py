"""The corpus tier: architectures nobody here wrote (torchvision, timm) and third-party ONNX classifiers, exported
and explained against an independent float64 reference. It runs in its own virtualenv (scripts/test.sh).

Every case records a row; with IGCAM_CORPUS_REPORT=FILE the session writes them as the Markdown table that
README's "Supported architectures" shows (FILE outside the repository: the tests write nothing into it).
"""
import os
from pathlib import Path

import pytest

ROWS = []


def pytest_collection_modifyitems(items):
    for item in items:  # the whole tier is slow (10 to 17 minutes on 2 cores)
        item.add_marker(pytest.mark.slow)


@pytest.fixture
def record():
    return ROWS.append


def pytest_sessionfinish(session, exitstatus):
    report = os.environ.get("IGCAM_CORPUS_REPORT")
    if not report or not ROWS:
        return
    lines = ["| family | model (layer, input) | exported | max normalized Δ | max raw Δ / peak | float32 torch Δ | "
             "time |", "|---|---|---|---|---|---|---|"]

    def cell(row, key, form, unit=""):
        return format(row[key], form) + unit if row.get(key) is not None else "—"

    for row in sorted(ROWS, key=lambda r: (r["family"], r["model"])):
        if row["exported"]:
            lines.append(f"| {row['family']} | {row['model']} | yes | {cell(row, 'normalized', '.1e')} | "
                         f"{cell(row, 'raw', '.1e')} | {cell(row, 'float32', '.1e')} | {cell(row, 'seconds', '.0f', ' s')} |")
        else:
            lines.append(f"| {row['family']} | {row['model']} | no: {row['reason']} | | | | |")
    Path(report).write_text("\n".join(lines) + "\n")
