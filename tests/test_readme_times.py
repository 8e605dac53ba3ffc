"""The README's times are the measured ones: each command's figure is the one tools/readme_times.py
recorded in docs/readme_times.json (on a quiet machine), quoted once per command with a marker naming the
measurement, and the paragraph that quotes it holds no other, older figure; the demo's config states no
time of its own."""
import json
import re

from conftest import ROOT, script
COMMANDS, format_seconds = script("readme_times").COMMANDS, script("readme_times").format_seconds

TIME = re.compile(r"\b\d+(?:\.\d+)? ?(?:min|s)\b")
MARKER = re.compile(r"\(`tools/readme_times\.py (\w+)`")


def test_readme_quotes_exactly_the_recorded_times():
    record = json.loads((ROOT / "docs" / "readme_times.json").read_text())
    readme = (ROOT / "README.md").read_text()
    quoted = MARKER.findall(readme)
    assert set(record) <= set(COMMANDS) and set(quoted) <= set(record), "a quoted time was never measured"
    assert set(record) == set(quoted), "a measured time is not quoted"
    figures = {r["text"] for r in record.values()}
    for paragraph in readme.split("\n\n"):
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
