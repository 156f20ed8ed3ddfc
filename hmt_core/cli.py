"""`hmt`: the command line of hmt_core (convert checkpoints, inspect models)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hmt_core.checkpoint import read_state_dict
from hmt_core.config import HMTConfig
from hmt_core.errors import HMTError
from hmt_core.model import HMTModel


def _convert(args: argparse.Namespace) -> int:
    recall_dim = args.recall_dim
    if recall_dim is None:  # not a training flag users remember: read it off the checkpoint
        state = read_state_dict(args.from_hmt_pytorch)
        wq = next((v for k, v in state.items() if k.endswith("cross_attn.wq.weight")), None)
        if wq is None:
            raise HMTError("checkpoint has no cross_attn.wq.weight: not an HMT checkpoint")
        recall_dim = int(wq.shape[0])
    config = HMTConfig(segment_tokens=args.segment_tokens, num_sensory=args.num_sensory,
                       ltm_context=args.ltm_context, recall_dim=recall_dim, sum_fraction=args.sum_fraction)
    model = HMTModel.from_hmt_pytorch(args.from_hmt_pytorch, backbone=args.backbone, config=config,
                                      lora_alpha=args.lora_alpha)
    model.save_pretrained(args.out)
    print(json.dumps({"out": str(args.out), "fingerprint": model.fingerprint, "hmt": config.to_dict(),
                      "tokenizer": model.tokenizer is not None}, indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    model = HMTModel.from_pretrained(args.model)
    backbone = model.backbone.config
    print(json.dumps({
        "model": str(args.model), "fingerprint": model.fingerprint, "hmt": model.hmt_config.to_dict(),
        "backbone": backbone.model_type, "hidden_size": model.dim, "vocab_size": model.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "session_state_bytes_max": model.hmt_config.ltm_context * model.dim * 4,
        "tokenizer": model.tokenizer is not None,
    }, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmt", description="Hierarchical Memory Transformer tools")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="HMT-pytorch checkpoint -> servable model directory")
    convert.add_argument("--from-hmt-pytorch", required=True, metavar="CKPT",
                         help="checkpoint written by HMT-pytorch (.safetensors, .pt/.bin, or a directory)")
    convert.add_argument("--backbone", required=True, metavar="DIR_OR_NAME",
                         help="backbone directory or hub name: config and tokenizer (weights only if the "
                              "checkpoint has none)")
    convert.add_argument("--out", required=True, metavar="DIR")
    convert.add_argument("--segment-tokens", type=int, required=True, help="L, the segment length trained with")
    convert.add_argument("--num-sensory", type=int, required=True, help="k, sensory tokens carried over")
    convert.add_argument("--ltm-context", type=int, required=True, help="N, memory embeddings recalled over")
    convert.add_argument("--recall-dim", type=int, default=None, help="default: read from the checkpoint")
    convert.add_argument("--sum-fraction", type=float, default=0.5)
    convert.add_argument("--lora-alpha", type=float, default=32.0,
                         help="LoRA alpha of a PEFT backbone (not stored in checkpoints; reference uses 32)")
    convert.set_defaults(run=_convert)

    info = commands.add_parser("info", help="describe a model directory")
    info.add_argument("model", metavar="DIR_OR_NAME")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except HMTError as exc:
        print(f"hmt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
