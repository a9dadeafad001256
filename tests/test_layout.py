"""The house: library modules import bottom-up without cycles, scripts never import scripts, the
original's API stays importable, and every command the README and docs/ show still parses."""
from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LEAVES = ("errors", "fileio")  # import no project module


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for the library and the scripts (not tests, not benchmarks)."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in ("models", "visu"):
        for p in (ROOT / pkg).glob("*.py"):
            mods[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    return mods


def is_script(path: Path) -> bool:
    """A command-line script: it runs something when executed (``if __name__ == "__main__"``)."""
    return '__name__ == "__main__"' in path.read_text()


def imports_of(path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports anywhere (module level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in mods:
                n = n.rpartition(".")[0]
            if n:
                out.add(n)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = project_modules()
    graph = {}
    for name, path in mods.items():
        deps = imports_of(path, mods) - {name}
        if name.startswith("models.") or name == "models":
            deps -= {m for m in deps if m == "models" or m.startswith("models.")}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(n: str, path: list[str]) -> list[str] | None:
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if not state.get(m) and (found := visit(m, path + [m])):
                return found
        state[n] = 2
        return None

    for n in sorted(graph):
        if not state.get(n) and (found := visit(n, [n])):
            return found
    return None


def test_import_graph_has_no_cycle_and_no_script_to_script_edge():
    graph, mods = import_graph(), project_modules()
    scripts = {n for n, p in mods.items() if is_script(p)}
    assert {"main", "eval_knn", "eval_linear", "eval_voc_classif", "eval_retrieval", "visu.report",
            "visu.gradient_ascent", "visu.activ-retrieval"} <= scripts
    assert not scripts & {"knn", "cli", "distributed", "checkpoint", "eval_common", "visu.common", "util"}
    assert {"main", "clustering", "checkpoint", "distributed", "knn", "cli", "util", "fileio"} <= set(graph)
    bad = [(a, b) for a, deps in graph.items() if a in scripts for b in deps if b in scripts]
    assert not bad, f"scripts importing scripts: {bad}"
    for leaf in LEAVES:
        assert not graph[leaf], f"{leaf} must import no project module, imports {graph[leaf]}"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_graph_check_sees_cycles_and_script_edges(tmp_path, monkeypatch):
    """The checker itself: a planted cycle and a planted script-to-script import are found."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    import a\n")
    mods = {"a": tmp_path / "a.py", "b": tmp_path / "b.py"}
    graph = {n: imports_of(p, mods) for n, p in mods.items()}
    assert graph == {"a": {"b"}, "b": {"a"}} and find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    (tmp_path / "s.py").write_text('import a\n\nif __name__ == "__main__":\n    pass\n')
    assert is_script(tmp_path / "s.py") and not is_script(mods["a"])


def test_original_api_is_importable():
    import clustering
    import models
    import util

    for obj in (util.UnifLabelSampler, util.AverageMeter, util.Logger, util.learning_rate_decay,
                util.load_model, clustering.Kmeans, clustering.PIC, clustering.preprocess_features,
                clustering.cluster_assign, clustering.arrange_clustering, models.alexnet, models.vgg16):
        assert callable(obj)
    assert hasattr(clustering.Kmeans(3), "cluster")


def test_readme_fits_on_a_screen():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines"


# ---------------------------------------------------------------------------------------
# every command shown in README.md and docs/*.md: its script exists and knows its flags
# ---------------------------------------------------------------------------------------
LAUNCHERS = {"main.sh": "main.py", "quickstart.sh": "main.py", "eval_linear.sh": "eval_linear.py",
             "eval_knn.sh": "eval_knn.py", "eval_retrieval.sh": "eval_retrieval.py",
             "eval_voc_classif_fc6_8.sh": "eval_voc_classif.py", "eval_voc_classif_all.sh": "eval_voc_classif.py",
             "visu/gradient_ascent.sh": "visu/gradient_ascent.py",
             "visu/activ-retrieval.sh": "visu/activ-retrieval.py",
             "main_deepclusterv2.sh": "main_deepclusterv2.py"}


def shown_commands() -> list[tuple[str, str, list[str], list[str]]]:
    """(doc, script, flags, env names) for every command line in a ``bash`` block of the docs."""
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].split(" # ")[0].strip()
                if not line or line.startswith("#"):
                    continue
                try:
                    words = shlex.split(line)
                except ValueError:
                    continue
                env = [w.split("=", 1)[0] for w in words if re.match(r"^[A-Z_]+=", w)]
                words = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
                script = None
                for i, w in enumerate(words):
                    w = w.removeprefix("./")
                    if w == "launch.py":  # torchrun's flags, then the script it runs
                        continue
                    if w.endswith(".py") and not w.startswith("tests/") and (ROOT / w).exists() or w in LAUNCHERS:
                        script, rest = w, words[i + 1:]
                        break
                if script is None:
                    continue
                flags = [w.split("=")[0] for w in rest if w.startswith("--")]
                out.append((doc.name, script, flags, env))
    return out


@lru_cache(maxsize=None)
def help_text(script: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, f"{script} --help failed: {r.stderr[-500:]}"
    return r.stdout


def test_docs_show_commands():
    cmds = shown_commands()
    scripts = {s for _, s, _, _ in cmds}
    # a sample of what must be found: the parser above really reads the docs
    assert {"main.py", "main.sh", "eval_knn.py", "eval_linear.sh", "visu/report.py"} <= scripts, scripts


@pytest.mark.parametrize("script", sorted({LAUNCHERS.get(s, s) for _, s, _, _ in shown_commands()}))
def test_every_documented_flag_exists(script):
    """Each --flag written after a script (or its launcher) in the docs is in that script's --help."""
    helptext = help_text(script)
    missing = sorted({(doc, f) for doc, s, flags, _ in shown_commands() if LAUNCHERS.get(s, s) == script
                      for f in flags if not re.search(re.escape(f) + r"\b", helptext)})
    assert not missing, f"{script}: flags shown in the docs but unknown to --help: {missing}"


def test_every_documented_launcher_variable_is_read():
    """An ``NAME=value ./launcher.sh`` in the docs names a variable the launcher reads."""
    missing = []
    for doc, s, _, env in shown_commands():
        if s.endswith(".sh"):
            body = (ROOT / s).read_text()
            if s == "quickstart.sh":
                body += (ROOT / "main.sh").read_text()
            missing += [(doc, s, v) for v in env if v not in ("OMP_NUM_THREADS", "TMPDIR", "CUDA_VISIBLE_DEVICES")
                        and not re.search(r"\b" + v + r"\b", body)]
    assert not missing, missing
