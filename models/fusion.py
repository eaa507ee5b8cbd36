"""Late fusion: per-modality logits combined under an explicit availability mask.

Each modality ``m`` (the image encoder's logit, scaled tabular features with
missing indicators, the pooled note representation) has its own branch ``f_m``
-- a linear term on standardised inputs, plus an optional small MLP
(``hidden > 0``) -- giving a logit contribution. The fused logit is

    logit = b + sum_m mask_m * f_m(x_m)

so an absent modality contributes nothing and the model accepts any subset.
This is the naive-Bayes form of late fusion: when the modalities carry
conditionally independent evidence, ``f_m`` is modality m's log-likelihood
ratio and the masked sum is the posterior logit for whatever was observed. The
logit with only modality m present, ``b + f_m``, is exposed as that modality's
logit for explanation (:meth:`FusionRiskModel.per_modality_logits`).

Modality dropout during training hides present modalities at random so every
subset is trained on, not just the patterns that happen to occur. The linear
terms carry an L2 penalty scaled by each branch's input width and chosen from a
small grid on the validation log-loss; early stopping also watches that loss.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> X = {"ehr": rng.normal(size=(200, 3)).astype("float32")}
>>> y = (X["ehr"][:, 0] > 0).astype(int)
>>> model = FusionRiskModel(modalities=("ehr",), max_epochs=5, device="cpu")
>>> model.fit(X, y, X_val=X, y_val=y).predict_proba(X).shape
(200, 2)
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from torch import nn

from models.calibration import (
    METHODS,
    Calibrator,
    IsotonicCalibration,
    PlattScaling,
    calibrator_from_dict,
    make_calibrator,
)
from models.device import exact_math, resolve_device

__all__ = ["MODALITIES", "FusionNet", "FusionRiskModel"]

log = logging.getLogger(__name__)

#: Modality names, as ``CohortManifest.modalities_present`` spells them.
MODALITIES: tuple[str, ...] = ("image", "ehr", "note")


class Branch(nn.Module):
    """One modality's logit contribution: a linear term, plus a one-hidden-layer MLP.

    Inputs are standardised first with the ``shift``/``scale`` buffers (set from the
    training rows at fit time, saved with the weights), so one L2 penalty suits every
    modality. ``hidden=0`` makes the branch linear: a logistic-regression term.
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, n_in: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(n_in))
        self.register_buffer("scale", torch.ones(n_in))
        self.linear = nn.Linear(n_in, 1)
        self.mlp: nn.Sequential | None = None
        if hidden > 0:
            self.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, 1))
        # Start every contribution at exactly 0 (the model at the base rate), so early
        # stopping compares against a sane start rather than random logit noise.
        layers = [self.linear] + ([self.mlp[-1]] if self.mlp is not None else [])
        for layer in layers:
            assert isinstance(layer, nn.Linear)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.shift) / self.scale
        out = self.linear(z)
        if self.mlp is not None:
            out = out + self.mlp(z)
        return out.squeeze(-1)


class FusionNet(nn.Module):
    """``logit = bias + sum_m mask_m f_m(x_m)``; returns (logit, contributions (B, M))."""

    def __init__(self, dims: Mapping[str, int], hidden: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        self.modalities = tuple(dims)
        self.branches = nn.ModuleDict({m: Branch(d, hidden, dropout) for m, d in dims.items()})
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, inputs: Mapping[str, torch.Tensor], mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        contributions = torch.stack([self.branches[m](inputs[m]) for m in self.modalities],
                                    dim=1)
        fused = self.bias + (contributions * mask).sum(dim=1)
        return fused, contributions


class FusionRiskModel(BaseEstimator):
    """Scikit-learn style wrapper around :class:`FusionNet`, with calibration.

    ``X`` is a mapping modality -> 2-D float array (rows aligned); ``mask`` is a
    boolean array ``(n, len(modalities_))`` saying which modality each row has.
    Rows of an absent modality may hold anything (NaN included): they are zeroed
    and masked.

    Parameters
    ----------
    modalities : sequence of str, default=("image", "ehr", "note")
        Branches to build, in mask column order; keys missing from ``X`` at fit
        time are dropped (e.g. a cohort without images).
    hidden : int, default=0
        Hidden units of each branch's MLP; 0 = linear branches (logistic-regression
        terms on standardised inputs), which suits additive evidence best.
    dropout : float, default=0.2
    modality_dropout : float, default=0.25
        Training-time probability of hiding each present modality of a row.
    lr : float, default=3e-3
    weight_decay : float, default=1e-2
        AdamW decay of the MLP weights (when ``hidden > 0``).
    l2 : float or sequence of float, default=(0.003, 0.01, 0.03, 0.1)
        L2 penalty ``l2 * ||w||^2`` on the linear terms' weights, added to the mean
        log-loss (sklearn's ``C`` is ``1 / (2 * l2 * n)``). A sequence is a grid:
        one fit per value, the best validation log-loss wins (``l2_``).
    l2_dim_power : float, default=0.5
        Branch ``m``'s penalty is multiplied by ``d_m ** l2_dim_power`` (its input
        width), so wide branches (note embeddings) are shrunk harder than narrow
        ones (the one image logit).
    max_epochs : int, default=300
    min_epochs : int, default=20
        Epochs always run before early stopping may stop.
    patience : int, default=25
        Epochs without a better validation log-loss before stopping.
    batch_size : int, default=256
    seed : int, default=0
    device : str, default="auto"
    calibration : {"platt-pattern", "platt", "temperature", "isotonic"}, \
default="platt-pattern"
        Method :meth:`calibrate` fits (see :mod:`models.calibration`); with
        "platt-pattern" each missingness pattern of the mask gets its own shrunk
        intercept offset.
    solver : {"auto", "lbfgs", "adam"}, default="auto"
        "lbfgs" (linear branches only) minimises the penalised log-loss exactly,
        full batch, with modality dropout as its expectation over every subset of
        each row's modalities, and picks the L2 strength per branch on the
        validation log-loss (coordinate search over the ``l2`` grid); the problem
        is convex, so there is no epoch noise and no early stopping. "adam" is
        minibatch AdamW with sampled modality dropout and early stopping (needed
        when ``hidden > 0``). "auto": "lbfgs" when ``hidden == 0``, else "adam".
    bias_l2 : float, default=0.0
        L2 penalty on each branch's bias ("lbfgs" only). A branch's bias is the logit
        offset of the rows that have the modality (its inputs are centred), i.e. a
        missingness-pattern rate; 0 leaves it free. On a small cohort these rates rest
        on a handful of events each, and a free one ranks held-out patients by the
        training part's pattern rates, which out-of-fold runs against their own labels
        (the small cohort's cross-fitted head sets it to its L2; models.fusion_crossfit).
    rank : dict of str -> list of (column indices, k), optional
        Reduced-rank blocks per branch ("lbfgs" only): the weights of each block's
        columns lie in the block's top ``k`` principal directions on the training rows
        that have the modality (principal-component regression); columns in no block
        keep a free weight each. The fitted weight is folded back onto the columns, so
        the branch stays a plain linear term over its inputs.

    Attributes
    ----------
    net_ : FusionNet
    modalities_ : tuple of str
    dims_ : dict str -> int
    history_ : list of dict
    best_epoch_ : int
    l2_ : float
        The L2 strength used (the grid's winner; with "lbfgs" the shared one the
        per-branch search started from).
    l2_by_modality_ : dict of str -> float
        The L2 strength of each branch.
    calibrator_ : PlattScaling or TemperatureScaling or IsotonicCalibration or None
        Set by :meth:`calibrate`; None until then (raw probabilities).
    """

    _parameter_constraints: ClassVar[dict[str, Any]] = {"calibration": METHODS,
                                                        "solver": ("auto", "lbfgs", "adam")}

    def __init__(self, *, modalities: Sequence[str] = MODALITIES, hidden: int = 0,
                 dropout: float = 0.2, modality_dropout: float = 0.25, lr: float = 3e-3,
                 weight_decay: float = 1e-2,
                 l2: float | Sequence[float] = (0.003, 0.01, 0.03, 0.1),
                 l2_dim_power: float = 0.5, max_epochs: int = 300,
                 min_epochs: int = 20, patience: int = 25, batch_size: int = 256,
                 seed: int = 0, device: str = "auto", calibration: str = "platt-pattern",
                 solver: str = "auto",
                 rank: Mapping[str, Sequence[tuple[Sequence[int], int]]] | None = None,
                 bias_l2: float = 0.0) -> None:
        self.modalities = modalities
        self.hidden = hidden
        self.dropout = dropout
        self.modality_dropout = modality_dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.l2 = l2
        self.l2_dim_power = l2_dim_power
        self.max_epochs = max_epochs
        self.min_epochs = min_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.calibration = calibration
        self.solver = solver
        self.rank = rank
        self.bias_l2 = bias_l2


    # -- fitting -----------------------------------------------------------------------

    def fit(self, X: Mapping[str, np.ndarray], y: np.ndarray, mask: np.ndarray | None = None,
            *, X_val: Mapping[str, np.ndarray], y_val: np.ndarray,
            mask_val: np.ndarray | None = None) -> FusionRiskModel:
        """Fit the head; the validation split picks the L2 strengths (and, with AdamW, the
        epoch). Returns self. The "lbfgs" fit runs on the CPU in float64 whatever
        ``device`` says: it is a small convex problem, and float64 keeps it exact.
        """
        if self.calibration not in self._parameter_constraints["calibration"]:
            raise ValueError(f"calibration must be one of {list(METHODS)}, got "
                             f"{self.calibration!r}")
        if not 0.0 <= self.modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; choose from {list(MODALITIES)}")
        modalities = tuple(m for m in self.modalities if m in X)
        if not modalities:
            raise ValueError(f"X has none of the modalities {list(self.modalities)}")
        y_arr = np.asarray(y, dtype=np.float32)
        if len(np.unique(y_arr)) < 2:
            raise ValueError("the training split has one class only; cannot train")
        self.modalities_ = modalities
        self.dims_ = {m: int(np.asarray(X[m]).shape[1]) for m in modalities}
        device = resolve_device(self.device)
        xs, ms = self._tensors(X, mask, len(y_arr))
        xv, mv = self._tensors(X_val, mask_val, len(y_val))
        l2_grid = [float(v) for v in (self.l2 if isinstance(self.l2, Sequence) else [self.l2])]
        if not l2_grid or min(l2_grid) < 0:
            raise ValueError(f"l2 must be a non-negative float or a list of them, got {self.l2!r}")
        if self.solver not in self._parameter_constraints["solver"]:
            raise ValueError(f"solver must be 'auto', 'lbfgs' or 'adam', got {self.solver!r}")
        if self.solver == "lbfgs" and self.hidden > 0:
            raise ValueError("solver='lbfgs' fits linear branches only; use hidden=0 or "
                             "solver='adam'")
        lbfgs = self.solver == "lbfgs" or (self.solver == "auto" and self.hidden == 0)
        if self.bias_l2 and not lbfgs:
            raise ValueError("bias_l2 needs solver 'lbfgs' (or 'auto' with hidden=0)")
        if self.rank and not lbfgs:
            raise ValueError("rank restricts linear branches fitted exactly; it needs "
                             "solver 'lbfgs' (or 'auto' with hidden=0)")
        if lbfgs:
            net, history, best, l2_shared, by_mod = self._fit_lbfgs(
                l2_grid, xs, ms, xv, mv, y_arr, np.asarray(y_val, np.float32))
            best_epoch = 0
        else:
            fits = [self._fit_one(l2, xs, ms, xv, mv, y_arr, np.asarray(y_val, np.float32),
                                  device) for l2 in l2_grid]
            k = int(np.argmin([f[3] for f in fits]))
            net, history, best_epoch, best = fits[k]
            l2_shared = l2_grid[k]
            by_mod = dict.fromkeys(modalities, l2_shared)
            if len(l2_grid) > 1:
                log.info("fusion: l2 %s chosen on validation log-loss (%s)", l2_grid[k],
                         ", ".join(f"{v:g}: {f[3]:.4f}"
                                   for v, f in zip(l2_grid, fits, strict=True)))
        self.net_ = net.to("cpu").eval()
        self.history_ = history
        self.best_epoch_ = best_epoch
        self.l2_ = l2_shared
        self.l2_by_modality_ = by_mod
        self.calibrator_: Calibrator | None = None
        if best_epoch:
            log.info("fusion: best epoch %d, val loss %.4f", best_epoch, best)
        return self

    def _init_net(self, xs: dict[str, torch.Tensor], ms: torch.Tensor, y_arr: np.ndarray
                  ) -> FusionNet:
        """A fresh net at the base rate, each branch standardised on the rows that have it."""
        net = FusionNet(self.dims_, self.hidden, self.dropout)
        with torch.no_grad():
            rate = float(y_arr.mean())
            net.bias.fill_(math.log(rate / (1 - rate)))
            for j, m in enumerate(self.modalities_):
                present = ms[:, j] > 0
                if present.any():
                    rows = xs[m][present].double()
                    std = rows.std(dim=0, unbiased=False) if len(rows) > 1 else \
                        torch.ones(rows.shape[1], dtype=torch.float64)
                    branch = net.branches[m]
                    assert isinstance(branch, Branch)
                    branch.shift.copy_(rows.mean(dim=0).float())
                    branch.scale.copy_(torch.where(std > 1e-6, std, 1.0).float())
        return net

    def _dropout_expansion(self, ms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
        """Every subset of each row's modalities, weighted by its modality-dropout probability.

        Returns (row index, subset mask, weight): training on these weighted rows is
        training on the expectation of the sampled dropout, without its noise.
        """
        p = float(self.modality_dropout)
        n_mod = ms.shape[1]
        subsets = torch.tensor([[(k >> j) & 1 for j in range(n_mod)]
                                for k in range(2**n_mod)], dtype=torch.float64)
        present = ms.double()
        rows, masks, weights = [], [], []
        for sub in subsets:
            kept = present * sub  # modalities kept from those present
            dropped = present * (1 - sub)
            ok = (sub <= present + 1e-9).all(dim=1)  # a subset of what the row has
            w = (1 - p) ** kept.sum(dim=1) * p ** dropped.sum(dim=1)
            idx = torch.nonzero(ok & (w > 1e-12)).flatten()
            rows.append(idx)
            masks.append(sub.expand(len(idx), n_mod))
            weights.append(w[idx])
        return torch.cat(rows), torch.cat(masks), torch.cat(weights)

    def _fit_lbfgs(self, l2_grid: list[float], xs: dict[str, torch.Tensor], ms: torch.Tensor,
                   xv: dict[str, torch.Tensor], mv: torch.Tensor, y_arr: np.ndarray,
                   y_val: np.ndarray
                   ) -> tuple[FusionNet, list[dict[str, float]], float, float, dict[str, float]]:
        """Exact penalised fits; L2 shared first, then per branch by coordinate search."""
        mods = self.modalities_
        base = self._init_net(xs, ms, y_arr).double()
        xs64 = {m: v.double() for m, v in xs.items()}
        xv64 = {m: v.double() for m, v in xv.items()}
        rows, sub_mask, weight = self._dropout_expansion(ms)
        yt = torch.as_tensor(y_arr, dtype=torch.float64)[rows]
        yv = torch.as_tensor(y_val, dtype=torch.float64)
        mv64 = mv.double()
        n = float(len(y_arr))
        history: list[dict[str, float]] = []
        cache: dict[tuple[float, ...], tuple[float, dict[str, torch.Tensor]]] = {}
        standardised = {m: (xs64[m] - cast(Branch, base.branches[m]).shift)
                        / cast(Branch, base.branches[m]).scale for m in mods}
        bases = self._rank_bases(standardised, ms)

        def fit(l2s: tuple[float, ...]) -> tuple[float, dict[str, torch.Tensor]]:
            if l2s in cache:
                return cache[l2s]
            net = copy.deepcopy(base)
            branch = {m: cast(Branch, net.branches[m]) for m in mods}
            # A reduced-rank branch learns coefficients on its principal directions;
            # its weight is basis @ coefficients, folded into the linear layer below.
            coef = {m: torch.zeros(p.shape[1], dtype=torch.float64, requires_grad=True)
                    for m, p in bases.items()}

            def weight_of(m: str) -> torch.Tensor:
                return bases[m] @ coef[m] if m in bases else branch[m].linear.weight[0]

            params = [net.bias, *(branch[m].linear.weight for m in mods if m not in bases),
                      *coef.values(), *(branch[m].linear.bias for m in mods)]
            penalty = [lam * float(self.dims_[m]) ** self.l2_dim_power
                       for lam, m in zip(l2s, mods, strict=True)]
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=300, tolerance_grad=1e-7,
                                    tolerance_change=1e-10, history_size=20,
                                    line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                opt.zero_grad()
                w = {m: weight_of(m) for m in mods}
                contrib = torch.stack([standardised[m] @ w[m] + branch[m].linear.bias
                                       for m in mods], dim=1)
                logit = net.bias + (contrib[rows] * sub_mask).sum(dim=1)
                nll = nn.functional.binary_cross_entropy_with_logits(
                    logit, yt, weight=weight, reduction="sum") / n
                reg = sum(c * (w[m] ** 2).sum()
                          for c, m in zip(penalty, mods, strict=True))
                if self.bias_l2:
                    reg = reg + float(self.bias_l2) * sum((branch[m].linear.bias ** 2).sum()
                                                          for m in mods)
                loss = nll + reg
                loss.backward()  # type: ignore[no-untyped-call]
                return loss

            opt.step(closure)  # type: ignore[no-untyped-call]
            with torch.no_grad():
                for m in bases:
                    branch[m].linear.weight.copy_(weight_of(m)[None, :])
                val_logit, _ = net(xv64, mv64)
                val = float(nn.functional.binary_cross_entropy_with_logits(val_logit, yv))
            history.append({"val_loss": val,
                            **{f"l2_{m}": lam for m, lam in zip(mods, l2s, strict=True)}})
            cache[l2s] = (val, copy.deepcopy(net.state_dict()))
            return cache[l2s]

        shared = min(l2_grid, key=lambda lam: fit((lam,) * len(mods))[0])
        current = [shared] * len(mods)
        if len(l2_grid) > 1 and len(mods) > 1:
            for j in range(len(mods)):
                def at(lam: float, j: int = j) -> float:
                    return fit(tuple([*current[:j], lam, *current[j + 1:]]))[0]
                current[j] = min(l2_grid, key=at)
        best, state = fit(tuple(current))
        net = FusionNet(self.dims_, self.hidden, self.dropout)
        net.load_state_dict({k: v.float() for k, v in state.items()})
        by_mod = dict(zip(mods, current, strict=True))
        log.info("fusion (lbfgs): l2 shared %g, per branch %s; validation log-loss %.4f "
                 "(%d fits)", shared, by_mod, best, len(cache))
        return net, history, best, shared, by_mod

    def _rank_bases(self, standardised: dict[str, torch.Tensor], ms: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """Orthonormal weight basis ``(d, r)`` of each branch with reduced-rank blocks.

        Each block's columns get its top-k principal directions on the branch's
        training rows; every column outside the blocks keeps its own free weight.
        """
        unknown = sorted(set(self.rank or {}) - set(self.modalities_))
        if unknown:
            raise ValueError(f"rank names modalities {unknown} that are not fitted; "
                             f"fitted: {list(self.modalities_)}")
        bases: dict[str, torch.Tensor] = {}
        for j, m in enumerate(self.modalities_):
            blocks = (self.rank or {}).get(m)
            if not blocks:
                continue
            d = self.dims_[m]
            z = standardised[m][ms[:, j] > 0]
            taken: set[int] = set()
            parts: list[torch.Tensor] = []
            for cols, k in blocks:
                idx = [int(i) for i in cols]
                if not idx or min(idx) < 0 or max(idx) >= d or taken & set(idx) or \
                        len(set(idx)) < len(idx) or int(k) < 1:
                    raise ValueError(f"rank[{m!r}]: each block needs distinct columns in "
                                     f"0..{d - 1}, in no other block, and k >= 1")
                taken |= set(idx)
                # The standardised columns are centred on these rows already.
                _, _, vh = torch.linalg.svd(z[:, idx], full_matrices=False)
                part = torch.zeros(d, min(int(k), len(idx)), dtype=z.dtype)
                part[idx] = vh[:int(k)].T
                parts.append(part)
            free = [i for i in range(d) if i not in taken]
            unit = torch.zeros(d, len(free), dtype=z.dtype)
            unit[free, torch.arange(len(free))] = 1.0
            bases[m] = torch.cat([unit, *parts], dim=1)
        return bases

    def _fit_one(self, l2: float, xs: dict[str, torch.Tensor], ms: torch.Tensor,
                 xv: dict[str, torch.Tensor], mv: torch.Tensor, y_arr: np.ndarray,
                 y_val: np.ndarray, device: torch.device
                 ) -> tuple[FusionNet, list[dict[str, float]], int, float]:
        """One training run at L2 strength ``l2``: (net at its best epoch, history, epoch, loss)."""
        yt = torch.as_tensor(y_arr)
        yv = torch.as_tensor(y_val)
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        # Start at the base rate (fewer epochs, a sane early stop), branches standardised.
        net = self._init_net(xs, ms, y_arr).to(device)
        linear = [p for n_, p in net.named_parameters() if ".linear.weight" in n_]
        # Wider branches get a proportionally stronger penalty (d ** l2_dim_power), so a
        # 770-wide note branch cannot outfit a 1-wide image branch on noise.
        weights = [float(p.shape[1]) ** self.l2_dim_power for p in linear]
        others = [p for n_, p in net.named_parameters() if ".linear.weight" not in n_]
        opt = torch.optim.AdamW([{"params": linear, "weight_decay": 0.0},
                                 {"params": others, "weight_decay": self.weight_decay}],
                                lr=self.lr)
        loss_fn = nn.BCEWithLogitsLoss()
        xs_d = {m: v.to(device) for m, v in xs.items()}
        xv_d = {m: v.to(device) for m, v in xv.items()}
        ms_d, mv_d, yt_d, yv_d = ms.to(device), mv.to(device), yt.to(device), yv.to(device)
        best, best_state, best_epoch, stale = math.inf, copy.deepcopy(net.state_dict()), 0, 0
        history: list[dict[str, float]] = []
        n = len(yt)
        for epoch in range(1, self.max_epochs + 1):
            net.train()
            order = torch.randperm(n, generator=gen).to(device)
            keep = (torch.rand(ms.shape, generator=gen) >= self.modality_dropout).to(device)
            total = 0.0
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = {m: v[idx] for m, v in xs_d.items()}
                logit, _ = net(batch, ms_d[idx] * keep[idx])
                loss = loss_fn(logit, yt_d[idx])
                if l2 > 0:
                    loss = loss + l2 * sum(c * (w * w).sum()
                                           for c, w in zip(weights, linear, strict=True))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            net.eval()
            with torch.no_grad():
                val_logit, _ = net(xv_d, mv_d)
                val_loss = float(loss_fn(val_logit, yv_d))
            history.append({"epoch": epoch, "train_loss": total / n, "val_loss": val_loss})
            if epoch == 1 or epoch % 10 == 0:
                log.info("fusion epoch %d: train loss %.4f, val loss %.4f", epoch, total / n,
                         val_loss)
            if val_loss < best - 1e-5:
                best, best_state, best_epoch, stale = (val_loss, copy.deepcopy(net.state_dict()),
                                                       epoch, 0)
            else:
                stale += 1
                if stale >= self.patience and epoch >= self.min_epochs:
                    break
        net.load_state_dict(best_state)
        return net, history, best_epoch, best

    def calibrate(self, X: Mapping[str, np.ndarray], y: np.ndarray,
                  mask: np.ndarray | None = None) -> FusionRiskModel:
        """Fit ``calibration`` on held-out rows (never the training split); returns self."""
        check_is_fitted(self, "net_")
        logit, contrib, present = self._forward(X, mask, None)
        return self.calibrate_scores(logit, contrib, present, y)

    def calibrate_scores(self, logit: np.ndarray, contrib: np.ndarray, present: np.ndarray,
                         y: np.ndarray, bias: np.ndarray | float | None = None
                         ) -> FusionRiskModel:
        """Fit ``calibration`` on held-out raw scores: fused logits, per-branch
        contributions and availability (as :meth:`_forward` gives them), e.g. the
        out-of-fold scores of heads fitted without each row (``bias``: their global bias,
        per row; default this head's). Returns self."""
        check_is_fitted(self, "net_")
        cal = make_calibrator(self.calibration)
        if isinstance(cal, PlattScaling) and cal.per_pattern:
            # A pattern that is rare in the calibration split (imaging missing: ~80
            # patients) would get a noisy offset from its own rows alone. Every row also
            # stands in, masked, for each smaller pattern of its modalities -- the same
            # device as modality dropout -- so each pattern's offset is learned from
            # most of the split, while the rows that really have the pattern still count.
            z, keys, w, t = self._masked_copies(logit, contrib, present, np.asarray(y), bias)
            self.calibrator_ = cal.fit(z, t, keys, sample_weight=w)
        else:
            self.calibrator_ = cal.fit(logit, y, self.pattern_keys(present))
        return self

    #: Weight of each masked copy of a calibration row, relative to the row itself.
    MASKED_COPY_WEIGHT: ClassVar[float] = 0.5

    def _masked_copies(self, logit: np.ndarray, contrib: np.ndarray, present: np.ndarray,
                       y: np.ndarray, bias: np.ndarray | float | None = None
                       ) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
        """Rows as observed, plus each row with every non-empty proper subset of its modalities."""
        b = np.broadcast_to(np.asarray(float(self.net_.bias.detach()[0]) if bias is None
                                       else bias, dtype=float), (len(logit),))
        zs, ms, ws, ts = [logit], [present], [np.ones(len(logit))], [y]
        n_mod = present.shape[1]
        for k in range(1, 2**n_mod - 1):
            sub = np.array([(k >> j) & 1 for j in range(n_mod)], dtype=bool)
            rows = np.flatnonzero((present | ~sub).all(axis=1) & (present.sum(axis=1) >
                                                                   sub.sum()))
            if not len(rows):
                continue
            zs.append(b[rows] + contrib[rows][:, sub].sum(axis=1))
            ms.append(np.repeat(sub[None, :], len(rows), axis=0))
            ws.append(np.full(len(rows), self.MASKED_COPY_WEIGHT))
            ts.append(y[rows])
        return (np.concatenate(zs), self.pattern_keys(np.vstack(ms)), np.concatenate(ws),
                np.concatenate(ts))

    def pattern_keys(self, present: np.ndarray) -> list[str]:
        """Missingness-pattern key of each row of an ``(n, M)`` mask, e.g. ``"ehr+note"``."""
        m = np.asarray(present, dtype=bool).reshape(-1, len(self.modalities_))
        return ["+".join(mod for mod, on in zip(self.modalities_, row, strict=True) if on)
                or "none" for row in m]

    def calibrate_logit(self, logit: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Apply the calibrator to raw fused logits of rows with availability ``present``."""
        cal = getattr(self, "calibrator_", None)
        if cal is None:
            return np.asarray(logit, dtype=float)
        return np.asarray(cal.transform(logit, self.pattern_keys(present)), dtype=float)

    # -- inference ---------------------------------------------------------------------

    def _tensors(self, X: Mapping[str, np.ndarray], mask: np.ndarray | None, n: int
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if mask is None:
            m = np.array([[mod in X for mod in self.modalities_]] * n, dtype=bool)
        else:
            m = np.asarray(mask, dtype=bool)
            if m.shape != (n, len(self.modalities_)):
                raise ValueError(f"mask must have shape ({n}, {len(self.modalities_)}) for "
                                 f"modalities {list(self.modalities_)}, got {m.shape}")
        out: dict[str, torch.Tensor] = {}
        for j, mod in enumerate(self.modalities_):
            if mod not in X:
                if m[:, j].any():
                    raise ValueError(f"mask says {mod!r} is present but X has no {mod!r}")
                out[mod] = torch.zeros(n, self.dims_[mod])
                continue
            arr = np.asarray(X[mod], dtype=np.float32)
            if arr.shape != (n, self.dims_[mod]):
                raise ValueError(f"{mod!r} input must have shape ({n}, {self.dims_[mod]}), "
                                 f"got {arr.shape}")
            bad = ~np.isfinite(arr).all(axis=1) & m[:, j]
            if bad.any():
                raise ValueError(f"{mod!r} has non-finite values in {int(bad.sum())} row(s) "
                                 "marked present")
            arr = np.where(m[:, j:j + 1], arr, 0.0).astype(np.float32)
            out[mod] = torch.from_numpy(np.ascontiguousarray(arr))
        return out, torch.from_numpy(m.astype(np.float32))

    def _forward(self, X: Mapping[str, np.ndarray], mask: np.ndarray | None,
                 device: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        check_is_fitted(self, "net_")
        n = len(next(iter(X.values()))) if X else (0 if mask is None else len(mask))
        xs, ms = self._tensors(X, mask, n)
        dev = resolve_device(device if device is not None else self.device)
        net = self.net_.to(dev)
        logits, contribs = [], []
        try:
            with torch.inference_mode(), exact_math():
                for start in range(0, n, 4096):
                    sl = slice(start, start + 4096)
                    lo, co = net({m: v[sl].to(dev) for m, v in xs.items()}, ms[sl].to(dev))
                    logits.append(lo.cpu())
                    contribs.append(co.cpu())
        finally:
            self.net_ = net.to("cpu")
        if not logits:
            return np.zeros(0), np.zeros((0, len(self.modalities_))), ms.numpy()
        return (torch.cat(logits).double().numpy(), torch.cat(contribs).double().numpy(),
                ms.numpy().astype(bool))

    def predict_logit(self, X: Mapping[str, np.ndarray], mask: np.ndarray | None = None, *,
                      calibrated: bool = True, device: str | None = None) -> np.ndarray:
        """Fused logit per row (after the calibrator's logit map when there is one)."""
        logit, _, present = self._forward(X, mask, device)
        return self.calibrate_logit(logit, present) if calibrated else logit

    def predict_proba(self, X: Mapping[str, np.ndarray], mask: np.ndarray | None = None, *,
                      device: str | None = None) -> np.ndarray:
        """``(n, 2)`` class probabilities, calibrated when :meth:`calibrate` has run."""
        logit, _, present = self._forward(X, mask, device)
        z = self.calibrate_logit(logit, present)
        cal = getattr(self, "calibrator_", None)
        # Isotonic maps to probabilities directly (its logit form clips at eps).
        p = cal.predict_proba(logit) if isinstance(cal, IsotonicCalibration) else \
            0.5 * (1 + np.tanh(0.5 * z))
        return np.column_stack([1.0 - p, p])

    def per_modality_logits(self, X: Mapping[str, np.ndarray], mask: np.ndarray | None = None,
                            *, calibrated: bool = True, device: str | None = None
                            ) -> np.ndarray:
        """``(n, M)``: the logit each modality gives alone (``b + f_m``); NaN where absent.

        Equals :meth:`predict_logit` with every other modality masked.
        """
        _, contribs, present = self._forward(X, mask, device)
        alone = float(self.net_.bias.detach()[0]) + contribs
        if calibrated:
            # Each column is "only modality j present": calibrate it as that pattern.
            for j in range(alone.shape[1]):
                only = np.zeros((len(alone), len(self.modalities_)), dtype=bool)
                only[:, j] = True
                alone[:, j] = self.calibrate_logit(alone[:, j], only)
        return np.where(present, alone, np.nan)

    def contributions(self, X: Mapping[str, np.ndarray], mask: np.ndarray | None = None, *,
                      device: str | None = None) -> np.ndarray:
        """``(n, M)`` raw contributions ``f_m`` to the fused logit; 0 where absent."""
        _, contribs, present = self._forward(X, mask, device)
        return np.where(present, contribs, 0.0)

    # -- persistence -------------------------------------------------------------------

    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(config, state dict) for the artifact."""
        check_is_fitted(self, "net_")
        params = {**self.get_params(deep=False), "modalities": list(self.modalities)}
        cal = getattr(self, "calibrator_", None)
        config = {"params": params, "modalities": list(self.modalities_), "dims": self.dims_,
                  "best_epoch": self.best_epoch_, "l2": getattr(self, "l2_", None),
                  "calibrator": cal.to_dict() if cal is not None else None}
        return config, {k: v.detach().cpu().clone() for k, v in self.net_.state_dict().items()}

    @classmethod
    def from_state(cls, config: dict[str, Any], state: dict[str, torch.Tensor]
                   ) -> FusionRiskModel:
        params = dict(config["params"])
        params["modalities"] = tuple(params["modalities"])
        model = cls(**params)
        model.modalities_ = tuple(config["modalities"])
        # JSON documents may come back with sorted keys: the order is modalities_, not dims.
        model.dims_ = {m: int(config["dims"][m]) for m in model.modalities_}
        net = FusionNet(model.dims_, model.hidden, model.dropout)
        net.load_state_dict(state)
        model.net_ = net.eval()
        model.history_ = []
        model.best_epoch_ = int(config.get("best_epoch", 0))
        cal = config.get("calibrator")
        model.calibrator_ = calibrator_from_dict(cal) if cal else None
        return model
