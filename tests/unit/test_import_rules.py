"""Import rules between the product packages, read from every module's imports (docs/architecture.md)."""
from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("router", "prefill_worker", "decode_worker", "kv_transfer", "engine", "kernels", "contracts",
            "deploy", "proto")
GRPC = ("grpc", "grpc_health", "grpc_reflection", "grpc_tools")


@dataclass(frozen=True)
class Import:
    path: Path  # the importing file
    line: int
    module: str  # dotted name as imported ("engine.kv_cache", "torch.nn")

    @property
    def top(self) -> str:
        return self.module.split(".")[0]

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True)
class Rule:
    source: str  # the package whose modules the rule constrains
    forbidden: tuple[str, ...]  # top-level names those modules must not import
    why: str


RULES = (
    Rule("kernels", ("engine", "prefill_worker", "decode_worker", "router", "deploy"), "kernels are leaves"),
    Rule("kv_transfer", ("engine", "ray", "router", "prefill_worker", "decode_worker"),
         "kv_transfer knows the KV layout, not the model, the workers or Ray"),
    Rule("engine", ("router", "prefill_worker", "decode_worker", "deploy", "ray", *GRPC),
         "the engine runs inside either worker, without Ray or gRPC"),
    Rule("prefill_worker", ("decode_worker",), "the workers never import each other"),
    Rule("decode_worker", ("prefill_worker",), "the workers never import each other"),
    Rule("contracts", (*(p for p in PACKAGES if p != "contracts"), "torch"),
         "contracts are torch-free leaves"),
    *(Rule(p, ("router", "deploy"), "nothing imports router or deploy")
      for p in PACKAGES if p not in ("router", "deploy")),
    Rule("router", ("deploy",), "nothing imports deploy"),
    *(Rule(p, ("bench",), "the benchmarks sit above the product: only the CLI (deploy) runs them")
      for p in PACKAGES if p != "deploy"),
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_file(module: str) -> Path | None:
    """The product file that defines dotted `module`, or None if it is not one of ours."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def imports_of(path: Path) -> tuple[Import, ...]:
    """Every import in `path` (once per line and module), function-level and TYPE_CHECKING ones included: a
    type-only arrow is still an arrow."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:  # `from pkg import module` imports pkg.module
                sub = f"{base}.{alias.name}"
                found.append(Import(path, node.lineno, sub if _module_file(sub) else base))
    return tuple(dict.fromkeys(found))


def product_files() -> list[Path]:
    return sorted(f for p in PACKAGES for f in (ROOT / p).rglob("*.py"))


def project_targets(imp: Import) -> list[Path]:
    """The product files an import executes: the module and every package above it."""
    parts = imp.module.split(".")
    files = (_module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1))
    return [f for f in files if f is not None]


def rule_violations() -> list[str]:
    problems = []
    for path in product_files():
        source = _module_name(path).split(".")[0]
        for imp in imports_of(path):
            for rule in RULES:
                if rule.source == source and imp.top in rule.forbidden:
                    problems.append(f"{imp}: {rule.source} -> {imp.module}: {rule.why}")
    return problems


def torch_chains(package: str) -> list[str]:
    """For each module of `package` that reaches torch through project imports: the chain, file:line each."""
    problems = []
    for path in sorted((ROOT / package).rglob("*.py")):
        chain = torch_chain(path)
        if chain:
            problems.append(" -> ".join(f"{imp} ({imp.module})" for imp in chain))
    return problems


def torch_chain(start: Path) -> tuple[Import, ...] | None:
    """The shortest chain of imports from `start` to a torch import (breadth-first over product modules)."""
    chains: dict[Path, tuple[Import, ...]] = {start: ()}
    queue = deque([start])
    while queue:
        path = queue.popleft()
        for imp in imports_of(path):
            if imp.top == "torch":
                return (*chains[path], imp)
            for target in project_targets(imp):
                if target not in chains:
                    chains[target] = (*chains[path], imp)
                    queue.append(target)
    return None


def test_packages_import_only_in_the_allowed_directions() -> None:
    problems = rule_violations()
    assert not problems, "import rule violations:\n" + "\n".join(problems)


def test_router_reaches_no_torch_through_project_imports() -> None:
    problems = torch_chains("router")
    assert not problems, "router modules that import torch:\n" + "\n".join(problems)


def test_the_checker_sees_function_level_and_from_package_imports() -> None:
    launcher = imports_of(ROOT / "deploy" / "launcher.py")
    # `from router.server import build_server` inside LocalCluster.serve, `import ray` inside functions.
    assert {"router.server", "ray"} <= {imp.module for imp in launcher}
    cli = imports_of(ROOT / "deploy" / "cli.py")
    assert "deploy.client" in {imp.module for imp in cli}  # `from deploy import client`
    assert torch_chain(ROOT / "engine" / "llm_engine.py") is not None
