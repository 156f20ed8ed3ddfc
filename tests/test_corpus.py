"""The book corpus: a real fetch of every pinned archive (about 11 MB, 15 s), clean text, held-out books,
checksums (a damaged cached or downloaded archive is refused), fetch errors that say what to run."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from hmt_core.backbones import CACHE_ENV
from hmt_core.errors import HMTError, InvalidInputError
from hmt_lab import corpus
from hmt_lab.corpus import (
    ARCHIVES,
    BOOK_SOURCES,
    HELD_OUT_TITLES,
    Book,
    CorpusChecksumError,
    CorpusFetchError,
    clean_text,
    ensure_archive,
    split_books,
)

BOILERPLATE = ("*** START OF", "*** END OF", "START OF THE PROJECT", "END OF THE PROJECT", "Project Gutenberg",
               "PROJECT GUTENBERG", "gutenberg.org", "Small Print", "SMALL PRINT", "This eBook is for the use")


@pytest.fixture(autouse=True)
def _no_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)  # never the developer's own cache: each test names its own


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool in ("npm", "apt-get"):
        if shutil.which(tool) is None:
            pytest.skip(f"the corpus fetch needs `{tool}`")
    return tmp_path_factory.mktemp("hmt-cache")


@pytest.fixture(scope="module")
def all_books(cache: Path) -> list[Book]:
    return corpus.books(cache_dir=cache, include_kjv=False)


def test_every_book_is_long_clean_text(all_books: list[Book]) -> None:
    assert [b.title for b in all_books] == [s.title for s in BOOK_SOURCES]  # deterministic order
    assert len({b.title for b in all_books}) == len(all_books) >= 12
    assert sum(len(b.text) for b in all_books) > 15_000_000
    for book in all_books:
        assert len(book.text) > 100_000, book.title
        assert book.author and book.license.startswith("public domain") and book.source, book.title
        for marker in BOILERPLATE:
            assert marker not in book.text, (book.title, marker)
        # whitespace normalized, paragraphs kept
        assert "\r" not in book.text and "\t" not in book.text and "\n\n\n" not in book.text, book.title
        assert "  " not in book.text and book.text == book.text.strip(), book.title
        assert book.text.count("\n\n") > 20, book.title


def test_books_hold_the_real_texts(all_books: list[Book]) -> None:
    text = {b.title: b.text for b in all_books}
    # prose: a hard-wrapped paragraph became one line
    assert ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife.") in text["Pride and Prejudice"]
    assert "Emma Woodhouse, handsome, clever, and rich" in text["Emma"]
    moby = text["Moby-Dick; or, The Whale"]
    assert "CHAPTER 1. Loomings.\n\nCall me Ishmael." in moby
    assert moby.endswith("only found another orphan.") and "CHAPTER 135. The Chase.—Third Day." in moby
    assert "Down the Rabbit-Hole" in text["Alice's Adventures in Wonderland"]
    # verse keeps its lines; the 1992 release's page about the etext is gone
    lost = text["Paradise Lost"]
    assert lost.startswith("Book I\n\nOf Man's first disobedience, and the fruit\nOf that forbidden tree")
    assert "IBM cards" not in lost and "Joseph Raben" not in lost
    assert "\nOLIVER What, boy!\n" in text["As You Like It"]
    devil = text["The Devil's Dictionary"]
    assert devil.startswith("PREFACE") and "ABDICATION, n. An act whereby a sovereign" in devil
    assert "00-database" not in devil and "wiretap" not in devil
    sotu = text["State of the Union Addresses, 1790-2021"]
    assert sotu.startswith("George Washington, 1790\n\nFellow-Citizens of the Senate")


def test_held_out_books_are_whole_long_and_not_trained_on(all_books: list[Book]) -> None:
    train, held = split_books(all_books, HELD_OUT_TITLES)
    assert 2 <= len(HELD_OUT_TITLES) <= 3
    assert sorted(b.title for b in held) == sorted(HELD_OUT_TITLES)
    assert not {b.title for b in train} & set(HELD_OUT_TITLES)
    assert len(train) + len(held) == len(all_books)
    assert all(len(b.text) > 800_000 for b in held)
    train_text = "\n".join(b.text for b in train)
    assert "Call me Ishmael" not in train_text and "Fanny Price" not in train_text
    with pytest.raises(InvalidInputError, match="Moby Dick"):
        split_books(all_books, ["Moby Dick"])  # a misspelt title would leak the book into training


def test_a_damaged_cached_archive_is_refused(cache: Path, all_books: list[Book], tmp_path: Path) -> None:
    archive = ARCHIVES["devil"]
    cached = corpus.corpus_dir(cache) / archive.filename
    assert corpus.sha256_file(cached) == archive.sha256
    other = corpus.corpus_dir(tmp_path)
    other.mkdir(parents=True)
    damaged = bytearray(cached.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # one bit: same size, different file
    (other / archive.filename).write_bytes(bytes(damaged))
    with pytest.raises(CorpusChecksumError, match=f"delete {other / archive.filename}"):
        ensure_archive("devil", tmp_path)
    (other / archive.filename).write_bytes(cached.read_bytes()[:1000])
    with pytest.raises(CorpusChecksumError, match="has sha256"):  # truncated
        ensure_archive("devil", tmp_path)
    # the intact file, put there by hand (the offline route), is used without a fetch
    shutil.copy(cached, other / archive.filename)
    assert ensure_archive("devil", tmp_path) == other / archive.filename


def test_a_download_that_is_not_the_pinned_file_never_enters_the_cache(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ARCHIVES, "devil", dataclasses.replace(ARCHIVES["devil"], sha256="0" * 64))
    with pytest.raises(CorpusChecksumError, match="downloaded debian dict-devil"):
        ensure_archive("devil", tmp_path)
    assert not any(corpus.corpus_dir(tmp_path).iterdir())  # no file, no leftover temp dir


def test_a_failed_fetch_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ARCHIVES, "brotli", dataclasses.replace(ARCHIVES["brotli"], version="0.0.0.404"))
    with pytest.raises(CorpusFetchError) as error:
        ensure_archive("brotli", tmp_path)
    assert isinstance(error.value, HMTError)
    assert "pip download --no-deps --no-binary :all: Brotli==0.0.0.404" in str(error.value)
    assert str(corpus.corpus_dir(tmp_path)) in str(error.value)


def test_gutenberg_header_footer_and_license_are_stripped() -> None:
    raw = ("\ufeffThe Project Gutenberg eBook of Persuasion, by Jane Austen\r\n\r\n"
           "This eBook is for the use of anyone anywhere at no cost.\r\n\r\n"
           "*** START OF THE PROJECT GUTENBERG EBOOK PERSUASION ***\r\n\r\n"
           "Produced by Sharon Partridge and Martin Ward. HTML version by Al Haines.\r\n"
           "Scanned for Project Gutenberg.\r\n\r\n\r\n"
           "Chapter 1\r\n\r\n"
           "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who,\r\n"
           "for his own amusement, never took up any book but the Baronetage;\r\n\r\n"
           "    Walter Elliot, born March 1, 1760, married, July 15, 1784,\r\n"
           "    Elizabeth, daughter of James Stevenson, Esq.\r\n\r\n"
           "Finis\r\n\r\n"
           "*** END OF THE PROJECT GUTENBERG EBOOK PERSUASION ***\r\n\r\n"
           "Updated editions will replace the previous one--the old editions will be renamed.\r\n"
           "START: FULL LICENSE\r\n")
    assert clean_text(raw) == (
        "Chapter 1\n\n"
        "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, "
        "never took up any book but the Baronetage;\n\n"
        "Walter Elliot, born March 1, 1760, married, July 15, 1784,\nElizabeth, daughter of James Stevenson, Esq.\n\n"
        "Finis")
    with pytest.raises(CorpusChecksumError, match="start line"):
        clean_text("no such heading here", start="Book I")


def test_describe_sources_names_every_book() -> None:
    rows = corpus.describe_sources()
    assert [r["title"] for r in rows[:-1]] == [s.title for s in BOOK_SOURCES]
    assert rows[-1]["title"] == corpus.KJV_TITLE
    for row in rows:
        assert row["author"] and row["package"] and row["version"] and row["license"], row
        assert "public domain" in row["license"], row
    assert {r["package"] for r in rows} >= {a.package for a in ARCHIVES.values()}


@pytest.mark.skipif(shutil.which("bible") is None, reason="no `bible` command (apt-get install bible-kjv)")
def test_the_kjv_is_one_book() -> None:
    book = corpus.kjv_book()
    assert book.text.startswith("In the beginning God created the heaven and the earth.")
    assert book.text.count("\n\n") == 1188 and len(book.text) > 4_000_000  # 1189 chapters
