"""The lesson's shape, held to the tree: the README's file table and sizes, the core files' rules,
and no import circle among the project's modules."""
import ast
import re
from pathlib import Path

from conftest import ROOT

LESSON = ["lora.py", "sampler.py", "vader.py", "rewards.py", "train.py", "sample.py"]
CORE = ["lora.py", "sampler.py", "vader.py"]  # they know nothing of processes, experts or user errors
CHAPTERS = ["models.py", "wan.py", "wan_vae.py"]


def lines(name):
    return len((ROOT / name).read_text().splitlines())


def test_the_readme_states_the_files_and_sizes_of_the_tree():
    readme = (ROOT / "README.md").read_text()
    table = dict(re.findall(r"^\| `([\w/]+\.py)` \| (\d+) \|", readme, flags=re.M))
    assert list(table) == LESSON + CHAPTERS  # the reading order: the six lesson files, then the chapters
    assert {name: lines(name) for name in table} == {name: int(n) for name, n in table.items()}
    assert sum(lines(n) for n in LESSON) <= 1300 and max(lines(n) for n in LESSON) <= 260
    assert max(lines(n) for n in ("models.py", "wan.py")) <= 300
    size = re.search(r"toy model \(committed, ([\d.]+) MB\)", readme)[1]
    on_disk = sum(p.stat().st_size for p in (ROOT / "toy" / "model").rglob("*") if p.is_file())
    assert f"{on_disk / 1e6:.1f}" == size
    assert (ROOT / "BENCHMARKS.md").stat().st_size <= 25_000  # the current results; history is in git


def test_the_core_files_raise_no_user_error_and_name_no_process_or_expert():
    for name in CORE:
        text = (ROOT / name).read_text()
        for word in ("UserError", "process group", "world", "DTensor", "expert", "rank, world", "torch.distributed"):
            assert word not in text, (name, word)


def project_imports(path):
    """The project modules a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_no_import_circle():
    files = [p for p in ROOT.rglob("*.py") if not {".venv", "tests"} & set(p.relative_to(ROOT).parts)]
    name = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in files}
    modules = set(name.values())
    graph = {name[p]: {m for m in project_imports(p) if m in modules and m != name[p]} for p in files}

    def path_back(start, node, seen):
        for nxt in graph[node]:
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                if (rest := path_back(start, nxt, seen)) is not None:
                    return [node, *rest]
        return None

    circles = [c for m in sorted(graph) if (c := path_back(m, m, set())) is not None]
    assert circles == [], circles
