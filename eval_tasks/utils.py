"""The prompt and the scores of eval_tasks/alpaca_sample_heldout.yaml: this repo's own (prompter.py,
answer_eval.py), so that lm_eval's numbers and `python inference.py evaluate`'s are computed
alike."""

import sys
from pathlib import Path

# lm_eval imports this file by its path; the repo's modules come from the editable install
# (requirements-dev.txt's `-e .`) or, without it, from the repo root above this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompter import Prompter  # noqa: E402
from support.answer_eval import score  # noqa: E402

PROMPTER = Prompter()


def doc_to_text(doc: dict) -> str:
    return PROMPTER.generate_prompt(doc["instruction"], doc["input"])


def process_results(doc: dict, results: list[str]) -> dict:
    # As inference.generate_responses: the text after a "### Response:" the model might write,
    # stripped.
    return score(PROMPTER.get_response(results[0]), doc["output"])
