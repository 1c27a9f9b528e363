"""Check that the phitune names README.md and docs/architecture.md quote exist in the code, and its import rules hold.

    python scripts/check_docs.py [FILE ...]        (default: README.md docs/architecture.md; run by `make lint`)

What is checked, in every inline `code` span, and in plain fenced blocks (no language: the layout, the data flow)
every dotted word whose first part is a phitune module or class (fenced blocks with a language are examples):
- a dotted name (`step.batch_maker`, `phitune.lora.disable_adapters`, `TrainState.micro`, `fast.fused.install(...)`):
  its first part must be a phitune module or package (by its last name or a dotted tail of its path:
  `train`, `training.train`, `phitune.training.train`), a class phitune defines, a config key section
  (`model.load_in_4bit`, `data.max_seq_length`) or one of OTHER_NAMES below; every following part must then exist:
  a submodule, a name the module defines (a package: also imports or exports lazily; a plain module's imports do
  not count, so `train.batch_maker` fails where `step.batch_maker` passes), a class attribute, a config key;
- a file name (`train.py`, `training/step.py`, `scripts/sync_readme.py`): a file of the repository ends with it.
And every import of a phitune module (inside functions too) must be allowed by the table under '## Import rules'
in docs/architecture.md: a module may import its own subpackage, the leaves (errors, _typed, _lazy) and what
its subpackage's row lists. The '## Layout' block there lists every module of src/phitune, and only those.
The code is read with `ast` (nothing imported but phitune.config's key list, which loads without torch).
A name of another library or of a local variable that a document quotes goes in OTHER_NAMES, so that a module
renamed or removed in phitune is reported instead of passing as "someone else's name".
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "phitune"
DOCS = ("README.md", "docs/architecture.md")

# First parts that are not phitune's (other libraries, a Hugging Face model object, GGUF metadata keys, local
# variables in the docs' examples) -> the second parts allowed after them (None: any). Keep it short and specific:
# a phitune module name must never be here.
OTHER_NAMES: dict[str, set[str] | None] = {
    "torch": None, "nn": None, "transformers": None, "peft": None, "loralib": None, "gguf": None, "datasets": None,
    "tempfile": None, "fcntl": None, "os": None, "tokenizers": None,
    "og": {"Tokenizer"},  # onnxruntime_genai
    "llm": {"tokenize"},  # llama_cpp.Llama
    "general": {"name"}, "adapter": {"lora"},  # GGUF metadata keys
    "stop": {"saving"},  # interrupt.StopOnSignal as the loop names it
    "model": {"generate", "model", "name_or_path", "config", "lm_head"},  # a transformers model (model.* config
    # keys are checked against ModelConfig before this)
}
# A dotted span whose last part is one of these is a file name (`meta.json`, `phitune.lock`), not a code name.
FILE_SUFFIXES = {"json", "jsonl", "yaml", "yml", "jinja", "lock", "model", "pt", "safetensors", "md", "txt", "html",
                 "png", "gguf", "sh", "toml", "cfg", "csv", "parquet", "arrow", "bin", "onnx", "whl", "py"}
FILE_ROOTS = ("src/phitune", "scripts", "benchmarks", "tests", "examples", "docs", ".")

DOTTED = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)")
FILE = re.compile(r"^([\w./-]+\.py)$")
WORD = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\()?")
SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


@dataclass
class Module:
    """What one phitune module offers to a dotted name: its names and, per class, the class's attributes."""

    names: set[str] = field(default_factory=set)
    classes: dict[str, set[str]] = field(default_factory=dict)


def class_attributes(node: ast.ClassDef) -> set[str]:
    """Methods, class-level fields and `self.x = ...` attributes of a class."""
    out: set[str] = set()
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            out.add(item.target.id)
        elif isinstance(item, ast.Assign):
            out |= {t.id for t in item.targets if isinstance(t, ast.Name)}
    for sub in ast.walk(node):
        targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target] if isinstance(
            sub, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                out.add(t.attr)
    return out


def read_module(path: Path) -> Module:
    """The names a module defines at top level or exports through a lazy `_EXPORTS` dict; a package's `__init__.py`
    also exports what it imports. A plain module's imports are not its names: `train.batch_maker` must be quoted as
    `step.batch_maker`, where the function lives."""
    mod = Module()
    package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            mod.names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            mod.names.add(node.name)
            mod.classes[node.name] = class_attributes(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and package:
            mod.names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            mod.names |= {t.id for t in targets if isinstance(t, ast.Name)}
            if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets) and isinstance(node.value,
                                                                                                 ast.Dict):
                mod.names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return mod


def read_package(src: Path = SRC) -> dict[str, Module]:
    """{dotted module path ('phitune.training.step'): Module} for every module of the package."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = ["phitune", *path.relative_to(src).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = read_module(path)
    return out


def config_keys() -> dict[str, dict]:
    """{section: {key: nested keys or {}}} of a run config, from the classes behind `--help-config`."""
    sys.path.insert(0, str(SRC.parent))
    from phitune.config.reference import config_sections

    def keys(cls) -> dict:
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[f.name] = keys(type(default)) if dataclasses.is_dataclass(default) else {}
        return out

    return {name: keys(cls) for name, cls in config_sections()}


class Checker:
    """Resolves the names quoted in a document against the package read by `read_package`."""

    def __init__(self, modules: dict[str, Module], sections: dict[str, dict], root: Path = ROOT):
        self.modules = modules
        self.sections = sections
        self.files = [str(p.relative_to(root)) for base in FILE_ROOTS
                      for p in (root / base).glob("*.py" if base == "." else "**/*.py")]
        self.classes: dict[str, list[set[str]]] = {}
        for mod in modules.values():
            for name, attrs in mod.classes.items():
                self.classes.setdefault(name, []).append(attrs)

    def problem(self, span: str, *, only_phitune: bool = False) -> str | None:
        """Why the span names something that does not exist; None when it exists or is not a phitune name.

        only_phitune (words of a plain fenced block, such as the layout and the data flow): only a dotted name whose
        first part is a phitune module or class is checked; anything else there is prose."""
        file = FILE.match(span)
        if file and not only_phitune:
            name = file.group(1)
            if any(f == name or f.endswith("/" + name) for f in self.files):
                return None
            return f"no file {name} in the repository"
        dotted = DOTTED.match(span)
        if not dotted:
            return None
        parts = dotted.group(1).split(".")
        if parts[-1] in FILE_SUFFIXES and not span[dotted.end():].startswith("("):
            return None
        if parts[0] == "phitune":
            return self.module_path(parts, exact=True)[1]
        if parts[0] in self.sections and self.config_key(parts):
            return None
        allowed = OTHER_NAMES.get(parts[0], set())
        if allowed is None or parts[1] in allowed:
            return None
        matched, why = self.module_path(parts, exact=False)
        if matched and why is None:
            return None
        if parts[0] in self.classes:
            if len(parts) == 2 and any(parts[1] in attrs for attrs in self.classes[parts[0]]):
                return None
            return f"class {parts[0]} has no attribute {'.'.join(parts[1:])}"
        if matched:
            return why
        if only_phitune:
            return None
        if parts[0] in OTHER_NAMES:
            return f"no config key {'.'.join(parts)} (nor a name OTHER_NAMES allows after {parts[0]})"
        if parts[0] in self.sections:
            return f"no config key {'.'.join(parts)}"
        return f"{parts[0]} is not a phitune module, class or config section"

    def config_key(self, parts: list[str]) -> bool:
        keys = self.sections
        for part in parts:
            if part not in keys:
                return False
            keys = keys[part]
        return True

    def module_path(self, parts: list[str], *, exact: bool) -> tuple[bool, str | None]:
        """(some module's path ends with a prefix of `parts`, why none has the rest as attributes or None)."""
        why = None
        matched = False
        for path, mod in self.modules.items():
            path_parts = path.split(".")
            for n in range(len(parts), 0, -1):
                prefix = parts[:n]
                if (path_parts != prefix) if exact else (path_parts[-n:] != prefix):
                    continue
                matched = True
                problem = self.attributes(path, mod, parts[n:])
                if problem is None:
                    return True, None
                why = why or problem
                break
        return matched, why or f"no phitune module {'.'.join(parts)}"

    def attributes(self, path: str, mod: Module, rest: list[str]) -> str | None:
        if not rest:
            return None
        name = rest[0]
        if f"{path}.{name}" in self.modules:
            return self.attributes(f"{path}.{name}", self.modules[f"{path}.{name}"], rest[1:])
        if name not in mod.names:
            return f"{path} has no {name}"
        if len(rest) == 1:
            return None
        if name in mod.classes:
            return None if rest[1] in mod.classes[name] and len(rest) == 2 else f"{path}.{name} has no {rest[1]}"
        return f"{path}.{name} is not a class or module: cannot check .{rest[1]}"


def check(paths: list[Path], checker: Checker) -> list[str]:
    """`file:line: name: why` for every quoted name that does not exist."""
    out = []
    for path in paths:
        fence = None  # the open fenced block's language ("" for a plain one), None outside
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fence = line.strip()[3:].strip() if fence is None else None
                continue
            if fence:
                continue
            if fence is None:
                spans = [(span.strip(), False) for span in SPAN.findall(line)]
            else:
                spans = [(word, True) for word in WORD.findall(line)]
            for span, only_phitune in spans:
                why = checker.problem(span, only_phitune=only_phitune)
                if why:
                    out.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}: "
                               f"`{span}`: {why}")
    return out


LEAVES = {"errors", "_typed", "_lazy"}  # importable from anywhere
ENTRY_POINTS = {"phitune", "__main__"}  # the lazy top package and `python -m phitune`: no row of their own


def import_rules(doc: Path) -> dict[str, set[str]]:
    """{subpackage or module (dotted, without 'phitune.'): what it may import} from the table under the
    '## Import rules' heading of docs/architecture.md."""
    rules: dict[str, set[str]] = {}
    in_section = False
    for line in doc.read_text().splitlines():
        if line.startswith("## "):
            in_section = line.strip() == "## Import rules"
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if in_section and line.startswith("|") else []
        if len(cells) == 2 and cells[0] not in ("subpackage", "") and not set(cells[0]) <= set("-: "):
            rules[cells[0]] = {name.strip() for name in cells[1].split(",") if re.fullmatch(r"[\w.]+", name.strip())}
    return rules


def import_problems(rules: dict[str, set[str]], src: Path = SRC) -> list[str]:
    """`module -> module: why` for every import of a phitune module that the rules do not allow (imports inside
    functions count: they tie the modules together all the same)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from code_metrics import imports_of, module_name

    def short(name: str) -> str:
        return name.removeprefix("phitune.") if name != "phitune" else name

    def owner(name: str) -> str | None:
        """The row that governs a module: the longest row name that is the module or a package above it."""
        rows = [r for r in rules if name == r or name.startswith(r + ".")]
        return max(rows, key=len) if rows else None

    def allowed(target: str, row: set[str]) -> bool:
        return target.split(".")[0] in LEAVES or any(target == a or target.startswith(a + ".") for a in row)

    files = sorted(src.rglob("*.py"))
    modules = {module_name(p, src) for p in files}
    out = []
    named = {short(m) for m in modules}
    for row, allowed_names in rules.items():  # the table itself must name what exists
        for name in sorted({row} | allowed_names):
            if name not in named:
                out.append(f"the import rules name {name}, which is not a phitune module or subpackage")
    for path in files:
        current = short(module_name(path, src))
        if current in ENTRY_POINTS:
            continue
        row = owner(current)
        for target, _top in imports_of(path, src, modules):
            target = short(target)
            if row is None:
                if target.split(".")[0] not in LEAVES:
                    out.append(f"{current} -> {target}: {current} has no row in the import rules, so it may import "
                               f"only {', '.join(sorted(LEAVES))}")
            elif owner(target) != row and not allowed(target, rules[row]):
                out.append(f"{current} -> {target}: not in the '{row}' row of the import rules "
                           f"({', '.join(sorted(rules[row])) or 'nothing'})")
    return sorted(set(out))


def layout_problems(doc: Path, src: Path = SRC) -> list[str]:
    """The '## Layout' block of docs/architecture.md against the package: every module listed exists and every
    module is listed (one line per module, indented under its folder)."""
    block, in_section, fenced = [], False, False
    for line in doc.read_text().splitlines():
        if line.startswith("## "):
            in_section = line.strip().startswith("## Layout")
        elif in_section and line.startswith("```"):
            if fenced:
                break
            fenced = True
        elif in_section and fenced:
            block.append(line)
    listed: set[str] = set()
    stack: list[tuple[int, str]] = []  # (indent, folder) of the folders the current line is inside
    for line in block:
        name = line.split()[0] if line.strip() else ""
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if not name or indent == len(line):
            continue
        path = "/".join([f for _, f in stack] + [name.rstrip("/")])
        if name.endswith("/") and indent < 40:  # a folder (text columns start further right)
            stack.append((indent, name.rstrip("/")))
        elif name.endswith(".py") and indent < 40:
            listed.add(path)
    prefix = "src/phitune/"
    actual = {prefix + str(p.relative_to(src)) for p in src.rglob("*.py")}
    # a subpackage's __init__.py is described by its folder's line, unless it holds code worth its own line
    actual -= {p for p in actual if p.endswith("/__init__.py") and p.count("/") > 2 and p not in listed}
    listed = {p for p in listed if p.startswith(prefix)}
    out = [f"{doc.name} Layout lists {p}, which does not exist" for p in sorted(listed - actual)]
    out += [f"{doc.name} Layout does not list {p} (one line per module: add it with what it owns)"
            for p in sorted(actual - listed)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, default=[ROOT / d for d in DOCS])
    args = ap.parse_args(argv)
    problems = check([p.resolve() for p in args.files], Checker(read_package(), config_keys()))
    rules_doc = ROOT / "docs" / "architecture.md"
    if rules_doc.resolve() in [p.resolve() for p in args.files]:
        rules = import_rules(rules_doc)
        if not rules:
            problems.append(f"{rules_doc.relative_to(ROOT)}: no import rules table under '## Import rules'")
        else:
            problems += [f"import rules: {line}" for line in import_problems(rules)]
        problems += layout_problems(rules_doc)
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s). A stale name: rename it to what the code calls it now (another library's "
              "name: add it to OTHER_NAMES in scripts/check_docs.py). An import the rules do not allow: import "
              "something the row allows, or change the rule in docs/architecture.md on purpose.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
