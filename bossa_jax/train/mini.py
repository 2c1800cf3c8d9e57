"""The BOSSA-mini recipe (issue 11, item 3): ``python train.py mini --out DIR [--seed N]``.

Every stage runs through the same code as the paper model, with ``configs/bossa_mini.yaml``'s sizes:

0. a style corpus (:func:`bossa_jax.data.style_corpus.make_corpus`), unless one is given;
1. stage 0 (:mod:`bossa_jax.train.lm`): pre-train the small MuseCoco-architecture LM on the
   corpus's stage-2 sequences, then export it (it is frozen from here on);
2. stage 1 (:mod:`bossa_jax.train.stage1`): ITC + ITM + ITG with a random-init Q-Former on the
   frozen log-mel front end, then export it (``train.py export``'s :func:`stage1.export`);
3. stage 2 (:mod:`bossa_jax.train.stage2`): the query-only Q-Former from the stage-1 export, the
   projection and LoRA on the frozen stage-0 LM;
4. the final stage-2 model at ``DIR/model``: ``save_stage2``'s checkpoint plus the run's whole
   config as ``run_config.yaml`` (the layout ``bossa_jax.arrange.Arranger.from_checkpoint``
   reads), so the audio front end and the sequence settings travel with it.

Folder ``DIR``::

    corpus/          the generated style corpus (absent with --corpus)
    features/        the log-mel feature caches of the train and validation splits
    stage0/ stage1/ stage2/   training runs (metrics.jsonl, tb/, checkpoints/, config.yaml)
    stage0-lm/       the frozen LM (MuseCoco checkpoint)
    stage1-model/    the stage-1 model (stage-1 checkpoint)
    model/           the final stage-2 checkpoint
    config.yaml      the resolved config of the recipe
    recipe.json      per stage: wall time, load average, last training metrics

Refusal and restart: ``DIR`` must be new or empty; ``--resume`` continues an interrupted recipe
(finished stages are kept, an interrupted training run resumes from its last checkpoint) and
``--overwrite`` replaces a previous BOSSA-mini folder (only one this command wrote).
Reproducible for a seed: the corpus, every stage's initialisation, data order and dropout draw from
``--seed``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bossa_jax import sharding
from bossa_jax.config import Config, load_config
from bossa_jax.errors import BossaError, OutputError
from bossa_jax.outputs import MARKER, check_location, read_marker

log = logging.getLogger("bossa_jax.train")

OUTPUT_KIND = "BOSSA-mini run"
DEFAULT_CONFIG = "bossa_mini"
RECIPE_FILE = "recipe.json"
CORPUS, FEATURES = "corpus", "features"
STAGE0, STAGE1, STAGE2 = "stage0", "stage1", "stage2"
LM_EXPORT, STAGE1_EXPORT, MODEL = "stage0-lm", "stage1-model", "model"
RUN_CONFIG_FILE = "run_config.yaml"  # = bossa_jax.arrange.RUN_CONFIG_FILE: the full Config


@dataclasses.dataclass(frozen=True)
class RecipeOptions:
    """What ``train.py mini`` takes besides the config: the corpus (an existing folder, or the
    size of the one to generate) and the seed of everything."""

    seed: int = 0
    corpus: str | None = None
    songs: int = 240
    bars: int = 16


def recipe_config(
    config: str | Path, out: str | Path, options: RecipeOptions, overrides: Sequence[str] = ()
) -> tuple[Config, Path]:
    """(the config file with the user's ``overrides``, then every path under ``out`` and every
    seed set to ``options.seed``; the corpus folder)."""
    out = Path(out)
    corpus = Path(options.corpus) if options.corpus else out / CORPUS
    recipe = [
        "stage1.dataset=manifest",
        f"stage1.data_dir={corpus / 'manifest.jsonl'}",
        f"stage1.split_file={corpus / 'split.json'}",
        f"stage1.feature_cache_dir={out / FEATURES}",
        f"train.out_dir={out / STAGE1}",
        f"stage0.train.out_dir={out / STAGE0}",
        f"stage2.train.out_dir={out / STAGE2}",
        f"stage2.init_from={out / STAGE1_EXPORT}",
        f"stage2.musecoco_checkpoint={out / LM_EXPORT}",
        f"train.seed={options.seed}",
        f"stage0.train.seed={options.seed}",
        f"stage2.train.seed={options.seed}",
    ]
    return load_config(config, [*overrides, *recipe]), corpus


def prepare_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses to clobber (see the module docstring); creates ``out`` with its marker."""
    if resume and overwrite:
        raise BossaError("--resume and --overwrite exclude each other: give one")
    check_location(out, OUTPUT_KIND, folder=True)
    if out.is_dir() and os.listdir(out):
        marker = read_marker(out)
        ours = marker is not None and marker.get("kind") == OUTPUT_KIND
        if not ours:
            raise OutputError(f"{out}: exists and is not a BOSSA-mini run folder; give a new --out")
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise OutputError(
                f"{out}: holds a BOSSA-mini run; pass --resume to continue it or --overwrite "
                "to replace it"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"kind": OUTPUT_KIND, "files": []}) + "\n")


class _Record:
    """recipe.json: per stage wall time, load average and final metrics (rewritten atomically)."""

    def __init__(self, out: Path, resume: bool):
        self.path = out / RECIPE_FILE
        self.data: dict[str, Any] = {}
        if resume and self.path.is_file():
            self.data = json.loads(self.path.read_text())
        self.data.setdefault("stages", {})

    def stage(self, name: str, seconds: float, metrics: dict[str, Any] | None = None) -> None:
        self.data["stages"][name] = {
            "seconds": round(seconds, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            **({"final_metrics": metrics} if metrics is not None else {}),
        }
        self.save()

    def save(self) -> None:
        from bossa_jax.outputs import atomic_output

        with atomic_output(self.path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=1) + "\n")


def _eval_metrics(run_dir: Path) -> dict[str, float]:
    """The last eval record of a run's metrics.jsonl (empty when it never evaluated)."""
    path = run_dir / "metrics.jsonl"
    last: dict[str, float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("split") == "eval":
                last = {k: v for k, v in record.items() if k != "split"}
    return last


def _train_stage(name: str, run_fn: Any, config: Config, run_dir: Path, resume: bool) -> Any:
    """Runs one training stage; a run interrupted by a signal stops the recipe (exit code kept)."""
    from bossa_jax.train import loop

    resume_run = resume and bool(loop.checkpoint_steps(run_dir))
    overwrite_run = resume and not resume_run and run_dir.exists()
    log.info("BOSSA-mini: %s -> %s", name, run_dir)
    result = run_fn(config, resume=resume_run, overwrite=overwrite_run)
    if result.stopped_by != "done":
        raise _Stopped(name, result.exit_code)
    return result


class _Stopped(Exception):
    def __init__(self, stage: str, exit_code: int):
        super().__init__(f"{stage} stopped by a signal")
        self.stage, self.exit_code = stage, exit_code


def export_stage2(config: Config, run_dir: Path, out: Path) -> Path:
    """The stage-2 model of the run in ``run_dir`` (the latest checkpoint's trainable weights on
    the model :func:`stage2.build_model` makes, so with the frozen LM the run trained with) as a
    stage-2 checkpoint at ``out``, with ``config`` stored beside the model's own sections."""
    import jax.numpy as jnp

    from bossa_jax.models.arranger import CHECKPOINT_KIND, save_stage2
    from bossa_jax.outputs import atomic_output
    from bossa_jax.train import lm, stage2
    from bossa_jax.train.optim import make_optimizer
    from bossa_jax.train.step import build_program

    train_cfg = config.stage2.train
    mesh = sharding.make_mesh(config.mesh)
    with sharding.use_mesh(mesh, sharding.rules_of(config.mesh)):
        program = build_program(
            stage2.build_model(config),
            stage2.trainable(config.stage2),
            stage2.make_loss_fn(config.stage2),
            make_optimizer(train_cfg.optim, train_cfg.total_steps),
            mesh,
            compute_dtype=jnp.dtype(train_cfg.compute_dtype),
        )
        model = lm.restore_latest(program, run_dir)
        # the layout bossa_jax.arrange.Arranger.from_checkpoint reads (its save_arranger)
        with atomic_output(out, kind=CHECKPOINT_KIND) as tmp:
            save_stage2(tmp, model)
            (tmp / RUN_CONFIG_FILE).write_text(config.to_yaml())
    return out


@dataclasses.dataclass
class RecipeResult:
    """How the recipe ended: ``model`` is None when a signal stopped a stage (``exit_code`` is
    then the training loop's: 0 after SIGTERM, 130 after SIGINT)."""

    model: Path | None
    exit_code: int
    stopped_in: str | None = None


def run(
    config: str | Path,
    out: str | Path,
    options: RecipeOptions = RecipeOptions(),
    *,
    overrides: Sequence[str] = (),
    resume: bool = False,
    overwrite: bool = False,
) -> RecipeResult:
    """The whole recipe (see the module docstring)."""
    from bossa_jax.data import style_corpus
    from bossa_jax.outputs import atomic_output
    from bossa_jax.train import lm, stage1, stage2

    out = Path(out)
    config, corpus = recipe_config(config, out, options, overrides)
    if options.corpus and not (corpus / "manifest.jsonl").is_file():
        raise BossaError(f"--corpus {corpus}: no manifest.jsonl in it (make one with make-corpus)")
    prepare_out(out, resume=resume, overwrite=overwrite)
    with atomic_output(out / "config.yaml") as tmp:
        tmp.write_text(config.to_yaml())
    record = _Record(out, resume)
    record.data["options"] = dataclasses.asdict(options)
    record.data["config"] = str(out / "config.yaml")
    record.save()
    start = time.perf_counter()

    if not options.corpus and not (corpus / "manifest.jsonl").is_file():
        t = time.perf_counter()
        style_corpus.make_corpus(
            corpus, songs=options.songs, seed=options.seed, bars=options.bars, overwrite=resume
        )
        record.stage("corpus", time.perf_counter() - t)

    stages = (
        (STAGE0, lm.run, config.stage0.train.out_dir, LM_EXPORT, lm.export),
        (STAGE1, stage1.run, config.train.out_dir, STAGE1_EXPORT, stage1.export),
        (STAGE2, stage2.run, config.stage2.train.out_dir, MODEL, export_stage2),
    )
    try:
        for name, run_fn, run_dir, export_name, export_fn in stages:
            target = out / export_name
            if (target / MARKER).is_file():
                log.info("BOSSA-mini: %s already done (%s)", name, target)
                continue
            t = time.perf_counter()
            result = _train_stage(name, run_fn, config, Path(run_dir), resume)
            train_seconds = time.perf_counter() - t
            if name == STAGE2:
                export_fn(config, Path(run_dir), target)
            else:
                export_fn(config, Path(run_dir), target, overwrite=resume)
            metrics = {"train": result.last_metrics, "eval": _eval_metrics(Path(run_dir))}
            record.stage(name, time.perf_counter() - t, metrics)
            log.info("BOSSA-mini: %s done in %.0f s (training %.0f s)", name,
                     time.perf_counter() - t, train_seconds)  # fmt: skip
    except _Stopped as stop:
        record.data["stopped"] = stop.stage
        record.save()
        return RecipeResult(None, stop.exit_code, stop.stage)
    record.data["total_seconds"] = round(time.perf_counter() - start, 1)
    record.data["model"] = str(out / MODEL)
    record.data["model_bytes"] = model_size_bytes(out / MODEL)
    record.save()
    return RecipeResult(out / MODEL, 0)


def model_size_bytes(path: str | Path) -> int:
    """Bytes on disk of a checkpoint folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def load_run_config(model: str | Path) -> Config:
    """The full config stored with a model written by :func:`export_stage2`."""
    path = Path(model) / RUN_CONFIG_FILE
    if not path.is_file():
        raise BossaError(f"{model}: no {RUN_CONFIG_FILE} in it (not a BOSSA-mini model)")
    return load_config(path)


__all__: Sequence[str] = (
    "RecipeOptions",
    "RecipeResult",
    "export_stage2",
    "load_run_config",
    "model_size_bytes",
    "recipe_config",
    "run",
)
