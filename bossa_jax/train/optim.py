"""AdamW with the official warm-up + cosine schedule (SPEC 7, SPEC 10.14-10.15).

The official ``utils/scheduler.py:OptimizerSchedulerWithWarmUp`` steps torch's ``LinearLR``
(start_factor 0.01 -> 1.0 over ``warmup_steps`` optimizer steps) and then a chained
``CosineAnnealingLR`` (T_max = total - warmup, eta_min) on the same optimizer. In closed form the
learning rate used by optimizer update ``n`` (0-based) is

    n <  W:  lr * (f + (1 - f) * n / W)
    n >= W:  eta_min + (lr - eta_min) * (1 + cos(pi * (n - W) / (total - W))) / 2

which is what :func:`lr_schedule` returns (tests compare it with torch step by step). AdamW is
optax's (decoupled decay ``p -= lr * wd * p``, as ``torch.optim.AdamW``), with weight decay on every
trainable parameter by default (official), optionally masked, and optional global-norm clipping
before it (stage 2 clips at 1.0; stage 1 never clips).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import optax

from bossa_jax.config import OptimConfig

# Parameters exempt from decay under decay_mask="exclude_norms_biases", besides every parameter of
# rank <= 1 (biases, LayerNorm scales/offsets, a scalar temperature).
NO_DECAY_NAMES = ("query_tokens", "temp", "temperature")


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate of optimizer update ``n`` (SPEC 7: LinearLR then CosineAnnealingLR)."""
    cosine = optax.cosine_decay_schedule(
        init_value=cfg.lr,
        decay_steps=total_steps - cfg.warmup_steps,
        alpha=cfg.min_lr / cfg.lr,
    )
    if cfg.warmup_steps == 0:
        return cosine
    warmup = optax.linear_schedule(
        init_value=cfg.lr * cfg.warmup_start_factor,
        end_value=cfg.lr,
        transition_steps=cfg.warmup_steps,
    )
    return optax.join_schedules([warmup, cosine], boundaries=[cfg.warmup_steps])


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """The names of a pytree key path (dict keys, attribute names, sequence indices) as strings."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return tuple(names)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies under ``exclude_norms_biases``: parameters of rank >= 2
    whose path names none of ``NO_DECAY_NAMES``."""

    def keep(path: Sequence[Any], leaf: Any) -> bool:
        names = path_names(path)
        return leaf.ndim >= 2 and not any(n in NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW(lr schedule, betas, eps, weight decay [masked]) with optional clipping before it.

    Apply it to the trainable state only (the one trainable filter, DESIGN "Trainable vs frozen");
    the optimizer state then mirrors that state and is sharded like it.
    """
    adamw = optax.adamw(
        learning_rate=lr_schedule(cfg, total_steps),
        b1=cfg.betas[0],
        b2=cfg.betas[1],
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=None if cfg.decay_mask == "all" else decay_mask,
    )
    if cfg.grad_clip_norm is None:
        return adamw
    # torch.nn.utils.clip_grad_norm_ scales by max/(norm + 1e-6); optax by max/norm: equal to 1e-6
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
