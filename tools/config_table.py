"""Every config key with its default and its schema comment, as the table in docs/configuration.md.

    python tools/config_table.py            # print the table
    python tools/config_table.py --write    # replace the table in docs/configuration.md

The table is made from attndreambooth/config/schema.py (defaults from the dataclasses, meanings from the
comment beside each field), so it cannot drift: tests/test_docs.py compares the page with it."""
import argparse
import ast
import dataclasses
import sys
from pathlib import Path

from omegaconf import MISSING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from attndreambooth.config import schema  # noqa: E402

PAGE = ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- keys: made by tools/config_table.py, do not edit -->", "<!-- end of keys -->"


def field_comments():
    """{(class name, field name): the comment beside the field, with its continuation lines}."""
    source = (ROOT / "attndreambooth" / "config" / "schema.py").read_text().splitlines()
    comments = {}
    for node in ast.parse("\n".join(source)).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign):
                line = source[item.lineno - 1]
                parts = [line.split("  # ", 1)[1]] if "  # " in line else []
                for nxt in source[item.end_lineno:]:
                    if not nxt.strip().startswith("#"):
                        break
                    parts.append(nxt.strip().lstrip("#").strip())
                comments[(node.name, item.target.id)] = " ".join(parts)
    return comments


def shown(value):
    if value is MISSING:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def default_of(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def rows(cls, prefix, comments):
    for f in dataclasses.fields(cls):
        key, value = f"{prefix}{f.name}", default_of(f)
        if dataclasses.is_dataclass(value):
            yield from rows(type(value), key + ".", comments)
        elif f.name == "stages":
            stages = schema.paper_stages()
            for g in dataclasses.fields(schema.StageConfig):
                values = {name: getattr(stage, g.name) for name, stage in stages.items()}
                default = "; ".join(f"{n}: {shown(v)}" for n, v in values.items()) if len(
                    {shown(v) for v in values.values()}) > 1 else shown(next(iter(values.values())))
                yield f"stages.<stage>.{g.name}", default, comments.get(("StageConfig", g.name), "")
        else:
            yield key, shown(value), comments.get((cls.__name__, f.name), "")


def table():
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | `{cell(d)}` | {cell(m)} |" for k, d, m in rows(schema.Config, "", field_comments())]
    return "\n".join(lines)


def page_with_table(text):
    head, rest = text.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{rest.split(END, 1)[1]}"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help=f"replace the table in {PAGE.relative_to(ROOT)}")
    if p.parse_args().write:
        PAGE.write_text(page_with_table(PAGE.read_text()))
    else:
        print(table())
