"""Structure figures of the package: lines per file, longest functions, import cycles, where config keys travel.

    python scripts/code_metrics.py [--src src/phitune] [--keys lora_dropout max_seq_length] [--json]

Import cycles count every import of a phitune module, at module top or inside a function, because a cycle hidden
in a function still ties the two modules together. "Files a key crosses" counts the files that name the key
(an identifier or string), the path a value takes from YAML to where it acts.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, src: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """(imported phitune module, at module top?) for every import in the file."""
    current = module_name(path, src)
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    type_only = set()  # imports under `if TYPE_CHECKING:` are not runtime edges
    for n in tree.body:
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            type_only |= {id(c) for c in ast.walk(n)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node, current, path.name == "__init__.py")
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != current:
                found.append((name, id(node) in top_level))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph with a package's __init__ left out: `phitune` re-exports lazily and is nobody's dependency."""
    return {a: {b for b in bs if b != "phitune"} for a, bs in graph.items() if a != "phitune"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="src/phitune")
    ap.add_argument("--keys", nargs="*", default=["lora_dropout", "max_seq_length"])
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    src = Path(args.src)
    files = sorted(p for p in src.rglob("*.py"))
    modules = {module_name(p, src) for p in files}

    lines = {str(p.relative_to(src)): len(p.read_text().splitlines()) for p in files}
    functions = []
    graph: dict[str, set[str]] = {}
    inner_imports = []
    for p in files:
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(src)}:{node.name}"))
        mod = module_name(p, src)
        for target, top in imports_of(p, src, modules):
            graph.setdefault(mod, set()).add(target)
            if not top:
                inner_imports.append(f"{p.relative_to(src)} -> {target}")
    key_files = {}
    for key in args.keys:
        pattern = re.compile(rf"\b{re.escape(key)}\b")
        key_files[key] = [str(p.relative_to(src)) for p in files if pattern.search(p.read_text())]

    report = {
        "files": len(files),
        "total_lines": sum(lines.values()),
        "largest_files": sorted(lines.items(), key=lambda kv: -kv[1])[: args.top],
        "longest_functions": [f"{n} {name}" for n, name in sorted(functions, reverse=True)[: args.top]],
        "function_level_imports_of_phitune": len(inner_imports),
        "import_cycles": cycles(package_edges(graph)),
        "files_naming_key": {k: len(v) for k, v in key_files.items()},
        "key_files": key_files,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['files']} files, {report['total_lines']} lines")
    print("largest files:", ", ".join(f"{name} {n}" for name, n in report["largest_files"]))
    print("longest functions:", ", ".join(report["longest_functions"]))
    print("imports of phitune modules inside functions:", report["function_level_imports_of_phitune"])
    print("import cycles:", report["import_cycles"] or "none")
    for key, names in key_files.items():
        print(f"files naming {key}: {len(names)} ({', '.join(names)})")


if __name__ == "__main__":
    main()
