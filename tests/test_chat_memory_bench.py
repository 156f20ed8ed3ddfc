"""bench/chat_memory.py end to end on the shipped demo model: a live hmt-serve, 2 facts, 2 short chats.

The demo's L is 32, so 4 windows back is ~128 tokens and the run takes seconds; its held-out
paragraphs file stands in for the corpus (no download).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "hmt-demo"


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "hmt.safetensors").is_file(), reason="the demo model is not checked out")
def test_chat_memory_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "chat_memory.json"
    command = [sys.executable, "bench/chat_memory.py", "--model", str(DEMO), "--passages", str(DEMO / "held_out.txt"),
               "--facts", "2", "--short-chats", "2", "--full-context", "--threads", "1", "--concurrency", "2",
               "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Conversational memory" in result.stdout and "Short chats" in result.stdout

    data = json.loads(out.read_text())
    assert data["segment_tokens"] == 32 and data["windows"] == 4
    memory = data["memory"]
    for reader in ("hmt", "window"):
        assert 0.0 <= memory[reader]["rate"] <= 1.0
    # the demo backbone has 128 positions: the full-context reader gets no rate when nothing fits
    full = memory["full"]
    assert full["rate"] is None if full["n"] == 0 else 0.0 <= full["rate"] <= 1.0
    assert memory["hmt"]["n"] == memory["window"]["n"] == 2
    for fact in memory["facts"]:
        assert fact["distance_tokens"] >= 4 * 32  # the fact really is 4 windows back
        assert fact["continuation"] == "new"  # one fresh session per fact
        assert isinstance(fact["hmt_recalled"], bool) and isinstance(fact["window_recalled"], bool)
    assert memory["mean_distance_windows"] >= 4

    short = data["short_chats"]
    assert len(short["chats"]) == 2
    assert 0.0 <= short["exact_agreement"] <= 1.0
    assert 0.0 <= short["mean_common_prefix_tokens"] <= short["reply_tokens"]
    assert short["hmt_loss"] > 0 and short["backbone_loss"] > 0
    for chat in short["chats"]:
        assert chat["prompt_tokens"] + short["reply_tokens"] <= 32  # fits in one window
    # the server read exactly the tokens the baselines were given
    assert data["prompt_token_mismatches"] == 0
