import json

from benchmarks.report import END, START, latest, render, write_reports
from tests.conftest import REPO

DOC = REPO / "docs" / "benchmarks.md"


def test_benchmarks_page_and_results_md_show_the_newest_results_file():
    """The published numbers are the latest `make bench` results file's, rendered as report.py does."""
    path = latest()
    block, results_md = render(json.loads(path.read_text()), path.name)
    assert block in DOC.read_text()
    assert (REPO / "benchmarks" / "RESULTS.md").read_text() == results_md + "\n"


def test_readme_links_to_the_numbers_instead_of_holding_a_copy():
    readme = (REPO / "README.md").read_text()
    assert START not in readme and END not in readme
    assert "(docs/benchmarks.md)" in readme and "(benchmarks/RESULTS.md)" in readme


def test_write_reports_replaces_only_the_block(tmp_path):
    """What `make bench` does at its end: RESULTS.md rewritten, the page's block swapped, its prose kept."""
    path = latest()
    block, results_md = render(json.loads(path.read_text()), path.name)
    doc, out = tmp_path / "benchmarks.md", tmp_path / "RESULTS.md"
    doc.write_text(f"# before\n\n{START}\nstale numbers\n{END}\n\nafter\n")
    write_reports(path, results_md=out, doc=doc)
    assert doc.read_text() == f"# before\n\n{block}\n\nafter\n"
    assert out.read_text() == results_md + "\n"
