"""Each row's own low-rank term straight from the banks: ``out[t] += sum_m c[row, m] * S[slot] (A[slot] x[t])``
with ``slot = slots[row, m]`` (a negative slot adds nothing), for the decode steps of `table.RowTable`.

Two small kernels per adapted linear read, for every token, only the factors of its row's slots (the
gathered matrix-vector products of Punica's BGMV, shrink then expand): no concatenated factors, no
per-row mask, and no shape that depends on which adapters the rows use, so a step captured in a CUDA graph
serves any mix of resident adapters by refilling the ``slots`` / ``coef`` buffers in place.

On CUDA with Triton the kernel is Triton's; elsewhere (and as the tests' oracle) the same arithmetic runs
in torch: gather the row's factors, two batched products in fp32 per slot, one rounding into ``out``. Both
compute the term in fp32 and round ``out + term`` once to ``out``'s dtype, so a row whose slots are all
negative stays bit for bit what the base computed.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch


def rows_term(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Add each row's term into ``out`` in place.

    ``x`` ``(tokens, in)``, ``out`` ``(tokens, out)`` (contiguous rows), tokens a multiple of the rows;
    ``lora_a`` ``(cap, r, in)`` and ``lora_b`` ``(cap, r, out)`` the banks (``s * B`` transposed);
    ``slots`` ``(rows, M)`` long and ``coef`` ``(rows, M)`` float32.
    """
    kernel_for(x.device)(x, lora_a, lora_b, slots, coef, out)


def kernel_for(device: torch.device) -> Any:
    """The implementation of `rows_term` for tensors on ``device``: Triton's on CUDA where Triton is
    there, torch's elsewhere (a `table.RowTable` picks it once, when it is made)."""
    kernel = _triton() if device.type == "cuda" else None
    return kernel if kernel is not None else _torch


def _torch(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slots: torch.Tensor,
    coef: torch.Tensor,
    out: torch.Tensor,
) -> None:
    apply_gathered(x, gather(lora_a, lora_b, slots, coef), out)


def gather(
    lora_a: torch.Tensor, lora_b: torch.Tensor, slots: torch.Tensor, coef: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Torch's kernel, first half: per slot column ``m``, each row's ``lora_A`` transposed ``(n, in, r)``
    and its weighted ``lora_B`` ``(n, r, out)``, in fp32 (a `_term.Table` keeps them while its rows stay)."""
    n, m = slots.shape
    parts = []
    for j in range(m):
        slot = slots[:, j].clamp(min=0)
        weight = (coef[:, j] * (slots[:, j] >= 0)).to(torch.float32).view(n, 1, 1)
        a = lora_a.index_select(0, slot).to(torch.float32).transpose(1, 2)
        parts.append((a, lora_b.index_select(0, slot).to(torch.float32) * weight))
    return parts


def apply_gathered(
    x: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], out: torch.Tensor
) -> None:
    """Torch's kernel, second half: ``out += term``, rounded once. One slot after another, each product of
    one row's own shapes, so a row's term is the same whatever the other rows hold and however many slots
    they use (a padded slot adds exact zeros)."""
    n = parts[0][0].shape[0]
    tokens = x.shape[0]
    xs = x.view(n, tokens // n, -1).to(torch.float32)
    term: torch.Tensor | None = None
    for a, s in parts:
        t = torch.bmm(torch.bmm(xs, a), s)
        term = t if term is None else term.add_(t)
    assert term is not None
    out.copy_(out.to(torch.float32).add_(term.view(tokens, -1)))


@functools.cache
def _triton() -> Any:
    """The Triton launcher, or None where Triton is missing (then `_torch` runs)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    # Two kernels without loops over ``in`` (a loop over ``in`` left each program waiting on one load after
    # another: 35 us a linear on an H200): the shrink splits ``in`` over programs, each writing its partial
    # ``A x`` of every (slot, rank) pair of its row; the expand sums the partials and adds its columns.
    # Each slot is its own tile of ``(RP, BK)`` / ``(RP, BO)``, taken one after another, and the tile sizes
    # do not depend on the number of slots: a row's term is summed in the same order whatever the other
    # rows use (a padded slot adds exact zeros), which the batch-invariant decode steps rely on.

    @triton.jit
    def lora_rows_shrink(
        x_ptr,
        a_ptr,
        part_ptr,
        slots_ptr,
        per,
        n_in,
        sx,
        sa0,
        sa1,
        M: tl.constexpr,
        R: tl.constexpr,
        RP: tl.constexpr,
        BK: tl.constexpr,
    ):
        t = tl.program_id(0)
        ks = tl.program_id(1)
        row = t // per
        rr = tl.arange(0, RP)
        kk = ks * BK + tl.arange(0, BK)
        km = kk < n_in
        xv = tl.load(x_ptr + t * sx + kk, mask=km, other=0.0).to(tl.float32)
        base = part_ptr + (t * tl.num_programs(1) + ks) * (M * RP)
        for m in tl.static_range(M):
            slot = tl.load(slots_ptr + row * M + m + rr * 0)  # the row's slot m, once per rank
            ok = (rr < R) & (slot >= 0)
            slot = tl.where(ok, slot, 0).to(tl.int64)
            av = tl.load(
                a_ptr + slot[:, None] * sa0 + rr[:, None] * sa1 + kk[None, :],
                mask=ok[:, None] & km[None, :],
                other=0.0,
            )
            tl.store(base + m * RP + rr, tl.sum(av.to(tl.float32) * xv[None, :], axis=1))

    @triton.jit
    def lora_rows_expand(
        part_ptr,
        s_ptr,
        y_ptr,
        slots_ptr,
        coef_ptr,
        per,
        n_out,
        n_parts,
        sy,
        ss0,
        ss1,
        M: tl.constexpr,
        R: tl.constexpr,
        RP: tl.constexpr,
        KP: tl.constexpr,
        BO: tl.constexpr,
    ):
        t = tl.program_id(0)
        ob = tl.program_id(1)
        row = t // per
        rr = tl.arange(0, RP)
        kp = tl.arange(0, KP)
        oo = ob * BO + tl.arange(0, BO)
        om = oo < n_out
        d = tl.zeros((BO,), dtype=tl.float32)
        for m in tl.static_range(M):
            slot = tl.load(slots_ptr + row * M + m + rr * 0)
            ok = (rr < R) & (slot >= 0)
            c = tl.load(coef_ptr + row * M + m + rr * 0, mask=ok, other=0.0)
            slot = tl.where(ok, slot, 0).to(tl.int64)
            parts = tl.load(
                part_ptr + (t * n_parts + kp[:, None]) * (M * RP) + m * RP + rr[None, :],
                mask=kp[:, None] < n_parts,
                other=0.0,
            )
            h = tl.sum(parts, axis=0) * c  # (RP,): zero past the rank and for a padded slot
            sv = tl.load(
                s_ptr + slot[:, None] * ss0 + rr[:, None] * ss1 + oo[None, :],
                mask=ok[:, None] & om[None, :],
                other=0.0,
            )
            d += tl.sum(h[:, None] * sv.to(tl.float32), axis=0)
        yp = y_ptr + t * sy + oo
        yv = tl.load(yp, mask=om, other=0.0).to(tl.float32)
        tl.store(yp, (yv + d).to(y_ptr.dtype.element_ty), mask=om)

    # tile sizes: ADAPTERHUB_ROWKERNEL="BO,WARPS,BK" (the most output columns per expand program, its warps,
    # the most input columns per shrink program) for tuning on other GPUs; the defaults were measured on an H200
    bo_max, warps, bk_max = (int(v) for v in os.environ.get("ADAPTERHUB_ROWKERNEL", "512,4,512").split(","))

    def launch(
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        slots: torch.Tensor,
        coef: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        n, m = slots.shape
        tokens, n_in = x.shape
        n_out, r = out.shape[1], lora_a.shape[1]
        assert lora_a.stride(2) == 1 and lora_b.stride(2) == 1 and x.stride(1) == 1 and out.stride(1) == 1
        rp = triton.next_power_of_2(r)
        bk = max(16, min(bk_max, 8192 // rp, triton.next_power_of_2(n_in)))
        n_parts = triton.cdiv(n_in, bk)
        bo = max(16, min(bo_max, 8192 // rp, triton.next_power_of_2(n_out)))
        part = torch.empty((tokens, n_parts, m * rp), dtype=torch.float32, device=x.device)
        per = tokens // n
        lora_rows_shrink[(tokens, n_parts)](
            x,
            lora_a,
            part,
            slots,
            per,
            n_in,
            x.stride(0),
            lora_a.stride(0),
            lora_a.stride(1),
            M=m,
            R=r,
            RP=rp,
            BK=bk,
            num_warps=4,
        )
        lora_rows_expand[(tokens, triton.cdiv(n_out, bo))](
            part,
            lora_b,
            out,
            slots,
            coef,
            per,
            n_out,
            n_parts,
            out.stride(0),
            lora_b.stride(0),
            lora_b.stride(1),
            M=m,
            R=r,
            RP=rp,
            KP=triton.next_power_of_2(n_parts),
            BO=bo,
            num_warps=warps,
        )

    return launch
