"""`sqs convert run MODEL ...` and `sqs convert report RUN_DIR ... --out DIR`: SwiGLU -> SQS / Bilinear.

Parse, then call `sqs.integrations.convert.anneal_to` (the run) or
`sqs.integrations.convert_report.write_report` (curves, plot and table of several runs).
"""

from __future__ import annotations

import json

from sqs.cli.args import bounded, nonneg_float, nonneg_int, positive_float, positive_int


def _run(args) -> int:
    import torch

    from sqs.integrations.convert import ConvertConfig, anneal_to
    from sqs.integrations.pretrained import load_pretrained, text_blocks

    cfg = ConvertConfig(target=args.target, steps=args.steps, anneal_steps=args.anneal_steps, lr=args.lr,
                        warmup_steps=args.warmup_steps, batch=args.batch, context=args.context,
                        mlp_only=not args.full, eval_every=args.eval_every,
                        checkpoint_every=args.checkpoint_every, seed=args.seed,
                        sqs={"c": args.c, "lam": args.lam, "p": args.p}, distill_steps=args.distill_steps,
                        distill_anneal_steps=args.distill_anneal_steps, distill_batch=args.distill_batch,
                        distill_blocks=args.distill_blocks, distill_lr=args.distill_lr,
                        distill_warmup_steps=args.distill_warmup_steps, distill_eval_every=args.distill_eval_every)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = args.run_dir or f"runs/convert/{args.model.rstrip('/').split('/')[-1]}-{args.target}"
    pre = load_pretrained(args.model, cache_dir=args.cache_dir)
    train = text_blocks(pre.tokenizer, args.train_text, "train", cfg.context, args.train_blocks, args.cache_dir)
    evals = {str(src): text_blocks(pre.tokenizer, src, "heldout", cfg.context, args.eval_blocks, args.cache_dir)
             for src in args.eval_text}
    print(f"sqs convert: {pre.source} -> {cfg.target}; {len(train)} training windows of {cfg.context} tokens; "
          f"held-out {', '.join(f'{k} ({len(v)})' for k, v in evals.items())}; run directory {run_dir}", flush=True)
    anneal_to(pre.model, train, evals, cfg, run_dir, tokenizer=pre.tokenizer,
              source={"model": pre.source, "train_text": str(args.train_text)},
              progress=lambda msg: print(f"sqs convert: {msg}", flush=True))
    print(f"sqs convert: model saved in {run_dir}/model; curve in {run_dir}/curve.jsonl")
    return 0


def _report(args) -> int:
    from sqs.integrations.convert_report import write_report

    out = write_report(args.run_dirs, args.out, title=args.title)
    print(json.dumps({k: str(v) for k, v in out.items()}, indent=2))
    return 0


def register(sub, groups) -> None:
    g = sub.add_parser("convert", help="convert a SwiGLU language model to SQS or Bilinear by annealing the gate",
                       description="Convert a pretrained SwiGLU language model (Hugging Face directory or GGUF file) "
                                   "into an SQS or Bilinear one by annealing the gate while fine-tuning.")
    s = g.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    r = s.add_parser("run", help="anneal one model to one target gate (resumable run directory)",
                     description="Anneal every gated MLP from SiLU to the target gate over --anneal-steps optimizer "
                                 "steps, then fine-tune at the target until --steps; saves RUN_DIR/model "
                                 "(transformers loads it; SQS after sqs.integrations.transformers.register()).")
    r.add_argument("model", help="a Hugging Face model directory, a .gguf file, or smollm2 (sqs data fetch smollm2)")
    r.add_argument("--target", choices=("sqs", "bilinear"), default="sqs")
    r.add_argument("--run-dir", help="where the run lives (default runs/convert/<model>-<target>); "
                                     "re-running the same command resumes it")
    r.add_argument("--steps", type=nonneg_int, default=200,
                   help="end-to-end optimizer steps (default 200; 0 with --distill-steps: distillation only)")
    r.add_argument("--anneal-steps", type=nonneg_int, default=None,
                   help="steps over which the gate moves from SiLU to the target (default steps/2; 0 = swap at once; "
                        "with --distill-steps it is 0: the distillation anneals)")
    d = r.add_argument_group("per-layer distillation (before the end-to-end steps; cheap: no backward through the "
                             "model)")
    d.add_argument("--distill-steps", type=nonneg_int, default=0,
                   help="distillation steps: every MLP learns the original MLP's outputs on cached inputs while its "
                        "gate anneals (default 0: none)")
    d.add_argument("--distill-anneal-steps", type=nonneg_int, default=None,
                   help="distillation steps over which t rises to 1 (default half; 0 = the target gate throughout)")
    d.add_argument("--distill-batch", type=positive_int, default=256,
                   help="token positions per layer and distillation step (default 256)")
    d.add_argument("--distill-blocks", type=positive_int, default=128,
                   help="training windows whose MLP inputs and outputs are cached (default 128; bfloat16, "
                        "30 layers x 128 x 128 tokens x 576 x 2 tensors: 1.1 GB)")
    d.add_argument("--distill-lr", type=positive_float, default=1e-3, help="peak distillation lr (default 1e-3)")
    d.add_argument("--distill-warmup-steps", type=nonneg_int, default=20)
    d.add_argument("--distill-eval-every", type=positive_int, default=100,
                   help="held-out evaluation and checkpoint every this many distillation steps (default 100)")
    r.add_argument("--batch", type=positive_int, default=8, help="windows per step (default 8)")
    r.add_argument("--context", type=bounded(int, 2), default=128, help="tokens per window (default 128)")
    r.add_argument("--lr", type=positive_float, default=2e-4, help="peak AdamW learning rate (default 2e-4)")
    r.add_argument("--warmup-steps", type=nonneg_int, default=10)
    r.add_argument("--full", action="store_true", help="train every weight (default: the MLP projections only)")
    r.add_argument("--train-text", default="shakespeare",
                   help="shakespeare, tinystories (their train split) or a UTF-8 .txt file (default shakespeare)")
    r.add_argument("--eval-text", nargs="+", default=["shakespeare"],
                   help="held-out text(s) to measure the loss on (default shakespeare)")
    r.add_argument("--train-blocks", type=positive_int, default=None,
                   help="use at most this many training windows (default: all of the train split)")
    r.add_argument("--eval-blocks", type=positive_int, default=16, help="held-out windows per text (default 16)")
    r.add_argument("--eval-every", type=positive_int, default=25)
    r.add_argument("--checkpoint-every", type=positive_int, default=25)
    r.add_argument("--seed", type=nonneg_int, default=0)
    r.add_argument("--c", type=bounded(float), default=0.01, help="SQS shift c (default 0.01)")
    r.add_argument("--lam", type=nonneg_float, default=0.5, help="SQS shrink lambda (default 0.5)")
    r.add_argument("--p", type=positive_float, default=1.0, help="SQS power p (default 1)")
    r.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    r.add_argument("--cache-dir", help="cache root (default $SQS_CACHE_DIR or ~/.cache/sqs)")
    r.set_defaults(func=_run)
    rep = s.add_parser("report", help="curves (JSON, PNG) and a markdown table of finished conversion runs",
                       description="Collect conversion runs into OUT: curves.json, curves.png, README.md.")
    rep.add_argument("run_dirs", nargs="+", help="run directories of `sqs convert run`")
    rep.add_argument("--out", required=True, help="folder to write (e.g. results/smollm2)")
    rep.add_argument("--title", default="SwiGLU -> SQS / Bilinear conversion")
    rep.set_defaults(func=_report)
