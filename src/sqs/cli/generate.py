"""`sqs generate RUN_DIR --prompt ...`: sample from a trained language model."""

from __future__ import annotations


def _generate(args) -> int:
    from sqs.experiments import lm

    loaded = lm.load_lm(args.run_dir, device=args.device if args.device != "auto" else "cpu",
                        cache_dir=args.cache_dir)
    for i in range(args.num_samples):
        text = lm.generate_text(loaded, args.prompt, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k or None, seed=args.seed + i,
                                stop_at_eot=not args.no_stop)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} (seed {args.seed + i})")
        print(text)
    return 0


def register(sub, groups) -> None:
    g = sub.add_parser("generate", help="sample text from a trained language model",
                       description="Continue a prompt with a trained TinyStories model (deterministic for a seed; "
                                   "--temperature 0 is greedy).")
    g.add_argument("run_dir", help="a run directory of `sqs train lm`")
    g.add_argument("--prompt", default="Once upon a time")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-samples", type=int, default=1, help="samples with seeds seed, seed+1, ...")
    g.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    g.add_argument("--device", default="cpu")
    g.add_argument("--cache-dir", help="only for runs without a tokenizer.json")
    g.set_defaults(func=_generate)
