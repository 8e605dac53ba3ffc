"""The package's layout shows its design: every import (module level or inside a function) points down the
layers, no two modules import each other (directly or round a loop), and nothing outside the families asks
which family a model is."""
import ast
import re

from conftest import ROOT

# bottom to top; a module may import its own layer and the ones below (attention_reg.py is a library file
# of its own, below everything; cli is the commands' argument parser, machine the words for where a measurement
# ran; the command-line faces, infer.py and train_attndreambooth.py, are on top)
LAYERS = ("attention_reg", "attndreambooth.cli", "attndreambooth.machine", "attndreambooth.config", "attndreambooth.families", "attndreambooth.inference",
          "attndreambooth.trainer", "attndreambooth.sweep", "infer", "train_attndreambooth")


def modules():
    files = [*sorted((ROOT / "attndreambooth").rglob("*.py")),
             *(ROOT / f"{m}.py" for m in ("attention_reg", "infer", "train_attndreambooth"))]
    return {p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__"): p
            for p in files}


def imports(path, known):
    """The project modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in known}


def layer(module):
    return max(i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))


def upward_arrows(graph):
    return sorted((m, d) for m, deps in graph.items() for d in deps if layer(d) > layer(m))


def loops(graph):
    """Every import loop met by a depth-first walk, as a path that ends where it starts."""
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":  # met again on the current path: a loop
                found.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_loop_and_every_arrow_points_down():
    known = modules()
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    assert upward_arrows(graph) == []
    assert loops(graph) == []


def test_the_checks_can_fail(tmp_path):
    """On a made-up graph: a loop of three, and a config module importing the trainer."""
    (tmp_path / "a.py").write_text("def f():\n    from attndreambooth.trainer import b\n")  # inside a function
    known = {"attndreambooth.config.a": tmp_path / "a.py", "attndreambooth.trainer.b": tmp_path / "a.py"}
    assert imports(tmp_path / "a.py", known) == {"attndreambooth.trainer.b"}
    graph = {"attndreambooth.config.a": {"attndreambooth.trainer.b"}, "attndreambooth.trainer.b": {"attndreambooth.trainer.c"},
             "attndreambooth.trainer.c": {"attndreambooth.config.a"}}
    assert upward_arrows(graph) == [("attndreambooth.config.a", "attndreambooth.trainer.b")]
    assert loops(graph) == [["attndreambooth.config.a", "attndreambooth.trainer.b", "attndreambooth.trainer.c",
                             "attndreambooth.config.a"]]


def test_no_family_test_outside_the_families():
    """No code outside attndreambooth/families/ decides SD or SDXL by itself (tests may check diffusers' names)."""
    pattern = re.compile(r"text_encoder_2 is not None|is_sdxl|addition_embed_type|\.attn2\.")
    code = [p for p in [*ROOT.glob("*.py"), *(ROOT / "attndreambooth").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
            if "families" not in p.parts]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in code for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == [], hits


def test_every_file_reads_in_one_sitting():
    files = [*ROOT.glob("*.py"), *(ROOT / "attndreambooth").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > 310}
    assert long == {}, long


BESIDE = ("worlds", "bench")  # the synthetic worlds and the speed benchmarks: they import the package


def test_the_package_never_imports_what_lives_beside_it():
    """The worlds and the benchmarks are built on the trainer; a training run needs none of them."""
    top = lambda name: (name or "").split(".")[0]  # noqa: E731
    offenders = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "attndreambooth").rglob("*.py"))
                 for node in ast.walk(ast.parse(p.read_text()))
                 if (isinstance(node, ast.ImportFrom) and top(node.module) in BESIDE)
                 or (isinstance(node, ast.Import) and any(top(a.name) in BESIDE for a in node.names))]
    assert offenders == []
    assert not (ROOT / "attndreambooth" / "bench").exists()
