"""``tl-lenses train-tuned --text PATH... --out DIR``; ``tl-lenses eval-lens DIR --text PATH...``.

Both pack the text the same way (``--seq-len``, ``--held-out``, ``--seed``), so ``eval-lens``
with the training settings evaluates on exactly the rows training held out.
"""

from __future__ import annotations

import logging

from tl_lenses.model_args import add_model_arguments

logger = logging.getLogger("tl_lenses")


def add_parser(subparsers) -> None:
    train = subparsers.add_parser("train-tuned", help="train a tuned lens on text")
    _data_arguments(train)
    train.add_argument("--out", required=True, help="folder to write the lens into")
    train.add_argument("--recipe", default="fast", choices=["fast", "reference"])
    train.add_argument("--kind", default="affine", choices=["affine", "bias"])
    train.add_argument("--layers", default=None,
                       help="comma-separated block indices to cover (default: all)")
    train.add_argument("--steps", type=int, default=None, help="KL steps (recipe default)")
    train.add_argument("--time-budget", type=float, default=None, help="seconds, in all")
    train.add_argument("--batch-size", type=int, default=None,
                       help="rows per step, over all processes (default 8; 32 on a GPU)")
    train.add_argument("--micro-batch-size", type=int, default=None,
                       help="rows per forward pass (default: a process's share of a batch)")
    train.add_argument("--stream", action="store_true",
                       help="pack --text / --dataset lazily, in order (bounded memory; no "
                       "held-out split is taken)")
    train.add_argument("--dataset", default=None,
                       help="instead of --text: a Hugging Face dataset name, streamed "
                       "(needs the optional 'datasets'; implies --stream)")
    train.add_argument("--dataset-config", default=None, help="the dataset's configuration")
    train.add_argument("--dataset-split", default="train")
    train.add_argument("--dataset-column", default="text")
    train.add_argument("--lr", type=float, default=None)
    train.add_argument("--ls-tokens", type=int, default=32768,
                       help="most tokens the fast recipe's least-squares warm start reads "
                       "(whole batches, at most one pass over the data; 0: none). With "
                       "--steps 0 the lens is the warm start alone")
    train.add_argument("--lens-device", default=None,
                       help="device of the lens and its KL targets (default: the model's)")
    train.add_argument("--no-bf16", action="store_true", help="float32 unembedding matmuls")
    train.add_argument("--checkpoint", default=None, help="checkpoint folder (resumable)")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser("eval-lens", help="per-layer held-out metrics of lenses")
    evaluate.add_argument("lens_dirs", nargs="+", help="lens folders (from train-tuned)")
    _data_arguments(evaluate)
    evaluate.add_argument("--out", default="lens_eval.html", help="HTML report path")
    evaluate.add_argument("--png", default=None, help="also write the KL plot as a PNG")
    evaluate.add_argument("--rows", type=int, default=32, help="held-out rows to evaluate")
    evaluate.set_defaults(func=run_eval)


def _data_arguments(parser) -> None:
    parser.add_argument("--text", nargs="+", default=None,
                        help="text files, folders or globs")
    parser.add_argument("--generate", type=int, default=None,
                        help="instead of --text: sample this many rows from the model")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--held-out", type=float, default=0.05)
    parser.add_argument("--max-tokens", type=int, default=None, help="cap on the corpus")
    parser.add_argument("--seed", type=int, default=0)
    add_model_arguments(parser)


def _model(args):
    from tl_lenses.model_args import model_from_args

    return model_from_args(args)


def _split(model, args):
    from tl_lenses.data import token_split

    if (args.text is None) == (args.generate is None):
        raise ValueError("pass --text PATH... or --generate N (one of them)")
    logger.info("reading and packing text ..." if args.text else "sampling text from the model ...")
    split = token_split(model, paths=args.text, generate=args.generate, seq_len=args.seq_len,
                        held_out=args.held_out, seed=args.seed, max_tokens=args.max_tokens)
    logger.info(f"{split.train.shape[0]} training rows, {split.held_out.shape[0]} held out "
        f"({args.seq_len} tokens each)")
    return split


def run_train(args) -> int:
    """Train a lens; under ``torchrun`` every rank trains, rank 0 writes and reports."""
    from tl_lenses.lenses.tuned.distributed import close_distributed, init_distributed, rank_device

    if args.device.startswith("cuda"):  # under torchrun, "cuda" is this rank's GPU
        args.device = str(rank_device(args.device))
    world = init_distributed(args.device)
    try:
        return _train(args, world)
    finally:
        close_distributed()


def _train(args, world) -> int:
    from tl_lenses.lenses.tuned.io import save_tuned_lens
    from tl_lenses.lenses.tuned.lens import TunedLens
    from tl_lenses.lenses.tuned.train import train_tuned_lens

    model = _model(args)
    rows = _stream(model, args) if args.stream or args.dataset else _split(model, args).train
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    lens = TunedLens.for_model(model, layers=layers, kind=args.kind)
    result = train_tuned_lens(
        model, rows, lens, recipe=args.recipe, steps=args.steps,
        time_budget=args.time_budget, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, lr=args.lr, ls_tokens=args.ls_tokens,
        bf16=False if args.no_bf16 else None, seed=args.seed, lens_device=args.lens_device,
        checkpoint_dir=args.checkpoint, resume=args.resume, progress=world.is_main,
    )
    if not world.is_main:
        return 0
    training = {"steps": result.steps, "tokens_seen": result.tokens_seen,
                "warm_start_tokens": result.warm_start_tokens,
                "warm_start_stop": result.warm_start_stop, "lens_device": result.lens_device,
                "seconds": round(result.seconds, 1), "config": result.config,
                "processes": result.world_size, "stop_reason": result.stop_reason,
                "kl_skipped": result.kl_skipped, "text": args.text, "dataset": args.dataset,
                "seq_len": args.seq_len, "seed": args.seed}
    path = save_tuned_lens(result.lens, args.out, training=training)
    print(f"wrote {path} ({result.warm_start_tokens} warm-start tokens (stopped by "
          f"{result.warm_start_stop}), {result.steps} KL "
          f"steps, {result.seconds:.0f} s, {result.world_size} process(es), stopped by "
          f"{result.stop_reason})")
    return 0


def _stream(model, args):
    from tl_lenses.streams import TokenStream

    if args.dataset is None:
        if args.text is None:
            raise ValueError("--stream needs --text PATH... or --dataset NAME")
        return TokenStream(model, paths=args.text, seq_len=args.seq_len)
    if args.text is not None:
        raise ValueError("pass --text or --dataset, not both")
    try:
        import datasets
    except ModuleNotFoundError:
        raise ModuleNotFoundError("--dataset needs the optional 'datasets' package: "
                                  "pip install 'tl_lenses[data]'") from None
    dataset = datasets.load_dataset(args.dataset, args.dataset_config,
                                    split=args.dataset_split, streaming=True)
    return TokenStream(model, dataset=dataset, column=args.dataset_column,
                       seq_len=args.seq_len)


def run_eval(args) -> int:
    from tl_lenses.lenses.logit import LogitLens
    from tl_lenses.lenses.tuned.eval import evaluate_lenses
    from tl_lenses.lenses.tuned.io import load_tuned_lens

    if args.rows < 1:
        raise ValueError(f"--rows must be >= 1, got {args.rows}")
    model = _model(args)
    lenses = {"logit": LogitLens()}
    for folder in args.lens_dirs:
        lens = load_tuned_lens(folder, model)
        lenses[f"{lens.name} ({folder})"] = lens
    split = _split(model, args)
    evaluation = evaluate_lenses(model, split.held_out[: args.rows], lenses, progress=True)
    for name, m in evaluation.metrics.items():
        print(f"{name}: mean KL {m.mean_kl:.4f} nats ({float(m.kl_bpb[:-1].mean()):.4f} "
              f"bits/byte), mean top-1 agreement {float(m.top1_agreement[:-1].mean()):.3f}")
    with open(args.out, "w", encoding="utf-8") as file:
        file.write(evaluation.to_html())
    print(f"wrote {args.out}")
    if args.png:
        evaluation.save_png(args.png)
        print(f"wrote {args.png}")
    return 0
