"""Structure figures of the package: files and lines per folder, long files, import cycles, duplicated blocks.

    python scripts/code_metrics.py [SRC] [--keys lora_dropout max_seq_length] [--window 6] [--json]

SRC is the package folder (default src/phitune; any checkout's, e.g. an old tree's, to compare before and after).
Import cycles count every import of a phitune module, at module top or inside a function, because a cycle hidden
in a function still ties the two modules together. "Files a key crosses" counts the files that name the key
(an identifier or string), the path a value takes from YAML to where it acts. A duplicated block is a run of at
least --window consecutive code lines (stripped, comments and blank lines dropped, docstrings kept) that occurs in
two or more places; overlapping windows of one repeat are merged into one block.
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


LONG_FILE = 500  # issue 21: no file over 500 lines unless it is one idea that needs the length


def per_folder(lines: dict[str, int]) -> dict[str, tuple[int, int]]:
    """{folder relative to SRC ('.' for the top): (files, lines)} over the files directly in it."""
    out: dict[str, list[int]] = {}
    for name, n in lines.items():
        folder = str(Path(name).parent)
        entry = out.setdefault(folder, [0, 0])
        entry[0] += 1
        entry[1] += n
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, normalised line) for each line that carries code: stripped, blank and comment lines dropped.

    Trivial lines (a lone bracket, `else:`, `return`, ...) and import lines are dropped as well, or every pair of
    functions would "share" their closing lines and every pair of modules their import headers."""
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", "import ", "from ")) or len(line) < 4:
            continue
        out.append((number, " ".join(line.split())))
    return out


def duplicated_blocks(texts: dict[str, str], window: int) -> list[dict]:
    """Runs of at least `window` equal normalised code lines found in more than one place (also within one file).

    Each window of `window` consecutive code lines is hashed; windows seen in two or more places are duplicates, and
    consecutive duplicate windows of the same pair of places are merged into one block."""
    seen: dict[int, list[tuple[str, int]]] = {}
    code = {name: code_lines(text) for name, text in texts.items()}
    for name, rows in code.items():
        for i in range(len(rows) - window + 1):
            key = hash(tuple(line for _, line in rows[i:i + window]))
            seen.setdefault(key, []).append((name, i))
    # pair of places -> the window starts they share, so overlapping windows merge into one block
    pairs: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for places in seen.values():
        if len(places) < 2:
            continue
        first = places[0]
        for other in places[1:]:
            pairs.setdefault((first[0], other[0]), []).append((first[1], other[1]))
    blocks = []
    for (a, b), starts in pairs.items():
        starts.sort()
        run_start = prev = starts[0]
        for cur in starts[1:] + [None]:
            if cur is not None and cur == (prev[0] + 1, prev[1] + 1):
                prev = cur
                continue
            n = prev[0] - run_start[0] + window
            blocks.append({
                "lines": n,
                "a": f"{a}:{code[a][run_start[0]][0]}-{code[a][prev[0] + window - 1][0]}",
                "b": f"{b}:{code[b][run_start[1]][0]}-{code[b][prev[1] + window - 1][0]}",
            })
            if cur is not None:
                run_start = prev = cur
    return sorted(blocks, key=lambda blk: (-blk["lines"], blk["a"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", default=None, help="the package folder (default src/phitune)")
    ap.add_argument("--src", dest="src_option", default="src/phitune", help=argparse.SUPPRESS)
    ap.add_argument("--window", type=int, default=6, help="code lines a duplicated block has at least")
    ap.add_argument("--keys", nargs="*", default=["lora_dropout", "max_seq_length"])
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    src = Path(args.src or args.src_option)
    if not src.is_dir():
        ap.error(f"{src} is not a folder (give the package folder, e.g. src/phitune)")
    files = sorted(p for p in src.rglob("*.py"))
    modules = {module_name(p, src) for p in files}

    texts = {str(p.relative_to(src)): p.read_text() for p in files}
    lines = {name: len(text.splitlines()) for name, text in texts.items()}
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

    blocks = duplicated_blocks(texts, args.window)
    report = {
        "files": len(files),
        "total_lines": sum(lines.values()),
        "folders": {k: {"files": f, "lines": n} for k, (f, n) in per_folder(lines).items()},
        "files_over_500_lines": {k: n for k, n in sorted(lines.items(), key=lambda kv: -kv[1]) if n > LONG_FILE},
        "largest_files": sorted(lines.items(), key=lambda kv: -kv[1])[: args.top],
        "longest_functions": [f"{n} {name}" for n, name in sorted(functions, reverse=True)[: args.top]],
        "function_level_imports_of_phitune": len(inner_imports),
        "import_cycles": cycles(package_edges(graph)),
        "duplicated_blocks": len(blocks),
        "duplicated_lines": sum(blk["lines"] for blk in blocks),
        "duplicates": blocks,
        "files_naming_key": {k: len(v) for k, v in key_files.items()},
        "key_files": key_files,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['files']} files, {report['total_lines']} lines")
    print("files and lines per folder:")
    for folder, entry in report["folders"].items():
        label = "(top level)" if folder == "." else folder + "/"
        print(f"  {label:<22} {entry['files']:>3} files {entry['lines']:>6} lines")
    over = report["files_over_500_lines"]
    print(f"files over {LONG_FILE} lines:", ", ".join(f"{k} {n}" for k, n in over.items()) or "none")
    print("largest files:", ", ".join(f"{name} {n}" for name, n in report["largest_files"]))
    print("longest functions:", ", ".join(report["longest_functions"]))
    print("imports of phitune modules inside functions:", report["function_level_imports_of_phitune"])
    print("import cycles:", report["import_cycles"] or "none")
    print(f"duplicated blocks (>= {args.window} code lines): {len(blocks)}, {report['duplicated_lines']} lines")
    for blk in blocks[: args.top]:
        print(f"  {blk['lines']:>3} lines  {blk['a']}  ==  {blk['b']}")
    for key, names in key_files.items():
        print(f"files naming {key}: {len(names)} ({', '.join(names)})")


if __name__ == "__main__":
    main()
