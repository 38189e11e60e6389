"""GradDrop: gradient sign dropout (Chen et al. 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_generator

_METHOD = "GradDrop"


def graddrop(
    grads: Tensor,
    activations: Tensor,
    *,
    leak: Tensor | float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Combined gradient of GradDrop at a shared activation layer.

    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov (2020), *Just Pick a Sign: Optimizing Deep
    Multitask Models with Gradient Sign Dropout*, NeurIPS, https://arxiv.org/abs/2010.06808, Algorithm 1
    (``f`` the identity). With ``∇ᵢ = ∂Lᵢ/∂A``:

    - ``Sᵢ = Σ_batch sign(A) ⊙ ∇ᵢ`` (summed over the batch dimension, dim 0 of ``A``);
    - purity ``P = ½(1 + ΣᵢSᵢ / Σᵢ|Sᵢ|)`` elementwise (``½`` where every ``Sᵢ`` is zero);
    - ``U ~ Uniform(0, 1)``, one draw per element of ``P``, shared by all tasks and the whole batch;
    - mask ``Mᵢ = 1[P > U]·1[Sᵢ > 0] + 1[P < U]·1[Sᵢ < 0]``;
    - result ``Σᵢ (ℓᵢ + (1 − ℓᵢ)Mᵢ) ⊙ ∇ᵢ`` (masks broadcast over the batch), to back-propagate into ``A``.

    The result is the **sum** over tasks (the paper; one port averages and multiplies back by ``T``).
    Not Gramian-expressible: it acts on the representation gradients themselves. ``U`` is drawn on the CPU
    from ``generator`` (in the gradients' dtype, float32 for half precisions) then moved to their device,
    so a generator in the same state gives the same masks on every process; TorchJD's ``GradDrop`` draws
    ``torch.rand(P.shape)`` the same way from the global generator (its input plays the role of ``S``).

    Shapes:
        ``activations``: ``A = [B, *F]``, batch first (``[B]`` for one feature; add a batch dim of size 1 if
        there is none). ``grads``: ``[T, B, *F]``, task ``i``'s gradient of its loss with respect to ``A``.
        ``leak``: float or ``[T]``, each in ``[0, 1]`` (default 0; 1 lets a main task's gradient through
        untouched). Returns ``[B, *F]``, the dtype and device of ``grads``.
    """
    if not isinstance(grads, Tensor) or not isinstance(activations, Tensor):
        raise TypeError(f"grads and activations must be torch.Tensors for {_METHOD}.")
    if grads.ndim < 2 or grads.shape[0] < 1 or grads.shape[1:] != activations.shape:
        raise ValueError(
            f"grads must be [T, *A] with A = activations.shape (batch first) for {_METHOD}, got grads "
            f"{tuple(grads.shape)} and activations {tuple(activations.shape)}."
        )
    if not grads.is_floating_point():
        raise ValueError(f"grads must be floating point for {_METHOD}, got dtype {grads.dtype}.")
    check_generator(generator, _METHOD)
    T = grads.shape[0]
    leak_t = torch.as_tensor(leak, dtype=grads.dtype, device=grads.device).detach()
    if leak_t.ndim == 0:
        leak_t = leak_t.expand(T)
    if leak_t.shape != (T,) or not bool(((leak_t >= 0) & (leak_t <= 1)).all()):
        raise ValueError(
            f"leak must be a float or a [{T}] tensor with values in [0, 1] for {_METHOD}, got {leak!r}."
        )
    if not bool(torch.isfinite(grads).all()) or not bool(torch.isfinite(activations).all()):
        raise ValueError(f"grads and activations must be finite for {_METHOD}.")
    signed = (torch.sign(activations).to(grads.dtype) * grads).sum(dim=1)  # S: [T, *F]
    total, magnitude = signed.sum(dim=0), signed.abs().sum(dim=0)
    ratio = torch.where(magnitude > 0, total / torch.where(magnitude > 0, magnitude, 1.0), 0.0)
    purity = 0.5 * (1 + ratio)
    draw_dtype = grads.dtype if grads.dtype in (torch.float32, torch.float64) else torch.float32
    uniform = torch.rand(purity.shape, generator=generator, dtype=draw_dtype).to(grads.device, grads.dtype)
    mask = ((purity > uniform) & (signed > 0)) | ((purity < uniform) & (signed < 0))
    keep = leak_t.view(T, *[1] * (signed.ndim - 1)) + (1 - leak_t).view(T, *[1] * (signed.ndim - 1)) * mask
    return (keep.unsqueeze(1).to(grads.dtype) * grads).sum(dim=0)
