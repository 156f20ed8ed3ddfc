"""Can the backbone read the memory prompt where HMT puts it? (#27, stage 0: attention to the memory position.)

HMT reads a window as [p, E(sensory), E(x), p]: the recalled memory p at position 0. A pretrained LM turns whatever
sits at position 0 into its attention sink (a massive activation that most heads park their attention on, with
values near zero), so p's content may not reach the tokens at all. For held-out pass-key prompts (the question
2 segments after the key, standard wording, filler from held-out text) this prints, per layout (the paper's, and
p behind a sink token, HMTConfig.sink_token):

- the attention from the positions that predict the key's digits to p, averaged over heads, early and late layers;
- p's hidden-state norm over the median token's, at its largest across layers (the sink's massive activation);
- the digit loss (nats per digit, ln 10 = 2.30 is chance) with the recalled p, with p zeroed and with p's
  coordinates shuffled: equal losses mean the reader does not use p's content.

    python bench/memory_position.py --model models/hmt-smollm2
    python bench/memory_position.py --model runs/stage-A-103 --carry campaign/stage-A2.carry.pt --sinks none 0 1
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from common import ROOT, print_table

from hmt_core import HMTModel
from hmt_lab.episodes import (
    EpisodeConfig,
    _queries,
    chain_states,
    eval_keys,
    load_trainable,
    prepare,
    prompt_attention,
    read_outputs,
    recall_over,
)
from hmt_lab.exercises import value_token_indices


def load(model_dir: str, carry: str | None) -> HMTModel:
    """The model, with an episode run's carry file (its LoRA, scale and sink) applied when given."""
    model = HMTModel.from_pretrained(model_dir)
    if carry is not None:
        saved = torch.load(carry, map_location="cpu", weights_only=True)
        prepare(model, EpisodeConfig.from_dict(saved["config"]))
        load_trainable(model, saved["trainable"], Path(carry))
    return model.eval()


@torch.no_grad()
def measure(model: HMTModel, filler: list[int], keys: int, distance: int) -> dict[str, float]:
    cfg = model.hmt_config
    layers = model.backbone.config.get_text_config().num_hidden_layers
    attention = torch.zeros(layers)
    peak_norm = 0.0
    losses: dict[str, list[float]] = {"recalled": [], "zeroed": [], "shuffled": []}
    shuffle = torch.randperm(model.dim, generator=torch.Generator().manual_seed(0))
    items = eval_keys(model.tokenizer, cfg.segment_tokens, [distance], keys, filler, seed=1)
    for item in items:
        states = list(chain_states(model, item.segments))
        head, answer = item.questions[distance]
        before = item.key_segment + distance
        row = head + answer
        prompt, _ = recall_over(model, _queries(model, [row[:min(cfg.summary_tokens, len(head))]]),
                                [states[before - 1]])
        sensory = item.segments[before - 1][-cfg.num_sensory:] if cfg.num_sensory else []
        digits = value_token_indices(model.tokenizer, answer)
        wanted = torch.tensor([answer[i] for i in digits])
        for name, p in (("recalled", prompt), ("zeroed", torch.zeros_like(prompt)), ("shuffled", prompt[:, shuffle])):
            recalled = name == "recalled"
            out, prefix = read_outputs(model, p, [sensory], [row], attentions=recalled, hidden_states=recalled)
            at = [prefix + len(sensory) + len(head) - 1 + i for i in digits]
            logits = model.lm_logits(out.last_hidden_state[0, at]).float()
            losses[name].append(float(torch.nn.functional.cross_entropy(logits, wanted)))
            if recalled:
                where = prefix - 1  # p's position
                attention += prompt_attention(out.attentions, where)[0, :, :, at].mean(dim=(1, 2)) / len(items)
                for hidden in out.hidden_states:
                    ratio = hidden[0, where].norm() / hidden[0, where + 1:].norm(dim=-1).median()
                    peak_norm = max(peak_norm, float(ratio))
    half = layers // 2
    return {"attention, first half of layers": float(attention[:half].mean()),
            "attention, second half": float(attention[half:].mean()),
            "p norm / median (peak)": peak_norm,
            **{f"digit loss, p {name}": sum(v) / len(v) for name, v in losses.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "hmt-smollm2"), help="model directory")
    parser.add_argument("--carry", help="an episode run's carry file to apply (hmt train-episodes --carry)")
    parser.add_argument("--sinks", nargs="+", default=["none", "0"],
                        help="layouts: none (p at position 0) or a sink token id before p")
    parser.add_argument("--keys", type=int, default=6)
    parser.add_argument("--distance", type=int, default=2, help="segments between the key and the question")
    parser.add_argument("--filler", default=str(ROOT / "models" / "hmt-smollm2" / "held_out.txt"),
                        help="held-out text the prompts are cut from")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load(args.model, args.carry)
    filler = model.tokenizer(Path(args.filler).read_text()[:200_000])["input_ids"]
    base = model.hmt_config
    rows = []
    for sink in args.sinks:
        model.hmt_config = dataclasses.replace(base, sink_token=None if sink == "none" else int(sink))
        result = measure(model, filler, args.keys, args.distance)
        rows.append(["p at 0 (the paper's)" if sink == "none" else f"sink token {sink}, then p",
                     *(f"{value:.3f}" if "loss" in name or "attention" in name else f"{value:.1f}"
                       for name, value in result.items())])
    model.hmt_config = base
    print_table(["layout", "attention to p (layers 1-15)", "(16-30)", "p norm / median, peak", "digit loss",
                 "p zeroed", "p shuffled"], rows)


if __name__ == "__main__":
    main()
