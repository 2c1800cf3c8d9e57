"""AdamW + schedule against torch (SPEC 7): LinearLR + CosineAnnealingLR driven the way the
official OptimizerSchedulerWithWarmUp drives them, and torch.optim.AdamW on the same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from bossa_jax.config import OptimConfig, load_config
from bossa_jax.errors import ConfigError
from bossa_jax.train.optim import decay_mask, lr_schedule, make_optimizer

WARMUP, TOTAL = 10, 50


class OfficialSchedulerWithWarmUp:
    """utils/scheduler.py:OptimizerSchedulerWithWarmUp (SPEC 7): counts its own steps, steps the
    warm-up scheduler while count < warmup, the chained cosine one afterwards."""

    def __init__(self, optimizer, warmup, total, start_factor, eta_min):
        self.optimizer = optimizer
        self.warmup_steps = warmup
        self.warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=start_factor, total_iters=warmup
        )
        self.cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total - warmup, eta_min=eta_min
        )
        self.count = 0

    def step(self):
        self.optimizer.step()
        if self.count < self.warmup_steps:
            self.warmup.step()
        else:
            self.cosine.step()
        self.count += 1


def torch_lrs(cfg: OptimConfig, total: int, steps: int | None = None) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = OfficialSchedulerWithWarmUp(
        opt, cfg.warmup_steps, total, cfg.warmup_start_factor, cfg.min_lr
    )
    lrs = []
    for _ in range(total if steps is None else steps):
        lrs.append(opt.param_groups[0]["lr"])  # the lr the coming update uses
        sched.step()
    return lrs


def test_schedule_equals_torch_linear_then_cosine():
    cfg = OptimConfig(warmup_steps=WARMUP)
    expected = np.array(torch_lrs(cfg, TOTAL))
    ours = np.array([float(lr_schedule(cfg, TOTAL)(n)) for n in range(TOTAL)])
    assert expected[0] == pytest.approx(1e-6) and expected[WARMUP] == pytest.approx(1e-4)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)


def test_paper_schedule_endpoints():
    cfg = OptimConfig()  # 1000 warm-up steps, 1e-4 peak, eta_min 1e-5
    sched = lr_schedule(cfg, 11000)
    expected = torch_lrs(cfg, 11000, steps=1003)
    for n in (0, 1, 500, 999, 1000, 1001, 1002):
        assert float(sched(n)) == pytest.approx(expected[n], rel=1e-5)
    assert float(sched(11000)) == pytest.approx(1e-5, rel=1e-5)


def _params(seed=0):
    r = np.random.default_rng(seed)
    return {
        "kernel": r.normal(size=(4, 3)).astype(np.float32),
        "bias": r.normal(size=(3,)).astype(np.float32),
        "query_tokens": r.normal(size=(1, 2, 3)).astype(np.float32),
        "temp": np.float32(0.07),
    }


def _run_both(cfg: OptimConfig, steps: int = 5, grad_scale: float = 1.0):
    params = _params()
    r = np.random.default_rng(1)
    grads = [
        {k: (grad_scale * r.normal(size=np.shape(v))).astype(np.float32) for k, v in params.items()}
        for _ in range(steps)
    ]
    tx = make_optimizer(cfg, TOTAL)
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(jp)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update({k: jnp.asarray(v) for k, v in g.items()}, state, jp)
        jp = optax.apply_updates(jp, updates)

    tp = {k: torch.nn.Parameter(torch.tensor(np.asarray(v))) for k, v in params.items()}
    opt = torch.optim.AdamW(
        list(tp.values()),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    sched = OfficialSchedulerWithWarmUp(
        opt, cfg.warmup_steps, TOTAL, cfg.warmup_start_factor, cfg.min_lr
    )
    for g in grads:
        for k, p in tp.items():
            p.grad = torch.tensor(g[k])
        if cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(tp.values()), cfg.grad_clip_norm)
        sched.step()
    return jp, {k: p.detach().numpy() for k, p in tp.items()}


def test_adamw_equals_torch_with_decay_on_everything():
    cfg = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.05)
    ours, ref = _run_both(cfg, steps=6)
    for k in ref:
        np.testing.assert_allclose(np.asarray(ours[k]), ref[k], atol=1e-6, err_msg=k)
        assert not np.allclose(ref[k], _params()[k])  # every parameter moved


def test_clipping_equals_torch_clip_grad_norm():
    cfg = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, grad_clip_norm=1.0)
    ours, ref = _run_both(cfg, steps=4, grad_scale=10.0)
    for k in ref:  # torch divides by (norm + 1e-6): equal to ~1e-6 relative
        np.testing.assert_allclose(np.asarray(ours[k]), ref[k], atol=2e-6, err_msg=k)


def test_decay_mask_exempts_norms_biases_queries_temperature():
    mask = decay_mask({k: jnp.asarray(v) for k, v in _params().items()})
    assert mask == {"kernel": True, "bias": False, "query_tokens": False, "temp": False}
    cfg = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=0, decay_mask="exclude_norms_biases")
    params = {k: jnp.asarray(v) for k, v in _params().items()}
    tx = make_optimizer(cfg, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)  # Adam term is 0: only decay moves parameters
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["kernel"], params["kernel"] * (1 - 1e-2 * 0.05), rtol=1e-6)
    for k in ("bias", "query_tokens", "temp"):
        np.testing.assert_array_equal(new[k], params[k])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.optim.decay_mask=some", "train.optim.decay_mask"),
        ("train.optim.grad_clip_norm=-1", "train.optim.grad_clip_norm"),
        ("train.total_steps=500", "train.total_steps"),  # not more than the 1000 warm-up steps
        ("train.compute_dtype=float16", "train.compute_dtype"),
        ("train.optim.betas=[0.9]", "train.optim.betas"),
    ],
)
def test_bad_train_config_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"'{key}" in str(err.value) and "\n" not in str(err.value)


def test_paper_defaults():
    cfg = load_config("paper").train.optim
    assert (cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay) == (1e-4, (0.9, 0.999), 1e-8, 0.05)
    assert (cfg.warmup_steps, cfg.warmup_start_factor, cfg.min_lr) == (1000, 0.01, 1e-5)
    assert cfg.decay_mask == "all" and cfg.grad_clip_norm is None
