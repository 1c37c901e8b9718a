"""README's two set-up commands stay in sync with CI and with the package."""

from __future__ import annotations

import re

from tests.conftest import REPO


def _blocks(section: str, language: str) -> list[str]:
    """The ``language`` code blocks of README's ``## {section}`` section, in order."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)\n```", body, flags=re.S)


def _commands() -> list[str]:
    return _blocks("Set up", "bash")


def test_readme_has_exactly_two_setup_commands():
    cmds = _commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].endswith("-m spb2_jax")
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in ci


def test_use_section_runs_as_written():
    """Every python block of README's "Use" section, in order, in one namespace (as a notebook would)."""
    blocks = _blocks("Use", "python")
    assert len(blocks) >= 3 and "spb2.load_pretrained()" in blocks[0]
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md Use block {i}", "exec"), namespace)  # noqa: S102
    assert namespace["out"].logits.shape == (1, 6, namespace["config"].vocab_size)
    assert isinstance(namespace["texts"][0], str) and len(namespace["ids"][0]) == 4
    assert namespace["model"].config.layer_kinds == ("moba", "sse_gdn", "moba", "sse_gdn", "sse_gdn", "full")
