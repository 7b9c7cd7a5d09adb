"""The README opens with the two commands a new user runs; CI runs the second one."""

from helpers import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = text.split("```bash")[1:3]
    return [next(ln for ln in b.split("```")[0].splitlines() if ln.strip() and not ln.startswith("#")) for b in blocks]


def test_ci_runs_the_readme_test_command():
    setup, tests = readme_commands()
    assert "pip install -e " in setup
    assert "pytest" in tests
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith(("#", "set ", "cd ", "apt-get "))]
    assert ci == [tests]


def test_the_setup_command_runs_the_tiny_pipeline_end_to_end():
    setup, _ = readme_commands()
    assert setup.endswith("doit pipeline:tiny")
    assert (REPO / "pipelines" / "tiny.toml").is_file()
