"""Real text with no network: Wikipedia, news, Python source and Python's reference manual.

``wiki`` stands in for WikiText-103 offline: the shortened enwiki pages-articles dump
that gensim ships as test data, with markup stripped (gensim's own ``filter_wiki``),
redirects, disambiguation pages and stubs dropped. ``news`` (the Lee news corpus of
Australian news articles) stands in for C4. ``code`` is source code: a pinned list of
modules of the Python standard library that ships with the interpreter (PSF license).
``pydoc`` is technical prose: the language reference topics that every interpreter
ships for ``help()`` (``pydoc_data.topics``, PSF license). Each is split
deterministically by document (after dropping exact duplicates): even-indexed documents
form the ``calibration`` half, odd-indexed the ``test`` half. The standard library differs
between Python versions, so ``code`` and ``pydoc`` text (not their file and topic names)
depends on the interpreter; results name the Python version they ran on.
"""

from __future__ import annotations

import bz2
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import QuicksilverError

SPLITS = ("calibration", "test")
OFFLINE_CORPORA = ("wiki", "news", "code", "pydoc")
HUB_CORPORA = ("wikitext-103", "c4")
DEFAULT_CORPUS = "wiki"
MIN_ARTICLE_CHARS = 2000  # shorter pages are stubs
C4_DOCUMENTS = 2000


@dataclass(frozen=True)
class Corpus:
    """Documents of one corpus split, in a fixed order."""

    name: str
    split: str
    documents: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.documents)


def _gensim_test_data() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise QuicksilverError("the offline corpora need the gensim package (pip install gensim)")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def clean_wiki_markup(text: str) -> str:
    """Plain text from wiki markup: gensim's filter_wiki, then bold/italics and headings."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^\s*(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.M)  # == Heading == -> Heading
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)  # list bullets
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n\s*\n(\s*\n)+", "\n\n", text)
    return text.strip()


CLEANING_VERSION = 1  # bump when clean_wiki_markup or the filters change: the disk cache is rebuilt


@functools.lru_cache(maxsize=None)
def _wiki_documents() -> tuple[str, ...]:
    """Parsed once (about 6 s), then read back from a JSON file in the cache dir."""
    import json
    from importlib.metadata import version

    from .paths import cache_dir
    from .results_io import write_json_atomic

    cached = cache_dir() / "corpora" / f"wiki-v{CLEANING_VERSION}-gensim{version('gensim')}.json"
    try:
        return tuple(json.loads(cached.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    docs = _parse_wiki()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cached, list(docs))
    except OSError:
        pass  # a read-only cache only costs time
    return docs


def _parse_wiki() -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages

    path = _gensim_test_data() / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    if not path.is_file():
        raise QuicksilverError(f"{path} is missing from the gensim install")
    docs = []
    with bz2.BZ2File(path) as f:
        for title, raw, _ in extract_pages(f, filter_namespaces=("0",)):
            if raw.lstrip().lower().startswith("#redirect") or "(disambiguation)" in title:
                continue
            text = clean_wiki_markup(raw)
            if len(text) >= MIN_ARTICLE_CHARS:
                docs.append(f"{title}\n\n{text}")
    return tuple(docs)


@functools.lru_cache(maxsize=None)
def _news_documents() -> tuple[str, ...]:
    path = _gensim_test_data() / "lee_background.cor"
    if not path.is_file():
        raise QuicksilverError(f"{path} is missing from the gensim install")
    lines = path.read_text(encoding="utf-8").splitlines()
    # The file repeats some articles verbatim: keep the first copy, or the halves would share text.
    return tuple(dict.fromkeys(line.strip() for line in lines if line.strip()))


# Standard-library modules present, under these names, in Python 3.11, 3.12 and 3.13 (none of
# PEP 594's removals, no module that became a package), 3-100 KB each. Order fixes the split:
# even entries are calibration, odd entries test, and each half opens with varied files.
CODE_FILES = (
    "textwrap.py", "heapq.py", "calendar.py", "pprint.py", "json/encoder.py", "json/decoder.py",
    "shlex.py", "csv.py", "fractions.py", "contextlib.py", "base64.py", "gettext.py",
    "queue.py", "sched.py", "graphlib.py", "string.py", "random.py", "tokenize.py",
    "gzip.py", "selectors.py", "timeit.py", "weakref.py", "functools.py", "copy.py",
    "tempfile.py", "uuid.py", "html/parser.py", "http/cookies.py", "email/header.py", "email/utils.py",
    "asyncio/locks.py", "asyncio/queues.py", "concurrent/futures/_base.py", "urllib/parse.py", "mimetypes.py", "filecmp.py",
    "plistlib.py", "cmd.py", "bdb.py", "numbers.py", "statistics.py", "dataclasses.py",
    "configparser.py", "ipaddress.py",
)
MIN_PYDOC_TOPICS = 60  # 79 in Python 3.11-3.13


def stdlib_dir() -> Path:
    """The folder of the running interpreter's standard library."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=None)
def _code_documents() -> tuple[str, ...]:
    import sys

    root = stdlib_dir()
    missing = [name for name in CODE_FILES if not (root / name).is_file()]
    if missing:
        raise QuicksilverError(
            f"corpus 'code' needs standard-library files missing from {root} (Python {sys.version.split()[0]}): {', '.join(missing)}"
        )
    return tuple((root / name).read_text(encoding="utf-8").rstrip() for name in CODE_FILES)


@functools.lru_cache(maxsize=None)
def _pydoc_documents() -> tuple[str, ...]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split it out of the interpreter package
        raise QuicksilverError("corpus 'pydoc' needs pydoc_data, part of the standard library, which this Python lacks") from e
    docs = tuple(dict.fromkeys(topics[key].strip() for key in sorted(topics) if topics[key].strip()))
    if len(docs) < MIN_PYDOC_TOPICS:
        raise QuicksilverError(f"corpus 'pydoc' found only {len(docs)} topics in pydoc_data (expected at least {MIN_PYDOC_TOPICS})")
    return docs


def _hub_documents(name: str) -> tuple[str, ...]:
    try:
        import datasets
    except ImportError as e:
        raise QuicksilverError(f"corpus {name!r} needs network access and the datasets package (pip install 'quicksilver[hub]')") from e
    try:
        if name == "wikitext-103":
            ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-103-raw-v1", split="test")
            return tuple(t for t in ds["text"] if t.strip())
        ds = datasets.load_dataset("allenai/c4", "en", split="validation", streaming=True)
        return tuple(row["text"] for _, row in zip(range(C4_DOCUMENTS), ds))
    except Exception as e:  # network, hub or cache failures all mean: not available here
        raise QuicksilverError(f"corpus {name!r} could not be loaded from the dataset hub (no network?): {type(e).__name__}") from e


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's contents; a clear error if missing, not UTF-8, or empty."""
    path = Path(path)
    if path.is_dir():
        raise QuicksilverError(f"text file {path} is a folder; give a file")
    if not path.exists():
        raise QuicksilverError(f"text file {path} does not exist")
    if not path.is_file():
        raise QuicksilverError(f"text file {path} is not a regular file (a device, pipe or socket); give a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise QuicksilverError(f"text file {path} is not valid UTF-8 (byte {e.start})") from e
    if not text.strip():
        raise QuicksilverError(f"text file {path} is empty")
    return text


def check_corpus_args(name: str, split: str, text_file: str | Path | None = None) -> None:
    """Reject a bad corpus name, split or text file cheaply, before any long work starts."""
    if split not in SPLITS:
        raise QuicksilverError(f"unknown split {split!r} (use {' or '.join(SPLITS)})")
    if text_file is not None:
        read_text_file(text_file)
    elif name not in OFFLINE_CORPORA + HUB_CORPORA:
        raise QuicksilverError(
            f"unknown corpus {name!r} (offline: {', '.join(OFFLINE_CORPORA)}; with network: {', '.join(HUB_CORPORA)}; or --text-file)"
        )


def load_corpus(name: str = DEFAULT_CORPUS, split: str = "test", text_file: str | Path | None = None) -> Corpus:
    """Load a corpus split.

    Parameters
    ----------
    name : str
        ``wiki`` (default), ``news``, ``code`` (Python standard-library source), ``pydoc``
        (Python's reference topics), or with network ``wikitext-103`` / ``c4``.
        Ignored when ``text_file`` is given.
    split : {"test", "calibration"}
        Which half of an offline corpus. Hub corpora have one split (test for
        wikitext-103, validation for c4) and ignore it.
    text_file : path, optional
        Any UTF-8 text file, used whole.
    """
    check_corpus_args(name, split, text_file)
    if text_file is not None:
        return Corpus(Path(text_file).name, "file", (read_text_file(text_file),))
    if name == "wiki":
        docs = _wiki_documents()
    elif name == "news":
        docs = _news_documents()
    elif name == "code":
        docs = _code_documents()
    elif name == "pydoc":
        docs = _pydoc_documents()
    elif name in HUB_CORPORA:
        return Corpus(name, "test" if name == "wikitext-103" else "validation", _hub_documents(name))
    start = 0 if split == "calibration" else 1
    return Corpus(name, split, docs[start::2])
