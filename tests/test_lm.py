"""TinyStories language models: model, task, training, resume, generation, NaN stop, DDP, report.

Everything runs on the shipped TinyStories sample with a 300-token BPE and a tiny model.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqs.data import tinystories as ts
import sqs
from sqs.experiments.lm_table import run_experiment
from sqs.models.gpt import GPT, GPTConfig
from sqs.runs.lm_config import LMRunConfig, load_config
from sqs.runs.lm_pipeline import LMTask, generate_text, load_lm, plan, run_lm
from sqs.training.checkpoint import load_weights, read_meta
from sqs.training.trainer import TrainingDiverged

from conftest import TINY_VOCAB as VOCAB  # noqa: E402
TINY = dict(vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=2, d_hidden=32, context=32, batch_size=8,
            lr=3e-3, grad_clip=1.0, eval_windows=32, eval_batch=32, eval_every=5)
TINY_TOML = """
name = "tiny"
[model]
n_layers = 2
d_model = 32
n_heads = 2
d_hidden = 32
context = 32
[data]
vocab_size = 300
[train]
batch_size = 8
grad_accum = 2
steps = 6
lr = 3e-3
grad_clip = 1.0
[eval]
eval_every = 3
eval_windows = 16
eval_batch = 16
"""


pytestmark = pytest.mark.usefixtures("eager_backend")  # same math as compiled, no Inductor start-up


@pytest.fixture(scope="module")
def cache(tinystories_cache):
    return tinystories_cache


def tiny_cfg(**kw) -> LMRunConfig:
    d = dict(TINY)
    if not {"steps", "tokens", "epochs"} & set(kw):
        d["steps"] = 20
    d.update(kw)
    return LMRunConfig(**d)


# ---- model ------------------------------------------------------------------------------------

def test_gpt_is_causal_and_uses_the_glu_gate():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, n_layers=2, d_model=16, n_heads=2, d_hidden=16, context=12, gate="bilinear"))
    assert all(b.mlp.gate == "bilinear" for b in m.blocks)
    x = torch.randint(0, 50, (2, 12))
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 50
    a, b = m(x), m(y)
    assert a.shape == (2, 12, 50)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)  # the future does not leak backwards
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    assert m.head is None and m.num_params() == sum(p.numel() for p in m.parameters())
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=30, n_heads=4)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_from_targets_equals_cross_entropy_of_logits(tie, reduction):
    """Training uses model(x, targets=y), the chunked output cross-entropy; it must give the
    loss and every parameter gradient of cross_entropy(model(x), y)."""
    cfg = GPTConfig(vocab_size=50, n_layers=2, d_model=16, n_heads=2, d_hidden=16, context=12, gate="sqs",
                    tie_embeddings=tie)
    torch.manual_seed(0)
    m = GPT(cfg).double()
    x, y = torch.randint(0, 50, (3, 12)), torch.randint(0, 50, (3, 12))
    loss = m(x, targets=y, reduction=reduction)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    ref = torch.nn.functional.cross_entropy(m(x).reshape(-1, 50), y.reshape(-1), reduction=reduction)
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    scale = y.numel() if reduction == "sum" else 1  # the loss is float32 by design: float32 tolerances
    torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=1e-6 * scale)
    for (name, _), g, r in zip(m.named_parameters(), grads, ref_grads):
        assert g.dtype == r.dtype, name
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7 * scale, msg=name)
    with torch.no_grad():  # evaluation takes the loss-only path
        torch.testing.assert_close(m(x, targets=y, reduction=reduction), ref.float(), rtol=1e-6, atol=1e-6 * scale)


def test_linear_cross_entropy_chunks_and_errors():
    from sqs.ops.linear_cross_entropy import linear_cross_entropy

    g = torch.Generator().manual_seed(1)
    h = torch.randn(37, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 11, (37,), generator=g)
    ref = torch.nn.functional.cross_entropy(h @ w.T, t)
    ref_g = torch.autograd.grad(2 * ref, (h, w))
    for rows in (1, 5, 37, 100):  # chunks that do and do not divide the 37 rows
        out = linear_cross_entropy(h, w, t, chunk_rows=rows)
        torch.testing.assert_close(out, ref)
        for a, b in zip(torch.autograd.grad(2 * out, (h, w)), ref_g):
            torch.testing.assert_close(a, b)
    frozen = w.detach()  # a frozen output layer: only dL/dh, same values
    (dh,) = torch.autograd.grad(2 * linear_cross_entropy(h, frozen, t, chunk_rows=5), (h,))
    torch.testing.assert_close(dh, ref_g[0])
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:-1])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="none")


def test_generate_greedy_topk_and_seed():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=40, n_layers=1, d_model=16, n_heads=2, d_hidden=16, context=8)).eval()
    idx = torch.tensor([[1, 2, 3]])
    g = m.generate(idx, 12, temperature=0)  # longer than the context: cropped window
    assert g.shape == (1, 15) and torch.equal(g[:, :3], idx)
    assert torch.equal(g[0, 3], m(idx)[0, -1].argmax())
    s1 = m.generate(idx, 12, temperature=1.0, generator=torch.Generator().manual_seed(5))
    s2 = m.generate(idx, 12, temperature=1.0, generator=torch.Generator().manual_seed(5))
    s3 = m.generate(idx, 12, temperature=1.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    k1 = m.generate(idx, 1, temperature=5.0, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(k1, g[:, :4])  # top_k=1 is greedy whatever the temperature
    e = m.generate(idx, 12, temperature=0, eos_id=int(g[0, 4]))
    assert e.shape[1] == 5  # stopped at the end-of-text id


# ---- config -----------------------------------------------------------------------------------

def test_shipped_configs_and_overrides():
    cpu = load_config("tinystories-cpu")
    paper = load_config("tinystories-paper")
    assert (cpu.n_layers, cpu.d_model, cpu.d_hidden, cpu.lr, cpu.weight_decay) == (4, 128, 128, 1e-3, 0.1)
    assert (paper.batch_size, paper.epochs, paper.context) == (512, 20, 256)
    assert plan(paper, 1_000_000)["tokens_per_step"] == 512 * 256
    p = plan(cpu, 4_174_385)
    assert p["steps"] * p["tokens_per_step"] == cpu.tokens
    c = load_config("tinystories-paper", ["train.epochs=3", "train.lr=3e-4", "train.betas=[0.9, 0.95]"], gate="swiglu")
    assert (c.epochs, c.lr, c.betas, c.gate, c.tokens) == (3, 3e-4, (0.9, 0.95), "swiglu", None)
    with pytest.raises(ValueError, match="unknown key"):
        load_config("tinystories-cpu", ["learning_rate=1"])
    with pytest.raises(ValueError, match="exactly one"):
        LMRunConfig(steps=3, epochs=1)
    with pytest.raises(ValueError, match="belongs in \\[train\\]; write it as train.lr"):
        load_config("tinystories-cpu", ["lr=3e-4"])
    with pytest.raises(FileNotFoundError, match="tinystories-cpu"):
        load_config("no-such-config")


def test_batches_depend_on_step_only_and_split_across_ranks(cache):
    cfg = tiny_cfg(grad_accum=2)
    tr = ts.encode_split("train", cache_dir=cache, vocab_size=VOCAB)
    va = ts.encode_split("valid", cache_dir=cache, vocab_size=VOCAB)
    task = LMTask(tr, va, cfg, 1000, 4000)
    whole = torch.cat([task.batch(3, m, 0, 1)[0] for m in range(2)])
    parts = torch.cat([task.batch(3, m, r, 2)[0] for m in range(2) for r in range(2)])
    assert whole.shape == (8, 32) and torch.equal(whole, parts)
    x, y = task.batch(3, 0, 0, 1)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(task.batch(4, 0, 0, 1)[0], x)
    assert torch.equal(LMTask(tr, va, cfg, 1000, 4000).val_offsets, task.val_offsets)  # fixed eval set
    with pytest.raises(ValueError, match="divisible"):
        task.per_rank(3)


# ---- training ---------------------------------------------------------------------------------

def test_short_training_lowers_validation_loss(cache, tmp_path):
    recs = run_lm(tiny_cfg(steps=30), tmp_path / "run", cache_dir=cache, progress=False)
    first, last = recs[0], recs[-1]
    assert first["step"] == 0 and last["step"] == 30 and last.get("final")
    assert last["val_loss"] < first["val_loss"] - 0.5, (first["val_loss"], last["val_loss"])
    assert math.isclose(last["val_ppl"], math.exp(last["val_loss"]), rel_tol=1e-9)
    st = ts.split_stats("valid", cache_dir=cache, vocab_size=VOCAB)
    assert math.isclose(last["val_bpb"], ts.bits_per_byte(last["val_loss"], st["tokens"], st["bytes"]), rel_tol=1e-9)
    assert last["tokens"] == 30 * 8 * 32 and last["tokens_per_s"] > 0
    assert {r.get("fraction") for r in recs} >= {0.25, 0.5, 0.75, 1.0}
    assert (tmp_path / "run" / "model.safetensors").exists() and (tmp_path / "run" / "tokenizer.json").exists()


def test_resume_reproduces_an_uninterrupted_run(cache, tmp_path):
    cfg = tiny_cfg(steps=16, gate="sqs", grad_accum=2)
    full = run_lm(cfg, tmp_path / "full", cache_dir=cache, progress=False)
    run_lm(cfg, tmp_path / "cut", cache_dir=cache, progress=False, stop_after=7)  # "killed" after step 7
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    assert read_meta(tmp_path / "cut" / "checkpoint.safetensors")["step"] == 5  # last checkpoint before the cut
    resumed = run_lm(cfg, tmp_path / "cut", cache_dir=cache, progress=False)
    a = load_weights(tmp_path / "full" / "model.safetensors")
    b = load_weights(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_loss"] for r in full] == [r["val_loss"] for r in resumed]
    # a finished run is not trained again
    again = run_lm(cfg, tmp_path / "cut", cache_dir=cache, progress=False)
    assert [r["step"] for r in again] == [r["step"] for r in full]


def test_generation_is_deterministic_for_a_seed(cache, tmp_path, capsys):
    from sqs.cli import main

    run_lm(tiny_cfg(steps=10), tmp_path / "run", cache_dir=cache, progress=False)
    model = load_lm(tmp_path / "run")
    assert model.step == 10 and model.eot_id == 0
    t1 = generate_text(model, "Once upon a time", max_new_tokens=30, temperature=0.8, seed=3)
    t2 = generate_text(model, "Once upon a time", max_new_tokens=30, temperature=0.8, seed=3)
    greedy = [generate_text(model, "Once upon a time", max_new_tokens=30, temperature=0, seed=s) for s in (0, 1)]
    assert t1 == t2 and t1.startswith("Once upon a time")
    assert greedy[0] == greedy[1]
    others = {generate_text(model, "Once upon a time", max_new_tokens=30, temperature=1.0, seed=s)
              for s in range(4)}
    assert len(others) > 1
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "Once upon a time", "--max-new-tokens", "30",
                 "--temperature", "0.8", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == t1.strip()


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(cache, tmp_path):
    cfg = tiny_cfg(steps=50, lr=1e9, grad_clip=0.0, eval_every=1)
    with pytest.raises(TrainingDiverged, match=r"loss became .* at step (\d+).*checkpoint") as info:
        run_lm(cfg, tmp_path / "run", cache_dir=cache, progress=False)
    step = int(info.value.args[0].split(" at step ")[1].split()[0])
    assert 0 < step < 50
    ck = tmp_path / "run" / "checkpoint.safetensors"
    assert read_meta(ck)["step"] == step  # the checkpoint of the step before the bad loss is kept
    assert not (tmp_path / "run" / "model.safetensors").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process(cache, tmp_path):
    """torchrun with 2 gloo processes (global batch split over ranks and 2 micro-steps) ends
    with the weights of one process on the same global batch."""
    from sqs.cli import main

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    args = ["train", "lm", "--config", str(cfg), "--gate", "sqs", "--seed", "0", "--cache-dir", str(cache),
            "--no-progress", "--device", "cpu"]
    assert main(args + ["--run-dir", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", SQS_BACKEND="eager", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(Path(sqs.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "sqs.cli", *args, "--run-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = load_weights(tmp_path / "one" / "model.safetensors")
    b = load_weights(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, (a[k] - b[k]).abs().max())
    ra = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert all(math.isclose(x["val_loss"], y["val_loss"], rel_tol=1e-5) for x, y in zip(ra, rb))


RANKS_RESUME = """
import os, sys
import torch.distributed as dist
import torch.multiprocessing as mp

def work(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from sqs.io import ConfigError
    from sqs.training.distributed import same_start
    said = []
    for starts in ((8, 8), (8, 0)):  # a shared run folder; then rank 1's node does not see the checkpoint
        try:
            same_start(starts[rank], "RUN")
            said.append("ok")
        except ConfigError as e:
            said.append(str(e))
    with open(os.path.join(out, str(rank)), "w") as f:
        f.write("\\n".join(said))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(work, args=(sys.argv[1], sys.argv[2]), nprocs=2)
"""


def test_ranks_that_would_resume_from_different_steps_are_refused_on_every_rank(tmp_path):
    """Multi-node torchrun with a runs folder the nodes do not share: rank 0 finds a checkpoint,
    another rank does not; every rank stops with the same one line instead of training apart."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_RESUME)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(Path(sqs.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(script), str(_free_port()), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [(tmp_path / r).read_text().split("\n") for r in ("0", "1")]
    assert said[0] == said[1]
    assert said[0][0] == "ok"
    assert "rank 0 resumes at step 8 but rank(s) 1 at step 0" in said[0][1] and "shared folder" in said[0][1]


# ---- experiment and report --------------------------------------------------------------------

def test_experiment_writes_table_curves_samples_and_skips_finished_runs(cache, tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY_TOML)
    kw = dict(out=tmp_path / "results", runs_dir=tmp_path / "runs", gates=["sqs", "bilinear"], extra_seeds=[1],
              cache_dir=cache, progress=False, max_new_tokens=12)
    table = run_experiment(cfg, throughput_reps=2, **kw)
    runs = [(r["gate"], r["seed"]) for r in table["runs"]]
    assert runs == [("sqs", 0), ("bilinear", 0), ("sqs", 1)]
    assert all(r["complete"] and set(r["at"]) == {"25%", "50%", "75%", "100%"} for r in table["runs"])
    out = tmp_path / "results"
    md = (out / "table.md").read_text()
    assert "| SQS | 0 |" in md and "Bilinear" in md and "6.70" in md and "7.65" in md
    assert "exp(mean" in md
    # every gate's training step is timed side by side, beside the runs' own tokens/s
    tp = json.loads((out / "throughput.json").read_text())
    assert set(tp["gates"]) == {"sqs", "bilinear"} and all(g["tokens_per_s"] > 0 for g in tp["gates"].values())
    assert "## Training throughput" in md and table["per_gate"]["sqs"]["interleaved_tokens_per_s"] > 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (out / "samples.md").read_text()
    assert samples.count("'Once upon a time', greedy") == 2 and "temperature 0.8" in samples
    assert table["per_gate"]["sqs"]["seeds"] == 2
    assert math.isclose(table["per_gate"]["sqs"]["val_ppl_of_mean"],
                        math.exp(table["per_gate"]["sqs"]["val_loss_mean"]))
    # finished runs are skipped; --report-only rebuilds the same table from the run dirs
    mtime = (tmp_path / "runs" / "tiny" / "tinystories" / "sqs-s0" / "model.safetensors").stat().st_mtime_ns
    again = run_experiment(cfg, report_only=True, samples=False, **{k: v for k, v in kw.items()})
    assert (tmp_path / "runs" / "tiny" / "tinystories" / "sqs-s0" / "model.safetensors").stat().st_mtime_ns == mtime
    assert again["per_gate"] == table["per_gate"]
