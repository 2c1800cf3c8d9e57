"""The training loop (DESIGN "Layout": train/loop.py; SPEC 7, SPEC 11.7).

:func:`train` builds the mesh, creates the model sharded, splits it by the trainable filter, builds
AdamW with the official schedule, compiles the step ahead of time, and runs ``train.total_steps``
optimizer updates on global batches assembled from each process's local batches. Around the step:

* logging every ``train.log_every`` steps: every metric of the loss function (mean over the
  interval), ``lr``, ``grad_norm``, ``steps_per_s``, ``samples_per_s``; to the console (a tqdm bar
  plus one line), to ``<out_dir>/metrics.jsonl`` and to TensorBoard (``<out_dir>/tb``);
* an eval pass every ``train.eval_every`` steps when ``eval_data`` is given;
* a checkpoint every ``train.checkpoint_every`` steps and at the end (``<out_dir>/checkpoints``);
* ``resume=True`` continues from the newest intact checkpoint with the same parameters, optimizer
  state, rng and data-iterator position, so it matches an uninterrupted run exactly; a damaged
  newer checkpoint is moved to ``<out_dir>/damaged-checkpoints`` with a warning; without any
  checkpoint the run starts from step 0 and says so;
* an ``out_dir`` that already holds checkpoints is refused unless ``resume`` or ``overwrite``
  (which removes the run's own files: checkpoints, config.yaml, metrics.jsonl, tb/; nothing
  else), so a re-run never silently keeps the old weights;
* SIGTERM or SIGINT: finish the current step, write a checkpoint, return; the exit code is
  ``EXIT_PREEMPTED`` (0) after SIGTERM, so schedulers see a clean stop, and 130 after SIGINT
  (a second Ctrl-C stops at once, after pending checkpoint writes finish);
* a non-finite loss stops the run with a one-line :class:`~bossa_jax.errors.BossaError`; no
  checkpoint is written after the last step whose loss was checked finite;
* the resolved config is written to ``<out_dir>/config.yaml``.

Only process 0 logs and writes files besides checkpoints; checkpoints are written collectively.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from bossa_jax.config import Config
from bossa_jax.errors import BossaError, CheckpointError, ConfigError, interrupt_pending
from bossa_jax.outputs import atomic_output
from bossa_jax.sharding import batch_sharding, make_mesh, rules_of, use_mesh
from bossa_jax.train.checkpoint import TrainCheckpointer
from bossa_jax.train.optim import lr_schedule, make_optimizer
from bossa_jax.train.step import (
    Filter,
    LossFn,
    TrainState,
    abstract_like,
    batch_shardings,
    build_program,
    compile_ahead,
    replicated_key,
)

log = logging.getLogger("bossa_jax.train")

EXIT_PREEMPTED = 0  # SIGTERM: checkpoint written, clean exit (the job can be requeued)
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): checkpoint written
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
TENSORBOARD_DIR = "tb"
DAMAGED_DIR = "damaged-checkpoints"
# everything a run writes into its out_dir (and so everything --overwrite removes)
RUN_ARTEFACTS = (CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR, DAMAGED_DIR)


class DataIterator(Protocol):
    """What the loop needs from a data pipeline: a grain ``DatasetIterator`` fits."""

    def __next__(self) -> Any: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


# (process_index, process_count) -> an iterator of this process's rows of each global batch
DataFactory = Callable[[int, int], DataIterator]
EvalFactory = Callable[[int, int], Iterable[Any]]


@dataclasses.dataclass
class TrainResult:
    """How a run ended: ``stopped_by`` is "done", "SIGTERM" or "SIGINT"."""

    step: int
    state: TrainState
    stopped_by: str
    exit_code: int
    last_metrics: dict[str, float]


def batch_shards(mesh: Mesh) -> int:
    """How many ways the global batch is split on ``mesh`` (the ``batch`` rule's mesh axes;
    call under ``use_mesh``)."""
    axes = batch_sharding(mesh, 1).spec[0]
    axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
    return math.prod(mesh.shape[a] for a in axes)


def check_batch_divides(global_batch: int, mesh: Mesh) -> None:
    """A global batch the mesh or the process count cannot split is a one-line ConfigError."""
    shards = batch_shards(mesh)
    if global_batch % shards:
        raise ConfigError(
            f"config key 'train.global_batch_size': {global_batch} is not divisible by the "
            f"{shards} batch shards of mesh {dict(mesh.shape)}; use a multiple of {shards}"
        )
    if global_batch % jax.process_count():
        raise ConfigError(
            f"config key 'train.global_batch_size': {global_batch} is not divisible by the "
            f"{jax.process_count()} processes"
        )


def to_global(local_batch: Any, shardings: Any, process_count: int) -> Any:
    """Global arrays from every process's rows (``make_array_from_process_local_data``)."""

    def one(x: Any, sharding: Any) -> jax.Array:
        x = np.asarray(x)
        global_shape = (x.shape[0] * process_count,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, local_batch, shardings)


def gather_to_host(tree: Any) -> Any:
    """Full numpy copies of (possibly multi-process sharded) arrays, on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def checkpoint_steps(out_dir: str | Path) -> list[int]:
    """The committed checkpoint steps of the run in ``out_dir`` (orbax names each step's folder
    by its number; temporary folders of unfinished writes are not counted)."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def check_run_dir(out_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses to train into a folder that holds another run's checkpoints unless the user said
    what to do with them (a one-line BossaError naming the folder and both flags)."""
    if resume and overwrite:
        raise BossaError("--resume and --overwrite exclude each other: give one")
    steps = checkpoint_steps(out_dir)
    if steps and not (resume or overwrite):
        raise BossaError(
            f"{out_dir} already holds a training run (checkpoints up to step {steps[-1]}); "
            "pass --resume to continue it or --overwrite to replace it"
        )


def clear_run_dir(out_dir: Path) -> None:
    """Removes the run's own files from ``out_dir`` (:data:`RUN_ARTEFACTS`), nothing else."""
    for name in RUN_ARTEFACTS:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _set_aside(ckpt: TrainCheckpointer, step: int, out_dir: Path) -> Path:
    """Moves a damaged checkpoint out of orbax's folder (kept for inspection, never deleted)."""
    target = out_dir / DAMAGED_DIR / str(step)
    n = 1
    while target.exists():
        target = out_dir / DAMAGED_DIR / f"{step}-{n}"
        n += 1
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(ckpt.directory / str(step)), str(target))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    ckpt.manager.reload()
    return target


def restore_newest_intact(
    ckpt: TrainCheckpointer, abstract_state: Any, rng: jax.Array, out_dir: Path
) -> tuple[int, Any, jax.Array, dict[str, Any] | None] | None:
    """(step, state, rng, data state) of the newest checkpoint that restores, or None when there
    is no checkpoint. Checkpoints newer than the one that restores are damaged: they are set aside
    with a warning. When none restores nothing is moved (a config that no longer matches the run
    fails every step alike) and the newest one's error is raised."""
    steps = sorted(ckpt.all_steps(), reverse=True)
    failed: list[tuple[int, CheckpointError]] = []
    for step in steps:
        try:
            restored = ckpt.restore(step, abstract_state, rng)
        except CheckpointError as err:
            failed.append((step, err))
            continue
        for bad, err in failed:
            moved = _set_aside(ckpt, bad, out_dir)
            log.warning("checkpoint step %d is damaged, moved to %s (%s)", bad, moved, err)
        return (step, *restored)
    if failed:
        raise CheckpointError(
            f"no checkpoint in {ckpt.directory} restores (steps {steps}); the newest: "
            f"{failed[0][1]}; check that the config is the run's, or start again with --overwrite"
        )
    return None


class _StopSignals:
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint first; a second SIGINT
    raises KeyboardInterrupt (the unwinding still waits for checkpoint writes in flight)."""

    def __init__(self) -> None:
        # a Ctrl-C that Python dropped before the loop started (see errors.interrupt_pending)
        self.received: str | None = "SIGINT" if interrupt_pending() else None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the default handlers alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = self.received or signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> str | None:
        """The signal, if any process received one (a collective in multi-process runs)."""
        if jax.process_count() == 1:
            return self.received
        codes = {None: 0, "SIGTERM": 1, "SIGINT": 2}
        seen = multihost_utils.process_allgather(np.int32(codes[self.received]))
        top = int(np.max(seen))
        return {0: None, 1: "SIGTERM", 2: "SIGINT"}[top]


class MetricLogger:
    """Console (tqdm), JSONL and TensorBoard output; a no-op outside process 0."""

    def __init__(self, out_dir: Path, total: int, initial: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
        self.jsonl = open(out_dir / METRICS_FILE, "a")  # noqa: SIM115 - closed in close()
        self.tb = SummaryWriter(str(out_dir / TENSORBOARD_DIR))

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for name, value in metrics.items():
            self.tb.add_scalar(f"{split}/{name}", value, step)
        self.tb.flush()
        text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        self.bar.write(f"[{split}] step {step}: {text}")
        if split == "train" and "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4g}")

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            self.tb.close()


def write_config(config: Config, out_dir: Path) -> None:
    """The resolved config, beside the run's outputs (DESIGN "Configs")."""
    with atomic_output(out_dir / CONFIG_FILE) as tmp:
        tmp.write_text(config.to_yaml())


def _host_metrics(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _non_finite(step: int, metrics: dict[str, float], ckpt: TrainCheckpointer) -> BossaError:
    last = ckpt.latest_step()
    where = f"step {last} in {ckpt.directory}" if last is not None else "none written"
    return BossaError(
        f"non-finite loss ({metrics.get('loss')}) at step {step}; training stopped, "
        f"last good checkpoint: {where}"
    )


def evaluate(
    program: Any,
    eval_step: Any,
    state: TrainState,
    batches: Iterable[Any],
    process_count: int,
    rng: jax.Array,
) -> dict[str, float]:
    """Mean of each eval metric over ``batches`` (process-local batches)."""
    sums: dict[str, float] = {}
    count = 0
    shardings = None
    for local in batches:
        shardings = shardings or batch_shardings(program.mesh, local)
        batch = to_global(local, shardings, process_count)
        for k, v in _host_metrics(eval_step(state.params, program.frozen, batch, rng)).items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
    return {k: v / count for k, v in sums.items()} if count else {}


def train(
    config: Config,
    *,
    model_fn: Callable[[], nnx.Module],
    trainable: Filter,
    loss_fn: LossFn,
    train_data: DataFactory,
    eval_data: EvalFactory | None = None,
    eval_loss_fn: LossFn | None = None,
    resume: bool = False,
    overwrite: bool = False,
    mesh: Mesh | None = None,
    after_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Runs (or resumes) training as described in the module docstring.

    ``model_fn()`` returns the full model created sharded under the active mesh (e.g. with
    ``sharding.create_sharded``) with its frozen parts loaded; it runs once, also when resuming,
    since frozen parts are not in the training checkpoint. ``trainable`` is the one trainable
    filter. ``train_data(process_index, process_count)`` returns an iterator over this process's
    rows of each global batch (``global_batch_size / process_count`` rows) with grain's
    ``get_state``/``set_state``. ``after_step(step)`` is a hook for tests and profilers.
    ``overwrite`` replaces a previous run in ``train.out_dir`` (see :func:`check_run_dir`).
    """
    cfg = config.train
    process_index, process_count = jax.process_index(), jax.process_count()
    primary = process_index == 0
    out_dir = Path(cfg.out_dir)
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    with use_mesh(mesh, rules_of(config.mesh)):
        check_batch_divides(cfg.global_batch_size, mesh)
    check_run_dir(out_dir, resume=resume, overwrite=overwrite)
    if primary:
        if overwrite:
            clear_run_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, out_dir)
    if process_count > 1:
        multihost_utils.sync_global_devices("run dir ready")
    compute_dtype = jnp.dtype(cfg.compute_dtype)
    schedule = lr_schedule(cfg.optim, cfg.total_steps)

    with contextlib.ExitStack() as stack:
        stack.enter_context(use_mesh(mesh, rules_of(config.mesh)))
        model = model_fn()
        tx = make_optimizer(cfg.optim, cfg.total_steps)
        program = build_program(model, trainable, loss_fn, tx, mesh, compute_dtype=compute_dtype)
        del model
        ckpt = TrainCheckpointer(out_dir / CHECKPOINT_DIR, cfg.keep_checkpoints)
        stack.callback(ckpt.close)
        data = train_data(process_index, process_count)
        rng = replicated_key(cfg.seed, mesh)
        state = program.state
        start = 0
        restored = None
        if resume:
            restored = restore_newest_intact(ckpt, abstract_like(state), rng, out_dir)
        if restored is not None:
            start, state, rng, data_state = restored
            if data_state is not None:
                data.set_state(data_state)
            log.info("resumed from %s/%d", ckpt.directory, start)
        elif resume:
            log.warning("--resume: no checkpoint in %s, starting from step 0", ckpt.directory)
        program.state = None  # the loop owns the (donated) state from here on

        local = next(data, None) if start < cfg.total_steps else None
        if local is None and start < cfg.total_steps:
            raise BossaError(f"the training data yielded no batch at step {start}")
        b_shardings = batch_shardings(mesh, local) if local is not None else None
        step_fn = None
        if local is not None:
            batch = to_global(local, b_shardings, process_count)
            step_fn = compile_ahead(
                program.train_step(b_shardings), state, program.frozen, batch, rng
            )
        eval_step = program.eval_step() if eval_data is not None else None
        if eval_step is not None and eval_loss_fn is not None:
            eval_step = dataclasses.replace(program, loss_fn=eval_loss_fn).eval_step()

        logger = MetricLogger(out_dir, cfg.total_steps, start, primary)
        stack.callback(logger.close)
        signals = stack.enter_context(_StopSignals())

        step = start  # updates applied so far
        pending: list[tuple[int, dict[str, jax.Array]]] = []  # metrics not yet checked
        interval: dict[str, float] = {}
        interval_steps = 0
        t_last = time.perf_counter()
        last_metrics: dict[str, float] = {}

        def check_pending() -> None:
            nonlocal interval_steps, last_metrics
            for s, m in pending:
                host = _host_metrics(m)
                if not math.isfinite(host["loss"]):
                    raise _non_finite(s, host, ckpt)
                for k, v in host.items():
                    interval[k] = interval.get(k, 0.0) + v
                interval_steps += 1
                last_metrics = host
            pending.clear()

        def save() -> None:
            check_pending()  # never checkpoint a state whose loss was not checked finite
            ckpt.save(step, state, rng, data.get_state())

        stopped_by = "done"
        try:
            while step < cfg.total_steps:
                if step > start:
                    local = next(data, None)
                    if local is None:
                        raise BossaError(f"the training data ran out at step {step}")
                    batch = to_global(local, b_shardings, process_count)
                # metrics of the previous step are checked after this one is dispatched
                state, metrics = step_fn(state, program.frozen, batch, rng)
                step += 1
                logger.advance()
                if len(pending) >= 1:
                    check_pending()
                pending.append((step, metrics))
                if after_step is not None:
                    after_step(step)

                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    check_pending()
                    elapsed = time.perf_counter() - t_last
                    record = {k: v / interval_steps for k, v in interval.items()}
                    record["lr"] = float(schedule(step - 1))
                    record["steps_per_s"] = interval_steps / elapsed
                    record["samples_per_s"] = interval_steps * cfg.global_batch_size / elapsed
                    logger.write(step, "train", record)
                    interval.clear()
                    interval_steps = 0
                    t_last = time.perf_counter()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    save()
                if eval_step is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    logger.write(step, "eval", _run_eval(program, eval_step, state, eval_data))
                stopped_by = signals.agreed() or "done"
                if stopped_by != "done":
                    log.warning("%s received: checkpointing step %d and stopping", stopped_by, step)
                    break
            if stopped_by == "done":
                check_pending()
            save()
            ckpt.wait()
        except BossaError:
            ckpt.wait()  # let an earlier good checkpoint finish; nothing newer is written
            raise

    exit_code = {"done": 0, "SIGTERM": EXIT_PREEMPTED, "SIGINT": EXIT_INTERRUPTED}[stopped_by]
    return TrainResult(step, state, stopped_by, exit_code, last_metrics)


def _run_eval(program: Any, eval_step: Any, state: TrainState, eval_data: EvalFactory):
    rng = replicated_key(0, program.mesh)
    batches: Iterator[Any] = iter(eval_data(jax.process_index(), jax.process_count()))
    return evaluate(program, eval_step, state, batches, jax.process_count(), rng)
