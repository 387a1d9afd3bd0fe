"""The usual recipe, as bench/bench_vs_hf_trainer.py runs it against train.py: PEFT + transformers.Trainer with
alpaca-lora's data path and settings (tloen/alpaca-lora, finetune.py).

    python bench/hf_trainer_recipe.py --model-path MODEL --train-file train.json --valid-file valid.json \\
        --output-dir OUT --timings timings.json --precision bf16 --group-by-length

What it keeps from finetune.py: the JSON records through `datasets.load_dataset("json")`, each tokenized as the
whole prompt + output (`tokenizer(full_prompt, truncation=True, max_length=cutoff_len)`, EOS appended when it fits,
labels = input_ids: train_on_inputs), pad id 0 on the left, `DataCollatorForSeq2Seq(pad_to_multiple_of=8,
padding=True)`, `get_peft_model` with LoraConfig(r=8, alpha=16, dropout=0.05, bias="none", CAUSAL_LM), and
TrainingArguments with warmup_steps=100, learning_rate=3e-4, logging_steps=10, optim="adamw_torch",
group_by_length (transformers 5 spells it train_sampling_strategy="group_by_length"),
`model.config.use_cache = False`, then `model.save_pretrained(output_dir)`.

What it changes, and why:
  - the CPU (`use_cpu=True`), float32 weights, no 8-bit loading, bf16 autocast (`bf16=True`) where finetune.py
    has fp16 on a GPU: what train.py does on a CPU with PRECISION=bf16 (`--device cuda`: the GPU, float32
    weights, fp16 or bf16 autocast by --precision);
  - no evaluation or checkpoint inside the loop, one evaluation at the end (finetune.py's every 200 steps never
    fires in a run of 200 steps or fewer; train.py is run with EVAL_FREQ=0 SAVE_STEPS=0 to match), eval batch =
    train batch (train.py's);
  - no `torch.compile(model)`: finetune.py calls it after handing `model` to the Trainer, which keeps training the
    uncompiled model, so it changes nothing; no patched `model.state_dict` (PEFT saves adapters itself now);
  - a fixed shuffle seed, and `include_num_input_tokens_seen="non_padding"`, which counts each micro-batch's
    attention mask (the real tokens, as train.py counts them).

It writes --timings, a JSON file: the wall-clock time (time.time()) at the end of each optimizer step (TrainerCallback
on_step_end: after the optimizer step, the schedule and zero_grad, before logging) and the real tokens trained up to
then. It prints `READY` when the model, its adapters, the data and the Trainer are built, right before
`trainer.train()`: the moment the benchmark reads the resident memory of "the loaded model".
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import load_dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from prompter import Prompter  # noqa: E402  (alpaca-lora's templates/alpaca.json, the same text)

READY = "READY"


class StepTimes(transformers.TrainerCallback):
    """The time each optimizer step ends and the real tokens trained by then."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.time())
        self.tokens.append(int(state.num_input_tokens_seen))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--valid-file", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--cache-dir", default=None, help="datasets' cache (default: its own)")
    parser.add_argument("--timings", type=Path, required=True, help="JSON file to write the step times to")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: finetune.py's own device (fp16 there is its setting)")
    parser.add_argument("--group-by-length", action="store_true")
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    prompter = Prompter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_path)
    tokenizer.pad_token_id = 0  # unk: "we want this to be different from the eos token"
    tokenizer.padding_side = "left"

    def tokenize(prompt, add_eos_token=True):
        result = tokenizer(prompt, truncation=True, max_length=args.cutoff_len, padding=False, return_tensors=None)
        if (result["input_ids"][-1] != tokenizer.eos_token_id and len(result["input_ids"]) < args.cutoff_len
                and add_eos_token):
            result["input_ids"].append(tokenizer.eos_token_id)
            result["attention_mask"].append(1)
        result["labels"] = result["input_ids"].copy()
        return result

    def generate_and_tokenize_prompt(data_point):
        return tokenize(prompter.generate_prompt(data_point["instruction"], data_point["input"],
                                                 data_point["output"]))

    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query_key_value"], lora_dropout=0.05, bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    data = load_dataset("json", data_files={"train": args.train_file, "valid": args.valid_file},
                        cache_dir=args.cache_dir)
    train_data = data["train"].shuffle(seed=args.seed).map(generate_and_tokenize_prompt)
    val_data = data["valid"].map(generate_and_tokenize_prompt)

    steps = StepTimes()
    trainer = transformers.Trainer(
        model=model,
        train_dataset=train_data,
        eval_dataset=val_data,
        args=transformers.TrainingArguments(
            per_device_train_batch_size=args.micro_batch_size,
            per_device_eval_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=args.grad_accum,
            warmup_steps=args.warmup_steps,
            num_train_epochs=args.epochs,
            learning_rate=args.learning_rate,
            bf16=args.precision == "bf16",
            fp16=args.precision == "fp16",
            use_cpu=args.device == "cpu",
            logging_steps=10,
            optim="adamw_torch",
            eval_strategy="no",
            save_strategy="no",
            output_dir=args.output_dir,
            train_sampling_strategy="group_by_length" if args.group_by_length else "random",  # group_by_length
            report_to="none",
            seed=args.seed,
            include_num_input_tokens_seen="non_padding",
        ),
        data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt",
                                                          padding=True),
        callbacks=[steps],
    )
    model.config.use_cache = False
    print(READY, flush=True)
    trainer.train()
    trainer.evaluate()
    model.save_pretrained(args.output_dir)
    args.timings.write_text(json.dumps({"step_end_times": steps.times, "real_tokens_seen": steps.tokens}))


if __name__ == "__main__":
    main()
