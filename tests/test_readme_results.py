"""The README's results tables hold only what the committed results files hold: every table row under a heading that
names results files is a row ``benchmarks/results_table.py`` renders from those files. A number typed in by hand, or
a table left behind when its file was replaced, fails here."""
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import results_table  # noqa: E402

RESULTS_FILE = re.compile(r"`(?:benchmarks/results/)?([\w.-]+\.jsonl?)`")


def _sections():
    """[(heading, results files it names, its table rows)] for every README heading followed by a table."""
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    sections = []
    for line in lines:
        if line.startswith("#"):
            sections.append((line, RESULTS_FILE.findall(line), []))
        elif sections and line.startswith("|") and not line.startswith("|---"):
            sections[-1][2].append(line)
    return [s for s in sections if s[2]]


def test_the_readme_has_results_tables():
    named = [heading for heading, files, _ in _sections() if files]
    assert len(named) >= 5, named  # (the parse below must not find nothing and pass)


@pytest.mark.parametrize("heading, files, rows", [pytest.param(*s, id="+".join(s[1])) for s in _sections() if s[1]])
def test_every_results_table_row_is_rendered_from_its_files(heading, files, rows):
    rendered = set()
    for name in files:
        path = os.path.join(results_table.RESULTS, name)
        assert os.path.isfile(path), f"{heading!r} names {name}, which is not committed under benchmarks/results/"
        rendered.update(results_table.render(path).splitlines())
    missing = [row for row in rows if row not in rendered]
    assert not missing, f"under {heading!r}, rows not in {files} as results_table.py renders them: {missing[:3]}"


def test_no_rendered_results_row_sits_under_a_heading_naming_no_file():
    """A table pasted with results_table.py's own "### <file>" heading (no backticks: the file is not named the way
    the check above reads) would escape that check: no row any committed results file renders may sit under a
    heading that names no file."""
    rendered = set()
    for name in os.listdir(results_table.RESULTS):
        if name.endswith((".json", ".jsonl")):
            rows = results_table.render(os.path.join(results_table.RESULTS, name)).splitlines()
            rendered.update(row for row in rows if row.startswith("|") and not row.startswith("|---"))
    stray = [(heading, row) for heading, files, rows in _sections() if not files for row in rows if row in rendered]
    assert not stray, stray[:3]
