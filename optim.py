"""Optimisation pieces of DeepCluster-v2 (facebookresearch/swav ``main_deepclusterv2.py``).

- :class:`LARC`: layer-wise adaptive rate control around any optimizer (swav wraps SGD
  momentum 0.9, weight decay 1e-6 in apex's ``LARC(trust_coefficient=0.001, clip=False)``);
  written here so that no apex is needed.
- :func:`warmup_cosine_schedule`: swav's per-iteration learning rates, a linear warmup from
  ``start_warmup`` to ``base_lr`` followed by a cosine decay to ``final_lr``.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class LARC:
    """Layer-wise adaptive rate control (You et al. 2017) wrapping ``optim``.

    For each parameter tensor w with gradient g, before the wrapped step (wd = the group's
    weight decay, which the wrapper applies itself and hides from the wrapped optimizer):

        local = trust * ||w|| / (||g|| + wd * ||w|| + eps)          if ||w|| > 0 and ||g|| > 0
        g    <- (g + wd * w) * local                                  (clip=False)
        g    <- (g + wd * w) * min(local / lr, 1)                     (clip=True)

    and g is left as is, without weight decay, when either norm is 0 (apex's behaviour).
    Parameters whose ``grad`` is None are skipped (swav freezes its prototypes that way).
    The norms are computed on the device without host synchronisation.

    The wrapper exposes ``param_groups``, ``state``, ``zero_grad``, ``state_dict`` and
    ``load_state_dict`` of the wrapped optimizer, so schedulers, ``torch.amp.GradScaler`` and
    checkpoints treat it as the optimizer itself.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, trust_coefficient: float = 0.02,
                 clip: bool = True, eps: float = 1e-8):
        self.optim = optimizer
        self.trust_coefficient = float(trust_coefficient)
        self.clip = bool(clip)
        self.eps = float(eps)

    # -- the wrapped optimizer's interface ----------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.optim.param_groups

    @property
    def state(self):
        return self.optim.state

    @property
    def defaults(self) -> dict:
        return self.optim.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optim.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optim.load_state_dict(state)

    def __repr__(self) -> str:
        return (f"LARC(trust_coefficient={self.trust_coefficient}, clip={self.clip}, eps={self.eps}, "
                f"optim={self.optim!r})")

    # -- the step -----------------------------------------------------------------------
    @torch.no_grad()
    def adapt_gradients(self) -> None:
        """Rescale every gradient in place (weight decay folded in), as described above."""
        for group in self.optim.param_groups:
            wd = float(group.get("weight_decay", 0.0))
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # (P,) norms in one kernel each: a per-tensor `if norm != 0` would sync the host
            w_norms = torch._foreach_norm([p.detach() for p in params])
            g_norms = torch._foreach_norm([p.grad for p in params])
            for p, wn, gn in zip(params, w_norms, g_norms):
                ok = (wn > 0) & (gn > 0)
                local = self.trust_coefficient * wn / (gn + wn * wd + self.eps)
                if self.clip:
                    local = torch.clamp(local / group["lr"], max=1.0)
                local = torch.where(ok, local, torch.ones_like(local)).to(p.grad.dtype)  # 0-d
                if wd != 0.0:
                    decay = torch.where(ok, torch.full_like(wn, wd), torch.zeros_like(wn)).to(p.dtype)
                    p.grad.add_(p.detach() * decay)
                p.grad.mul_(local)

    def step(self, closure=None):
        """Adapt the gradients, then step the wrapped optimizer with its weight decay off."""
        if closure is not None:
            raise ValueError("LARC.step does not take a closure")
        self.adapt_gradients()
        saved = [g.get("weight_decay", 0.0) for g in self.optim.param_groups]
        for g in self.optim.param_groups:
            g["weight_decay"] = 0.0
        try:
            self.optim.step()
        finally:
            for g, wd in zip(self.optim.param_groups, saved):
                g["weight_decay"] = wd


def dcv2_sgd(params, base_lr: float, wd: float, momentum: float = 0.9, trust_coefficient: float = 0.001,
             clip: bool = False) -> LARC:
    """swav's optimizer: ``LARC(SGD(params, lr=base_lr, momentum=0.9, weight_decay=wd),
    trust_coefficient=0.001, clip=False)``."""
    sgd = torch.optim.SGD(params, lr=base_lr, momentum=momentum, weight_decay=wd)
    return LARC(sgd, trust_coefficient=trust_coefficient, clip=clip)


def warmup_cosine_schedule(base_lr: float, final_lr: float, epochs: int, warmup_epochs: int,
                           start_warmup: float, iters_per_epoch: int) -> np.ndarray:
    """(epochs * iters_per_epoch,) learning rate of each iteration, as swav builds it.

    Warmup: ``np.linspace(start_warmup, base_lr, warmup_epochs * iters_per_epoch)`` (both
    ends included); then iteration t of the remaining T = (epochs - warmup_epochs) *
    iters_per_epoch gets ``final_lr + (base_lr - final_lr) * (1 + cos(pi * t / T)) / 2``.
    """
    if warmup_epochs > epochs:
        raise ValueError(f"warmup_epochs {warmup_epochs} exceeds epochs {epochs}")
    warm = np.linspace(start_warmup, base_lr, iters_per_epoch * warmup_epochs)
    total = iters_per_epoch * (epochs - warmup_epochs)
    cos = np.array([final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / total))
                    for t in range(total)], dtype=np.float64)
    return np.concatenate((warm, cos))
