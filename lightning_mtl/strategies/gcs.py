"""GCS: auxiliary losses gated by gradient cosine similarity (Du et al. 2018)."""

from __future__ import annotations

from torch import Tensor

from lightning_mtl.functional.auxiliary import cosines_to_main, gcs_weights
from lightning_mtl.strategies._auxiliary import AuxiliaryWeighting
from lightning_mtl.strategies._gradient_based import GradientMode, JacobianMethod, SyncMode


class GCS(AuxiliaryWeighting):
    """GCS: Du, Czarnecki, Jayakumar, Farajtabar, Pascanu & Lakshminarayanan, "Adapting Auxiliary Losses Using
    Gradient Similarity", arXiv:1812.02224 (2018).

    An auxiliary task's gradient on the shared parameters is added to the main task's only where it agrees
    with it: the shared update is ``g_main + Σₖ wₖgₖ`` with ``wₖ = 1[cos(g_main, gₖ) > 0]`` (the paper's
    unweighted rule) or, with ``weighted=True``, ``wₖ = max(0, cos(g_main, gₖ))`` (its weighted variant), so that
    an auxiliary task never makes the update a worse descent direction for the main loss (to first order).
    Every task-specific parameter (head) gets its own task's plain gradient ``∇ΣLᵢ`` (``heads="plain"``),
    whatever the gate: a gated auxiliary task still trains its head.

    Conventions (:func:`~lightning_mtl.functional.auxiliary.gcs_weights`):

    * **Boundary**: strictly positive cosine (``cos > 0``) opens the gate; ``cos = 0`` (orthogonal) does not.
      This follows the ``> 0`` of AuxiLearn's port of the unweighted rule; an orthogonal gradient brings no
      first-order decrease of the main loss, and the weighted variant gives it weight 0 too, so both variants
      agree at the boundary.
    * **Zero-norm gradients**: a zero auxiliary or main gradient has an undefined cosine, taken as 0 (gate
      closed). A step on which no main task is labelled (partial labels) closes every gate.
    * **Several main tasks**: the main gradient is the sum of the main tasks' gradients (the gradient of the
      summed main loss, each main task weighted 1), and each auxiliary task is compared with that sum.
    * Cosines are measured on the whole shared parameter vector (the paper's form; not per layer), from the
      Gramian of the global batch: the weights, hence the update, are exact under DDP (``sync="exact"``).

    Logged: ``train/weight/<task>`` (1 for main tasks, the gate or ``max(0, cos)`` for auxiliary ones) and
    ``train/gcs/cos/<aux task>``.

    Example::

        tasks = ["price", Task("volume", role="auxiliary")]
        trainer = L.Trainer(callbacks=[GCS()])          # or GCS(weighted=True)

    Args:
        weighted: ``False`` (default): the unweighted gate ``1[cos > 0]``; ``True``: weight ``max(0, cos)``.
        mode: ``"parameters"`` (default) or ``"representation"`` (cosines of the gradients w.r.t. the shared
            representation marked in ``task_losses``, cheaper; the paper uses the shared parameters).
        update_every, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.

    Raises:
        ValueError: when attached to a module without at least one main and one auxiliary task.
    """

    heads = "plain"

    def __init__(
        self,
        weighted: bool = False,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        if not isinstance(weighted, bool):
            raise ValueError(f"GCS weighted must be True or False, got {weighted!r}.")
        super().__init__(mode=mode, update_every=update_every, sync=sync, jacobian=jacobian)
        self.weighted = weighted

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        main = self.main_mask
        cos = cosines_to_main(stat, main, "GCS")
        for name, c, is_main in zip(self.task_names, cos.tolist(), main.tolist()):
            if not is_main:
                self._metrics[f"train/gcs/cos/{name}"] = stat.new_tensor(c).float()
        return gcs_weights(stat, main, weighted=self.weighted)
