"""The package's layout: the folders follow the data, imports run one way, every file says what it is for."""

import ast
import itertools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ppl_cli"
STAGES = ("data", "engine", "output", "commands")  # in the order the data flows
TOP_LEVEL_BASES = ("config", "errors")  # what every stage may import besides the stages before it


def modules() -> dict[str, Path]:
    """Dotted names under ppl_cli (`data.sources`, `cli`) -> their files."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The ppl_cli modules a module imports (relative imports, resolved; `from . import x` as x)."""
    package = name.split(".")[:-1]  # `data.sources` and `data.__init__` both live in data/
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            names = [".".join(target)] if node.module else [".".join([*target, a.name]) for a in node.names]
            out.update(n for n in names if n)
    return out


def stage(name: str) -> str | None:
    first = name.split(".")[0]
    return first if first in STAGES or first == "runtime" else None


def test_imports_run_one_way():
    wrong = []
    for name, path in modules().items():
        own = stage(name)
        for target in imported(name, path):
            other = stage(target)
            if own is None:
                if name in TOP_LEVEL_BASES and target not in TOP_LEVEL_BASES:
                    wrong.append(f"{name} -> {target} (config and errors import only each other)")
                continue
            if own == "runtime" and other is not None and other != "runtime":
                wrong.append(f"{name} -> {target} (runtime imports no stage)")
            elif own in STAGES and other is None and target not in TOP_LEVEL_BASES:
                wrong.append(f"{name} -> {target} (a stage imports only config, errors and earlier stages)")
            elif own in STAGES and other in STAGES and STAGES.index(other) > STAGES.index(own):
                wrong.append(f"{name} -> {target} (a later stage)")
            elif own in STAGES and other == "runtime":
                wrong.append(f"{name} -> {target} (runtime is the pipeline's)")
    assert not wrong, wrong


def test_every_file_says_what_it_is_for():
    missing = [name for name, path in modules().items() if not (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip()]
    assert not missing, missing


def one_letter_apart(a: str, b: str) -> bool:
    if abs(len(a) - len(b)) > 1 or a == b:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))


def test_no_two_file_names_differ_by_one_letter():
    names = sorted({p.stem for p in PACKAGE.rglob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"})
    assert not [(a, b) for a, b in itertools.combinations(names, 2) if one_letter_apart(a, b)]


def test_the_layout_checks_can_fail():
    assert one_letter_apart("report", "reports") and one_letter_apart("rows", "row") and not one_letter_apart("rows", "runs")
    assert stage("engine.vllm_engine") == "engine" and stage("pipeline") is None
