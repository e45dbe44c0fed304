import io
import json

import pytest
from conftest import wikitext_valid_or_skip

from ppl_cli.config import Config
from ppl_cli.data.documents import digest, load_documents
from ppl_cli.data.formats import DOCSTRING_MODULES, python_docstrings, wikitext_articles
from ppl_cli.data.records import Document
from ppl_cli.errors import EXIT_DATA, PplError


def load(data, stdin=None, **options):
    return load_documents(Config(data=str(data), **options), stdin)


def test_txt_file_one_document_or_split(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First line.\nSecond line.\n\n  \nNew paragraph.\n")
    assert load(path) == [Document("a.txt", "First line.\nSecond line.\n\n  \nNew paragraph.\n")]
    assert load(path, doc_split="line") == [
        Document("a.txt:1", "First line."),
        Document("a.txt:2", "Second line."),
        Document("a.txt:5", "New paragraph."),  # ids are line numbers: the record is found again
    ]
    assert load(path, doc_split="blank-line") == [
        Document("a.txt:1", "First line.\nSecond line."),
        Document("a.txt:5", "New paragraph.\n"),
    ]


def test_directory_of_txt_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("ay")
    (tmp_path / "ignored.bin").write_bytes(b"\x00")
    assert load(tmp_path) == [Document("b.txt", "bee"), Document("sub/a.txt", "ay")]


def test_jsonl_with_ids_and_limit(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one", "id": 7}\n\n{"text": "two", "id": 8}\n{"text": "three", "id": 9}\n')
    assert load(path, id_field="id", limit=2) == [Document("7", "one"), Document("8", "two")]
    assert [d.id for d in load(path)] == ["7", "8", "9"]  # without --id-field: a field named id
    (tmp_path / "n.jsonl").write_text('{"text": "one", "key": 7}\n\n{"text": "two"}\n')
    assert [d.id for d in load(tmp_path / "n.jsonl")] == ["n.jsonl:1", "n.jsonl:3"]  # no id field: file:line


def test_json_array_object_and_lines(tmp_path):
    rows = [{"body": "x"}, {"body": "y"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "c.json").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("a.json", "b.json", "c.json"):
        assert [d.text for d in load(tmp_path / name, text_field="body")] == ["x", "y"]


def test_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.csv").write_text('id,text\n1,"hello, world"\n2,"multi\nline"\n')
    assert load(tmp_path / "d.csv", id_field="id") == [Document("1", "hello, world"), Document("2", "multi\nline")]
    pq.write_table(pa.table({"text": ["p", "q"], "n": [1, 2]}), tmp_path / "d.parquet")
    assert [d.text for d in load(tmp_path / "d.parquet")] == ["p", "q"]


WIKI = " \n = Alpha = \n \n Alpha text . \n \n = = Section = = \n \n More alpha . \n \n = Beta = \n \n Beta text . \n"


def test_wikitext_articles_split_at_title_headings_only():
    numbered = list(wikitext_articles(enumerate(WIKI.splitlines(keepends=True), start=1)))
    assert [line for line, _ in numbered] == [2, 10]  # the heading's line
    docs = [doc for _, doc in numbered]
    assert [d.id for d in docs] == ["Alpha", "Beta"]
    assert docs[0].text.startswith(" = Alpha = \n") and "= = Section = =" in docs[0].text
    assert docs[1].text == " = Beta = \n \n Beta text . \n"
    # Nothing is lost but the blank line before the first heading.
    assert "".join(d.text for d in docs) == WIKI[len(" \n") :]


def test_wikitext_tokens_file(tmp_path):
    (tmp_path / "wiki.test.tokens").write_text(WIKI)
    assert [d.id for d in load(tmp_path / "wiki.test.tokens")] == ["Alpha", "Beta"]


def test_wikitext_from_the_hub_groups_rows_into_articles(monkeypatch):
    import ppl_cli.data.formats as formats

    calls = []

    def fake_split(dataset_id, name, split, streaming):
        calls.append((dataset_id, name, split))
        return [{"text": line} for line in WIKI.splitlines(keepends=True)]  # rows, as a Dataset iterates

    monkeypatch.setattr(formats, "load_hub_split", fake_split)
    assert [d.id for d in load("wikitext")] == ["Alpha", "Beta"]
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]


def test_real_wikitext_validation_has_60_articles():
    docs = load(wikitext_valid_or_skip())
    assert len(docs) == 60
    assert docs[0].id == "Homarus gammarus"


def test_stdin_jsonl_or_plain_text():
    jsonl = b'{"text": "a b"}\n{"text": "c"}\n'
    assert load("-", io.BytesIO(jsonl)) == [Document("stdin:1", "a b"), Document("stdin:2", "c")]
    plain = b"just some text\n{not json}\n"
    assert load("-", io.BytesIO(plain)) == [Document("stdin", "just some text\n{not json}\n")]
    assert len(load("-", io.BytesIO(b"x\ny\n"), doc_split="line")) == 2


def test_builtin_corpus_is_fixed_real_prose():
    docs = python_docstrings()
    assert [d.id for d in docs] == [m for m in DOCSTRING_MODULES if m in {d.id for d in docs}]
    assert len(docs) >= 6
    assert sum(len(d.text.split()) for d in docs) > 2000
    assert docs == python_docstrings()


def test_digest_changes_with_index_text_or_id():
    a = digest(0, Document("1", "x"))
    assert len({a, digest(0, Document("1", "y")), digest(0, Document("2", "x")), digest(1, Document("1", "x"))}) == 4
    assert digest(0, Document(None, "x")) != digest(0, Document("None", "x"))


@pytest.mark.parametrize(
    "name,content,options,message",
    [
        ("d.jsonl", '{"text": "ok"}\n{"text": bad}\n', {}, "d.jsonl line 2 is not JSON"),
        ("d.jsonl", '{"text": "ok"}\n[1, 2]\n', {}, "d.jsonl line 2 is not a JSON object"),
        ("d.jsonl", '{"body": "x", "title": "t"}\n', {}, "has no field 'text' \\(fields: body, title\\)"),
        ("d.jsonl", '{"text": 5}\n', {}, "field 'text' is int, not a string"),
        ("d.jsonl", '{"text": "x"}\n', {"id_field": "uid"}, "has no id field 'uid'"),
        ("d.json", '{"a": 1}', {}, "must hold a list of records"),
        ("d.csv", "title\nx\n", {}, "has no field 'text' \\(fields: title\\)"),
        ("d.xyz", "x", {}, "unknown file type .xyz"),
        ("empty.jsonl", "\n\n", {}, "no documents in"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, name, content, options, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(PplError, match=message) as e:
        load(tmp_path / name, **options)
    assert e.value.exit_code == EXIT_DATA


def test_invalid_utf8_names_the_byte_offset_or_is_replaced(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"caf\xc3\xa9 ok \xff\xfe end")
    with pytest.raises(PplError, match=r"bad.txt is not valid UTF-8 at byte offset 9; use encoding_errors replace"):
        load(path)
    assert load(path, encoding_errors="replace")[0].text == "café ok \ufffd\ufffd end"


def test_missing_paths_and_offline_hub(tmp_path):
    with pytest.raises(PplError, match="data not found: ./nope.txt"):
        load("./nope.txt")
    with pytest.raises(PplError, match="cannot load dataset someone/nothing-here"):
        load("someone/nothing-here")  # the tests run with HF_DATASETS_OFFLINE=1
