"""The README is the manual: its config reference must list every config key there is."""

from pathlib import Path

from raypipe.config import RaypipeConfig, flatten

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_reference_lists_every_key():
    text = README.read_text(encoding="utf-8")
    missing = [k for k in flatten(RaypipeConfig().model_dump()) if f"`{k}`" not in text]
    assert not missing, f"document these keys in README.md's config reference: {missing}"


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README.read_text(encoding="utf-8")
