"""The docs' times are the measured ones: each command's figure is the one tools/readme_times.py recorded in
docs/reports/readme_times.json (on a quiet machine), quoted once in the README or a guide with a marker naming
the measurement, and the paragraph that quotes it holds no other, older figure; the README quotes only the
demo's and the tests'; the demo's config states no time of its own."""
import json
import re

from conftest import ROOT, script
COMMANDS, format_seconds = script("readme_times").COMMANDS, script("readme_times").format_seconds

TIME = re.compile(r"\b\d+(?:\.\d+)? ?(?:min|s)\b")
MARKER = re.compile(r"\(`tools/readme_times\.py (\w+)`")


def test_the_docs_quote_exactly_the_recorded_times():
    record = json.loads((ROOT / "docs" / "reports" / "readme_times.json").read_text())
    pages = {p: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]}
    quoted = [name for text in pages.values() for name in MARKER.findall(text)]
    assert set(record) <= set(COMMANDS) and set(quoted) <= set(record), "a quoted time was never measured"
    assert set(record) == set(quoted), "a measured time is not quoted"
    assert sorted(MARKER.findall(pages[ROOT / "README.md"])) == ["demo", "tests"]
    figures = {r["text"] for r in record.values()}
    for text in pages.values():
        for paragraph in text.split("\n\n"):
            for name in MARKER.findall(paragraph):
                r = record[name]
                assert r["text"] == format_seconds(r["seconds"]) and r["machine"] and r["date"]
                assert f"{r['text']} (`tools/readme_times.py {name}`" in paragraph, f"{name}: not {r['text']}"
                stray = [t for t in TIME.findall(paragraph) if t not in figures and not t.startswith("0.")
                         and not any(t in f for f in figures)]
                assert not stray, f"{name}: other times beside the measured one: {stray}"
    assert len(quoted) == len(set(quoted)), "a command's time is quoted twice"


def test_formatting_and_the_demo_config_states_no_time():
    assert (format_seconds(48.4), format_seconds(130), format_seconds(59.6)) == ("48 s", "2 min 10 s", "1 min 0 s")
    comments = " ".join(line for line in (ROOT / "configs/tiny.yaml").read_text().splitlines() if line.startswith("#"))
    assert not TIME.search(comments), comments
