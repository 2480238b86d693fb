"""Getting the book: markers, decoding, chapters, and failing clearly when it is missing."""

from __future__ import annotations

import pytest

from datamodules.gutenberg import (
    BookUnavailableError,
    read_utf8_text,
    split_into_chapters,
    strip_gutenberg_boilerplate,
)
from datamodules.treasure_island import TreasureIslandDataModule
from foundation import ConfigError

SAMPLE = """The Project Gutenberg eBook of Something
Licence words before the book.
*** START OF THE PROJECT GUTENBERG EBOOK 120 ***
Title page

I
The First Chapter

Body one.

II
The Second Chapter

Body two.
*** END OF THE PROJECT GUTENBERG EBOOK 120 ***
Licence words after the book.
"""


def test_strip_keeps_only_text_between_markers():
    body = strip_gutenberg_boilerplate(SAMPLE)
    assert body.startswith("Title page")
    assert body.endswith("Body two.")
    assert "Licence" not in body and "PROJECT GUTENBERG" not in body


def test_text_without_markers_is_used_whole_with_a_warning():
    with pytest.warns(UserWarning, match="No Project Gutenberg START/END markers"):
        body = strip_gutenberg_boilerplate("I\nA Title\n\nSome text.\n")
    assert body == "I\nA Title\n\nSome text."


def test_chapters_split_at_roman_numeral_headings():
    chapters = split_into_chapters(strip_gutenberg_boilerplate(SAMPLE))
    assert [(c.number, c.title) for c in chapters] == [(1, "The First Chapter"), (2, "The Second Chapter")]
    assert "Title page" not in chapters[0].text  # front matter belongs to no chapter
    assert chapters[1].text.endswith("Body two.")


def test_text_without_chapter_headings_is_refused():
    with pytest.raises(ConfigError, match="No chapter headings"):
        split_into_chapters("just prose\nwith no headings")


def test_real_book_has_34_chapters(book_path):
    chapters = split_into_chapters(strip_gutenberg_boilerplate(read_utf8_text(book_path)))
    assert len(chapters) == 34
    assert chapters[0].title == "The Old Sea-dog at the Admiral Benbow"
    assert chapters[-1].title == "And Last"
    assert "\r" not in chapters[0].text


def test_empty_book_files_are_called_empty(tmp_path):
    empty = tmp_path / "pg120.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="pg120.txt is empty; give the book's plain text"):
        read_utf8_text(empty)
    hollow = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n"
    with pytest.raises(ConfigError, match="no text between the Gutenberg START and END markers"):
        strip_gutenberg_boilerplate(hollow)


def test_non_utf8_file_is_refused_with_the_fix(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text.*pg120.txt"):
        read_utf8_text(bad)


def test_binary_file_is_refused(tmp_path):
    bad = tmp_path / "book.txt"
    bad.write_bytes(b"abc\x00def")
    with pytest.raises(ConfigError, match="NUL bytes"):
        read_utf8_text(bad)


def test_missing_book_without_network_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("TREASURE_ISLAND_PATH", raising=False)
    datamodule = TreasureIslandDataModule(cache_dir=str(tmp_path), download_url="http://127.0.0.1:9/pg120.txt")
    with pytest.raises(BookUnavailableError, match="TREASURE_ISLAND_PATH"):
        datamodule.prepare_data()
    assert not any(tmp_path.rglob("*.partial")), "a failed download must leave no partial file"


def test_given_book_path_that_does_not_exist_is_refused(tmp_path):
    datamodule = TreasureIslandDataModule(book_path=str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match="data.book_path.*is not a file"):
        datamodule.prepare_data()


def test_download_is_used_from_the_cache_once_present(tmp_path, monkeypatch, book_path):
    monkeypatch.delenv("TREASURE_ISLAND_PATH", raising=False)
    (tmp_path / "pg120.txt").write_bytes(book_path.read_bytes())
    datamodule = TreasureIslandDataModule(cache_dir=str(tmp_path), download_url="http://127.0.0.1:9/x")
    datamodule.prepare_data()  # no download attempted: the cached copy is there
    datamodule.setup("fit")
    assert len(datamodule.datasets["train"]) > 0


def test_book_is_downloaded_once_into_the_cache_and_cleaned(tmp_path, monkeypatch, book_path):
    """A loopback HTTP server stands in for Project Gutenberg."""
    import functools
    import http.server
    import threading

    served = tmp_path / "site"
    served.mkdir()
    header = "The Project Gutenberg eBook of Treasure Island\r\nLicence text.\r\n"
    footer = "\r\nEnd of licence.\r\n"
    (served / "pg120.txt").write_bytes(header.encode() + book_path.read_bytes() + footer.encode())
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.delenv("TREASURE_ISLAND_PATH", raising=False)
        url = f"http://127.0.0.1:{server.server_address[1]}/pg120.txt"
        cache = tmp_path / "cache"
        first = TreasureIslandDataModule(cache_dir=str(cache), download_url=url)
        first.prepare_data()
        first.prepare_data()  # already there: no second download
        assert len(requests) == 1
        first.setup("fit")
        assert (cache / "pg120.txt").read_bytes().startswith(header.encode())
        assert not any(cache.glob("*.partial"))
        chapters = first.splits.chapters
        assert sum(len(c) for c in chapters.values()) == 34
        assert "Licence" not in first.splits.text("train") and "licence" not in first.splits.text("test")
    finally:
        server.shutdown()
