"""(h) HMT+Temp-LoRA: does the adapter learn better from the window as HMT reads it, after its memory
prompt p, than from the window alone? Both read every window the same way (HMT's reading with the
adapter applied); they differ only in what each commit trains the adapter on: `[p, E(sensory), E(W)]`
(what `hmt+temp-lora` does) or `[E(sensory), E(W)]` (Temp-LoRA's own recipe). Perplexity on the same
held-out documents, HMT alone measured in the same run as the baseline.

    python bench/temp_lora_prompt.py --model models/hmt-smollm2     # 4 documents of 32 segments: ~25 min
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch
from common import add_common_args, print_table, setup
from torch import Tensor

from hmt_core import HMTModel
from hmt_core.temp_lora import Adapter, TempLoRAConfig
from hmt_lab import evaluate
from hmt_lab.train import read_texts, token_samples


def without_prompt(model: HMTModel) -> HMTModel:
    """The same HMT+Temp-LoRA model, but each commit trains its adapter on [sensory, W] only."""
    train = model.trained_adapters

    def trained_adapters(adapters: Sequence[Adapter], contexts: Tensor | Sequence[Sequence[int]] | None,
                         windows: Tensor | Sequence[Sequence[int]], prompts: Tensor | None = None) -> list[Adapter]:
        return train(adapters, contexts, windows)  # the prompts are dropped

    model.trained_adapters = trained_adapters  # type: ignore[method-assign]  # this instance only
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, threads=2)
    parser.add_argument("--model", default="models/hmt-smollm2", help="an HMT model directory")
    parser.add_argument("--data", default=None, help="held-out text (default: the model's held_out.txt)")
    parser.add_argument("--doc-segments", type=int, default=32)
    parser.add_argument("--docs", type=int, default=4)
    args = parser.parse_args()
    setup(args)
    hmt = HMTModel.from_pretrained(args.model).eval()
    seg = hmt.hmt_config.segment_tokens
    data = args.data or f"{args.model}/held_out.txt"
    documents = token_samples(hmt, read_texts([data], "text"), args.doc_segments * seg)[:args.docs]
    lora = TempLoRAConfig(context_tokens=hmt.hmt_config.num_sensory)
    readers = {"HMT": hmt, "HMT+Temp-LoRA, adapter trained after p": hmt.with_memory("hmt+temp-lora", lora),
               "HMT+Temp-LoRA, adapter trained without p": without_prompt(hmt.with_memory("hmt+temp-lora", lora))}
    losses = {}
    for name, model in readers.items():
        report = evaluate.perplexity({model.hmt_config.memory: model}, documents, batch_size=1)
        losses[name] = report.loss[model.hmt_config.memory]
        print(f"{name}: {losses[name]:.4f} nats/token", flush=True)
    base = losses["HMT"]
    print(f"\n{args.model}, {len(documents)} documents of {args.doc_segments} segments, {torch.get_num_threads()} "
          f"threads; Temp-LoRA rank {lora.rank}, {lora.steps} steps at {lora.learning_rate}\n")
    print_table(["reader", "loss (nats/token)", "perplexity", "vs HMT"],
                [[name, f"{loss:.4f}", f"{math.exp(loss):.2f}", f"{math.exp(loss - base) - 1:+.1%}"]
                 for name, loss in losses.items()])


if __name__ == "__main__":
    main()
