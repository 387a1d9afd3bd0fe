"""Tests for prompter.py: the exact Alpaca templates and response extraction."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prompter import Prompter  # noqa: E402

# Written out in full (not built from Prompter's constants) so a change to the template fails here.
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\n"
)
NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
)


def test_template_with_input_is_exact():
    assert Prompter().generate_prompt("Translate to French.", "Good morning") == WITH_INPUT


@pytest.mark.parametrize("no_input", [None, ""])
def test_template_without_input_is_exact(no_input):
    assert Prompter().generate_prompt("Name a color.", no_input) == NO_INPUT
    assert Prompter().generate_prompt("Name a color.") == NO_INPUT


def test_label_is_appended_after_the_response_marker():
    prompter = Prompter()
    assert prompter.generate_prompt("Name a color.", label="Blue.") == NO_INPUT + "Blue."
    assert prompter.generate_prompt("Translate to French.", "Good morning", "Bonjour") == WITH_INPUT + "Bonjour"


def test_braces_in_user_text_are_kept_verbatim():
    prompt = Prompter().generate_prompt("Fix {this} code", "print(f'{x}')", "{}")
    assert "### Instruction:\nFix {this} code\n\n### Input:\nprint(f'{x}')\n\n### Response:\n{}" in prompt


def test_get_response_takes_text_after_the_last_marker():
    prompter = Prompter()
    assert prompter.get_response(NO_INPUT + "  Blue.\n") == "Blue."
    # An instruction that itself mentions the marker must not confuse it: the last marker wins.
    text = prompter.generate_prompt("Explain '### Response:' headers.", label=" They start answers. ")
    assert prompter.get_response(text) == "They start answers."


@pytest.mark.parametrize("text, expected", [("  just generated text \n", "just generated text"), ("", "")])
def test_get_response_without_marker_returns_stripped_text(text, expected):
    assert Prompter().get_response(text) == expected
