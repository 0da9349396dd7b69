"""`sqs read MODEL --out DIR`: a pretrained model's gated MLPs read as quadratic forms over tokens.

Parse, then call `sqs.experiments.read_pretrained.read_pretrained` (which loads, reads and writes).
"""

from __future__ import annotations

from sqs.cli.args import nonneg_int, positive_int


def _read(args) -> int:
    import torch

    from sqs.experiments.read_pretrained import DEFAULT_TOKENS, read_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    res = read_pretrained(args.model, args.out, tokens=args.token or DEFAULT_TOKENS, promoted=args.promoted,
                          fit_text=args.text, eval_text=args.eval_text, context=args.context,
                          fit_windows=args.fit_windows, eval_windows=args.eval_windows, layers=args.layer, k=args.k,
                          n_tokens=args.n_tokens, compare=args.compare, cache_dir=args.cache_dir,
                          progress=lambda m: print(f"sqs read: {m}", flush=True), bar=not args.no_progress)
    t = res["timing"]
    print(f"sqs read: {len(res['layers'])} layers read in {t['after_loading_wall_s']:.1f} s after loading "
          f"({t['after_loading_cpu_s']:.1f} s CPU); wrote {args.out}/reading.md, reading.json and figures")
    return 0


def register(sub, groups) -> None:
    r = sub.add_parser(
        "read", help="read a pretrained model's gated MLPs as quadratic forms over tokens (HF directory or GGUF)",
        description="Read every gated MLP layer of a pretrained decoder (a Hugging Face model directory, a .gguf "
                    "file, or smollm2 after `sqs data fetch smollm2`): for the --token directions and each layer's "
                    "most promoted tokens, fit the first-order, gain and affine readings of its gate on training "
                    "text, score them on held-out text (R^2), and read the best one's top eigenvectors as tokens "
                    "through the embedding and the unembedding. Writes OUT/reading.md, reading.json and PNGs.")
    r.add_argument("model", help="a Hugging Face model directory, a .gguf file, or smollm2")
    r.add_argument("--out", required=True, help="folder to write (e.g. results/smollm2/reading)")
    r.add_argument("--token", action="append", metavar="TEXT",
                   help="a token whose output direction to read (repeatable; one token of the model's tokenizer, "
                        "mind the leading space); default: ' Paris', ' dog', '.'")
    r.add_argument("--promoted", type=nonneg_int, default=3,
                   help="also read each layer's this many most promoted tokens (default 3)")
    r.add_argument("--layer", type=nonneg_int, action="append",
                   help="read only this layer (repeatable, 0-based; default every gated MLP)")
    r.add_argument("--text", default="shakespeare",
                   help="text whose training split fits the readings: shakespeare, tinystories or a .txt file")
    r.add_argument("--eval-text", default=None, help="text whose held-out split scores them (default: --text)")
    r.add_argument("--context", type=positive_int, default=128, help="tokens per window (default 128)")
    r.add_argument("--fit-windows", type=positive_int, default=16, help="training windows (default 16)")
    r.add_argument("--eval-windows", type=positive_int, default=16, help="held-out windows (default 16)")
    r.add_argument("--k", type=positive_int, default=3, help="eigenvectors read per sign (default 3)")
    r.add_argument("--n-tokens", type=positive_int, default=8, help="tokens listed per end (default 8)")
    r.add_argument("--compare", help="an earlier `sqs read` folder (or reading.json) whose per-layer fidelity "
                                     "the table shows beside this model's, e.g. the model before conversion")
    r.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar over the layers")
    r.add_argument("--cache-dir", help="cache root (default $SQS_CACHE_DIR or ~/.cache/sqs)")
    r.set_defaults(func=_read)
