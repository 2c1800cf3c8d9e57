"""BOSSA-mini: the paper's experiments at small scale (issue 11, item 5).

Sections (``--only`` picks some; all by default):

* ``classifier``: the rule-based style classifier (bossa_jax/data/style_classifier.py) checked on
  ground-truth corpus arrangements first (whole songs and 4-bar windows; the goal is >= 95%).
* ``retrieval``: paper Table 2 at mini scale: three stage-1 trainings of the same budget with the
  losses C (ITC), C+M (ITC + ITM) and C+M+G (all three; ``stage1.losses``), each evaluated by the
  project's retrieval evaluation (bossa_jax/train/evaluate.py: Acc@1, Acc@5, mean rank over
  ``--pairs`` held-out pairs, ``--rounds`` rounds, mean +- standard error). ``--stage1-runs``
  takes finished runs instead of training.
* ``style``: held-out lead sheets of the style corpus arranged with reference audio of every
  style (its own band rendering: paired; another held-out song's: unpaired) by
  :class:`bossa_jax.arrange.Arranger`; the result's style judged by the classifier; melody
  preservation and the chord-tone fraction of the accompaniment (bossa_jax/evaluate_style.py).
  Style accuracy counts the meter-compatible pairs (the arrangement keeps the lead sheet's meter:
  a 4/4 lead sheet cannot become a waltz, a 3/4 one only a waltz); chance there is 1 / 5 styles
  for 4/4 lead sheets. All pairs are reported too.
* ``control``: the same requests with the query outputs replaced by those of a silent clip (zero
  features) or shuffled across the batch (each song gets the queries of the song before it in its
  batch): if the audio steers, accuracy against the song's own reference falls towards chance
  (silent) or towards 0 while the arrangement follows the reference it was given (shuffled).
* ``real``: public-domain lead sheets and band recordings the corpus generator did not make
  (bench/assets/real, rendered with a soundfont the corpus does not use): melody preservation,
  chord-tone fraction, how often the texture follows the recording's (nearest corpus style, meter-
  compatible pairs), and how far apart arrangements of one lead sheet are for different
  recordings (same seed) compared with different seeds (same recording): 1 - Jaccard of the
  accompaniments' (bar, position, pitch) sets, and the L1 distance of the classifier's texture
  features.

Usage (from the repository root)::

    python bench/mini_eval.py                      # the demo model, a fresh corpus, full budget
    python bench/mini_eval.py --quick              # a couple of minutes: small corpus, tiny model
    python bench/mini_eval.py --checkpoint DIR --corpus CORPUS --stage1-steps 300
    python bench/mini_eval.py --stage1-runs C=RUN1 C+M=RUN2 C+M+G=RUN3 --only retrieval

Writes bench/results/mini_eval.json (``--out``) and prints a markdown table. ``--quick`` without
the demo model builds a random tiny stage-2 model: its figures only show that the code path runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "assets" / "real"))

import numpy as np  # noqa: E402

from bossa_jax import evaluate_style as es  # noqa: E402
from bossa_jax.data import style_classifier  # noqa: E402
from bossa_jax.data import style_corpus as corpus  # noqa: E402
from bossa_jax.errors import BossaError, DataError, run_cli  # noqa: E402

log = logging.getLogger("mini_eval")
RESULTS = ROOT / "bench" / "results"
DEMO_MODEL = ROOT / "bossa_jax" / "assets" / "demo_model"
MINI_CONFIG = ROOT / "configs" / "bossa_mini.yaml"
SECTIONS = ("classifier", "retrieval", "style", "control", "real")
ABLATIONS = {"C": ("itc",), "C+M": ("itc", "itm"), "C+M+G": ("itc", "itm", "itg")}
GOALS = {
    "classifier_accuracy": 0.95,
    "style_accuracy": 0.80,
    "melody_synthetic": 0.90,
    "melody_real": 0.80,
}
# kept by --update with the sections: what the arranging sections ran with, and their figures
# for the model alone when the config places the melody (arrange.melody_lock)
EXTRA_KEYS = ("model", "corpus", "melody_lock", "style_model_alone", "real_model_alone")
MEL_N = 64  # mel bands when a config without the mel front end is switched to it


@dataclasses.dataclass(frozen=True)
class Budget:
    corpus_songs: int
    corpus_bars: int
    stage1_steps: int | None  # None: the config's train.total_steps
    pairs: int
    rounds: int
    songs_per_style: int
    bars: int
    real_leadsheets: int
    real_recordings: int
    seeds: int
    max_new_tokens: int | None


# the corpus the BOSSA-mini recipe generates for seed 0 (bossa_jax/train/mini.py: 240 songs of 16
# bars): regenerated with the same settings it is the same corpus, so its test split is held out
FULL = Budget(240, 16, None, 128, 10, 2, 8, 6, 5, 2, None)
QUICK = Budget(36, 8, 8, 8, 2, 1, 4, 2, 3, 2, 48)


# --- helpers ------------------------------------------------------------------------------------
def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def with_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """``config`` with ``key=value`` overrides applied (checked like a loaded config)."""
    from bossa_jax.config import Config, build, parse_overrides

    result = build(Config, _merge(config.to_dict(), parse_overrides(overrides)))
    result.validate()
    return result


def mel_overrides(config: Any) -> list[str]:
    """Overrides switching a config to the mel front end (no MusicGen weights exist here)."""
    if config.audio.frontend == "mel":
        return []
    return [
        "audio.frontend=mel",
        f"audio.n_mels={MEL_N}",
        f"qformer.encoder_width={MEL_N}",
        "data.audio_input=features",
    ]


def mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def stopwatch() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: round(time.perf_counter() - start, 1)


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
    }


# --- corpus -------------------------------------------------------------------------------------
def ensure_corpus(path: Path | None, work: Path, budget: Budget, seed: int) -> Path:
    """The style corpus to evaluate on: ``path`` when given, else one generated in ``work``."""
    if path is not None:
        if not (path / "manifest.jsonl").is_file():
            raise DataError(f"--corpus {path}: no manifest.jsonl (python train.py make-corpus)")
        return path
    out = work / "corpus"
    if not (out / "manifest.jsonl").is_file():
        log.info("generating a corpus of %d songs in %s", budget.corpus_songs, out)
        corpus.make_corpus(
            out, songs=budget.corpus_songs, seed=seed, bars=budget.corpus_bars, overwrite=True
        )
    return out


def corpus_songs(root: Path, split: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    return [e for e in entries if e.get("split") == split and e.get("audio")]


# --- classifier ---------------------------------------------------------------------------------
def classifier_section(budget: Budget, seed: int) -> dict[str, Any]:
    report = style_classifier.check(max(12, budget.corpus_songs // 2), seed=seed + 1)
    return {
        name: {"accuracy": r["accuracy"], "items": r["items"], "confusion": r["confusion"].tolist()}
        for name, r in report.items()
    }


# --- retrieval ----------------------------------------------------------------------------------
def stage1_config(args: argparse.Namespace, corpus_dir: Path, work: Path, name: str) -> Any:
    from bossa_jax.config import load_config

    base = load_config(args.config)
    steps = args.stage1_steps or base.train.total_steps
    overrides = mel_overrides(base) + [
        "data.dataset=manifest",
        f"data.data_dir={corpus_dir / 'manifest.jsonl'}",
        "data.split_file=",
        f"data.feature_cache_dir={work / 'stage1-features'}",
        f"stage1.losses=[{', '.join(ABLATIONS[name])}]",
        f"train.out_dir={work / ('stage1-' + name)}",
        f"train.total_steps={steps}",
        "train.eval_every=0",
        f"train.checkpoint_every={steps}",
        f"train.log_every={max(1, steps // 4)}",
        f"train.seed={args.seed}",
        "data.random_musicgen=false",
    ]
    if base.train.optim.warmup_steps >= steps:
        overrides.append(f"train.optim.warmup_steps={max(1, steps // 10)}")
    return load_config(args.config, overrides + list(args.set))


def config_overrides(config: Any) -> list[str]:
    """The data settings of ``config`` as overrides (to read the same corpus with another run's
    config)."""
    cfg = config.data
    return [
        f"data.dataset={cfg.dataset}",
        f"data.data_dir={cfg.data_dir}",
        f"data.split_file={cfg.split_file}",
        f"data.feature_cache_dir={cfg.feature_cache_dir}",
    ]


def retrieval_section(args: argparse.Namespace, corpus_dir: Path, work: Path) -> dict[str, Any]:
    from bossa_jax.train import evaluate, stage1

    given = dict(item.split("=", 1) for item in args.stage1_runs)
    unknown = set(given) - set(ABLATIONS)
    if unknown:
        raise BossaError(f"--stage1-runs: unknown ablation(s) {sorted(unknown)}; use C, C+M, C+M+G")
    out: dict[str, Any] = {"ablations": {}}
    for name, losses in ABLATIONS.items():
        if name not in args.ablations:
            continue
        clock = stopwatch()
        config = stage1_config(args, corpus_dir, work, name)
        if name in given:  # the run's own config, reading this corpus
            from bossa_jax.config import load_config

            run_dir = Path(given[name])
            if not (run_dir / "config.yaml").is_file():
                raise BossaError(f"--stage1-runs {name}={run_dir}: no config.yaml in it")
            data_keys = [o for o in config_overrides(config) if o.startswith("data.")]
            config = load_config(run_dir / "config.yaml", data_keys)
        else:
            run_dir = Path(config.train.out_dir)
            log.info(
                "stage 1 %s (%s): %d steps -> %s",
                name,
                "+".join(losses),
                config.train.total_steps,
                run_dir,
            )
            result = stage1.run(config, overwrite=True)
            if result.exit_code != 0:
                raise BossaError(f"stage-1 training {name} stopped: {result.stopped_by}")
        train_seconds = clock()
        data = stage1.load_split(config, "test")
        pairs = min(args.pairs, len(data.usable))
        options = evaluate.RetrievalOptions(pairs, args.rounds, args.seed)
        model = evaluate.load_model(config, run_dir)
        report = evaluate.evaluate_retrieval(
            model,
            data,
            options,
            deperf=config.data.deperf,
            compute_dtype=config.train.compute_dtype,
        )
        out["pairs"], out["rounds"] = pairs, args.rounds
        out["chance_acc@1"] = 1.0 / pairs
        out["ablations"][name] = {
            "losses": list(losses),
            "run_dir": str(run_dir),
            "trained_here": name not in given,
            "steps": config.train.total_steps,
            **report["summary"],
            "train_seconds": train_seconds,
            "seconds": clock(),
        }
        log.info(
            "retrieval %s: acc@1 %.3f +- %.3f, mean rank %.1f (%d pairs)",
            name,
            report["summary"]["acc@1"]["mean"],
            report["summary"]["acc@1"]["stderr"],
            report["summary"]["mean_rank"]["mean"],
            pairs,
        )
    return out


# --- the arranger -------------------------------------------------------------------------------
def load_arranger(args: argparse.Namespace, budget: Budget, work: Path):
    """(Arranger, where its model came from): the checkpoint, or with ``--random-model`` (and in
    quick mode without the demo model) a random tiny mel-front-end model (smoke figures only)."""
    from bossa_jax.arrange import Arranger, read_run_config

    overrides = list(args.set)
    if budget.max_new_tokens is not None:
        overrides.append(f"arrange.max_new_tokens={budget.max_new_tokens}")
    checkpoint = Path(args.checkpoint) if args.checkpoint else DEMO_MODEL
    if args.random_model or (args.checkpoint is None and not checkpoint.is_dir() and args.quick):
        from flax import nnx

        from bossa_jax import sharding
        from bossa_jax.config import load_config
        from bossa_jax.models.arranger import Stage2Model

        base = load_config(args.random_model or "tiny")
        config = load_config(args.random_model or "tiny", mel_overrides(base) + overrides)
        log.warning(
            "random %s stage-2 model: the figures only show that the code runs", config.name
        )
        model = sharding.create_sharded(
            lambda: Stage2Model(config.qformer, config.musecoco, None, rngs=nnx.Rngs(args.seed))
        )
        return Arranger(model, config), f"random {config.name} model (smoke run)"
    if not checkpoint.is_dir():
        raise BossaError(
            f"--checkpoint {checkpoint}: not found (the demo model is made by `python train.py "
            "mini`; --quick runs a random tiny model)"
        )
    config = read_run_config(checkpoint)
    if overrides:
        config = with_overrides(config, overrides)
    return Arranger.from_checkpoint(checkpoint, config), str(checkpoint)


@contextlib.contextmanager
def model_alone(arranger: Any) -> Iterator[Any]:
    """The arranger with ``arrange.melody_lock`` off: every token drawn by the model."""
    saved = arranger.options
    arranger.options = dataclasses.replace(saved, melody_lock=False)
    try:
        yield arranger
    finally:
        arranger.options = saved


def arrangement_events(arrangement: Any) -> np.ndarray:
    """The arrangement's notes as the model wrote them (its REMI tokens decoded: bar 0 = the
    request's first bar)."""
    from bossa_jax.symbolic import remi

    return remi.decode(arrangement.tokens)[0]


def arrange_all(arranger: Any, requests: list, *, seed: int, prefix_fn=None) -> tuple[list, float]:
    clock = stopwatch()
    shown = [0.0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - shown[0] > 30 or done == total:
            shown[0] = time.perf_counter()
            log.info("  windows %d/%d", done, total)

    out = arranger(requests, seed=seed, progress=progress, prefix_fn=prefix_fn)
    return out, clock()


def judge(arrangement: Any, leadsheet_events: np.ndarray) -> dict[str, Any]:
    events = arrangement_events(arrangement)
    tones, counted = es.chord_tone_fraction(events, leadsheet_events)
    return {
        "predicted": style_classifier.classify(events, leadsheet_events),
        "melody_preservation": es.melody_preservation(events, leadsheet_events),
        "chord_tone_fraction": tones,
        "accompaniment_notes": counted,
        "notes": int(len(events)),
        "generated_tokens": int(arrangement.generated_tokens),
        "skipped_tokens": int(getattr(arrangement, "skipped_tokens", 0)),
    }


def summarize_items(items: list[dict[str, Any]], target: str = "reference_style") -> dict:
    """Style accuracy (meter-compatible items, and all), melody preservation, chord-tone
    fraction (pooled over notes) of judged items."""

    def accuracy(rows: list[dict]) -> float:
        return float(np.mean([r["predicted"] == r[target] for r in rows])) if rows else math.nan

    compatible = [r for r in items if r["meter_compatible"]]
    counted = sum(r["accompaniment_notes"] for r in items)
    pooled = sum(
        r["chord_tone_fraction"] * r["accompaniment_notes"]
        for r in items
        if r["accompaniment_notes"]
    )
    predicted = {}
    for r in items:
        predicted[r["predicted"]] = predicted.get(r["predicted"], 0) + 1
    return {
        "items": len(items),
        "style_accuracy": accuracy(compatible),
        "style_accuracy_items": len(compatible),
        "style_accuracy_all_pairs": accuracy(items),
        "melody_preservation": mean([r["melody_preservation"] for r in items]),
        "chord_tone_fraction": pooled / counted if counted else math.nan,
        "accompaniment_notes": counted,
        "predicted_styles": dict(sorted(predicted.items())),
    }


# --- style transfer -----------------------------------------------------------------------------
def meter_of(style: str) -> int:
    return corpus.BEATS_PER_BAR.get(style, 4)


def style_requests(corpus_dir: Path, budget: Budget) -> tuple[list, list[dict[str, Any]]]:
    """Every held-out lead sheet (up to ``songs_per_style`` per style) with reference audio of
    every style: its own (paired) and another held-out song's (unpaired)."""
    from bossa_jax.arrange import SongRequest
    from bossa_jax.symbolic.leadsheet import read_leadsheet

    held_out = corpus_songs(corpus_dir, "test")
    if len({e["style"] for e in held_out}) < len(corpus.STYLES):
        held_out += corpus_songs(corpus_dir, "validation")
    by_style: dict[str, list[dict]] = {}
    for entry in held_out:
        by_style.setdefault(entry["style"], []).append(entry)
    styles = [s for s in corpus.STYLES if s in by_style]
    if len(styles) < 2:
        raise DataError(f"{corpus_dir}: the held-out songs cover fewer than 2 styles: {styles}")
    requests, items = [], []
    for style in styles:
        for k, lead in enumerate(by_style[style][: budget.songs_per_style]):
            song = read_leadsheet(corpus_dir / lead["leadsheet"])
            bars = min(budget.bars, len(song.downbeat_times))
            cut = song.leadsheet.bars(0, bars).events
            for ref_style in styles:
                refs = by_style[ref_style]
                ref = lead if ref_style == style else refs[k % len(refs)]
                requests.append(
                    SongRequest(
                        f"{lead['id']}<-{ref['id']}",
                        song,
                        corpus_dir / ref["audio"],
                        bars=(0, bars),
                    )
                )
                items.append(
                    {
                        "leadsheet": lead["id"],
                        "leadsheet_style": style,
                        "reference": ref["id"],
                        "reference_style": ref_style,
                        "paired": ref is lead,
                        "meter_compatible": meter_of(style) == meter_of(ref_style),
                        "_leadsheet_events": cut,
                    }
                )
    return requests, items


def judged(arrangements: list, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for arrangement, item in zip(arrangements, items, strict=True):
        row = {k: v for k, v in item.items() if not k.startswith("_")}
        row.update(judge(arrangement, item["_leadsheet_events"]))
        out.append(row)
    return out


def style_section(arranger, requests, items, seed: int) -> tuple[dict[str, Any], list]:
    arrangements, seconds = arrange_all(arranger, requests, seed=seed)
    rows = judged(arrangements, items)
    labels = list(corpus.STYLES)
    compatible = [r for r in rows if r["meter_compatible"]]
    confusion = style_classifier.confusion_matrix(
        [r["reference_style"] for r in compatible], [r["predicted"] for r in compatible], labels
    )
    four_four = [s for s in labels if meter_of(s) == 4]
    return {
        "all": summarize_items(rows),
        "paired": summarize_items([r for r in rows if r["paired"]]),
        "unpaired": summarize_items([r for r in rows if not r["paired"]]),
        "chance": 1.0 / len(four_four),
        "confusion_labels": [*labels, "other"],
        "confusion": confusion.tolist(),
        "seconds": seconds,
        "windows_per_second": round(
            sum(len(a.windows) for a in arrangements) / max(seconds, 1e-9), 3
        ),
        "items": rows,
    }, arrangements


# --- controls -----------------------------------------------------------------------------------
def silent_prefix(arranger: Any) -> np.ndarray:
    """The projected query outputs (1, Q, d) of a silent clip: zero features, every step valid."""
    import jax.numpy as jnp

    from bossa_jax import audio

    steps = arranger.config.audio.clip_frames + audio.PATTERN_EXTRA
    width = arranger.model.cfg.encoder_width
    prefix = arranger.model.style_prefix(
        jnp.ones((1, steps), jnp.float32), features=jnp.zeros((1, steps, width), jnp.float32)
    )
    return np.asarray(prefix, np.float32)


def control_section(arranger, requests, items, seed: int) -> dict[str, Any]:
    silent = silent_prefix(arranger)
    batch_sizes: list[int] = []

    def silence(prefix: np.ndarray) -> np.ndarray:
        return np.broadcast_to(silent, prefix.shape).astype(prefix.dtype)

    def shuffle(prefix: np.ndarray) -> np.ndarray:
        batch_sizes.append(len(prefix))
        return np.roll(prefix, 1, axis=0)  # row i gets row i-1's queries (a derangement)

    out: dict[str, Any] = {}
    arrangements, seconds = arrange_all(arranger, requests, seed=seed, prefix_fn=silence)
    rows = judged(arrangements, items)
    out["silent"] = {**summarize_items(rows), "seconds": seconds}
    arrangements, seconds = arrange_all(arranger, requests, seed=seed, prefix_fn=shuffle)
    rows = judged(arrangements, items)
    # which request's queries each song got: the one before it in its batch of songs
    group = arranger.options.songs_per_batch
    source = []
    for j in range(len(rows)):
        start = j - j % group
        size = min(group, len(rows) - start)
        source.append(start + (j - start - 1) % size)
    complete = all(
        b in {min(group, len(rows) - s) for s in range(0, len(rows), group)} for b in batch_sizes
    )
    for j, row in enumerate(rows):
        donor = items[source[j]]
        row["queries_from_style"] = donor["reference_style"]
        row["queries_meter_compatible"] = meter_of(donor["reference_style"]) == meter_of(
            row["leadsheet_style"]
        )
    follows = [r for r in rows if r["queries_meter_compatible"]]
    out["shuffled"] = {
        **summarize_items(rows),
        "follows_given_queries": float(
            np.mean([r["predicted"] == r["queries_from_style"] for r in follows])
        )
        if follows and complete
        else math.nan,
        "follows_given_queries_items": len(follows),
        "every_batch_held_whole_groups": complete,
        "seconds": seconds,
    }
    return out


# --- real material ------------------------------------------------------------------------------
def real_section(arranger, budget: Budget, work: Path, seed: int) -> dict[str, Any]:
    import make_real

    from bossa_jax.arrange import SongRequest
    from bossa_jax.symbolic.leadsheet import read_leadsheet

    soundfont = make_real.soundfont()
    fallback = soundfont is None
    if fallback:
        soundfont = corpus.DEFAULT_SOUNDFONT
        log.warning("no other soundfont installed: recordings rendered with the corpus's own")
    audio = make_real.render_recordings(work / f"real-audio-{soundfont.stem}", soundfont)
    leads = list(make_real.LEADSHEETS)[: budget.real_leadsheets]
    recordings = list(make_real.RECORDINGS)[: budget.real_recordings]
    seeds = [seed + k for k in range(budget.seeds)]
    requests, items = [], []
    for name in leads:
        song = read_leadsheet(make_real.HERE / "leadsheets" / f"{name}.mid")
        bars = min(budget.bars, len(song.downbeat_times))
        beats = make_real.LEADSHEETS[name][2]
        for rec in recordings:
            requests.append(SongRequest(f"{name}<-{rec}", song, audio[rec], bars=(0, bars)))
            style = make_real.RECORDING_STYLE[rec]
            items.append(
                {
                    "leadsheet": name,
                    "recording": rec,
                    "reference_style": style,
                    "meter_compatible": beats == meter_of(style),
                    "_leadsheet_events": song.leadsheet.bars(0, bars).events,
                }
            )
    events: dict[int, list[np.ndarray]] = {}  # seed -> each request's arrangement
    rows = []
    clock = stopwatch()
    for s in seeds:
        arrangements, _ = arrange_all(arranger, requests, seed=s)
        events[s] = [arrangement_events(a) for a in arrangements]
        for row in judged(arrangements, items):
            rows.append({**row, "seed": s})
    distances: dict[str, Any] = {}
    for metric, fn in (("jaccard", es.accompaniment_distance), ("texture", es.style_distance)):
        between, within = [], []
        for name in leads:
            index = [j for j, it in enumerate(items) if it["leadsheet"] == name]
            lead = items[index[0]]["_leadsheet_events"]

            def dist(a, b, lead=lead, fn=fn):
                return fn(a, b, lead)

            for s in seeds:  # different recordings, same seed
                between.append(es.mean_pairwise([events[s][j] for j in index], dist))
            for j in index:  # same recording, different seeds
                within.append(es.mean_pairwise([events[s][j] for s in seeds], dist))
        b, w = mean(between), mean(within)
        distances[metric] = {
            "between_recordings": b,
            "between_seeds": w,
            "ratio": b / w if w else math.inf if b else math.nan,
        }
    summary = summarize_items(rows)
    return {
        "soundfont": str(soundfont),
        "soundfont_is_the_corpus_one": fallback,
        "leadsheets": leads,
        "recordings": recordings,
        "seeds": seeds,
        **summary,
        "style_follows_recording": summary["style_accuracy"],
        "distances": distances,
        "seconds": clock(),
        "items": rows,
    }


# --- report -------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, dict) and "mean" in value:
        return f"{value['mean']:.{digits}f} ± {value['stderr']:.{digits}f}"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def goal(value: float, target: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return "met" if value >= target else "missed"


def style_rows(v: dict[str, Any], tag: str, lock: bool) -> list[str]:
    """Melody preservation (a goal for the model alone; 1 by construction under the lock) and the
    chord-tone fraction of synthetic held-out arrangements."""
    target = "(placed by the lock)" if lock else ">= 0.90"
    verdict = "" if lock else goal(v["melody_preservation"], 0.9)
    return [
        f"| melody preservation, synthetic held-out{tag} | {fmt(v['melody_preservation'])} | "
        f"{target} | {verdict} |",
        f"| chord-tone fraction of the accompaniment, synthetic{tag} | "
        f"{fmt(v['chord_tone_fraction'])} | | |",
    ]


def real_rows(e: dict[str, Any], tag: str, lock: bool) -> list[str]:
    target = "(placed by the lock)" if lock else ">= 0.80"
    verdict = "" if lock else goal(e["melody_preservation"], 0.8)
    return [
        f"| real lead sheets: melody preservation{tag} | {fmt(e['melody_preservation'])} | "
        f"{target} | {verdict} |",
        f"| real: chord-tone fraction{tag} | {fmt(e['chord_tone_fraction'])} | | |",
    ]


def table(report: dict[str, Any]) -> str:
    rows = ["| figure | value | goal | |", "| --- | --- | --- | --- |"]
    c = report.get("classifier")
    if c:
        worst = min(r["accuracy"] for r in c.values())
        rows.append(
            f"| classifier on ground truth (worst of songs / windows, ± melody) | "
            f"{fmt(worst)} | >= 0.95 | {goal(worst, 0.95)} |"
        )
    r = report.get("retrieval")
    if r:
        for name, a in r["ablations"].items():
            rows.append(
                f"| retrieval {name}: Acc@1 / mean rank ({r['pairs']} pairs, "
                f"{r['rounds']} rounds, {a['steps']} steps) | {fmt(a['acc@1'])} / "
                f"{fmt(a['mean_rank'], 1)} | >> {fmt(r['chance_acc@1'])} | |"
            )
        full, c_only = r["ablations"].get("C+M+G"), r["ablations"].get("C")
        if full and c_only:
            ok = full["acc@1"]["mean"] >= c_only["acc@1"]["mean"]
            rows.append(
                f"| C+M+G not worse than C (Acc@1) | {fmt(full['acc@1']['mean'])} vs "
                f"{fmt(c_only['acc@1']['mean'])} | | {'met' if ok else 'missed'} |"
            )
    lock = bool(report.get("melody_lock"))
    tag = ", melody lock" if lock else ""
    s = report.get("style")
    if s:
        for part in ("paired", "unpaired", "all"):
            v = s[part]
            rows.append(
                f"| style accuracy{tag}, {part} (meter-compatible, n="
                f"{v['style_accuracy_items']}) | {fmt(v['style_accuracy'])} | >= 0.80 (chance "
                f"{fmt(s['chance'])}) | {goal(v['style_accuracy'], 0.8)} |"
            )
        rows += style_rows(s["all"], tag, lock)
    s = report.get("style_model_alone")
    if s:
        v = s["all"]
        rows.append(
            f"| style accuracy, model alone, all (meter-compatible, n="
            f"{v['style_accuracy_items']}) | {fmt(v['style_accuracy'])} | >= 0.80 | "
            f"{goal(v['style_accuracy'], 0.8)} |"
        )
        rows += style_rows(v, ", model alone", False)
    k = report.get("control")
    if k:
        rows.append(
            f"| control, silent queries: style accuracy{tag} | "
            f"{fmt(k['silent']['style_accuracy'])} | falls towards chance | |"
        )
        rows.append(
            f"| control, shuffled queries{tag}: accuracy vs own / vs given reference | "
            f"{fmt(k['shuffled']['style_accuracy'])} / "
            f"{fmt(k['shuffled']['follows_given_queries'])} | falls / stays | |"
        )
    e = report.get("real")
    if e:
        rows += real_rows(e, tag, lock)
        rows.append(
            f"| real: texture follows the recording{tag} (meter-compatible, n="
            f"{e['style_accuracy_items']}) | {fmt(e['style_follows_recording'])} | | |"
        )
        for metric, d in e["distances"].items():
            rows.append(
                f"| real: {metric} distance between recordings / between seeds{tag} | "
                f"{fmt(d['between_recordings'])} / {fmt(d['between_seeds'])} "
                f"(ratio {fmt(d['ratio'], 2)}) | ratio > 1 | |"
            )
    e = report.get("real_model_alone")
    if e:
        rows += real_rows(e, ", model alone", False)
    return "\n".join(rows)


def clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities as null, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv: Sequence[str]) -> int:
    from bossa_jax.cli import ArgumentParser
    from bossa_jax.outputs import atomic_output, check_output

    parser = ArgumentParser(prog="python bench/mini_eval.py", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help=f"stage-2 checkpoint (default {DEMO_MODEL})")
    parser.add_argument(
        "--random-model",
        metavar="CONFIG",
        help="arrange with a random stage-2 model of CONFIG (smoke runs)",
    )
    parser.add_argument(
        "--config",
        help="stage-1 config of the ablations (default "
        "configs/bossa_mini.yaml, or tiny with --quick)",
    )
    parser.add_argument("--corpus", type=Path, help="style corpus folder (default: generate one)")
    parser.add_argument("--work", type=Path, help="work folder (default runs/mini_eval[-quick])")
    parser.add_argument("--quick", action="store_true", help="a couple of minutes, tiny budget")
    parser.add_argument("--stage1-steps", type=int, help="steps of each stage-1 ablation")
    parser.add_argument(
        "--stage1-runs",
        nargs="*",
        default=[],
        metavar="NAME=RUN_DIR",
        help="finished stage-1 runs to evaluate instead of training",
    )
    parser.add_argument(
        "--ablations",
        nargs="+",
        choices=list(ABLATIONS),
        default=list(ABLATIONS),
        help="which stage-1 ablations to train / evaluate (all three)",
    )
    parser.add_argument("--pairs", type=int, help="retrieval pairs per round (128)")
    parser.add_argument("--rounds", type=int, help="retrieval rounds (10)")
    parser.add_argument("--songs-per-style", type=int, help="held-out lead sheets per style")
    parser.add_argument("--bars", type=int, help="bars arranged per song")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--note", help="a line saved in the report (e.g. where the model came from)"
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for the ablations and the arranger",
    )
    parser.add_argument("--out", type=Path, help="JSON report (bench/results/mini_eval.json)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the sections of an existing report that this run does not redo",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    budget = QUICK if args.quick else FULL
    budget = dataclasses.replace(
        budget,
        **{
            k: v
            for k, v in (
                ("stage1_steps", args.stage1_steps),
                ("pairs", args.pairs),
                ("rounds", args.rounds),
                ("songs_per_style", args.songs_per_style),
                ("bars", args.bars),
            )
            if v is not None
        },
    )
    for name in ("stage1_steps", "pairs", "rounds", "songs_per_style", "bars"):
        if getattr(budget, name) is not None and getattr(budget, name) < 1:
            raise BossaError(f"--{name.replace('_', '-')} must be at least 1")
    args.stage1_steps, args.pairs, args.rounds = budget.stage1_steps, budget.pairs, budget.rounds
    if args.config is None:
        args.config = str(MINI_CONFIG) if MINI_CONFIG.is_file() and not args.quick else "tiny"
    suffix = "_quick" if args.quick else ""
    out = args.out or RESULTS / f"mini_eval{suffix}.json"
    check_output(out, "benchmark report", folder=False, overwrite=True)
    work = args.work or ROOT / "runs" / f"mini_eval{suffix.replace('_', '-')}"
    work.mkdir(parents=True, exist_ok=True)

    clock = stopwatch()
    report: dict[str, Any] = {
        "command": " ".join(["python bench/mini_eval.py", *argv]),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": machine(),
        "budget": dataclasses.asdict(budget),
        "seed": args.seed,
        "goals": GOALS,
        **({"note": args.note} if args.note else {}),
    }
    seconds: dict[str, float] = {}
    corpus_dir = None
    if {"retrieval", "style", "control"} & set(args.only):
        section = stopwatch()
        corpus_dir = ensure_corpus(args.corpus, work, budget, args.seed)
        report["corpus"] = str(corpus_dir)
        seconds["corpus"] = section()
    if "classifier" in args.only:
        section = stopwatch()
        report["classifier"] = classifier_section(budget, args.seed)
        seconds["classifier"] = section()
        log.info(
            "classifier on ground truth: %s",
            {k: round(v["accuracy"], 3) for k, v in report["classifier"].items()},
        )
    if "retrieval" in args.only:
        section = stopwatch()
        report["retrieval"] = retrieval_section(args, corpus_dir, work)
        report["retrieval"]["config"] = args.config
        seconds["retrieval"] = section()
    if {"style", "control", "real"} & set(args.only):
        section = stopwatch()
        arranger, source = load_arranger(args, budget, work)
        report["model"] = source
        report["melody_lock"] = arranger.options.melody_lock
        seconds["load_model"] = section()
        if {"style", "control"} & set(args.only):
            requests, items = style_requests(corpus_dir, budget)
            if "style" in args.only:
                section = stopwatch()
                report["style"], _ = style_section(arranger, requests, items, args.seed)
                seconds["style"] = section()
                log.info("style accuracy %s", fmt(report["style"]["all"]["style_accuracy"]))
                if report["melody_lock"]:
                    section = stopwatch()
                    with model_alone(arranger):
                        report["style_model_alone"], _ = style_section(
                            arranger, requests, items, args.seed
                        )
                    seconds["style_model_alone"] = section()
            if "control" in args.only:
                section = stopwatch()
                report["control"] = control_section(arranger, requests, items, args.seed)
                seconds["control"] = section()
        if "real" in args.only:
            section = stopwatch()
            report["real"] = real_section(arranger, budget, work, args.seed)
            seconds["real"] = section()
            if report["melody_lock"]:
                section = stopwatch()
                with model_alone(arranger):
                    report["real_model_alone"] = real_section(arranger, budget, work, args.seed)
                seconds["real_model_alone"] = section()
    seconds["total"] = clock()
    report["seconds"] = seconds
    if args.update and out.is_file():  # earlier runs' sections, with their own settings
        previous = json.loads(out.read_text())
        kept = {k: previous[k] for k in (*SECTIONS, *EXTRA_KEYS) if k in previous}
        if "retrieval" in kept and "retrieval" in report:  # ablations not redone are kept
            done = report["retrieval"]["ablations"]
            earlier = kept["retrieval"]["ablations"]
            merged = {
                n: done.get(n) or earlier.get(n) for n in ABLATIONS if n in done or n in earlier
            }
            report["retrieval"]["ablations"] = merged
        kept = {k: v for k, v in kept.items() if k not in report}
        report = {**kept, **report}
        report["earlier_runs"] = [
            *previous.get("earlier_runs", []),
            {
                k: previous.get(k)
                for k in ("command", "started_utc", "machine", "budget", "seconds")
            },
        ]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in load] if load else None
    report["table"] = table(report)
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(clean(report), indent=1) + "\n")
    print(report["table"])
    print(f"\nwrote {out} in {seconds['total']:.0f} s (machine: {report['machine']})")
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
