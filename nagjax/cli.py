"""`nagjax <verb>`: train, eval, list, data.

Every verb that takes a config accepts `--experiment NAME` and `--set key=value ...`; bad keys or
values are reported before any work starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_EXPERIMENT = "quickstart"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", "-e", default=DEFAULT_EXPERIMENT, help="registered experiment name")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config overrides, e.g. model.depth=24 model.residual=lns train.steps=200")
    p.add_argument("--experiments-dir", action="append", default=[], metavar="PATH",
                   help="extra folder or .py file of experiments to register")


def _config(args):
    from nagjax.config import apply_overrides
    from nagjax.registry import get_experiment, load_experiments

    load_experiments(args.experiments_dir)
    return apply_overrides(get_experiment(args.experiment), args.overrides)


def cmd_train(args) -> int:
    config = _config(args)
    workdir = Path(args.workdir or Path("runs") / config.name)
    from nagjax.train.trainer import train

    result = train(config, workdir)
    if result.val_loss is not None:
        print(f"final validation loss {result.val_loss:.4f} ({result.val_bpb:.4f} bits/byte) "
              f"at step {result.step}; logs and checkpoints in {result.workdir}")
    return 0


def cmd_eval(args) -> int:
    from nagjax.train.trainer import evaluate_workdir

    out = evaluate_workdir(args.workdir, eval_batches=args.batches)
    print(json.dumps(out) if args.json else
          f"step {out['step']}: validation loss {out['loss']:.4f}, {out['bpb']:.4f} bits/byte")
    return 0


def cmd_list(args) -> int:
    from nagjax.registry import entries, load_experiments

    load_experiments(args.experiments_dir)
    items = entries()
    width = max((len(e.name) for e in items), default=0)
    for e in items:
        tag = "" if e.kind == "experiment" else f"[{e.kind}] "
        print(f"{e.name:<{width}}  {tag}{e.description}")
    return 0


def cmd_data(args) -> int:
    from nagjax.data.shards import run_data_command

    run_data_command(
        inputs=args.input, output=args.output, tokenizer=args.tokenizer,
        vocab_size=args.vocab_size, val_fraction=args.val_fraction, text_field=args.text_field,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nagjax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train an experiment (default: quickstart); resumes an existing workdir")
    _add_config_args(p)
    p.add_argument("--workdir", "-w", default=None, help="run folder (default: runs/<experiment>)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir on the validation split")
    p.add_argument("--workdir", "-w", required=True)
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("list", help="list registered experiments")
    p.add_argument("--experiments-dir", action="append", default=[], metavar="PATH")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("data", help="build token shards from your own text or JSONL files")
    p.add_argument("--input", "-i", nargs="+", required=True, help="text (.txt/.gz/.xz) or .jsonl files")
    p.add_argument("--output", "-o", required=True, help="shard folder to write (use as data.source=DIR)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: train one on the input)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary when training a tokeniser")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of the text held out for validation")
    p.add_argument("--text-field", default="text", help="JSONL field that holds the text")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["train"])
    if args.command is None:
        parser.print_help()
        return 2
    from nagjax.config import ConfigError
    from nagjax.data.shards import DataError
    from nagjax.train.checkpoint import CheckpointError

    from nagjax.runtime import setup

    setup()
    try:
        return args.func(args)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"nagjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
