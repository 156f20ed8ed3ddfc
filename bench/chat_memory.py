"""Conversational memory and short chats of a served model, through the OpenAI-compatible API.

1. Memory: `--facts` conversations (hmt_lab.exercises.chat_fact, held-out templates and values):
   a fact stated in the first user turn, exchanges about passages of the held-out books (never
   used in training) until the conversation after the fact's turn is at least `--windows`
   windows of L tokens (plus a random part of a window, so the question lands anywhere in its
   window), then the question. HMT: a live hmt-serve, one session per fact, the whole
   conversation sent with the official `openai` SDK in one request (the assistant turns of the
   history are the fixed filler replies, never model generations), greedy reply scored with
   fact_recalled. Baselines in-process on the bare backbone (a LoRA-trained model is loaded again
   without its deltas): greedy on the last L tokens of the same rendered prompt (windowed), and
   with --full-context on all of it when it fits the backbone's positions.
2. Short chats: `--short-chats` single exchanges (a request and the start of a held-out
   passage) whose prompt and reply fit in one window. HMT's greedy reply (HTTP, new session
   each) against the bare backbone's greedy reply on the same prompt (in-process): exact
   agreement and the mean common token prefix. And the teacher-forced loss (nats/token) of a
   held-out reference reply (the passage's continuation) under HMT (a new session that read the
   prompt) and under the bare backbone (one forward over prompt + reply), both in-process.

    python bench/chat_memory.py --model path/to/model                    # 50 facts, 4 windows, 20 short chats
    python bench/chat_memory.py --model models/hmt-demo --passages models/hmt-demo/held_out.txt \\
        --facts 2 --short-chats 2 --json /tmp/chat_memory.json          # quick, no corpus fetch
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import shlex
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from common import DTYPES, print_table, start_server
from openai import AsyncOpenAI

from hmt_core import HMTModel
from hmt_core.checkpoint import load_pretrained
from hmt_core.generation import continuation_log_probs
from hmt_lab.evaluate import greedy_backbone_reply
from hmt_lab.exercises import FILLER_REQUESTS, chat_fact, fact_recalled
from service.conversation import ChatTemplate, Message

# ----- passages ---------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def cut_passages(paragraphs: list[str], min_chars: int = 200, max_chars: int = 600) -> list[str]:
    """Passages of min_chars..max_chars: whole sentences of one paragraph, packed greedily (a
    sentence longer than max_chars is cut at a word). Shorter remainders are dropped, so every
    filler turn has some length."""
    out: list[str] = []
    for paragraph in paragraphs:
        current = ""
        for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
            while len(sentence) > max_chars:  # a run-on sentence: cut at the last space that fits
                cut = sentence.rfind(" ", 0, max_chars)
                cut = cut if cut > 0 else max_chars
                if len(current) >= min_chars:
                    out.append(current)
                current = ""
                out.append(sentence[:cut])
                sentence = sentence[cut:].strip()
            if current and len(current) + 1 + len(sentence) > max_chars:
                if len(current) >= min_chars:
                    out.append(current)
                current = ""
            current = f"{current} {sentence}".strip()
        if len(current) >= min_chars:
            out.append(current)
    return out


def read_paragraphs(path: str) -> list[str]:
    """A text file's paragraphs: blank-line separated blocks, or one per line when there are no blank lines."""
    text = Path(path).read_text(encoding="utf-8")
    blocks = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text) else text.split("\n")
    return [" ".join(b.split()) for b in blocks if b.strip()]


def held_out_paragraphs() -> tuple[list[str], str]:
    """Paragraphs of the books kept out of training (fetched and cached on first use)."""
    from hmt_lab.corpus import HELD_OUT_TITLES, books, split_books

    _, held = split_books(books(include_kjv=False), HELD_OUT_TITLES)
    return [p for book in held for p in book.text.split("\n\n")], "held-out books: " + ", ".join(
        b.title for b in held)


# ----- conversations ------------------------------------------------------------------------------


@dataclass
class FactCase:
    messages: list[dict[str, str]]
    value: str
    question: str
    filler_turns: int
    prompt: list[int]  # the rendered conversation with the generation prompt, as the server reads it
    distance_tokens: int  # tokens after the fact's turn, up to the end of the prompt


@dataclass
class ShortChat:
    messages: list[dict[str, str]]
    prompt: list[int]
    reference: list[int]  # a held-out reply: the passage's continuation


def render(template: ChatTemplate, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    """Token ids as hmt-serve reads a new session: the template's text, no added special tokens."""
    text = template.render([Message(m["role"], m["content"]) for m in messages], generation_prompt)
    return list(template.tokenizer.encode(text, add_special_tokens=False))


def build_fact(template: ChatTemplate, rng: random.Random, passages: list[str], windows: int, window: int,
               max_turns: int = 1000) -> FactCase:
    """The fewest filler exchanges that put the fact at least windows*L (+ a random part of L) tokens back."""
    seed, target = rng.randrange(2**63), windows * window + rng.randrange(window)
    for turns in range(max_turns):
        # the same seed for every length: chat_fact draws the same fact and first exchanges
        fact = chat_fact(random.Random(seed), passages, turns, held_out=True)
        prompt = render(template, fact.messages, True)
        distance = len(prompt) - len(render(template, fact.messages[:fact.fact_turn + 1], False))
        if distance >= target:
            return FactCase(fact.messages, fact.value, fact.messages[-1]["content"], turns, prompt, distance)
    raise SystemExit(f"{max_turns} filler exchanges do not put a fact {windows} windows back")


def build_short_chat(template: ChatTemplate, rng: random.Random, passages: list[str], window: int,
                     reply_tokens: int) -> ShortChat | None:
    """A request with the start of a passage, as many words as leave reply_tokens of the window;
    the reference reply: the passage's next words. None if not even one word fits."""
    encode = template.tokenizer.encode
    words, request = rng.choice(passages).split(), rng.choice(FILLER_REQUESTS)
    best: tuple[list[dict[str, str]], list[int], int] | None = None
    for n in range(1, len(words)):
        messages = [{"role": "user", "content": f"{request} {' '.join(words[:n])}"}]
        prompt = render(template, messages, True)
        if len(prompt) > window - reply_tokens:
            break
        best = messages, prompt, n
    if best is None:
        return None
    messages, prompt, n = best
    reference = list(encode(" ".join(words[n:]), add_special_tokens=False))[:reply_tokens]
    return ShortChat(messages, prompt, reference) if reference else None


# ----- HMT through HTTP ---------------------------------------------------------------------------


async def served_replies(url: str, conversations: list[list[dict[str, str]]], max_tokens: int,
                         concurrency: int, label: str) -> list[tuple[str, int, str]]:
    """(reply, prompt tokens the server read, continuation) of each conversation, each in a new session,
    greedy; up to `concurrency` at once (the server batches them)."""
    # no retries: a retried request would continue the session instead of starting it
    client = AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=1800)
    model_name = (await client.models.list()).data[0].id
    gate, done = asyncio.Semaphore(concurrency), 0
    run = uuid.uuid4().hex[:8]

    async def one(i: int, messages: list[dict[str, str]]) -> tuple[str, int, str]:
        nonlocal done
        async with gate:
            raw = await client.chat.completions.with_raw_response.create(
                model=model_name, messages=messages, max_tokens=max_tokens, temperature=0,  # type: ignore[arg-type]
                extra_headers={"X-Session-Id": f"bench-{label}-{run}-{i}"})
            completion = raw.parse()
            done += 1
            print(f"  {label} {done}/{len(conversations)}", file=sys.stderr, flush=True)
            usage = completion.usage.prompt_tokens if completion.usage else -1
            return (completion.choices[0].message.content or "", usage,
                    raw.headers.get("x-hmt-continuation", ""))

    try:
        return await asyncio.gather(*(one(i, m) for i, m in enumerate(conversations)))
    finally:
        await client.close()


# ----- the bare backbone in-process ---------------------------------------------------------------


def backbone_text(model: HMTModel, template: ChatTemplate, context: list[int], max_tokens: int) -> str:
    """The bare backbone's greedy reply, cut where hmt-serve cuts a chat reply (EOS, end of turn, stop strings)."""
    stops = model.eos_token_ids | set(template.stop_token_ids)
    tokens = greedy_backbone_reply(model, context, max_tokens)
    tokens = tokens[:next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]
    text = template.tokenizer.decode(tokens, skip_special_tokens=True)
    for stop in template.stop_strings:
        text = text.split(stop)[0]
    return text


@torch.no_grad()
def backbone_loss(model: HMTModel, prompt: list[int], reply: list[int]) -> float:
    """Teacher-forced nats/token of reply after prompt, the bare backbone reading both at once."""
    ids = torch.tensor([prompt + reply], device=model.device)
    log_probs = torch.log_softmax(model.backbone(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(reply) - 1, device=model.device)
    return float(-log_probs[positions, torch.tensor(reply, device=model.device)].mean())


@torch.no_grad()
def hmt_loss(model: HMTModel, prompt: list[int], reply: list[int]) -> float:
    """Teacher-forced nats/token of reply in a new session that read prompt, as generation sees it."""
    state = model.append(model.new_session(), prompt)
    return -sum(continuation_log_probs(model, state, reply)) / len(reply)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# ----- report -------------------------------------------------------------------------------------


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a rate (Wilson): honest at 0/n and n/n, where the normal one collapses."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def rate_row(label: str, hits: list[bool]) -> list[str]:
    if not hits:
        return [label, "0/0", "n/a", "n/a"]
    low, high = wilson(sum(hits), len(hits))
    return [label, f"{sum(hits)}/{len(hits)}", f"{sum(hits) / max(1, len(hits)):.0%}", f"{low:.0%}-{high:.0%}"]


def summary(hits: list[bool]) -> dict[str, Any]:
    low, high = wilson(sum(hits), len(hits))
    # no rate at n = 0 (no conversation fit the full-context reader), rather than a misleading 0%
    return {"hits": sum(hits), "n": len(hits), "rate": sum(hits) / len(hits) if hits else None, "ci95": [low, high]}


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory (HMT format, with a tokenizer)")
    parser.add_argument("--facts", type=int, default=50, help="conversations with a fact to recall")
    parser.add_argument("--windows", type=int, default=4, help="least distance of the fact, in windows of L tokens")
    parser.add_argument("--answer-tokens", type=int, default=24, help="max_tokens of the answer to the question")
    parser.add_argument("--short-chats", type=int, default=20, help="single exchanges that fit in one window")
    parser.add_argument("--reply-tokens", type=int, default=32,
                        help="short chats: reply length (greedy and reference), at most L/4")
    parser.add_argument("--full-context", action="store_true",
                        help="also the bare backbone on the whole conversation when it fits its positions")
    parser.add_argument("--passages", default=None,
                        help="a text file of held-out paragraphs (default: the held-out books of hmt_lab.corpus)")
    parser.add_argument("--passage-chars", default="200,600",
                        help="MIN,MAX characters of a filler passage (shorter ones step finer where L is small)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (server and in-process)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every conversation, reply and score here")
    args = parser.parse_args()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    print(f"`{command}`\n", flush=True)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as hmt-serve does: subnormal floats slow CPU matmuls
    torch.manual_seed(args.seed)
    model = HMTModel.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device).eval()
    # the baselines are the bare backbone: a model trained with LoRA is loaded again without its deltas
    bare = load_pretrained(HMTModel, args.model, dtype=DTYPES[args.dtype], device=args.device,
                           backbone_deltas=False).eval() if model.backbone_deltas else model
    if model.tokenizer is None:
        raise SystemExit("the model has no tokenizer: a chat benchmark needs one")
    template = ChatTemplate(model.tokenizer)
    window = model.hmt_config.segment_tokens
    limit: int | None = getattr(model.backbone.config, "max_position_embeddings", None)

    if args.passages:
        paragraphs, source = read_paragraphs(args.passages), args.passages
    else:
        paragraphs, source = held_out_paragraphs()
    low_chars, high_chars = (int(n) for n in args.passage_chars.split(","))
    passages = cut_passages(paragraphs, low_chars, high_chars)
    if not passages:
        raise SystemExit(f"no passages of {low_chars}-{high_chars} characters in {source}")
    rng = random.Random(args.seed)
    facts = [build_fact(template, rng, passages, args.windows, window) for _ in range(args.facts)]
    reply_tokens = max(1, min(args.reply_tokens, window // 4))
    chats: list[ShortChat] = []
    for _ in range(args.short_chats * 20):  # a passage whose first word does not fit is skipped
        if len(chats) == args.short_chats:
            break
        if (chat := build_short_chat(template, rng, passages, window, reply_tokens)) is not None:
            chats.append(chat)
    title = (f"{Path(args.model).name} (L={window}, {args.dtype} on {args.device}, {args.threads} threads); "
             f"{len(passages)} passages from {source}")
    print(title, flush=True)

    # HMT first, through a live server; the in-process baselines after it, so they do not share the cores
    with tempfile.TemporaryDirectory() as work:
        process, url = start_server(str(Path(args.model).resolve()), str(Path(work) / "redis"), args.threads,
                                    "--device", args.device, "--dtype", args.dtype,
                                    "--max-batch", str(max(8, args.concurrency)))
        try:
            started = time.perf_counter()
            served = asyncio.run(served_replies(url, [f.messages for f in facts], args.answer_tokens,
                                                args.concurrency, "fact"))
            fact_seconds = time.perf_counter() - started
            served_short = asyncio.run(served_replies(url, [c.messages for c in chats], reply_tokens,
                                                      args.concurrency, "short"))
        finally:
            process.terminate()
            process.wait(timeout=30)

    fact_rows: list[dict[str, Any]] = []
    for i, (fact, (reply, read, continuation)) in enumerate(zip(facts, served, strict=True)):
        window_reply = backbone_text(bare, template, fact.prompt[-window:], args.answer_tokens)
        full_reply: str | None = None
        if args.full_context and (limit is None or len(fact.prompt) + args.answer_tokens <= limit):
            full_reply = backbone_text(bare, template, fact.prompt, args.answer_tokens)
        fact_rows.append({
            **{k: v for k, v in asdict(fact).items() if k != "prompt"},
            "prompt_tokens": len(fact.prompt), "server_prompt_tokens": read, "continuation": continuation,
            "distance_windows": fact.distance_tokens / window,
            "hmt_reply": reply, "hmt_recalled": fact_recalled(fact.value, reply),
            "window_reply": window_reply, "window_recalled": fact_recalled(fact.value, window_reply),
            "full_reply": full_reply,
            "full_recalled": None if full_reply is None else fact_recalled(fact.value, full_reply)})
        print(f"  baseline {i + 1}/{len(facts)}", file=sys.stderr, flush=True)

    encode = model.tokenizer.encode
    chat_rows: list[dict[str, Any]] = []
    for chat, (reply, read, _) in zip(chats, served_short, strict=True):
        base = backbone_text(bare, template, chat.prompt, reply_tokens)
        hmt_ids, base_ids = encode(reply, add_special_tokens=False), encode(base, add_special_tokens=False)
        chat_rows.append({
            "messages": chat.messages, "prompt_tokens": len(chat.prompt), "server_prompt_tokens": read,
            "hmt_reply": reply, "backbone_reply": base, "exact": reply == base,
            "common_prefix_tokens": common_prefix(hmt_ids, base_ids),
            "hmt_reply_tokens": len(hmt_ids), "backbone_reply_tokens": len(base_ids),
            "reference": model.tokenizer.decode(chat.reference), "reference_tokens": len(chat.reference),
            "hmt_loss": hmt_loss(model, chat.prompt, chat.reference),
            "backbone_loss": backbone_loss(bare, chat.prompt, chat.reference)})

    # ----- tables
    hmt_hits = [r["hmt_recalled"] for r in fact_rows]
    window_hits = [r["window_recalled"] for r in fact_rows]
    full_hits = [r["full_recalled"] for r in fact_rows if r["full_recalled"] is not None]
    distances = [r["distance_windows"] for r in fact_rows]
    mismatched = sum(r["server_prompt_tokens"] != r["prompt_tokens"] for r in fact_rows + chat_rows)
    if fact_rows:
        rows = [rate_row("HMT (hmt-serve, /v1/chat/completions, one session per fact)", hmt_hits),
                rate_row(f"bare backbone, last {window} tokens", window_hits)]
        if args.full_context:
            rows.append(rate_row(f"bare backbone, whole conversation (fits {limit} positions: "
                                 f"{len(full_hits)}/{len(fact_rows)})", full_hits))
        print_table(["reader", "recalled", "rate", "95% CI"], rows,
                    title=f"Conversational memory: {len(fact_rows)} held-out facts, "
                          f"at least {args.windows} windows back (mean {mean(distances):.2f}, "
                          f"{min(distances):.2f}-{max(distances):.2f} windows of {window} tokens)")
        only_hmt = sum(h and not w for h, w in zip(hmt_hits, window_hits, strict=True))
        only_window = sum(w and not h for h, w in zip(hmt_hits, window_hits, strict=True))
        print(f"paired: HMT only {only_hmt}, windowed only {only_window}; mean filler exchanges "
              f"{mean([r['filler_turns'] for r in fact_rows]):.1f}; HTTP {fact_seconds:.1f} s")
    if chat_rows:
        exact = [r["exact"] for r in chat_rows]
        print_table(
            ["short chats (one window)", "value"],
            [["exact agreement, HMT vs bare backbone (greedy)", f"{sum(exact)}/{len(exact)} ({mean(exact):.0%})"],
             ["mean common prefix, tokens", f"{mean([r['common_prefix_tokens'] for r in chat_rows]):.1f} of "
                                            f"{mean([r['backbone_reply_tokens'] for r in chat_rows]):.1f}"],
             ["held-out reply loss, HMT (nats/token)", f"{mean([r['hmt_loss'] for r in chat_rows]):.3f}"],
             ["held-out reply loss, bare backbone (nats/token)",
              f"{mean([r['backbone_loss'] for r in chat_rows]):.3f}"]],
            title=f"Short chats: {len(chat_rows)} single exchanges, prompt + {reply_tokens}-token reply "
                  f"within {window} tokens")
    print(f"server read the same prompt tokens as rendered here: {len(fact_rows) + len(chat_rows) - mismatched}/"
          f"{len(fact_rows) + len(chat_rows)}")

    if args.json:
        result = {
            "command": command, "model": args.model, "segment_tokens": window, "passages": source,
            "passage_chars": [low_chars, high_chars], "passage_count": len(passages),
            "seed": args.seed, "windows": args.windows,
            "memory": {"hmt": summary(hmt_hits), "window": summary(window_hits),
                       "full": summary(full_hits) if args.full_context else None,
                       "mean_distance_windows": mean(distances), "http_seconds": fact_seconds, "facts": fact_rows},
            "short_chats": {
                "reply_tokens": reply_tokens,
                "exact_agreement": mean([r["exact"] for r in chat_rows]),
                "mean_common_prefix_tokens": mean([r["common_prefix_tokens"] for r in chat_rows]),
                "hmt_loss": mean([r["hmt_loss"] for r in chat_rows]),
                "backbone_loss": mean([r["backbone_loss"] for r in chat_rows]), "chats": chat_rows},
            "prompt_token_mismatches": mismatched}
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
