"""Train BOSSA (thin entry point; the work is in bossa_jax.train).

    train.py stage1 --config FILE [key=value ...] [--resume | --overwrite] [--synthetic N]
                    [--coordinator HOST:PORT --num-processes N --process-id I]
    train.py eval-retrieval --config FILE --checkpoint DIR [--pairs 128] [--rounds 10]
                    [--seed 0] [--augment] [--out report.json] [--overwrite] [key=value ...]
    train.py export RUN_DIR OUT [--overwrite]   (a stage-1 run -> what stage1.init_from reads)
    train.py stage2 --config FILE [key=value ...] [--resume | --overwrite]
                    [--coordinator HOST:PORT --num-processes N --process-id I]
    train.py make-corpus --out DIR [--songs 120] [--seed 0] [--bars 16] [--styles S ...]
                    [--no-audio] [--soundfont FILE] [--overwrite]
    train.py mini --out DIR [--seed 0] [--config configs/bossa_mini.yaml] [--corpus DIR]
                    [--songs 240] [--bars 16] [--resume | --overwrite] [key=value ...]

``stage1`` runs the stage-1 loop (bossa_jax.train.stage1 on bossa_jax.train.loop): metrics every
``train.log_every`` steps to the console, ``<out_dir>/metrics.jsonl`` and TensorBoard; validation
every ``train.eval_every`` steps; orbax checkpoints in ``<out_dir>/checkpoints``; SIGTERM/SIGINT
write a checkpoint and exit (0 / 130). An ``out_dir`` that already holds checkpoints needs
``--resume`` (continue from the newest intact checkpoint; a damaged newer one is moved aside) or
``--overwrite`` (remove the old run's checkpoints, config.yaml, metrics.jsonl and tb/, nothing
else).
``--synthetic N`` generates a corpus of N songs into ``<out_dir>/synthetic-data`` and trains on it
(a CPU smoke run: ``train.py stage1 --config configs/tiny.yaml --synthetic 8``).

``stage2`` runs stage-2 training (bossa_jax.train.stage2) on the same loop with ``stage2.train``
(batch 32, clipping 1.0), from ``stage2.init_from`` (a stage-1 checkpoint) and
``stage2.musecoco_checkpoint``; without them the weights are random (a CPU smoke run:
``train.py stage2 --config configs/tiny.yaml``).

``make-corpus`` writes the synthetic style corpus (bossa_jax.data.style_corpus): lead sheets,
piano arrangements in six accompaniment styles, band renderings (FluidSynth), a JSONL manifest with
a style label per song and a held-out split.

``mini`` runs the whole BOSSA-mini recipe (bossa_jax.train.mini): make-corpus (unless ``--corpus``
is given) -> stage 0 (pre-train the small symbolic LM, bossa_jax.train.lm) -> stage 1 -> stage 2,
all with ``configs/bossa_mini.yaml``'s sizes and every path under ``--out``; the final stage-2
checkpoint (with its config) is ``<out>/model``, per-stage times and losses ``<out>/recipe.json``.

``eval-retrieval`` ranks the symbolic candidates of N test pairs for each audio clip, R rounds
(paper Appendix D; bossa_jax.train.evaluate) and writes a JSON report. The model is built exactly
as the run trained it (the frozen MusicGen from its config, the trainable weights from its latest
checkpoint).

``export`` writes the model of a finished or interrupted stage-1 run (its latest checkpoint's
trainable weights and the frozen MusicGen it trained with) as a stage-1 checkpoint, the format
``stage1.init_from`` and ``convert.bossa`` use; the run's own ``config.yaml`` rebuilds the model.

Every bad input (unknown config key, a mesh that does not divide the batch, a missing data folder)
is one line on stderr and a non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bossa_jax.cli import ArgumentParser as _Parser
from bossa_jax.cli import add_output_options
from bossa_jax.errors import BossaError, run_cli

COMMANDS = ("stage1", "eval-retrieval", "export", "stage2", "make-corpus", "mini")


def _parser(command: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"train.py {command}")
    if command == "stage1":
        parser.add_argument("--config", required=True, help="YAML config (e.g. configs/tiny.yaml)")
        parser.add_argument(
            "--resume", action="store_true", help="continue from the newest intact checkpoint"
        )
        parser.add_argument(
            "--overwrite", action="store_true", help="replace the run already in train.out_dir"
        )
        parser.add_argument(
            "--synthetic", type=int, metavar="N", help="generate and train on N synthetic songs"
        )
        parser.add_argument("--coordinator", help="multi-host: coordinator HOST:PORT")
        parser.add_argument("--num-processes", type=int, help="multi-host: number of processes")
        parser.add_argument("--process-id", type=int, help="multi-host: this process's index")
    elif command == "stage2":
        parser.add_argument("--config", required=True, help="YAML config (e.g. configs/tiny.yaml)")
        parser.add_argument(
            "--resume", action="store_true", help="continue from the newest intact checkpoint"
        )
        parser.add_argument(
            "--overwrite", action="store_true", help="replace the run already in train.out_dir"
        )
        for flag in ("--coordinator", "--num-processes", "--process-id"):  # multi-host
            parser.add_argument(flag, type=str if flag == "--coordinator" else int)
    elif command == "eval-retrieval":
        parser.add_argument("--config", required=True)
        parser.add_argument("--checkpoint", required=True, help="training run folder or model")
        parser.add_argument("--pairs", type=int, default=128)
        parser.add_argument("--rounds", type=int, default=10)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--augment", action="store_true", help="transpose the symbolic side")
        parser.add_argument("--out", default="retrieval_report.json")
        add_output_options(parser)
    elif command == "export":
        parser.add_argument("run_dir", help="stage-1 training run folder (train.out_dir)")
        parser.add_argument("out", help="folder for the stage-1 checkpoint")
        parser.add_argument("--config", help="config to rebuild the model (default: the run's)")
        add_output_options(parser)
    elif command == "mini":
        parser.add_argument("--out", required=True, help="folder for the whole recipe's outputs")
        parser.add_argument("--seed", type=int, default=0, help="seed of the corpus and stages")
        parser.add_argument("--config", default="bossa_mini", help="default: bossa_mini.yaml")
        parser.add_argument("--corpus", help="an existing style corpus (default: generate one)")
        parser.add_argument("--songs", type=int, default=240, help="songs of the new corpus")
        parser.add_argument("--bars", type=int, default=16, help="bars per song of the corpus")
        parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
        parser.add_argument(
            "--overwrite", action="store_true", help="replace a previous BOSSA-mini run in --out"
        )
    elif command == "make-corpus":
        from bossa_jax.data import style_corpus

        parser.add_argument("--out", required=True, help="corpus folder to create")
        parser.add_argument("--songs", type=int, default=120)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--bars", type=int, default=16, help="bars per song")
        parser.add_argument("--styles", nargs="+", default=list(style_corpus.STYLES))
        parser.add_argument("--no-audio", action="store_true", help="skip the band rendering")
        parser.add_argument("--soundfont", default=str(style_corpus.DEFAULT_SOUNDFONT))
        add_output_options(parser)
        return parser
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def make_corpus_main(args: argparse.Namespace) -> int:
    from bossa_jax.data import style_corpus

    manifest = style_corpus.make_corpus(
        args.out, songs=args.songs, seed=args.seed, styles=args.styles, bars=args.bars,
        audio=not args.no_audio, soundfont=args.soundfont, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"make-corpus: wrote {args.songs} songs, manifest {manifest}", flush=True)
    return 0


def mini_main(args: argparse.Namespace) -> int:
    from bossa_jax.train import mini

    if args.songs < 1 or args.bars < 1:
        raise BossaError(f"--songs and --bars must be positive, got {args.songs}, {args.bars}")
    options = mini.RecipeOptions(
        seed=args.seed, corpus=args.corpus, songs=args.songs, bars=args.bars
    )
    result = mini.run(
        args.config, args.out, options, overrides=args.overrides,
        resume=args.resume, overwrite=args.overwrite,
    )  # fmt: skip
    if result.model is None:
        print(f"mini: stopped in {result.stopped_in}; continue with --resume", flush=True)
    else:
        print(json.dumps({"model": str(result.model)}), flush=True)
    return result.exit_code


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "synthetic", None) is not None:
        if args.synthetic < 1:
            raise BossaError(
                f"--synthetic must be a positive number of songs, got {args.synthetic}"
            )
        from bossa_jax.config import load_config

        out_dir = load_config(args.config, overrides).train.out_dir
        overrides += [
            "stage1.dataset=synthetic",
            f"stage1.synthetic_songs={args.synthetic}",
            f"stage1.data_dir={out_dir}/synthetic-data",
        ]
    return overrides


def stage1_main(args: argparse.Namespace) -> int:
    from bossa_jax.sharding import init_distributed

    init_distributed(args.coordinator, args.num_processes, args.process_id)
    from bossa_jax.config import load_config
    from bossa_jax.train import stage1

    config = load_config(args.config, _overrides(args))
    result = stage1.run(config, resume=args.resume, overwrite=args.overwrite)
    print(f"stage1: stopped_by={result.stopped_by} step={result.step}", flush=True)
    return result.exit_code


def stage2_main(args: argparse.Namespace) -> int:
    from bossa_jax.sharding import init_distributed

    init_distributed(args.coordinator, args.num_processes, args.process_id)
    from bossa_jax.config import load_config
    from bossa_jax.train import stage2

    result = stage2.run(
        load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite
    )
    print(f"stage2: stopped_by={result.stopped_by} step={result.step}", flush=True)
    return result.exit_code


def eval_main(args: argparse.Namespace) -> int:
    from bossa_jax.config import load_config
    from bossa_jax.outputs import check_output
    from bossa_jax.train import evaluate, stage1

    kind = "retrieval report"
    check_output(args.out, kind, folder=False, overwrite=args.overwrite, sources=[args.config])
    config = load_config(args.config, _overrides(args))
    options = evaluate.RetrievalOptions(args.pairs, args.rounds, args.seed, args.augment)
    data = stage1.load_split(config, "test")
    model = evaluate.load_model(config, args.checkpoint)
    report = evaluate.evaluate_retrieval(
        model, data, options, deperf=config.stage1.deperf, compute_dtype=config.train.compute_dtype
    )
    report["checkpoint"] = str(args.checkpoint)
    report["config"] = config.to_dict()
    evaluate.write_report(report, args.out)
    print(json.dumps({"out": args.out, **report["summary"]}), flush=True)
    return 0


def export_main(args: argparse.Namespace) -> int:
    from bossa_jax.config import load_config
    from bossa_jax.train import stage1

    config_file = args.config or str(Path(args.run_dir) / "config.yaml")
    if not Path(config_file).is_file():
        raise BossaError(f"{args.run_dir}: no config.yaml in it; give the run's --config")
    config = load_config(config_file, list(args.overrides))
    out = stage1.export(config, args.run_dir, args.out, overwrite=args.overwrite)
    print(json.dumps({"out": str(out)}), flush=True)
    return 0


def main(argv: Sequence[str]) -> int:
    # tensorboardX imports torch when it is installed (seconds); training never needs it
    sys.modules.setdefault("torch", None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax"):  # backend probing (e.g. "no libtpu") is not the user's business
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = list(argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__)
            return 0
        raise BossaError(f"train.py: give a command: {', '.join(COMMANDS)} (see --help)")
    command = argv[0]
    args = _parser(command).parse_intermixed_args(argv[1:])
    args.command = command
    if args.command == "stage2":
        return stage2_main(args)
    if args.command == "stage1":
        return stage1_main(args)
    if args.command == "export":
        return export_main(args)
    if args.command == "make-corpus":
        return make_corpus_main(args)
    if args.command == "mini":
        return mini_main(args)
    return eval_main(args)


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
