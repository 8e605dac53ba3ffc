"""The docs say what the repository holds: every path they name exists, the configuration table is the
schema's, the README's docs index lists every guide, and the README stays a front door."""
import re
import subprocess

from conftest import ROOT, script

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]  # CHANGELOG.md may name what was
# the checkout's own top-level entries (not runs/ or other folders a user's runs make)
TOP = {line.split("/")[0] for line in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True,
                                                     text=True, check=True).stdout.splitlines()}
PATH = re.compile(r"(?<![\w/.~<-])((?:\.ci|[\w-]+)(?:/[\w.-]+)+/?)(?![\w/*<])")
LINK = re.compile(r"\]\(([^)#\s]+)\)")


def named_paths(text):
    """The repository paths a page writes: paths starting at a top-level entry of the checkout, and the
    targets of its relative links; URLs, globs and placeholders are left out."""
    text = re.sub(r"https?://\S+", "", text)
    for m in PATH.finditer(text):
        path = m.group(1).rstrip(".")  # a sentence's full stop, or "scripts/..."
        if path.split("/")[0] in TOP:
            yield path
    for m in LINK.finditer(text):
        if "://" not in m.group(1):
            yield m.group(1)


def exists(path, page):
    return (ROOT / path).exists() or (page.parent / path).exists()


def test_every_path_the_docs_and_configs_name_exists():
    """README, docs/ and the configs' comments."""
    comments = {p: "\n".join(line for line in p.read_text().splitlines() if line.lstrip().startswith("#"))
                for p in (ROOT / "configs").rglob("*.yaml")}
    missing = [f"{page.relative_to(ROOT)}: {path}"
               for page, text in [*((p, p.read_text()) for p in PAGES), *comments.items()]
               for path in named_paths(text) if not exists(path, page)]
    assert not missing, "\n".join(missing)


def test_links_resolve_from_their_page():
    """A Markdown link or image is followed from the page's folder (GitHub and every viewer do), so a
    repository-root path in docs/reports/ names a file that exists and still renders as a broken image."""
    broken = [f"{page.relative_to(ROOT)}: {m.group(1)}" for page in PAGES for m in LINK.finditer(page.read_text())
              if "://" not in m.group(1) and not (page.parent / m.group(1)).exists()]
    assert not broken, "\n".join(broken)


def test_the_path_finder_finds_and_skips():
    found = list(named_paths("see `docs/method.md`, configs/tiny.yaml and [x](models.md); runs/my_dog/ and "
                             "https://github.com/a/b.py, [p](https://x.org/y.md), `configs/ablations/*.yaml`, "
                             "stages.<name>.lr, attndreambooth/trainer/method.py. `ComfyUI/models/loras`"))
    assert found == ["docs/method.md", "configs/tiny.yaml", "attndreambooth/trainer/method.py", "models.md"]
    assert not exists("docs/no_such_page.md", ROOT / "README.md") and exists("method.md", ROOT / "docs/x.md")


def test_the_configuration_table_is_the_schemas():
    table = script("config_table")
    page = (ROOT / "docs/configuration.md").read_text()
    assert table.page_with_table(page) == page, "run: python tools/config_table.py --write"
    from attndreambooth.config.schema import RuntimeConfig
    assert "| `runtime.keep_checkpoints` | `2` |" in page and RuntimeConfig().keep_checkpoints == 2
    assert "| `stages.<stage>.lr` | `stage1: 0.001; stage2: 2e-05; stage3: 2e-06` |" in page


def test_the_docs_index_lists_every_guide_and_the_readme_is_short():
    readme = (ROOT / "README.md").read_text()
    index = readme.split("## Documentation", 1)[1].split("\n## ", 1)[0]
    guides = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    assert [g for g in guides if f"]({g})" not in index] == []
    assert len(readme.split()) <= 1800, len(readme.split())
    first_screen = " ".join(readme.splitlines()[:40])
    assert "Status" in first_screen and "photos" in first_screen
