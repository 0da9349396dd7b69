"""The benchmark commands run end to end and report every variant against SwiGLU."""

import pytest
import torch

from sqs.cli import main


def test_bench_ops_prints_ratios_for_every_variant(capsys, tmp_path):
    out = tmp_path / "ops.md"
    assert main(["bench", "ops", "--numel", "4096", "--reps", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("swiglu", "relu", "gelu", "bilinear", "sqs-naive", "sqs-fused"):
        assert f"| {name} |" in text
    assert "| swiglu | " in text and " | 1.00 | " in text  # the baseline's own ratio
    assert out.read_text().count("| sqs-fused |") == 1


def test_bench_glu_grid_table(capsys):
    assert main(["bench", "glu", "--batch", "8", "--width", "16", "32", "--reps", "2"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 8 |")]
    assert len(lines) == 2 and all("(1.00)" in ln for ln in lines)


def test_bench_lm_times_every_gate_against_swiglu(capsys):
    assert main(["bench", "lm", "--gates", "sqs", "relu", "--batch", "1", "--reps", "1"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| swiglu", "| sqs", "| relu"]  # SwiGLU added as the baseline
    assert rows[0].endswith("| 1.000 |")


def test_bench_head_chunked_loss_uses_less_memory_than_plain(capsys, tmp_path):
    out = tmp_path / "head.md"
    assert main(["bench", "head", "--batch", "8", "--reps", "1", "--out", str(out)]) == 0
    rows = {r.split(" | ")[0][2:]: r.split(" | ") for r in capsys.readouterr().out.splitlines()
            if r.startswith("| ") and not r.startswith("| variant")}
    assert set(rows) == {"plain", "chunked"} and rows["plain"][2] == "1.00"
    # 2,048 tokens x 4,096 vocab: the plain form holds full logits (32 MiB each), the chunked one a 512-row chunk
    assert float(rows["chunked"][4].rstrip(" |")) < 0.5, rows
    assert "vocab 4,096" in out.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_on_cuda_without_a_gpu_is_one_line(capsys):
    assert main(["bench", "ops", "--numel", "1024", "--reps", "1", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda" in err[0] and "Traceback" not in err[0]
