"""The README's notebook example runs as written and says what the README says it does."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_notebook_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    section = text.split("## In a notebook", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["run"].verdict == "match"
    assert scope["check"].verdict == "diverged"
    first = scope["check"].first_local_divergence
    assert first.hint_classes == ["epsilon"] and first.hint.startswith("[epsilon] "), first
    assert (tmp_path / "reports" / "mine" / "report.html").is_file()
