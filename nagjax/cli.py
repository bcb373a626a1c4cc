"""`nagjax <verb>`: train, eval, sample, sweep, report, list, data, export, import, compile, prune, analyze.

Every verb that takes a config accepts `--experiment NAME` and `--set key=value ...`; bad keys or
values are reported before any work starts.

This is the one module that imports nagjax modules inside functions (tests/test_imports.py allows
it here only): each command imports what it needs when it runs, so start-up stays fast and
`nagjax data` workers or `nagjax --help` never load JAX or the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_EXPERIMENT = "quickstart"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", "-e", default=None,
                   help=f"registered experiment name (default: {DEFAULT_EXPERIMENT}; `train` on a workdir "
                        "that holds a checkpoint and no --experiment continues the saved config)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="config overrides, e.g. model.depth=24 model.residual=lns train.steps=200")
    p.add_argument("--experiments-dir", action="append", default=[], metavar="PATH",
                   help="extra folder or .py file of experiments to register")


def _register_schemes() -> None:
    """Register the built-in residual schemes, which configs name (`model.residual`, `model.nag.*`):
    the config module sits below the model and cannot import them itself."""
    import nagjax.model  # noqa: F401


def _config(args):
    from nagjax.config import apply_overrides
    from nagjax.registry import get_experiment, load_experiments

    _register_schemes()

    load_experiments(args.experiments_dir)
    return apply_overrides(get_experiment(args.experiment or DEFAULT_EXPERIMENT), args.overrides)


def _saved_run_config(args):
    """The config saved in `--workdir`'s latest checkpoint (plus --set overrides) when no
    --experiment is given: how a pruned workdir (`nagjax prune`) or any run is continued."""
    if args.experiment is not None or not args.workdir:
        return None
    from nagjax.config import apply_overrides, config_from_dict
    from nagjax.train.checkpoint import CheckpointStore, restore_agreed

    _register_schemes()
    directory = Path(args.workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    with CheckpointStore(directory, read_only=True) as store:
        # the newest readable config (the trainer reports and moves aside a damaged checkpoint)
        found = restore_agreed(store, store.restore_config)
    return None if found is None else apply_overrides(config_from_dict(found[1]), args.overrides)


def cmd_train(args) -> int:
    config = _saved_run_config(args) or _config(args)
    workdir = Path(args.workdir or Path("runs") / config.name)
    from nagjax.train.trainer import train

    result = train(config, workdir)
    if result.val_loss is not None:
        print(f"final validation loss {result.val_loss:.4f} ({result.val_bpb:.4f} bits/byte) "
              f"at step {result.step}; logs and checkpoints in {result.workdir}")
    return 0


def cmd_eval(args) -> int:
    if args.mod_sweep:
        return _mod_sweep(args)
    from nagjax.train.trainer import evaluate_workdir

    out = evaluate_workdir(args.workdir, eval_batches=args.batches)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"step {out['step']}: validation loss {out['loss']:.4f}, {out['bpb']:.4f} bits/byte")
    for name, v in out.get("by_source", {}).items():
        print(f"  {name}: {v['loss']:.4f}, {v['bpb']:.4f} bits/byte")
    if "loss_topk" in out:
        print(f"  (Mixture-of-Depths: causal thresholds, skip rate {out['skip_rate']:.3f}; top-k routing, "
              f"not causal: {out['loss_topk']:.4f})")
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
    from nagjax.config import ConfigError
    from nagjax.data.build import run_data_command
    from nagjax.data.sources import Inputs
    from nagjax.interrupts import Interrupted

    if (args.data_files or args.dataset_config) and not args.dataset:
        raise ConfigError("--data-files and --dataset-config apply to a Hugging Face dataset: "
                          "add --dataset NAME_OR_PATH (or drop them)")
    inputs = Inputs(
        files=tuple(args.input), text_field=args.text_field, encoding_errors=args.encoding_errors,
        dataset=args.dataset or "", dataset_config=args.dataset_config or "",
        dataset_split=args.dataset_split, data_files=tuple(args.data_files),
        streaming=not args.no_streaming,
    )
    workers = args.workers if args.workers is not None else min(16, os.cpu_count() or 1)
    try:
        run_data_command(
            inputs, args.output, tokenizer=args.tokenizer, eos_token=args.eos_token,
            vocab_size=args.vocab_size, val_fraction=args.val_fraction, workers=workers,
            shard_index=args.shard_index, num_shards=args.num_shards, progress=not args.no_progress,
        )
    except Interrupted as e:  # shards are renamed into place only when complete
        raise e.adding(f"{args.output} left as it was") from None
    return 0


def cmd_export(args) -> int:
    from nagjax.export.hf import export_workdir

    config = export_workdir(args.workdir, args.out, args.format, step=args.step)
    arch = config["architectures"][0]
    remote = ", trust_remote_code=True" if config["model_type"] == "nagjax" else ""
    print(f"wrote {args.out}: {arch} (step {config['nagjax']['step']}), model.safetensors, config.json, "
          f"tokenizer\nload it with: AutoModelForCausalLM.from_pretrained({str(args.out)!r}{remote})")
    if config.get("mod_skipping"):
        print(f"Mixture-of-Depths: trained thresholds exported (mod.rate={config['nagjax']['mod_rate']:g}); the "
              "export routes causally with them and skips (config.json mod_skipping=false for dense)")
    return 0


def cmd_import(args) -> int:
    from nagjax.export.hf_import import import_folder

    out = import_folder(args.source, args.workdir, experiment=args.experiment, overrides=args.overrides,
                        experiments_dir=args.experiments_dir)
    cfg = out["config"]
    m = cfg.model
    print(f"wrote {args.workdir}: step-0 checkpoint of {m.residual} (d_model={m.d_model}, depth={m.depth}, "
          f"vocab {m.vocab_size}) from {args.source} ({out['model_type']})\ndata: {out['data']}")
    if out["fresh"]:
        print("fresh (initialised, not imported): " + ", ".join(out["fresh"]))
    print(f"continue with: nagjax train --workdir {args.workdir}   (sample, eval and export work too)")
    return 0


def cmd_compile(args) -> int:
    from nagjax.compile import compile_report

    print(compile_report(_config(args), args.topology), flush=True)
    return 0


def _mod_sweep(args) -> int:
    from nagjax.analysis.diagnostics import load_run, validation_batches
    from nagjax.analysis.mod_sweep import mod_sweep, write_outputs

    run = load_run(args.workdir)
    batches = validation_batches(run.config, args.batches or run.config.train.eval_batches)
    rates = tuple(float(r) for r in args.rates.split(","))
    result = mod_sweep(run, batches, rates=rates)
    out_dir = Path(args.out or Path(args.workdir) / "mod_sweep")
    write_outputs(result, out_dir)
    print((out_dir / "mod_sweep.md").read_text())
    print(f"table, JSON, mod_sweep.png and skip_heatmap.png in {out_dir}")
    return 0


def cmd_sample(args) -> int:
    from nagjax.analysis.diagnostics import load_run, validation_batches
    from nagjax.config import ConfigError
    from nagjax.data.mixture import run_tokenizer
    from nagjax.infer.calibration import calibrate_thresholds
    from nagjax.infer.sample import generate

    if args.mod_rate is not None and not 0 <= args.mod_rate < 1:
        raise ConfigError(f"--mod-rate: expected a skip rate in [0, 1), got {args.mod_rate:g}")
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens: expected at least 1, got {args.max_tokens}")
    run = load_run(args.workdir)
    cfg = run.config
    tokenizer = run_tokenizer(cfg.data, args.workdir)
    policy = run.model().mod_policy  # trained, calibrated or no thresholds: the policy's choice

    def calibrate(rate: float):
        batches = validation_batches(cfg, cfg.train.eval_batches)
        return calibrate_thresholds(run.graphdef, run.params, batches, (rate,), under_skipping=True)[..., 0]

    thresholds, source = policy.sample_thresholds(run.state["aux"], rate=args.mod_rate, dense=args.dense,
                                                  calibrate=calibrate)
    if not policy.signal and args.mod_rate is not None:
        print(f"nagjax: note: --mod-rate needs a residual scheme with a skip signal (this model is "
              f"{cfg.model.residual!r}); sampling densely", file=sys.stderr)
    out = generate(run, tokenizer, args.prompt, max_new_tokens=args.max_tokens, temperature=args.temperature,
                   top_k=args.top_k, seed=args.seed, thresholds=thresholds, real_skip=not args.no_skip)
    for prompt, text in zip(args.prompt, out.texts):
        print(prompt + text)
    from nagjax.model.loops import labels

    print(sample_report(out, step=run.step, source=source, real_skip=not args.no_skip,
                        labels=labels(run.config.model) if run.config.model.repeat > 1 else None), file=sys.stderr)
    return 0


def sample_report(out, *, step: int, source: str, real_skip: bool, labels: list[str] | None = None) -> str:
    """The latency dial's read-out of one `nagjax sample` (nagjax/infer/sample.py: Generation);
    `labels`: one per executed block (a looped stack: `block.pass`)."""
    rows = len(out.tokens)
    how = "skipped sublayers not computed" if real_skip else "every sublayer computed, skipped updates discarded"
    lines = [
        f"[nagjax] step {step}; thresholds: {source}; {how}",
        f"[nagjax] prefill {rows} x {max(out.prompt_lengths)} tokens in {out.prefill_seconds * 1e3:.1f} ms; "
        f"decode {out.decode_tokens} tokens in {out.decode_seconds * 1e3:.1f} ms: "
        f"{out.tokens_per_second:.1f} tokens/s, {out.seconds_per_token * 1e3:.2f} ms per {'token' if rows == 1 else 'step'} "
        f"(compile {out.compile_seconds:.1f} s, not counted)",
        f"[nagjax] realised skip rate {out.skip_rate:.3f} of all sublayers ({out.skip_rate_eligible:.3f} of the "
        f"{int(out.eligible.sum())} that may skip); {out.calls_saved:.1%} of sublayer calls not computed; forward "
        f"{out.flops_per_token / 1e6:.2f} MFLOP/token (dense {out.dense_flops_per_token / 1e6:.2f}: "
        f"{out.flops_per_token / out.dense_flops_per_token:.2f}x)",
    ]
    if out.eligible.any():
        if labels is None:
            per = " ".join(f"{a:.2f}/{m:.2f}" for a, m in out.skip_rate_by_sublayer)
            lines.append(f"[nagjax] skip rate per block (attn/mlp): {per}")
        else:
            per = " ".join(f"{k}:{a:.2f}/{m:.2f}" for k, (a, m) in zip(labels, out.skip_rate_by_sublayer))
            lines.append(f"[nagjax] skip rate per executed block.pass (attn/mlp): {per}")
    return "\n".join(lines)


def cmd_sweep(args) -> int:
    from nagjax.registry import get_sweep, load_experiments
    from nagjax.sweep import run_sweep

    from nagjax.sweep import DepthSweep, run_depth_sweep
    from nagjax.config import ConfigError

    load_experiments(args.experiments_dir)
    sweep = get_sweep(args.sweep)
    workdir = Path(args.workdir or Path("runs") / "sweeps" / args.sweep)
    if isinstance(sweep, DepthSweep):  # fixed token budget per depth, not iso-FLOP
        if args.overrides:
            raise ConfigError("--set is not supported for depth sweeps; edit the sweep's configs")
        run_depth_sweep(sweep, workdir)
    else:
        run_sweep(sweep, workdir, tuple(args.overrides))
    print((workdir / "results.md").read_text())
    print(f"plots and results.json in {workdir}")
    return 0


def cmd_report(args) -> int:
    from nagjax.sweep.report import build_report

    try:
        out = build_report(args.sweep_dir, args.out, title=args.title, notes=args.note)
    except ValueError as e:  # a results.json this nagjax cannot read
        print(f"nagjax: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} from {len(args.sweep_dir)} sweep(s)")
    return 0


def cmd_prune(args) -> int:
    from nagjax.analysis import pruning

    if args.report:
        steps = tuple(args.steps) if args.steps else None
        report = pruning.prune_report(args.workdir, eval_batches=args.batches, steps=steps,
                                      compare_workdir=args.compare)
        print(json.dumps(report, indent=1) if args.json else pruning.format_report(report))
        return 0
    if args.blocks is None or args.method is None:
        from nagjax.config import ConfigError

        raise ConfigError("prune: pass --blocks K and --method METHOD, or --report")
    report = pruning.prune_workdir(args.workdir, args.blocks, args.method, out=args.out,
                                   heal_steps=args.heal_steps, eval_batches=args.batches)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"dropped blocks {report['dropped_blocks']} by {args.method}; validation loss "
              f"{report['loss_before']:.4f} -> {report['loss_after']:.4f}"
              + (f" -> {report['loss_after_heal']:.4f} after {args.heal_steps} healing steps"
                 if args.heal_steps else "")
              + f"\npruned checkpoint: {report['pruned']} (nagjax eval/train --workdir accept it)")
    return 0


def cmd_analyze(args) -> int:
    from nagjax.analysis.plots import analyze

    workdirs = [args.workdir, *args.compare]
    out = Path(args.out or Path(args.workdir) / "analysis")
    result = analyze(workdirs, out, eval_batches=args.batches, skip_losses=not args.no_skip)
    for run in result["runs"]:
        blocks = run["blocks"]
        print(f"{run['workdir']} ({run['residual']}, step {run['step']}): loss {run['loss']:.4f}; final "
              f"stream RMS {run['sublayers']['stream_rms'][-1][-1]:.3g}")
        if run.get("repeat", 1) > 1:
            print("  per pass: " + "; ".join(
                f"pass {p['pass']}: update ratio {p['update_ratio']:.3g}"
                + (f", skip rate {p['skip_rate']:.3f}" if "skip_rate" in p else "") for p in run["passes"]))
        if "skip_loss_increase" in blocks:
            print("  loss increase when skipping each block: "
                  + ", ".join(f"{v:+.4f}" for v in blocks["skip_loss_increase"]))
    print(f"wrote {result['json']} and {len(result['images'])} plots in {out}")
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
    p.add_argument("--mod-sweep", action="store_true",
                   help="evaluate at a range of Mixture-of-Depths skip rates (causal thresholds; NAG)")
    p.add_argument("--rates", default="0,0.1,0.2,0.3,0.4,0.5,0.6", help="target skip rates for --mod-sweep")
    p.add_argument("--out", default=None, help="output folder for --mod-sweep (default: WORKDIR/mod_sweep)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a trained workdir (one-pass prefill, KV cache, "
                       "MoD thresholds that really skip); reports tokens/s, skip rate and FLOPs")
    p.add_argument("--workdir", "-w", required=True)
    p.add_argument("--prompt", "-p", required=True, action="append",
                   help="repeat for a batch (prompts of any lengths, generated together)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mod-rate", type=float, default=None,
                   help="NAG: the latency dial, a skip rate to calibrate thresholds for (default: the "
                   "trained thresholds)")
    p.add_argument("--dense", action="store_true", help="NAG: run every sublayer")
    p.add_argument("--no-skip", action="store_true",
                   help="compute skipped sublayers and discard their updates (the reference path: "
                   "same text, no saving)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("sweep", help="train an iso-FLOP sweep (resumable) and write tables and plots")
    p.add_argument("--sweep", "-s", required=True, help="registered sweep name (`nagjax list`)")
    p.add_argument("--workdir", "-w", default=None, help="sweep folder (default: runs/sweeps/<sweep>)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="overrides applied to every variant")
    p.add_argument("--experiments-dir", action="append", default=[], metavar="PATH")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="a results page (tables + plots) from finished sweeps' results.json")
    p.add_argument("--sweep-dir", nargs="+", required=True, metavar="DIR", help="sweep workdirs to include")
    p.add_argument("--out", default="docs/results.md", help="Markdown page to write (plots go beside it)")
    p.add_argument("--title", default="nagjax results")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a paragraph appended to the page (e.g. what is pending)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("prune", help="CascadeFlow pruning: drop the least important blocks into a new "
                       "workdir, or --report each method's ranking and rank stability")
    p.add_argument("--workdir", "-w", required=True)
    p.add_argument("--blocks", "-k", type=int, default=None, help="number of blocks to remove")
    p.add_argument("--method", "-m", default=None,
                   choices=("cascadeflow", "block-influence", "angular", "magnitude"))
    p.add_argument("--heal-steps", type=int, default=0, help="train the pruned model this many steps")
    p.add_argument("--out", default=None, help="pruned workdir (default: WORKDIR-pruned-K-METHOD)")
    p.add_argument("--report", action="store_true", help="print rankings, single-block losses, stability")
    p.add_argument("--steps", type=int, nargs=2, default=None, metavar=("OLD", "NEW"),
                   help="--report: the two checkpoints to compare (default: the two latest)")
    p.add_argument("--compare", default=None, help="--report: compare with another workdir (e.g. seed)")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("analyze", help="depth microscope: per-layer plots (PNG) and JSON of one or more runs")
    p.add_argument("--workdir", "-w", required=True)
    p.add_argument("--compare", nargs="*", default=[], metavar="DIR", help="runs to overlay on the same plots")
    p.add_argument("--out", "-o", default=None, help="output folder (default: WORKDIR/analysis)")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: min(run's, 8))")
    p.add_argument("--no-skip", action="store_true", help="skip the per-block skip-loss evaluations")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("list", help="list registered experiments")
    p.add_argument("--experiments-dir", action="append", default=[], metavar="PATH")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("data", help="build token shards from your text, JSONL or Parquet files, or a "
                       "Hugging Face dataset")
    p.add_argument("--input", "-i", nargs="+", default=[], metavar="PATH",
                   help=".txt/.jsonl (optionally .gz/.xz) or .parquet files, or folders of them")
    p.add_argument("--dataset", default=None, metavar="NAME_OR_PATH",
                   help="a Hugging Face dataset: hub name, local folder, or a builder (json, parquet, "
                        "text) with --data-files; read with datasets.load_dataset (needs nagjax[hf])")
    p.add_argument("--dataset-config", default=None, help="--dataset: configuration (subset) name")
    p.add_argument("--dataset-split", default="train", help="--dataset: split to read (default: train)")
    p.add_argument("--data-files", nargs="+", default=[], metavar="GLOB", help="--dataset: data_files")
    p.add_argument("--no-streaming", action="store_true",
                   help="--dataset: download and cache it whole first (default: stream it)")
    p.add_argument("--output", "-o", required=True, help="shard folder to write (use as data.source=DIR)")
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece .model, Hugging Face tokenizer.json (file, folder or hub name); "
                        "default: train a SentencePiece BPE on the input")
    p.add_argument("--eos-token", default=None,
                   help="tokenizer.json: the token that ends a document (default: from "
                        "tokenizer_config.json, or </s>, <|endoftext|>, ...)")
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary when training a tokeniser")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of the documents held out for validation")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet or dataset column that holds the text")
    p.add_argument("--encoding-errors", default="strict", choices=("strict", "replace", "ignore"),
                   help="text/JSONL bytes that are not UTF-8: stop (strict), U+FFFD (replace) or drop (ignore)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokeniser processes (default: the CPU count, at most 16; 0 = this process)")
    p.add_argument("--shard-index", type=int, default=0, help="this machine's part, 0..N-1 (with --num-shards)")
    p.add_argument("--num-shards", type=int, default=1,
                   help="N machines each build one part of the same folder (needs --tokenizer)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("export", help="write a workdir's checkpoint as a Hugging Face transformers folder")
    p.add_argument("--workdir", "-w", required=True)
    p.add_argument("--format", default="hf", choices=("hf",), help="hf: safetensors + config.json + tokenizer")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="a Hugging Face folder (LlamaForCausalLM, or a nagjax export) as a "
                       "workdir that `nagjax train --workdir` continues")
    p.add_argument("source", metavar="FOLDER", help="Hugging Face model folder (config.json + *.safetensors)")
    p.add_argument("--workdir", "-w", required=True, help="new run folder")
    _add_config_args(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("compile", help="compile the train step for a target topology (no hardware needed); "
                       "print per-device memory and every parameter's sharding")
    _add_config_args(p)
    p.add_argument("--topology", "-t", default="local",
                   help="TPU slice (v5p-64, v5e-16, or v5p:2x4x4; needs libtpu) or 'local' (this machine's devices)")
    p.set_defaults(func=cmd_compile)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["train"])
    if args.command is None:
        parser.print_help()
        return 2
    from nagjax.interrupts import Interrupted, RaiseInterrupted

    with RaiseInterrupted():  # SIGINT/SIGTERM: one line and exit 130/143, never a traceback
        try:
            from nagjax.config import ConfigError
            from nagjax.data.shards import DataError
            from nagjax.runtime import setup
            from nagjax.train.checkpoint import CheckpointError
            from nagjax.train.guard import TrainingDiverged
            from nagjax.train.workdir_lock import WorkdirLocked

            setup()
            return args.func(args)
        except (ConfigError, DataError, CheckpointError, WorkdirLocked, FileNotFoundError) as e:
            print(f"nagjax: error: {e}", file=sys.stderr)
            return 2
        except TrainingDiverged as e:
            print(f"nagjax: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:
            e = e if isinstance(e, Interrupted) else Interrupted()
            print(f"nagjax: {e}", file=sys.stderr, flush=True)
            return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
