"""`sqs generate RUN_DIR --prompt ...`: sample from a trained language model."""

from __future__ import annotations

from sqs.cli.args import folder, nonneg_float, nonneg_int, positive_int


def _generate(args) -> int:
    from sqs.runs.lm_pipeline import generate_text, load_lm

    loaded = load_lm(args.run_dir, device=args.device, cache_dir=args.cache_dir)  # a device not here: one line
    for i in range(args.num_samples):
        text = generate_text(loaded, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, seed=args.seed + i, stop_at_eot=not args.no_stop)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} (seed {args.seed + i})")
        print(text)
    return 0


def register(sub, groups) -> None:
    g = sub.add_parser("generate", help="sample text from a trained language model",
                       description="Continue a prompt with a trained TinyStories model (deterministic for a seed; "
                                   "--temperature 0 is greedy).")
    g.add_argument("run_dir", type=folder, help="a run directory of `sqs train lm`")
    g.add_argument("--prompt", default="Once upon a time")
    g.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to add, >= 1 (default 200)")
    g.add_argument("--temperature", type=nonneg_float, default=0.8, help="finite, >= 0; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=positive_int, default=None,
                   help="sample from the k most likely tokens, >= 1 (default: all)")
    g.add_argument("--seed", type=nonneg_int, default=0)
    g.add_argument("--num-samples", type=positive_int, default=1, help="samples with seeds seed, seed+1, ... (>= 1)")
    g.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    g.add_argument("--device", default="cpu", help="cpu (default), auto (CUDA if available), cuda, cuda:1, mps")
    g.add_argument("--cache-dir", help="only for runs without a tokenizer.json")
    g.set_defaults(func=_generate)
