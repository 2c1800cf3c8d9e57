"""Does a BOSSA-mini model carry the style of the reference audio? (issue 11, item 4 check)

    python bench/demo_style_check.py --model DIR --corpus CORPUS [--songs-per-style 2]
        [--windows 1] [--seed 0] [--out bench/results/demo_style_check.json]

For held-out (test split) songs of the corpus, the first ``--windows`` 4-bar lead-sheet windows are
arranged with the stage-2 model (its projected query outputs in front of the SPEC 4.3 prompt, the
jitted sampler of :mod:`bossa_jax.sampling`, top-k 15) once for the reference clip of every test
song used (paired and unpaired), and each result is judged by the rule-based style classifier
(:mod:`bossa_jax.data.style_classifier`). Printed (and written as JSON): style accuracy against the
reference's style (all pairs; pairs whose meter agrees with the lead sheet's, since a 4/4 lead
sheet cannot become a 3/4 waltz; paired only), the same with the queries replaced by those of a
silent clip (the control: style should fall towards what the lead sheet alone implies), melody
preservation (lead-sheet melody notes found at the same bar, position and pitch) and the
confusion matrix. Runs on the project's own pieces only (no bossa_jax.arrange), so it works on any
stage-2 model folder with a ``run_config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bossa_jax import mel  # noqa: E402
from bossa_jax.data import readers  # noqa: E402
from bossa_jax.data import style_classifier as sc  # noqa: E402
from bossa_jax.data.style_corpus import STYLES  # noqa: E402
from bossa_jax.models.arranger import POSITION_START, load_stage2  # noqa: E402
from bossa_jax.sampling import Sampler, SamplingSettings  # noqa: E402
from bossa_jax.symbolic import remi, segment  # noqa: E402
from bossa_jax.symbolic.notes import BAR, INSTRUMENT, MELODY_INSTRUMENT, PITCH, POSITION  # noqa: E402
from bossa_jax.train.mini import load_run_config  # noqa: E402


def melody_kept(generated: np.ndarray, leadsheet, start_bar: int) -> float:
    """Fraction of the window's lead-sheet melody notes present in ``generated`` (octuple rows,
    bars from 0) at the same bar, position and pitch."""
    lead = leadsheet.events[leadsheet.events[:, INSTRUMENT] == MELODY_INSTRUMENT]
    if len(lead) == 0:
        return 1.0
    have = {(int(b), int(p), int(q)) for b, p, q in generated[:, [BAR, POSITION, PITCH]]}
    want = [(int(b) - start_bar, int(p), int(q)) for b, p, q in lead[:, [BAR, POSITION, PITCH]]]
    return sum(w in have for w in want) / len(want)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--songs-per-style", type=int, default=2)
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    config = load_run_config(args.model)
    model = load_stage2(args.model)
    corpus = Path(args.corpus)
    style_of = {}
    for line in (corpus / "manifest.jsonl").read_text().splitlines():
        entry = json.loads(line)
        style_of[entry["id"]] = entry["style"]
    sources, _ = readers.manifest_sources(corpus / "manifest.jsonl")
    records, _ = readers.read_songs(sources, split="test", require_audio=True)
    chosen: list = []
    for style in STYLES:
        chosen += [r for r in records if style_of[r.id] == style][: args.songs_per_style]

    # one reference clip per chosen song: the clip of its first window
    references = []
    items = []  # (lead-sheet song id, window)
    for record in chosen:
        frames = mel.audio_frames(record.audio, config.encodec.sampling_rate)
        windows = segment.segment_song(record.song, frames, clip_length=config.audio.clip_frames)[
            : args.windows
        ]
        if not windows:
            continue
        centre = windows[0].clip_start + windows[0].clip_frames // 2
        feats, mask = mel.file_features(record.audio, config, centre_frame=centre)
        references.append((record.id, feats, mask))
        items += [(record.id, w) for w in windows]
    # a silent clip of the same length: every frame at the floor, every frame valid
    silence = (mel.FLOOR_DB - mel.CENTER_DB) / mel.SCALE_DB
    silent = (np.full_like(references[0][1], silence), references[0][2].copy())

    sampler = Sampler(model.musecoco, SamplingSettings(top_k=15))
    max_tokens = config.stage2.max_tokens
    jobs = []  # (lead id, window, reference id or "silent", feats, mask)
    for lead_id, window in items:
        for ref_id, feats, mask in references:
            jobs.append((lead_id, window, ref_id, feats, mask))
        jobs.append((lead_id, window, "silent", *silent))
    results = []
    for i in range(0, len(jobs), args.batch):
        chunk = jobs[i : i + args.batch]
        feats = jnp.asarray(np.stack([j[3] for j in chunk]))
        masks = jnp.asarray(np.stack([j[4] for j in chunk]))
        prefix = model.style_prefix(masks, features=feats)
        prompts = [remi.prompt(j[1].leadsheet) for j in chunk]
        samples = sampler(
            prompts,
            prefix_embeddings=prefix,
            position_start=POSITION_START,
            max_new_tokens=[max_tokens - len(p) for p in prompts],
            seed=args.seed,
            sequence_ids=list(range(i, i + len(chunk))),
        )
        for k, (lead_id, window, ref_id, _, _) in enumerate(chunk):
            rows, skipped = remi.decode(samples.new_tokens(k))
            lead = window.leadsheet.events.copy()
            lead[:, BAR] -= window.start_bar
            predicted = sc.classify(rows, lead) if len(rows) else sc.UNKNOWN
            results.append(
                {
                    "leadsheet": lead_id,
                    "reference": ref_id,
                    "lead_style": style_of[lead_id],
                    "ref_style": style_of.get(ref_id, "silent"),
                    "predicted": predicted,
                    "melody": melody_kept(rows, window.leadsheet, window.start_bar),
                    "notes": len(rows),
                    "skipped_tokens": skipped,
                    "tokens": int(samples.count[k]),
                }
            )
        print(f"{min(i + args.batch, len(jobs))}/{len(jobs)} arrangements", flush=True)

    def accuracy(rows):
        return sum(r["predicted"] == r["ref_style"] for r in rows) / max(len(rows), 1)

    audio_rows = [r for r in results if r["reference"] != "silent"]
    meter = [r for r in audio_rows if (r["ref_style"] == "waltz") == (r["lead_style"] == "waltz")]
    paired = [r for r in audio_rows if r["reference"] == r["leadsheet"]]
    silent_rows = [r for r in results if r["reference"] == "silent"]
    four = [r for r in meter if r["ref_style"] != "waltz"]
    summary = {
        "pairs": len(audio_rows),
        "style_accuracy_all": accuracy(audio_rows),
        "style_accuracy_meter_agrees": accuracy(meter),
        "style_accuracy_4_4_only": accuracy(four),
        "style_accuracy_paired": accuracy(paired),
        "silent_control_predictions": dict(Counter(r["predicted"] for r in silent_rows)),
        "silent_control_matches_lead_style": sum(
            r["predicted"] == r["lead_style"] for r in silent_rows
        )
        / max(len(silent_rows), 1),
        "melody_preservation": float(np.mean([r["melody"] for r in audio_rows])),
        "mean_notes": float(np.mean([r["notes"] for r in audio_rows])),
        "mean_skipped_tokens": float(np.mean([r["skipped_tokens"] for r in audio_rows])),
        "chance_4_4": 1 / 5,
        "seconds": round(time.perf_counter() - started, 1),
    }
    counts = sc.confusion_matrix(
        [r["ref_style"] for r in audio_rows], [r["predicted"] for r in audio_rows], STYLES
    )
    print(sc.format_confusion(counts, STYLES))
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        payload = {"summary": summary, "confusion": counts.tolist(), "results": results}
        Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
