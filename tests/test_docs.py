"""The documentation as a newcomer meets it: every python and bash snippet of README.md and docs/ runs, page by
page in order, in a folder laid out like a fresh checkout after the Quick start (the checkout's files linked, the
demo's output copied); every link between the pages resolves; the supported-ops list is the rule table's; and the
runner fails, naming page and line, on a broken snippet."""
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.processes import Scope
from support.snippets import snippets

from igcam_engine.export.rules import supported_ops

ROOT = Path(__file__).resolve().parents[1]
PAGES = [Path("README.md"), *sorted(p.relative_to(ROOT) for p in (ROOT / "docs").glob("*.md"))]
# what a fresh checkout holds, linked into each page's folder (its writes stay in that folder)
CHECKOUT = ("README.md", "pyproject.toml", "igcam_engine", "export", "kernels", "benchmarks", "zoo", "examples",
            "scripts", "tests", "docs", ".ci", ".venv", ".venv-clients")
QUICK_START = ["bash scripts/setup.sh && .venv/bin/igcam demo", "bash scripts/test.sh"]


def _has_bf16() -> bool:
    try:
        import openvino
    except ImportError:
        return False
    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def unmet() -> list[str]:
    """The needs a snippet may declare that this machine does not meet (setup and time never are, here)."""
    met = {"ray": importlib.util.find_spec("ray") is not None, "gpu": _has_cuda(),
           "tritonserver": shutil.which("tritonserver") is not None, "bf16": _has_bf16(), "network": True,
           "setup": False, "time": False}
    return [need for need, available in met.items() if not available]


def checkout(folder: Path, demo: Path) -> Path:
    folder.mkdir()
    for name in CHECKOUT:
        (folder / name).symlink_to(ROOT / name)
    shutil.copytree(demo, folder / "igcam-demo")
    return folder


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The Quick start's demo, run as it says (.venv/bin/igcam demo in a checkout): its output feeds every page."""
    folder = tmp_path_factory.mktemp("quick-start")
    for name in CHECKOUT:
        (folder / name).symlink_to(ROOT / name)
    result = subprocess.run([".venv/bin/igcam", "demo"], cwd=folder, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "285 'Egyptian cat'" in result.stdout
    return folder / "igcam-demo"


def test_the_quick_start_is_what_ci_runs():
    block = next(s for s in snippets(ROOT / "README.md") if s.language == "bash")
    assert block.code.split("\n")[:2] == QUICK_START and block.need == "setup"
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh" in (ROOT / "scripts" / "test.sh").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[str(p) for p in PAGES])
def test_every_snippet_runs(page, demo, tmp_path):
    if not any(s.need not in unmet() for s in snippets(ROOT / page)):
        pytest.skip(f"{page} has no snippet to run here")
    folder = checkout(tmp_path / "checkout", demo)
    scope = Scope(tmp_path / "scope.log")
    env = {**scope.env, "IGCAM_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT / "tests")}
    log = tmp_path / "snippets.log"  # a file: a server a snippet left would hold a pipe open
    try:
        with open(log, "w") as output:
            code = subprocess.run([sys.executable, "-m", "support.snippets", str(page),
                                   *(f"--unmet={need}" for need in unmet())], cwd=folder, env=env, stdout=output,
                                  stderr=subprocess.STDOUT, timeout=1800).returncode
    finally:
        left = scope.stop()
    assert code == 0, log.read_text()[-6000:]
    assert not left, f"{page}'s snippets left processes running: {left}"


def test_a_broken_snippet_fails_naming_its_line(tmp_path):
    for language, code in (("python", "x = 1\nassert x == 2"), ("bash", "true\nfalse")):
        page = tmp_path / f"broken-{language}.md"
        page.write_text(f"# A page\n\n```{language}\n{code}\n```\n")
        result = subprocess.run([sys.executable, "-m", "support.snippets", str(page)], cwd=tmp_path,
                                env={"PYTHONPATH": str(ROOT / "tests"), "PATH": "/usr/bin:/bin"},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and f"{page}:4: the {language} snippet failed" in result.stdout, result.stdout
    skipped = tmp_path / "skipped.md"
    skipped.write_text("<!-- needs: gpu (an H200) -->\n```bash\nfalse\n```\n")
    result = subprocess.run([sys.executable, "-m", "support.snippets", str(skipped), "--unmet=gpu"], cwd=tmp_path,
                            env={"PYTHONPATH": str(ROOT / "tests")}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "skipped (gpu is not available here)" in result.stdout


def test_snippets_declare_only_known_needs():
    needs = {s.need for page in PAGES for s in snippets(ROOT / page)} - {None}
    assert needs <= {"ray", "gpu", "tritonserver", "bf16", "network", "setup", "time"}, needs
    never = [s.where for page in PAGES for s in snippets(ROOT / page) if s.need in ("setup", "time")]
    assert len(never) <= 2, f"snippets that never run in the suite: {never}"


def test_the_supported_ops_list_is_the_rule_table():
    text = (ROOT / "docs" / "supported.md").read_text()
    listed = text.split("<!-- ops: generated -->\n", 1)[1].split("<!-- end ops -->", 1)[0]
    assert listed == supported_ops(), "run `python -m igcam_engine.export.rules` and paste its output"


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set:
    """GitHub's heading anchors of a page, and explicit {#id} ones."""
    found = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            explicit = re.search(r"\{#([\w-]+)\}\s*$", title)
            if explicit:
                found.add(explicit.group(1))
                title = title[:explicit.start()].strip()
            found.add(re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-"))
    return found


def test_every_link_between_the_pages_resolves():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", (ROOT / page).read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (ROOT / page).parent / path if path else ROOT / page
            if not file.exists():
                broken.append(f"{page}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page}: {target} (no such section)")
    assert not broken, broken


def test_the_code_cites_pages_that_exist():
    """Comments and messages point at docs/ pages (README is the front door and has no numbered sections)."""
    wrong = []
    for folder in ("igcam_engine", "export", "kernels", "benchmarks", "zoo", "scripts"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".sh") or "__pycache__" in path.parts:
                continue
            text = path.read_text()
            wrong += [f"{path.relative_to(ROOT)}: {name}" for name in re.findall(r"docs/[\w-]+\.md", text)
                      if not (ROOT / name).exists()]
            wrong += [f"{path.relative_to(ROOT)}: README {section}" for section in re.findall(r'README \\?"[^"]+', text)]
    assert not wrong, wrong


def test_no_page_installs_from_a_registry():
    """The package is not on a registry: installs are from the checkout (pip install '.[extras]') or a wheel."""
    found = [str(page) for page in PAGES if re.search(r"pip install[^\n]*igcam-engine", (ROOT / page).read_text())]
    assert not found, found
