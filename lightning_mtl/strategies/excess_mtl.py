"""ExcessMTL: robust multi-task learning with excess risks (He et al., ICML 2024)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mtl.functional.excess_mtl import ExcessMTLState, excess_mtl_step, normalized_log_weights
from lightning_mtl.strategies._gradient_based import GradientMode, GradientWeighting, JacobianMethod, SyncMode
from lightning_mtl.task_state import take_tasks

_KEYS = ("sq_grad_sum", "baseline", "log_weights")
#: ``log w`` whose log-sum-exp is within this of ``log T`` is taken as normalised (not shifted on load)
_NORMALISED = 1e-9


class ExcessMTL(GradientWeighting):
    """ExcessMTL: He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess
    Risks", ICML 2024 (PMLR 235; https://arxiv.org/abs/2402.02009); the authors' code
    (``yifei-he/ExcessMTL``, ``LibMTL/weighting/ExcessMTL.py``, identical in LibMTL).

    Task weights follow each task's *excess risk* (its distance to convergence) instead of its loss, so that
    a task with label noise (a large Bayes error, hence a large loss that never goes away) does not take
    over the others. At each weight update, with ``gᵢ`` task ``i``'s gradient on the shared parameters
    (:func:`~lightning_mtl.functional.excess_mtl.excess_mtl_step`):

    * ``Sᵢ ← Sᵢ + gᵢ²`` (an AdaGrad accumulator: the diagonal Hessian approximation ``Hᵢ ≈ diag(√Sᵢ)``);
    * ``eᵢ = gᵢᵀ diag(1/√(Sᵢ + 1e-7)) gᵢ``, the excess-risk estimate ``Lᵢ(θ) − Lᵢ(θ*) ≈ gᵢᵀHᵢ⁻¹gᵢ`` of a
      second-order Taylor expansion (the paper's Equations 6-7);
    * scale processing (Section 3.2): ``rᵢ = eᵢ / e⁰ᵢ`` with ``e⁰ᵢ`` the first step's estimate;
    * exponentiated-gradient ascent (Equation 9): ``wᵢ ← wᵢ·exp(η rᵢ)``, renormalised to ``Σ w = T``;

    then ``Σ wᵢLᵢ`` is back-propagated once (the task-specific parameters get ``wᵢ∇Lᵢ`` too, as the authors'
    ``loss.backward()`` of the weighted sum). The equation and section numbers are those TorchJD 0.18's
    ``ExcessMTLWeighting`` cites; the rule itself was checked against the authors' code.

    Conventions (none changes the weights of the authors' code, except where a task's first gradient is
    zero):

    * **Sum T**: the weights start at 1 and sum to ``T`` (authors' code, LibMTL; the paper's simplex weights
      times ``T``; TorchJD's weights sum to 1). ``train/weight/<task>`` logs them.
    * **No ½** in ``eᵢ`` (the authors'): it cancels in ``eᵢ/e⁰ᵢ``.
    * **First step**: the authors' ``first_epoch`` flag means the first call: that step stores ``e⁰`` and
      leaves the weights at 1 (TorchJD with ``n_warmup_steps=1``; its default ``0`` already moves them).
      No multi-step warm-up: TorchJD reports that the paper's Appendix C.1 collects the statistics over a few
      epochs first; the authors' code does not, nor does this class.
    * **Log weights**: the update is carried out on ``log w`` (float64) with a log-sum-exp normalisation, so
      a long run saturates the weights instead of overflowing ``exp``.
    * **A zero first gradient** (``e⁰ᵢ = 0``, the task does not reach the shared parameters yet; the
      strategy warns once): that task's baseline waits for its first non-zero ``eᵢ``, its ``rᵢ`` is 0 until
      then (the authors' code would divide by zero).
    * **Per optimizer step**: ``gᵢ`` is the gradient of the global batch (averaged over ranks and over the
      accumulation window), so ``S``, ``e⁰`` and ``log w`` are identical on every rank and the update under
      DDP equals the single-process update on the union batch. With ``update_every=k`` the state moves only
      on the ``k``-th steps (the others take no per-task gradient). With ``sync="local"`` each rank updates
      the state from its own gradients and the base averages ``S``, ``e⁰`` and ``log w`` over ranks: a
      ``T × P`` all-reduce per update, as costly as ``"exact"``, and only an approximation.
    * Loss scale: multiplying a task's loss by ``c > 0`` leaves its weight unchanged (``eᵢ`` and ``e⁰ᵢ``
      both scale by ``c``, up to the ``1e-7``).

    Memory: ``S`` is ``T × P`` in the Jacobian's dtype on its device (as large as the Jacobian itself). The
    state ``S``, ``e⁰`` and ``log w`` is saved in checkpoints (``S`` on the CPU) and restored by task name.
    ``train/excess_mtl/relative_excess/<task>`` logs ``rᵢ``.

    Partial labels: a step where some tasks are labelled on no rank is the update above on the present tasks
    only, as a problem of ``|P|`` tasks: their rows of ``S`` accumulate, a present task whose baseline is unset
    (absent so far) sets it now, and their ``log w`` (renormalised to sum ``|P|`` over them: the paper's
    simplex over the present tasks, times ``|P|``) take the exponentiated-gradient step; the step's weights
    are those (sum ``|P|``), 0 for the absent tasks. The new present weights are written back scaled by the
    share of ``T`` they had before the step, so ``Σ w = T`` still holds over all tasks and the absent tasks'
    ``S`` rows, ``e⁰`` and ``log w`` stay bit-for-bit as they were. When the first update has absent tasks their
    state starts as the authors' first call would leave it (``S = 0``, ``e⁰`` unset, ``w = 1``).

    Args:
        robust_step_size: ``η > 0``, the exponentiated-gradient step (default ``1e-2``, the default of the
            authors' ``--robust_step_size`` in their ``LibMTL/config.py``, as in LibMTL; TorchJD defaults to
            ``1.0``; the per-benchmark values of the paper were not checked).
        mode: ``"parameters"`` only (the default): the method needs the Jacobian, not only its Gramian, so
            ``"representation"`` is refused.
        update_every, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
        seed: unused (the method draws no random numbers); accepted for the common signature.
    """

    needs = "jacobian"

    def __init__(
        self,
        robust_step_size: float = 1e-2,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
        seed: int | None = None,
    ) -> None:
        if isinstance(robust_step_size, bool) or not (
            isinstance(robust_step_size, (int, float))
            and math.isfinite(robust_step_size)
            and robust_step_size > 0
        ):
            raise ValueError(
                f"ExcessMTL robust_step_size must be a finite number > 0, got {robust_step_size!r} "
                "(the authors use 1e-2; larger values move the weights faster)."
            )
        self.robust_step_size = float(robust_step_size)
        self._state: ExcessMTLState | None = None
        super().__init__(mode=mode, update_every=update_every, sync=sync, jacobian=jacobian, seed=seed)

    # ------------------------------------------------------------------ state, read-only views
    @property
    def sq_grad_sum(self) -> Tensor | None:
        """``S [T, P]``, the running sum of squared per-task gradients (updated in place at each weight
        update); ``None`` before the first update."""
        return None if self._state is None else self._state.sq_grad_sum

    @property
    def baseline(self) -> Tensor | None:
        """``e⁰ [T]`` (float64), each task's first non-zero excess-risk estimate (0: not yet set)."""
        return None if self._state is None else self._state.baseline

    @property
    def log_weights(self) -> Tensor | None:
        """``log w [T]`` (float64), normalised so that ``Σ exp(log w) = T``; ``None`` before the first update."""
        return None if self._state is None else self._state.log_weights

    # ------------------------------------------------------------------ the method
    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        if self._state is not None and tuple(self._state.sq_grad_sum.shape) != tuple(stat.shape):
            raise ValueError(
                f"ExcessMTL: the state S has shape {tuple(self._state.sq_grad_sum.shape)} but the Jacobian of the "
                f"shared parameters has shape {tuple(stat.shape)} (tasks × shared parameters): the checkpoint was "
                "written for another model or another shared_parameters(). Resume with the model that wrote it, "
                "or start a new fit without ckpt_path."
            )
        # S is the strategy's own: updated in place (peak memory J, S and one [T, P] temporary)
        result = excess_mtl_step(stat, self._state, robust_step_size=self.robust_step_size, inplace=True)
        self._state = result.state
        for name, r in zip(self.task_names, result.relative_excess.float().unbind()):
            self._metrics[f"train/excess_mtl/relative_excess/{name}"] = r
        return result.weights

    def method_config(self) -> dict[str, Any]:
        """``robust_step_size``: ``log w`` is the sum of the ``η rᵢ`` steps taken with it."""
        return {"robust_step_size": self.robust_step_size}

    def method_state(self) -> dict[str, Any]:
        if self._state is None:
            return {key: None for key in _KEYS}
        return dict(zip(_KEYS, self._state))

    def load_method_state(self, state: Mapping[str, Any], order: Sequence[int] | None = None) -> None:
        """Restore :meth:`method_state`; ``order[i]`` is the saved index of task ``i`` (``None``: same order).
        The rows of ``S`` and the entries of ``e⁰`` and ``log w`` are reordered; ``log w`` is renormalised
        when it is not (after ``sync="local"`` averaged it over ranks, or narrowed to the present tasks), and
        kept bit-for-bit when it is."""
        values = [state.get(key) for key in _KEYS]
        if all(v is None for v in values):
            self._state = None
            return
        if any(v is None for v in values):
            missing = [k for k, v in zip(_KEYS, values) if v is None]
            raise ValueError(
                f"ExcessMTL: the saved state lacks {missing} (it has {[k for k in _KEYS if k not in missing]}): "
                "the checkpoint is incomplete. Start a new fit without ckpt_path."
            )
        S, baseline, log_weights = (v.detach() for v in values)
        if order is not None:
            S, baseline, log_weights = (take_tasks(v, order) for v in (S, baseline, log_weights))
        log_weights = log_weights.to(device="cpu", dtype=torch.float64)
        T = log_weights.numel()
        if abs(float(torch.logsumexp(log_weights, 0)) - math.log(T)) > _NORMALISED:
            log_weights = normalized_log_weights(log_weights)  # else kept bit-for-bit (partial labels)
        self._state = ExcessMTLState(  # S is updated in place: a copy, not the caller's tensor
            S.clone(), baseline.to(device="cpu", dtype=torch.float64), log_weights.clone()
        )

    def method_task_dims(self) -> dict[str, tuple[int, ...]]:
        """The rows of ``S`` and the entries of ``e⁰`` and ``log w`` are per task."""
        return {key: (0,) for key in _KEYS}

    def method_absent_fill(self) -> dict[str, float]:
        """``S = 0``, ``e⁰`` unset (0), ``log w = 0`` (``w = 1``): the state before the authors' first call."""
        return dict.fromkeys(_KEYS, 0.0)

    def merge_present_state(
        self, full: Mapping[str, Any], narrowed: Mapping[str, Any], present: list[int]
    ) -> dict[str, Any]:
        """The base's merge, with the present tasks' new ``log w`` (normalised to ``|P|`` over them) shifted to
        the share of ``T`` they had before the step: ``Σ w = T`` over all tasks, the absent tasks' untouched."""
        merged = super().merge_present_state(full, narrowed, present)
        new = narrowed.get("log_weights")
        if isinstance(new, Tensor):
            old = full.get("log_weights")
            before = torch.zeros(self.num_tasks, dtype=torch.float64)  # w = 1 before the first update
            if isinstance(old, Tensor):
                before = old.detach().to(device="cpu", dtype=torch.float64)
            index = torch.tensor(present, dtype=torch.long)
            share = torch.logsumexp(before[index], 0) - math.log(len(present))
            out = before.clone()
            out[index] = new.detach().to(device="cpu", dtype=torch.float64) + share
            merged["log_weights"] = out
        return merged

    def task_state(self) -> dict[str, Any]:
        """The base's checkpoint state, with a copy of ``S`` on the CPU (a checkpoint loads on any device, and
        the live ``S`` is updated in place)."""
        state = super().task_state()
        S = state["method"].get("sq_grad_sum")
        if isinstance(S, Tensor):
            state["method"]["sq_grad_sum"] = S.detach().to("cpu", copy=True)
        return state
