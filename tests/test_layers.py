"""The layers of docs/design.md import only downward, and no backend imports the oracle.

Every ``import`` statement of every module under ``eep/`` counts, lazy ones inside functions too:
a lazy import is still a dependency, it only runs later.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "eep"

# bottom up; a module may import its own layer and the layers below it
LAYERS = [
    ("base", ["eep.errors", "eep.envs"]),
    ("state", ["eep.state"]),
    ("routing", ["eep.routing"]),
    ("expert math", ["eep.mlp", "eep.fp8"]),
    ("exchange seam and repair", ["eep.exchange", "eep.transport", "eep.repair"]),
    ("reference", ["eep.reference"]),
    ("fused backends", ["eep.fused"]),
    ("runtime", ["eep.runtime"]),
    ("integrations", ["eep.integrations"]),
    ("applications", ["eep.cli"]),
]
NO_ORACLE = ("eep.exchange", "eep.transport", "eep.repair", "eep.fused", "eep.runtime", "eep.integrations")


def layer_of(module: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names
                      if node.module == "eep"]  # `from eep import reference`
    return [(line, name) for line, name in found if name == "eep" or name.startswith("eep.")]


MODULES = sorted(p for p in ROOT.rglob("*.py") if module_name(p) != "eep")


def test_every_package_module_has_a_layer():
    unplaced = [module_name(p) for p in MODULES if layer_of(module_name(p)) is None]
    assert not unplaced, f"modules outside every layer of docs/design.md: {unplaced}"


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_imports_go_only_downward(path):
    me = module_name(path)
    mine = layer_of(me)
    upward = [f"{path.name}:{line} imports {name} ({LAYERS[layer_of(name)][0]})"
              for line, name in imports_of(path)
              if layer_of(name) is not None and layer_of(name) > mine]
    assert not upward, f"{me} is in layer '{LAYERS[mine][0]}' but " + "; ".join(upward)


@pytest.mark.parametrize("path", [p for p in MODULES if module_name(p).startswith(NO_ORACLE)],
                         ids=[module_name(p) for p in MODULES if module_name(p).startswith(NO_ORACLE)])
def test_no_backend_imports_the_oracle(path):
    oracle = [f"{path.name}:{line} imports {name}" for line, name in imports_of(path)
              if name == "eep.reference" or name.startswith("eep.reference.")]
    assert not oracle, "; ".join(oracle)


def test_the_walk_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from eep.reference import dense_moe\n    import eep.fused.buffer\n")
    assert [name for _, name in imports_of(probe)] == ["eep.reference", "eep.fused.buffer"]
