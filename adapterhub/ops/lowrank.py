"""Low-rank linear algebra for combine and extract: pick a rank, truncate a factored or a dense delta.

``(B, A)`` pairs are 2-D ``(out, r)`` and ``(r, in*kh*kw)`` tensors whose product is the delta; every
truncation splits the singular values evenly between the two factors. `_truncate_factored` reduces the
rank of ``B @ A`` from QR factorisations of the stacks (CholeskyQR2, Householder as the fallback) and an
SVD of the small core, never forming the product, and answers a `FactoredDelta` (the type every combine
method answers with); `_dense_truncate` does a truncated SVD of a dense matrix (an fp64 Gram
eigendecomposition on a GPU). `_check_rank` / `_check_keep` check the ``rank`` and ``keep`` arguments
that `_pick_rank` takes.

Torch is imported only when a function runs.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..errors import InvalidOptionError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FactoredDelta:
    """A method's answer for one module: ``B @ A`` (scale 1) and its squared error against the exact sum."""

    B: torch.Tensor  # (out, R)
    A: torch.Tensor  # (R, in*kh*kw)
    error_sq: float
    norm_sq: float  # squared Frobenius norm of the exact weighted sum


def _check_rank(rank: object, *, allow_none: bool) -> None:
    if rank is None and allow_none:
        return
    if rank == "auto":
        return
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidOptionError(f"rank must be a positive integer or 'auto', got {rank!r}")


def _check_keep(keep: float) -> None:
    if not (isinstance(keep, numbers.Real) and 0.0 < float(keep) <= 1.0):
        raise InvalidOptionError(f"keep is the share of energy to keep, 0 < keep <= 1; got {keep!r}")


def _pick_rank(energy: torch.Tensor, rank: int | Literal["auto"], keep: float) -> int:
    """How many leading singular values to keep (``energy`` = squared singular values, descending)."""
    n = int(energy.numel())
    if rank != "auto":
        return min(int(rank), n)
    e = energy.double()
    total = float(e.sum())
    if n == 0 or total <= 0.0:
        return 1
    cum = e.cumsum(0)
    need = keep * total * (1.0 - 1e-12)
    return max(1, min(n, int((cum < need).sum()) + 1))


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) Vh_r``: the singular values split evenly between the factors."""
    sq = s[:r].sqrt()
    return u[:, :r] * sq, sq[:, None] * vh[:r]


def _dense_truncate(
    x: torch.Tensor,
    rank: int | Literal["auto"],
    keep: float,
    max_rank: int | None = None,
    *,
    gram: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a dense 2-D ``x`` as ``(B, A)`` in ``x.dtype``, singular values split evenly.

    On the CPU: ``torch.linalg.svd`` (LAPACK gesdd; what PEFT uses). On a GPU: an eigendecomposition of
    the smaller fp64 Gram matrix, because cuSOLVER's default fp32 SVD (Jacobi) can miss the leading
    subspace by 1e-3 to 1e-2 relative, while this is exact to fp32 and about as fast as gesvda.
    ``gram`` forces one way or the other.
    """
    import torch

    if not (gram if gram is not None else x.device.type != "cpu"):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        r = _pick_rank(s.double() ** 2, rank, keep)
        if max_rank is not None:
            r = min(r, max_rank)
        return _split(u, s, vh, r)
    xd = x.double()
    tall = x.shape[0] > x.shape[1]
    w, v = torch.linalg.eigh(xd.T @ xd if tall else xd @ xd.T)
    energy = w.flip(0).clamp_min(0.0)
    v = v.flip(1)
    r = _pick_rank(energy, rank, keep)
    if max_rank is not None:
        r = min(r, max_rank)
    s = energy[:r].sqrt()
    # drop directions at the fp64 Gram's noise floor rather than divide by them
    live = s > s[0] * 1e-7
    root = torch.where(live, s.sqrt(), torch.zeros_like(s))
    inv_root = torch.where(live, 1.0 / s.clamp_min(1e-300).sqrt(), torch.zeros_like(s))
    if tall:  # x = U S V^T, V from X^T X: A = sqrt(S) V^T, B = X V S^-1/2
        a = root[:, None] * v[:, :r].T
        b = (xd @ v[:, :r]) * inv_root
    else:  # U from X X^T: B = U sqrt(S), A = S^-1/2 U^T X
        b = v[:, :r] * root
        a = inv_root[:, None] * (v[:, :r].T @ xd)
    return b.to(x.dtype), a.to(x.dtype)


def _pad(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero columns / rows so an explicit ``rank`` is met even where the exact sum has lower rank."""
    r = b.shape[1]
    if r >= rank:
        return b, a
    import torch

    b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
    a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0)
    return b, a


def _orthogonalize(x: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """``x = Q R`` for a tall ``(n, K)`` stack: returns ``(M -> Q @ M, R)`` without necessarily forming Q.

    CholeskyQR2 (two Cholesky factorisations of K x K Gram matrices; as accurate as Householder for
    condition numbers below ~1e7 in fp64, and several times faster on tall-skinny stacks), falling back
    to Householder QR when the stack is rank deficient or ill-conditioned (the same adapter twice, K > n).
    """
    import torch

    n, k = x.shape
    if n >= k:
        l1, info1 = torch.linalg.cholesky_ex(x.T @ x)
        d1 = l1.diagonal()
        if int(info1) == 0 and float(d1.min()) > 1e-7 * float(d1.max()):
            r1 = l1.T
            q1 = torch.linalg.solve_triangular(r1, x, upper=True, left=False)  # x @ inv(r1)
            l2, info2 = torch.linalg.cholesky_ex(q1.T @ q1)
            if int(info2) == 0:
                r2 = l2.T
                return (lambda m: q1 @ torch.linalg.solve_triangular(r2, m, upper=True)), r2 @ r1
    q, r = torch.linalg.qr(x)
    return (lambda m: q @ m), r


def _truncate_factored(
    b: torch.Tensor, a: torch.Tensor, rank: int | Literal["auto"], keep: float
) -> FactoredDelta:
    """Optimal rank reduction of ``b @ a`` (``(out, K) @ (K, in)``) without forming the product.

    ``b = Qb Rb`` and ``a^T = Qa Ra``, so ``b @ a = Qb (Rb Ra^T) Qa^T``; the SVD of the small core
    ``Rb Ra^T = U S V^T`` gives the SVD of the product, ``(Qb U) S (Qa V)^T``.
    """
    import torch

    apply_b, rb = _orthogonalize(b)
    apply_a, ra = _orthogonalize(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    energy = s.double() ** 2
    r = _pick_rank(energy, rank, keep)
    sq = s[:r].sqrt()
    new_b = apply_b(u[:, :r] * sq)
    new_a = apply_a(vh[:r].T * sq).T
    if rank != "auto":
        new_b, new_a = _pad(new_b, new_a, int(rank))
    return FactoredDelta(new_b, new_a, float(energy[r:].sum()), float(energy.sum()))
