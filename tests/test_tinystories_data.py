"""TinyStories import, tokenizer and token files, on tiny data (tmp_path) and the shipped sample."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import threading

import numpy as np
import pytest

from sqs.data import tinystories as ts

EOT = "<|endoftext|>"


def story(i: int, words: int = 30) -> str:
    names = ["Lily", "Ben", "Tom", "Sue", "Max", "Mia", "Sam", "Zoe"]
    name = names[i % len(names)]
    body = " ".join(f"word{(i * 7 + k) % 97}" for k in range(words))
    return f"Once upon a time, {name} number {i} had a toy. {body}.\n{name} was Happy. The End {i}."


def write_txt(path, stories, gz=False, trailing=True):
    text = ("\n" + EOT + "\n").join(stories) + ("\n" + EOT + "\n" if trailing else "")
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_txt(src / "part-train-a.txt", [story(i) for i in range(40)])
    write_txt(src / "part-train-b.txt.gz", [story(i) for i in range(40, 70)], gz=True)
    write_txt(src / "tiny-valid.txt", [story(i) for i in range(100, 110)])
    return src


def test_import_report_counts(corpus, tmp_path):
    rep = ts.import_corpus(corpus, cache_dir=tmp_path, progress=False)
    assert rep["n_files"] == 3
    assert rep["stories"] == {"train": 70, "valid": 10}
    assert rep["validation"] == "files"
    assert rep["duplicates_dropped"] == 0 and rep["mojibake_repairs"] == 0 and rep["lowercased_files"] == []
    out = tmp_path / "tinystories"
    for split in ("train", "valid"):
        data = (out / f"{split}.txt").read_bytes()
        assert hashlib.sha256(data).hexdigest() == rep["sha256"][split]
        assert rep["characters"][split] == sum(len(s) for s in data.decode().split("\n" + EOT + "\n"))
    assert json.loads((out / "import_report.json").read_text())["stories"] == rep["stories"]
    assert list(ts.iter_stories("valid", tmp_path)) == [story(i) for i in range(100, 110)]


def test_shipped_sample(tmp_path):
    assert sorted(p.name for p in ts.sample_dir().glob("*.txt.gz")) == ["train-sample.txt.gz", "valid-sample.txt.gz"]
    assert (ts.sample_dir() / "README.md").read_text().count("CDLA-Sharing-1.0") >= 1
    rep = ts.fetch(src=ts.sample_dir(), cache_dir=tmp_path, progress=False)
    assert rep["stories"] == {"train": 300, "valid": 40}


def test_rejects_no_separators(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.txt").write_text("One story per line.\nAnother story.\n")
    with pytest.raises(ts.TinyStoriesError, match=r"train\.txt.*no story separators.*To fix"):
        ts.import_corpus(src, cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "tinystories" / "train.txt").exists()


@pytest.mark.parametrize("payload, what", [
    (b"Once upon a time\x00\x01\x02\n<|endoftext|>\n", "binary data"),
    (b"Once upon a time \xff\xfe caf\xe9\n<|endoftext|>\n", "not UTF-8"),
])
def test_rejects_binary(tmp_path, payload, what):
    src = tmp_path / "src"
    src.mkdir()
    write_txt(src / "good.txt", [story(1), story(2)])
    (src / "bad.txt").write_bytes(payload)
    with pytest.raises(ts.TinyStoriesError, match=rf"bad\.txt: {what}.*To fix"):
        ts.import_corpus(src, cache_dir=tmp_path, progress=False)


def test_rejects_empty_folder_and_bad_gzip(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ts.TinyStoriesError, match="no \\*.txt or \\*.txt.gz files"):
        ts.import_corpus(tmp_path / "empty", cache_dir=tmp_path, progress=False)
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.txt.gz").write_bytes(b"plain text, not gzip\n<|endoftext|>\n")
    with pytest.raises(ts.TinyStoriesError, match="x.txt.gz: named .gz but is not gzip"):
        ts.import_corpus(src, cache_dir=tmp_path, progress=False)


def test_duplicates_and_overlap_dropped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    train = [story(i) for i in range(20)] + [story(3), "   ", story(5) + "\n\n", story(100)]
    write_txt(src / "a.txt", train)
    write_txt(src / "b.txt", [story(7), story(200)])  # duplicate across train files
    write_txt(src / "valid.txt", [story(100), story(101), story(101)])
    rep = ts.import_corpus(src, cache_dir=tmp_path, progress=False)
    assert rep["stories"] == {"train": 21, "valid": 2}
    assert rep["duplicates_within_split"] == 4  # story 3, 5, 7 in train; 101 in valid
    assert rep["train_valid_overlap_dropped"] == 1  # story 100
    assert rep["duplicates_dropped"] == 5 and rep["empty_dropped"] == 1
    tr, va = list(ts.iter_stories("train", tmp_path)), list(ts.iter_stories("valid", tmp_path))
    assert len(set(tr)) == len(tr) and not set(tr) & set(va)


def test_hash_holdout_is_deterministic_and_disjoint(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_txt(src / "all.txt", [story(i, words=3) for i in range(400)])
    r1 = ts.import_corpus(src, cache_dir=tmp_path / "c1", progress=False)
    r2 = ts.import_corpus(src, cache_dir=tmp_path / "c2", progress=False)
    assert r1["validation"].startswith("hash holdout") and r1["sha256"] == r2["sha256"]
    assert r1["stories"]["train"] + r1["stories"]["valid"] == 400
    assert 1 <= r1["stories"]["valid"] <= 25
    tr, va = set(ts.iter_stories("train", tmp_path / "c1")), set(ts.iter_stories("valid", tmp_path / "c1"))
    assert not tr & va


def test_mojibake_repaired_and_lowercase_flagged(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bad = "He said, â€œHello!â€ Itâ€™s a cafÃ© â€” nice."
    good = "He said, “Hello!” It’s a café — nice."
    write_txt(src / "a.txt", [bad, story(1)])
    write_txt(src / "b.txt", [good, story(2)])  # the same story once repaired: a duplicate
    write_txt(src / "lower.txt", [story(i).lower() for i in range(10, 20)] + ["a cafã© story"])
    write_txt(src / "valid.txt", [story(50)])
    rep = ts.import_corpus(src, cache_dir=tmp_path, progress=False)
    assert rep["mojibake_repairs"] == 6
    assert rep["duplicates_dropped"] == 1
    assert rep["lowercased_files"] == ["lower.txt"]
    train = list(ts.iter_stories("train", tmp_path))
    assert good in train and bad not in train and "a café story" in train
    assert "â" not in (tmp_path / "tinystories" / "train.txt").read_text()
    assert ts.repair_mojibake("café… ñ « naïve “ok”") == ("café… ñ « naïve “ok”", 0)


def test_tokenizer_round_trip(corpus, tmp_path):
    ts.import_corpus(corpus, cache_dir=tmp_path, progress=False)
    tok = ts.train_tokenizer(tmp_path, vocab_size=300)
    assert tok.token_to_id(EOT) == 0 and tok.get_vocab_size() == 300
    for text in ["Once upon a time, Lily had a toy.", "  Two  spaces\nand a newline\n\n",
                 "Quotes “like” these — and émojis 😀!", story(3)]:
        assert tok.decode(tok.encode(text).ids) == text
    path = tmp_path / "tinystories" / "tokenizer-300.json"
    mtime = path.stat().st_mtime_ns
    ts.train_tokenizer(tmp_path, vocab_size=300)  # reused
    assert path.stat().st_mtime_ns == mtime
    assert ts.load_tokenizer(tmp_path, 300).encode(story(1)).ids == tok.encode(story(1)).ids
    with pytest.raises(ValueError):
        ts.train_tokenizer(tmp_path, vocab_size=70000)


def test_token_files_reused_and_rebuilt(corpus, tmp_path):
    ts.import_corpus(corpus, cache_dir=tmp_path, progress=False)
    prep = ts.prepare(cache_dir=tmp_path, vocab_size=300, progress=False)
    toks = ts.encode_split("train", cache_dir=tmp_path, vocab_size=300, progress=False)
    assert toks.dtype == np.uint16 and toks.ndim == 1 and str(toks.filename) == prep["train"]["path"]
    assert int((toks == 0).sum()) == 70 and toks[-1] == 0
    stats = ts.split_stats("train", tmp_path, 300)
    assert stats["tokens"] == len(toks) and stats["stories"] == 70
    assert stats["bytes"] == sum(len(story(i).encode()) for i in range(70))
    tok = ts.load_tokenizer(tmp_path, 300)
    first = toks[: int(np.argmax(toks == 0))]
    assert tok.decode(first.tolist()) == story(0)

    path1, mtime1, data1 = prep["train"]["path"], (tmp_path / prep["train"]["path"]).stat().st_mtime_ns, toks.copy()
    again = ts.encode_split("train", cache_dir=tmp_path, vocab_size=300, progress=False)  # nothing changed
    assert str(again.filename) == path1 and (tmp_path / path1).stat().st_mtime_ns == mtime1

    write_txt(corpus / "part-train-c.txt", [story(i) + " More text here." for i in range(300, 320)])
    ts.import_corpus(corpus, cache_dir=tmp_path, progress=False)
    rebuilt = ts.encode_split("train", cache_dir=tmp_path, vocab_size=300, progress=False)
    assert str(rebuilt.filename) != path1 and not (tmp_path / path1).exists()  # stale file removed
    assert int((rebuilt == 0).sum()) == 90 and len(rebuilt) > len(data1)  # contents changed
    assert ts.bits_per_byte(1.0, 100, 200) == pytest.approx(0.5 / np.log(2))


def test_needs_import_first(tmp_path):
    with pytest.raises(ts.TinyStoriesError, match="sqs data fetch tinystories --from DIR"):
        ts.prepare(cache_dir=tmp_path, vocab_size=300, progress=False)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    blob = b""
    sha = ""
    drop_first = True
    gets = []

    def log_message(self, *a):
        pass

    def _head(self, code, start, end):
        self.send_response(code)
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", f'"{self.sha}"')
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(self.blob)}")
        self.end_headers()

    def do_HEAD(self):
        self._head(200, 0, len(self.blob))

    def do_GET(self):
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        type(self).gets.append(start)
        self._head(206 if rng else 200, start, len(self.blob))
        if type(self).drop_first:
            type(self).drop_first = False
            self.wfile.write(self.blob[start:start + len(self.blob) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(self.blob[start:])


@pytest.fixture
def server():
    _RangeHandler.blob = ("\n".join(story(i) + "\n" + EOT for i in range(50)) + "\n").encode()
    _RangeHandler.sha = hashlib.sha256(_RangeHandler.blob).hexdigest()
    _RangeHandler.drop_first, _RangeHandler.gets = True, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_and_checks_sha(server, tmp_path, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    dest = ts.download(server + "/TinyStories-train.txt", tmp_path / "dl" / "t.txt", progress=False, timeout=5)
    assert dest.read_bytes() == _RangeHandler.blob
    assert _RangeHandler.gets[0] == 0 and _RangeHandler.gets[1] == len(_RangeHandler.blob) // 3  # resumed
    with pytest.raises(OSError, match="sha256 mismatch"):
        ts.download(server + "/x", tmp_path / "dl" / "u.txt", sha256="0" * 64, progress=False, timeout=5)
    assert not (tmp_path / "dl" / "u.txt.part").exists()


def test_fetch_without_src_explains_from(tmp_path, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    monkeypatch.setattr(ts.remote, "OFFICIAL_URLS", {"TinyStories-train.txt": "http://127.0.0.1:9/nothing"})
    with pytest.raises(ts.TinyStoriesError, match="--from DIR"):
        ts.fetch(cache_dir=tmp_path, progress=False)
