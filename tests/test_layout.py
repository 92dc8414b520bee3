"""The layers of the package import only downward and never in a circle.

Every import statement of every module (those inside functions too) is read from the source; a module belongs to a
layer by its name, and each layer may import only the layers below it:

    core (igcam_engine.*)  <-  export, zoo  <-  benchmarks  <-  apps
    core, export  <-  notebook (igcam_engine.notebook: torch model to maps in one call)
    core, export  <-  evaluation (igcam_engine.evaluation: the metrics; its sanity check randomizes a bundle)  <-  apps,
                      benchmarks
    kernels (the CUDA sources, used by the core's device stages)

The core additionally imports none of torch, onnx, Ray, matplotlib or the web stack: the runtime installs with numpy,
Pillow and onnxruntime alone.
"""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package name -> folder in the checkout
FOLDERS = {"igcam_engine": "igcam_engine", "igcam_engine.export": "export", "igcam_engine.kernels": "kernels",
           "igcam_engine.benchmarks": "benchmarks", "igcam_engine.zoo": "zoo"}
LAYERS = ("apps", "notebook", "evaluation", "benchmarks", "export", "zoo", "kernels")  # the core is everything else under igcam_engine
ALLOWED = {
    "core": {"core", "kernels"},
    "kernels": {"kernels"},
    "export": {"export", "core"},
    "zoo": {"zoo"},
    "benchmarks": {"benchmarks", "evaluation", "export", "zoo", "core"},
    "apps": {"apps", "benchmarks", "evaluation", "export", "zoo", "core"},
    "notebook": {"notebook", "export", "core"},
    "evaluation": {"evaluation", "export", "core"},
}
CORE_FORBIDDEN = {"torch", "onnx", "onnxscript", "ray", "matplotlib", "starlette", "fastapi", "pycuda"}
# The device stages need pycuda; they are the core's GPU implementation and import it only when constructed.
CORE_OPTIONAL = {"igcam_engine.device": {"pycuda"}}


def modules() -> dict:
    """module name -> source path, for every module of the package as laid out in the checkout."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if package == "igcam_engine" and parts[0] in ("export", "kernels", "benchmarks", "zoo"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = modules()


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def imports(module: str, path: Path) -> set:
    """Absolute names of everything `module` imports; `from package import name` counts as importing the module
    package.name when that is a module, else the package."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                names.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
    return names


GRAPH = {module: imports(module, path) for module, path in MODULES.items()}


def test_every_layer_is_found():
    assert {layer(m) for m in MODULES} == set(ALLOWED)
    assert {"igcam_engine.explainer", "igcam_engine.apps.cli", "igcam_engine.export.rules", "igcam_engine.zoo.resnet",
            "igcam_engine.benchmarks.latency", "igcam_engine.kernels"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_only_downward(module):
    wrong = sorted(target for target in GRAPH[module] if target.startswith("igcam_engine")
                   and layer(target) not in ALLOWED[layer(module)])
    assert not wrong, f"{module} ({layer(module)}) imports {wrong}"
    if layer(module) == "core":
        third_party = {name.split(".")[0] for name in GRAPH[module]} & CORE_FORBIDDEN
        third_party -= CORE_OPTIONAL.get(module, set())
        assert not third_party, f"the core module {module} imports {sorted(third_party)}"


def test_no_import_cycle():
    """Tarjan's strongly connected components over the package's own modules: every component must be one
    module."""
    edges = {m: sorted(t for t in targets if t in MODULES and t != m) for m, targets in GRAPH.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_can_fail():
    """A core module importing an application (and torch), and two modules importing each other, are caught."""
    saved = {m: GRAPH[m] for m in ("igcam_engine.maps", "igcam_engine.quadrature")}
    GRAPH["igcam_engine.maps"] = {"igcam_engine.quadrature", "torch"}
    GRAPH["igcam_engine.quadrature"] = {"igcam_engine.maps", "igcam_engine.apps.cli"}
    try:
        with pytest.raises(AssertionError, match="imports \\['igcam_engine.apps.cli'\\]"):
            test_imports_go_only_downward("igcam_engine.quadrature")
        with pytest.raises(AssertionError, match="imports \\['torch'\\]"):
            test_imports_go_only_downward("igcam_engine.maps")
        with pytest.raises(AssertionError, match="import cycles"):
            test_no_import_cycle()
    finally:
        GRAPH.update(saved)


SOURCES = {module: path.read_text() for module, path in MODULES.items()}


def _raises_of(module: str):
    """(line, exception name) of every `raise Name(...)` in a module."""
    for node in ast.walk(ast.parse(SOURCES[module])):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
            yield node.lineno, node.exc.func.id


def test_errors_are_raised_by_kind():
    """UserError is the common base; code raises a kind (igcam_engine.errors), which front ends answer by type."""
    found = [f"{module}:{line}" for module in MODULES for line, name in _raises_of(module) if name == "UserError"]
    assert not found, f"raise a kind of UserError (OptionError, InputError, ...), not UserError itself: {found}"


TEXT_MATCHING = re.compile(r"""["'][^"']*["']\s+(not\s+)?in\s+str\(\w+\)|str\(\w+\)\.replace\(""")


def test_no_error_is_told_by_its_wording():
    found = [f"{module}:{n}" for module, source in SOURCES.items() for n, line in enumerate(source.splitlines(), 1)
             if TEXT_MATCHING.search(line)]
    assert not found, f"an error's text decides what happens at {found}: raise (and catch) a kind instead"


def test_options_are_validated_by_the_validators():
    """"An int but not a bool" and its kin are written once, in igcam_engine.validators."""
    found = [f"{module}:{n}" for module, source in SOURCES.items() if module != "igcam_engine.validators"
             for n, line in enumerate(source.splitlines(), 1) if re.search(r"isinstance\([^)]*\bbool\b", line)]
    assert not found, f"hand-written type checks at {found}: use igcam_engine.validators"


def test_the_explainer_stays_a_facade():
    lines = len(SOURCES["igcam_engine.explainer"].splitlines())
    assert lines < 200, f"igcam_engine/explainer.py has {lines} lines: its concerns belong in the modules it wires"


def test_the_wording_checks_can_fail():
    assert TEXT_MATCHING.search('        raise HTTPError(413 if "more than the limit" in str(e) else 422, str(e))')
    assert TEXT_MATCHING.search('messages[index] = str(e).replace("image bytes", "the file", 1)')
    saved = SOURCES["igcam_engine.maps"]
    SOURCES["igcam_engine.maps"] = "def f(x):\n    raise UserError('no')\n"
    try:
        with pytest.raises(AssertionError, match="igcam_engine.maps:2"):
            test_errors_are_raised_by_kind()
    finally:
        SOURCES["igcam_engine.maps"] = saved
