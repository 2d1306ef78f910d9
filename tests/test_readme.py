"""The README stays true to the code: every setting is documented, the two commands come first."""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    missing = [
        f"GRERANK_{name.upper()}" for name in Settings.model_fields if f"GRERANK_{name.upper()}" not in README
    ]
    assert not missing, f"README lacks {missing}"


def test_the_two_commands_come_first() -> None:
    first_block = README.split("```")[1]
    assert "make serve" in first_block and "make test" in first_block


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] == [
        "make test"
    ]
