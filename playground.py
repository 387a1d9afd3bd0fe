"""What did fine-tuning change? A page that answers one instruction twice, side by side: with the
adapter and with the base model alone.

    python inference.py serve --lora-weights outputs/debug --model-path models/tiny-bloom
        # http://127.0.0.1:7860

One model in memory: inference.py loads the adapter unmerged (`load_model(..., merge=False)`) and
hands it to `serve`; the base pane generates inside `disable_adapter()`, which computes exactly the
base model. The two panes stream one after the other (adapter, then base), never both at once on the
one model. Options, validation, prompt and decoding are `generate_inference`'s
(support/generation.py), so the adapter pane shows what `generate_inference` returns; greedy unless
"sample" is ticked. Gradio (requirements-playground.txt) serves the page on 127.0.0.1 unless --host
says otherwise, with no telemetry and no share link; Ctrl-C or SIGTERM stops it (exit code 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

# before Gradio is imported: no telemetry, no version check
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer  # noqa: E402

from support.generation import (  # noqa: E402
    SAMPLING_DEFAULTS, CliParser, GenerationOptions, LoadedModel, Template, add_model_arguments,
    add_placement_arguments, build_prompt, generate_responses,
)

SAMPLE = Path(__file__).resolve().parent / "data" / "alpaca_sample.json"
EXAMPLE_RECORDS = (0, 1, 5, 11, 28)  # short ones from the Alpaca sample, two with an input
DONE = "done"  # the status line once both panes are final (tests wait for it)


class _StopWhenSet(StoppingCriteria):
    """Ends a generation early once `event` is set (the page was closed or reloaded mid-answer)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class Playground:
    """The loaded model and the two ways of answering with it.

    Args:
        loaded: from `inference.load_model(..., merge=False)`: its model must be a
            `LoraModelForCasualLM`, whose `disable_adapter()` gives the base model without a second
            copy of it.
        prompter: the prompt template (inference.py's `PROMPTER`).
    """

    def __init__(self, loaded: LoadedModel, prompter: Template):
        assert loaded.adapter is not None and not loaded.merged, \
            "the playground needs an unmerged adapter"
        self.loaded, self.prompter = loaded, prompter
        # One generation at a time on the one model: disable_adapter() switches the layers for every
        # caller, so an adapter answer running beside a base answer would come out as the base's.
        self._model_lock = threading.Lock()

    def stream(self, prompt: str, options: GenerationOptions, adapter: bool):
        """Yield the response as it grows, then exactly what `generate_responses` returns for it.

        Raises:
            Whatever generation raised, once the stream has ended.
        """
        tokenizer = self.loaded.tokenizer
        # transformers' streamers cannot follow beams: with num_beams > 1 the pane shows the final
        # answer only.
        streamer = (TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
                    if options.num_beams == 1 else None)
        stop = threading.Event()
        result: list[str] = []
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with self._model_lock:
                    with (contextlib.nullcontext() if adapter
                          else self.loaded.model.disable_adapter()):
                        result.extend(generate_responses(
                            self.loaded, [prompt], options, self.prompter, streamer,
                            StoppingCriteriaList([_StopWhenSet(stop)])))
            except BaseException as err:  # reported to the page by the caller's thread
                failure.append(err)
                if streamer is not None:
                    streamer.end()  # unblock the loop below

        # Daemon: a server stopped mid-answer exits without waiting for the answer to finish.
        thread = threading.Thread(target=generate, name="playground-generate", daemon=True)
        thread.start()
        try:
            text = ""
            for piece in streamer if streamer is not None else ():
                text += piece
                yield self.prompter.get_response(text)
            thread.join()
        finally:
            stop.set()  # no-op after a finished answer; ends it early when the page went away
        if failure:
            raise failure[0]
        yield result[0]

    def answer(self, instruction, user_inp, max_new_tokens, sample, temperature, top_p, top_k,
               num_beams, repetition_penalty):
        """The page's handler: yield (adapter pane, base pane, status line, generate button) as
        tokens arrive."""
        busy, idle = gr.Button(interactive=False), gr.Button(interactive=True)
        try:
            prompt = build_prompt(self.prompter, instruction, user_inp)
            options = read_options(max_new_tokens, sample, temperature, top_p, top_k, num_beams,
                                   repetition_penalty)
        except ValueError as err:
            yield "", "", f"error: {err}", idle
            return
        adapter_text = base_text = ""
        try:
            for adapter_text in self.stream(prompt, options, adapter=True):
                yield adapter_text, "", "generating: base + adapter …", busy
            for base_text in self.stream(prompt, options, adapter=False):
                yield adapter_text, base_text, "generating: base model …", busy
        # e.g. out of memory, or an option transformers refuses
        except (ValueError, RuntimeError) as err:
            yield adapter_text, base_text, f"error: {' '.join(str(err).split())}", idle
            return
        yield adapter_text, base_text, DONE, idle


def read_options(max_new_tokens, sample, temperature, top_p, top_k, num_beams, repetition_penalty
                 ) -> GenerationOptions:
    """The page's fields as `GenerationOptions` (same checks, same messages as
    `generate_inference`).

    Number fields give floats: a whole one becomes an int, so 16.0 tokens is 16 and top_p 128 reads
    "got 128"; 2.5 tokens stays 2.5 and is refused. The sampling fields count only when `sample` is
    ticked; empty ones take the sampling defaults.

    Raises:
        ValueError: as `GenerationOptions`, naming the option.
    """
    def number(value):
        return int(value) if isinstance(value, float) and value.is_integer() else value

    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if sample else {}
    return GenerationOptions(max_new_tokens=number(max_new_tokens), do_sample=bool(sample),
                             num_beams=number(num_beams),
                             repetition_penalty=number(repetition_penalty),
                             **{name: number(value) for name, value in sampling.items()})


def examples() -> list[list[str]]:
    """[instruction, input] of a few records of the Alpaca sample."""
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))
    return [[records[i]["instruction"], records[i]["input"]] for i in EXAMPLE_RECORDS]


def build_page(playground: Playground) -> gr.Blocks:
    """The page: instruction and input, the options, the two panes, the examples."""
    loaded, defaults = playground.loaded, GenerationOptions()
    with gr.Blocks(title="LoRA adapter playground", analytics_enabled=False) as page:
        gr.Markdown(f"## What did fine-tuning change?\nBase model `{loaded.base}` and adapter "
                    f"`{loaded.adapter}` ({loaded.precision} on {loaded.device}): one model in "
                    "memory, the adapter switched off for the base pane. Greedy decoding unless "
                    "*sample* is ticked, so an answer is reproducible.")
        with gr.Row():
            instruction = gr.Textbox(label="Instruction", lines=2, elem_id="instruction", scale=2)
            user_inp = gr.Textbox(label="Input (optional)", lines=2, elem_id="input", scale=1)
        with gr.Accordion("Generation options", open=False):
            with gr.Row():
                max_new_tokens = gr.Number(defaults.max_new_tokens, label="max_new_tokens",
                                           elem_id="max_new_tokens")
                num_beams = gr.Number(defaults.num_beams, label="num_beams (1: streamed)",
                                      elem_id="num_beams")
                repetition_penalty = gr.Number(defaults.repetition_penalty,
                                               label="repetition_penalty",
                                               elem_id="repetition_penalty")
                sample = gr.Checkbox(False, label="sample (instead of greedy)", elem_id="sample")
            with gr.Row(visible=False) as sampling_row:
                temperature, top_p, top_k = (gr.Number(SAMPLING_DEFAULTS[name], label=name,
                                                       elem_id=name)
                                             for name in ("temperature", "top_p", "top_k"))
        sample.change(lambda ticked: gr.Row(visible=ticked), sample, sampling_row,
                      api_visibility="private")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            adapter_pane = gr.Textbox(label="Base + adapter (fine-tuned)", lines=8,
                                      interactive=False, elem_id="adapter-pane")
            base_pane = gr.Textbox(label="Base model (adapter disabled)", lines=8,
                                   interactive=False, elem_id="base-pane")
        gr.Examples(examples(), [instruction, user_inp], label="Examples from the Alpaca sample",
                    elem_id="examples")
        # concurrency_limit=1: requests queue rather than share the model (see
        # Playground._model_lock).
        button.click(playground.answer,
                     [instruction, user_inp, max_new_tokens, sample, temperature, top_p, top_k,
                                         num_beams, repetition_penalty],
                     [adapter_pane, base_pane, status, button], api_name="generate",
                     concurrency_limit=1)
    return page


def build_parser() -> CliParser:
    """The flags of `python inference.py serve`."""
    parser = CliParser(prog="inference.py serve",
                       description="A page in the browser: the base model and base + adapter "
                                   "answer side by side.")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; "
                             "0.0.0.0: every network)")
    parser.add_argument("--port", type=int, default=7860, help="default: 7860")
    add_placement_arguments(parser)
    return parser


def serve(loaded: LoadedModel, prompter: Template, host: str, port: int) -> int:
    """Serve the page for `loaded` (inference.py's `serve` loads it) until Ctrl-C or SIGTERM, then
    return 0.

    Raises:
        OSError: the port is in use (`inference.main` prints it as one `error:` line).
    """
    page = build_page(Playground(loaded, prompter))
    try:
        page.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True,
                    quiet=True, ssr_mode=False, mcp_server=False)
    except OSError as err:  # Gradio's own message names its environment variable, not our flag
        raise OSError(f"cannot listen on {host}:{port} ({str(err).split('. ')[0]}); pass another "
                      "--port or --host") from None
    print(f"playground on http://{host}:{port} (Ctrl-C stops it)", flush=True)
    try:
        _wait_for_stop_signal()
    finally:
        page.close()
    print("playground stopped", flush=True)
    return 0


def _wait_for_stop_signal() -> None:
    stopped = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopped.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopped.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
