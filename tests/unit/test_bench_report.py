import json

from benchmarks.report import latest, render
from tests.conftest import REPO


def test_readme_and_results_md_show_the_newest_results_file():
    """Issue 9: the numbers in README are the latest `make bench` results file's, rendered as report.py does."""
    path = latest()
    readme_block, results_md = render(json.loads(path.read_text()), path.name)
    assert readme_block in (REPO / "README.md").read_text()
    assert (REPO / "benchmarks" / "RESULTS.md").read_text() == results_md + "\n"
