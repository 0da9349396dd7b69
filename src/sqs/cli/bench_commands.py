"""`sqs bench ops|glu|head|lm|hf`: parse, call `sqs.bench.glu` (the gate op, the GLU layer),
`sqs.bench.lm` (the LM head; the LM step through `sqs.experiments.lm_table.measure_throughput`)
or `sqs.bench.hf`, print and keep the tables."""

from __future__ import annotations

import itertools

from sqs.cli.args import add_gate, bounded, positive_int

REPS = bounded(int, 1)  # timed repetitions

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _device(name: str) -> str:
    """`--device`: a device that exists here (`sqs.core.resolve_device`: one line listing the
    available ones otherwise), as the name the benchmarks take."""
    from sqs.core import resolve_device

    return str(resolve_device(name))


def _ops(args) -> int:
    from sqs.bench.glu import bench_ops, format_ops_table

    dtype = _dtype(args.dtype)
    device = _device(args.device)
    tables = []
    for numel in args.numel:
        res = bench_ops(numel=numel, reps=args.reps, dtype=dtype, device=device)
        tables.append(format_ops_table(res, numel, dtype, device))
        print(tables[-1] + "\n", flush=True)
    _write(args.out, "sqs bench ops", tables)
    return 0


def _write(out: str | None, title: str, tables: list[str]) -> None:
    """Also keep the printed tables as a markdown file (with the machine they ran on)."""
    if not out:
        return
    import platform

    import torch

    from sqs.io import write_text

    head = (f"# `{title}`\n\nMeasured {__import__('datetime').datetime.now():%Y-%m-%d %H:%M} on "
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
            "all variants interleaved round-robin in one run, medians.\n\n")
    write_text(out, head + "\n\n".join(tables) + "\n")


def _glu(args) -> int:
    from tqdm import tqdm

    from sqs.bench.glu import bench_glu, format_glu_table

    dtype = _dtype(args.dtype)
    device = _device(args.device)
    cells = list(itertools.product(args.batch, args.width))
    grid = {}
    for b, w in tqdm(cells, desc="glu grid", unit="cell"):
        grid[(b, w)] = bench_glu(b, w, reps=args.reps, dtype=dtype, device=device)
    table = format_glu_table(grid)
    print(table)
    _write(args.out, "sqs bench glu", [table])
    return 0


def _head(args) -> int:
    from sqs.bench.lm import bench_head, format_head_table
    from sqs.runs.lm_config import load_config

    cfg = load_config(args.config)
    tokens = (args.batch or cfg.micro_batch) * cfg.context
    res = bench_head(tokens, cfg.d_model, cfg.vocab_size, reps=args.reps)
    table = format_head_table(res, tokens, cfg.d_model, cfg.vocab_size)
    print(table)
    _write(args.out, f"sqs bench head --config {args.config}", [table])
    return 0


def _lm(args) -> int:
    from sqs.bench.lm import format_lm_table
    from sqs.experiments.lm_table import measure_throughput
    from sqs.runs.lm_config import load_config

    gates = list(dict.fromkeys(["swiglu"] + list(args.gates)))  # SwiGLU: the baseline
    tp = measure_throughput(load_config(args.config), gates, reps=args.reps, batch=args.batch)
    table = format_lm_table(tp)
    print(table)
    _write(args.out, f"sqs bench lm --config {args.config}", [table])
    return 0


def _hf(args) -> int:
    from sqs.bench.hf import bench_hf, format_hf_table

    sizes = dict(layers=args.layers, d_model=args.d_model, intermediate=args.intermediate, vocab=args.vocab,
                 batch=args.batch, seq=args.seq)
    tables = []
    for shape in args.shape:
        res = bench_hf(shape, reps=args.reps, warmup=args.warmup, memory=not args.no_memory, **sizes)
        tables.append(format_hf_table(res, shape, **sizes))
        print(tables[-1] + "\n", flush=True)
    given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sizes.items() if v)
    _write(args.out, f"sqs bench hf --shape {' '.join(args.shape)} {given} --reps {args.reps} --warmup {args.warmup}"
           .replace("  ", " "), tables)
    return 0


def register(sub, groups) -> None:
    p = groups["bench"].add_parser("ops", help="gate op forward+backward time and peak memory, ratios to SwiGLU in plain PyTorch")
    p.add_argument("--numel", type=positive_int, nargs="+", default=[8 * 2**20], help="elements per tensor (default 8M)")
    p.add_argument("--reps", type=REPS, default=10, help="timed repetitions per variant (median reported; >= 1)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu", help="cpu (default), or cuda / cuda:N: CUDA timings synchronise around each call; on CUDA with liger-kernel installed, Liger's SwiGLU is a second baseline (bench ops)")
    p.add_argument("--out", help="also write the table(s) to this markdown file")
    p.set_defaults(func=_ops)

    p = groups["bench"].add_parser("glu", help="the paper's App. C grid: 1-layer GLU forward+backward, all gates")
    p.add_argument("--batch", type=positive_int, nargs="+", default=[256, 512, 1024],
                   help="batch sizes (paper: 256 512 1024 2048; CPU default a subset)")
    p.add_argument("--width", type=positive_int, nargs="+", default=[256, 512, 1024],
                   help="widths (paper: 256 512 1024 2048; CPU default a subset)")
    p.add_argument("--reps", type=REPS, default=10)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="cpu", help="cpu (default), or cuda / cuda:N: CUDA timings synchronise around each call; on CUDA with liger-kernel installed, Liger's SwiGLU is a second baseline (bench ops)")
    p.add_argument("--out", help="also write the table to this markdown file")
    p.set_defaults(func=_glu)

    p = groups["bench"].add_parser("head", help="the LM's output layer + cross-entropy: plain vs chunked "
                                                "(sqs.ops.linear_cross_entropy), time and peak memory")
    p.add_argument("--config", default="tinystories-cpu", help="LM config name or .toml path (sizes and batch)")
    p.add_argument("--batch", type=positive_int, help="sequences per step (default: the config's micro-batch)")
    p.add_argument("--reps", type=REPS, default=10)
    p.add_argument("--out", help="also write the table to this markdown file")
    p.set_defaults(func=_head)

    p = groups["bench"].add_parser("lm", help="TinyStories model training step, all gates interleaved: tokens/s "
                                              "and ratio to SwiGLU")
    p.add_argument("--config", default="tinystories-cpu", help="LM config name or .toml path (model and batch)")
    add_gate(p, "--gates", nargs="+", default=["swiglu", "sqs", "relu", "gelu", "bilinear"],
             help="gates to time (SwiGLU, the baseline, is always timed)")
    p.add_argument("--batch", type=positive_int, help="sequences per step (default: the config's micro-batch)")
    p.add_argument("--reps", type=REPS, default=12)
    p.add_argument("--out", help="also write the table to this markdown file")
    p.set_defaults(func=_lm)

    p = groups["bench"].add_parser("hf", help="Hugging Face Llama training step: SwiGLU vs SQS unfused (act_fn) vs "
                                              "apply_sqs (fused) vs fused + fused loss, time and peak memory; needs "
                                              "the hf extra: pip install 'sqs[hf]'")
    p.add_argument("--shape", nargs="+", choices=["small", "smollm2"], default=["small", "smollm2"],
                   help="model shapes: small (4 layers, d 256, vocab 2,048, 8x256 tokens) and/or smollm2 "
                        "(SmolLM2-135M: 30 layers, d 576, vocab 49,152, 8x512 tokens) (default: %(default)s)")
    p.add_argument("--layers", type=positive_int, help="override the shape's layer count (default: the shape's)")
    p.add_argument("--batch", type=positive_int, help="sequences per step (default: the shape's, 8)")
    p.add_argument("--seq", type=positive_int, help="tokens per sequence (default: the shape's)")
    p.add_argument("--d-model", type=positive_int, help="hidden size (default: the shape's)")
    p.add_argument("--intermediate", type=positive_int, help="MLP width (default: the shape's)")
    p.add_argument("--vocab", type=positive_int, help="vocabulary (default: the shape's)")
    p.add_argument("--reps", type=REPS, default=5, help="timed steps per variant (default: %(default)s)")
    p.add_argument("--warmup", type=bounded(int, 0), default=1,
                   help="untimed steps per variant first (kernel compilation; default: %(default)s)")
    p.add_argument("--no-memory", action="store_true", help="skip the profiled step that measures peak memory")
    p.add_argument("--out", help="also write the table(s) to this markdown file")
    p.set_defaults(func=_hf)
