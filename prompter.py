"""The Stanford Alpaca prompt template.

Training and inference must build prompts the same way, so both go through `Prompter`:
`support/alpaca_data.py` tokenizes `generate_prompt(instruction, input)` as the prompt and the
output as the response, and generation decodes the model's text and keeps only the part after the
response marker.
"""

from __future__ import annotations


class Prompter:
    """Builds Alpaca prompts and extracts the response from generated text.

    The two templates are the ones Stanford Alpaca trained with (`train.py` in
    tatsu-lab/stanford_alpaca), one for records with an input and one for records without.
    """

    TEMPLATE_WITH_INPUT = (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )
    TEMPLATE_NO_INPUT = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    )
    RESPONSE_MARKER = "### Response:"

    def generate_prompt(self, instruction: str, input: str | None = None,
                        label: str | None = None) -> str:
        """Fill the template.

        Args:
            instruction: the task description.
            input: optional context; `None` and `""` both select the template without an input
                section.
            label: optional expected response, appended right after the response marker (for
                training).

        Returns:
            The prompt, ending with "### Response:\\n" (followed by `label` when given).
        """
        # Braces in the user's text ("{x}" in code snippets) are safe: format() does not expand the
        # contents of its arguments.
        if input:
            prompt = self.TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input)
        else:
            prompt = self.TEMPLATE_NO_INPUT.format(instruction=instruction)
        if label:
            prompt += label
        return prompt

    def get_response(self, output: str) -> str:
        """Return the model's answer from a decoded generation.

        Args:
            output: decoded text, normally the prompt followed by the generated response.

        Returns:
            The text after the last "### Response:" marker, stripped of surrounding whitespace; when
            the marker is missing (e.g. only new tokens were decoded), the whole text stripped.
        """
        _, marker, response = output.rpartition(self.RESPONSE_MARKER)
        return (response if marker else output).strip()
