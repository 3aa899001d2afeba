"""The README's commands and CI agree."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command.strip() in [line.strip() for line in ci]


def test_readme_starts_with_space_front_matter():
    head = (ROOT / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in head and "app_file: app.py" in head
