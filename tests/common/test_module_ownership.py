"""Each concern has one owner in the code (CONTRIBUTING.md): a constant of common/ is defined in one module and
imported by the others, and only common/distributed.py calls torch.distributed."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMON = sorted(REPO.glob("common/**/*.py"))
PRODUCTION = sorted([*COMMON, *REPO.glob("benchmarks/*.py"), *REPO.glob("*.py")])


def module_constants(path: Path) -> dict[str, str]:
    """UPPER_CASE names assigned at module level -> the assigned expression's source."""
    constants = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id.isupper() and node.value is not None:
                    constants[target.id] = ast.unparse(node.value)
    return constants


def test_every_constant_is_defined_in_one_module():
    definitions: dict[tuple[str, str], list[str]] = {}
    for path in COMMON:
        for name, value in module_constants(path).items():
            definitions.setdefault((name, value), []).append(str(path.relative_to(REPO)))
    twice = {f"{name} = {value}": paths for (name, value), paths in definitions.items() if len(paths) > 1}
    assert not twice, twice


def test_only_distributed_py_calls_torch_distributed():
    callers = []
    for path in PRODUCTION:
        if path == REPO / "common" / "distributed.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            imported = isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed") or (
                isinstance(node, ast.Import) and any(alias.name.startswith("torch.distributed") for alias in node.names))
            called = isinstance(node, ast.Call) and ast.unparse(node.func).startswith("torch.distributed.")
            if imported or called:
                callers.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not callers, callers
