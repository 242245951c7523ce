import pytest

from quicksilver.corpora import clean_wiki_markup, load_corpus, read_text_file
from quicksilver.errors import QuicksilverError


@pytest.mark.parametrize("name", ["wiki", "news", "code", "pydoc"])
def test_offline_corpus_halves_are_disjoint_and_deterministic(name):
    test, calib = load_corpus(name, "test"), load_corpus(name, "calibration")
    assert len(test.documents) > 10 and len(calib.documents) > 10
    assert not set(test.documents) & set(calib.documents)
    assert load_corpus(name, "test").documents == test.documents
    assert len(test.text) > 100_000


def test_wiki_is_plain_text_without_redirects_or_stubs():
    docs = load_corpus("wiki").documents
    text = "\n".join(docs)
    for markup in ("[[", "]]", "{{", "'''", "<ref", "#REDIRECT"):
        assert markup not in text
    assert all(len(d) >= 2000 for d in docs)


def test_code_corpus_is_the_pinned_stdlib_files_split_by_file():
    from quicksilver.corpora import CODE_FILES, stdlib_dir

    calib, test = load_corpus("code", "calibration"), load_corpus("code", "test")
    assert len(calib.documents) + len(test.documents) == len(CODE_FILES)
    assert test.documents[0] == (stdlib_dir() / CODE_FILES[1]).read_text(encoding="utf-8").rstrip()
    assert all("def " in d for d in calib.documents + test.documents)


def test_code_corpus_names_a_missing_file(monkeypatch, tmp_path):
    import quicksilver.corpora as corpora

    (tmp_path / "textwrap.py").write_text("x = 1\n")
    monkeypatch.setattr(corpora, "stdlib_dir", lambda: tmp_path)
    corpora._code_documents.cache_clear()
    try:
        with pytest.raises(QuicksilverError, match=r"corpus 'code' needs .*heapq\.py") as e:
            load_corpus("code")
        assert "textwrap.py" not in str(e.value)
    finally:
        corpora._code_documents.cache_clear()


def test_clean_wiki_markup():
    raw = "'''Bold''' and [[link|shown]] text.\n\n==Heading==\n* item{{cite web|x=1}}"
    cleaned = clean_wiki_markup(raw)
    assert "Bold and shown text." in cleaned
    assert "Heading" in cleaned and "==" not in cleaned
    assert "cite" not in cleaned


def test_text_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("héllo world\n", encoding="utf-8")
    c = load_corpus(text_file=p)
    assert c.documents == ("héllo world\n",)


@pytest.mark.parametrize(
    "content,message", [(None, "does not exist"), (b"\xff\xfe\xfa bad", "not valid UTF-8"), (b"  \n\n", "empty")]
)
def test_text_file_errors(tmp_path, content, message):
    p = tmp_path / "f.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(QuicksilverError, match=message):
        read_text_file(p)


def test_unknown_corpus_and_split():
    with pytest.raises(QuicksilverError, match="unknown corpus"):
        load_corpus("nope")
    with pytest.raises(QuicksilverError, match="unknown split"):
        load_corpus("wiki", "train")
