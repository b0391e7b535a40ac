"""The STE training step of the dynamic shuffle as two Triton kernels (issue 5).

In ``"ste"`` training a :class:`~dyshuffle.layers.DynamicShuffle` with shared factors adds about
46 compute operators per layer to a training step (``python3 -m dyshuffle.tools.op_count``): the
descriptor, the generator, the softmax, the regularizer, the choice, the gather, and in the
backward the inverse gather, the factor gradients' contraction, the regularizer's gradient, the
softmax's and the generator's backward. On a GPU the CIFAR models are bound by launching them
(a training step 2.2x the fixed shuffle's on an H200, eager). :func:`ste_shuffle` does the same
step with two kernels, the sum of the regularizer and four small PyTorch operators for the
generator's weight gradients (ShuffleNetV2 1.0x: 2.2 compute operators per layer more than the
fixed shuffle's step, each kernel counted as one):

- forward: the inference kernel of :mod:`~dyshuffle.layers.fused` (descriptor, generator,
  softmax, choice and gather of each sample in one program, the parts of a concatenation read
  where they are), which also writes what the backward needs and each sample's regularizer;
- backward, one program per sample: the contraction of the output and its gradient into the
  factor gradients, the regularizer's gradient, the softmax's and the generator's backward down
  to the descriptor, and the input gradient (the inverse gather plus the descriptor's share)
  written to each part. The weight gradients are two matrix products and two sums over the
  samples (deterministic, no atomics).

Numbers are float32 inside the kernels (the PyTorch path computes the generator and the
contraction in the input's dtype under autocast): in float32 the gradients equal the PyTorch
path's within rounding, and the forward output bit for bit (tests/test_fused_training.py, which
runs the kernels on the CPU through Triton's interpreter). Opt-in (``fused_training=True`` of the
layer) until a GPU benchmark shows it pays (``dyshuffle bench --variants dynamic
dynamic:fused_training=true``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fused as _fused
from .permutation import _as_dtype

__all__ = ["available", "channel_tables", "ste_shuffle"]


def available(device: torch.device) -> bool:
    """The training kernels can run on ``device``: CUDA with Triton, or the CPU under Triton's
    interpreter (``TRITON_INTERPRET=1``, the tests). There is no C version for the CPU, where
    the PyTorch path's training step is within the target already (docs/BENCHMARKS.md)."""
    if not _fused.ENABLED or _fused.triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and _fused._INTERPRETED)


def channel_tables(groups: int, a: int, b: int, cross_shuffle: bool) -> tuple[Tensor, Tensor]:
    """Where each output channel sits in its group's ``(a, b)`` grid, for the backward kernel.

    Output channel ``c`` holds slot ``u = i * b + j`` of group ``g`` (``c = u * G + g`` with the
    cross-group shuffle, ``g * a * b + u`` without).

    Returns:
        ``rows`` ``(2, C)`` int32: ``i`` and ``a + j`` of every channel (its row of ``A`` and of
        ``B`` in the numbering of the kernels' logit rows), and ``moved`` ``(a + b, C)`` int32:
        for ``k < a`` the channel of slot ``(k, j)`` of the same group, for ``k >= a`` that of
        slot ``(i, k - a)``.
    """
    m = a * b
    c = torch.arange(groups * m)
    if cross_shuffle:
        u, g = c // groups, c % groups
    else:
        g, u = c // m, c % m
    i, j = u // b, u % b

    def channel(i_: Tensor, j_: Tensor) -> Tensor:
        slot = i_ * b + j_
        return slot * groups + g if cross_shuffle else g * m + slot

    moved = [channel(torch.full_like(i, k), j) for k in range(a)]
    moved += [channel(i, torch.full_like(j, k)) for k in range(b)]
    rows = torch.stack([i, a + j])
    return rows.to(torch.int32), torch.stack(moved).to(torch.int32)


if _fused.triton is not None:
    triton = _fused.triton
    tl = _fused.tl

    @triton.jit
    def _ste_backward_kernel(
        gy_ptr,
        y_ptr,
        gx0_ptr,
        gx1_ptr,
        soft_ptr,
        hidden_ptr,
        row_ptr,
        w1_ptr,
        w2_ptr,
        segment_ptr,
        column_ptr,
        rows_ptr,
        moved_ptr,
        inv_cols_ptr,
        index_inv_ptr,
        dlogit_ptr,
        dhidden_ptr,
        gorth_ptr,
        c0,
        channels,
        pixels,
        width,
        sgn,
        sgc,
        sgh,
        sgw,
        syn,
        syh,
        syw,
        s0n,
        s0h,
        s0w,
        s1n,
        s1h,
        s1w,
        hidden,
        num_logits,
        num_cols,
        inv_pixels,
        inv_tau,
        orth_scale,
        TWO_PARTS: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_R: tl.constexpr,
        TAU_IN_MEMORY: tl.constexpr,
    ):
        n = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK_C)
        in_c = c < channels
        r = tl.arange(0, BLOCK_R)  # the a + b rows (and moved-channel maps) of both factors
        in_r = r < num_cols

        # 1. acc[k, c] = sum_p gy[p, c] * y[p, moved[k, c]]: the contraction of the output and
        #    its gradient that the factor gradients are sums of
        moved = tl.load(
            moved_ptr + r[:, None] * channels + c[None, :],
            mask=in_r[:, None] & in_c[None, :],
            other=0,
        )
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for start in range(0, pixels, BLOCK_P):
            in_p, h, w = _fused._pixel_tile(start, pixels, width, BLOCK_P)
            offg = n * sgn + h * sgh + w * sgw
            g = tl.load(
                gy_ptr + offg[:, None] + c[None, :] * sgc,
                mask=in_p[:, None] & in_c[None, :],
                other=0.0,
            ).to(tl.float32)
            offy = n * syn + h * syh + w * syw
            ys = tl.load(
                y_ptr + offy[:, None, None] + moved[None, :, :],
                mask=in_p[:, None, None] & in_r[None, :, None] & in_c[None, None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(g[:, None, :] * ys, axis=0)

        # 2. summed over the channels of each row: part[k, q] = sum_{c in row q} acc[k, c]
        #    (row q < a: channels with i = q, for A; q >= a: j = q - a, for B)
        row_a = tl.load(rows_ptr + c, mask=in_c, other=-1)
        row_b = tl.load(rows_ptr + channels + c, mask=in_c, other=-1)
        part = tl.zeros([BLOCK_R, BLOCK_R], dtype=tl.float32)
        for q in range(0, num_cols):
            in_q = (row_a == q) | (row_b == q)
            col_q = tl.sum(tl.where(in_q[None, :], acc, 0.0), axis=1)  # (R,)
            part = tl.where(r[None, :] == q, col_q[:, None], part)

        # 3. the soft factors' gradient: dA[i, k] = part[ainv[k], i], dB[j, l] = part[a +
        #    binv[l], a + j] (inv_cols of the chosen pair: ainv, then a + binv)
        l_ = tl.arange(0, BLOCK_L)
        in_l = l_ < num_logits
        seg = tl.load(segment_ptr + l_, mask=in_l, other=-1)
        col = tl.load(column_ptr + l_, mask=in_l, other=-1)
        row = tl.load(row_ptr + n)
        k_of = tl.load(inv_cols_ptr + row * num_cols + col, mask=in_l, other=-1)
        pick = (k_of[:, None, None] == r[None, :, None]) & (seg[:, None, None] == r[None, None, :])
        dsoft = tl.sum(tl.sum(tl.where(pick, part[None, :, :], 0.0), axis=2), axis=1)  # (L,)

        # 4. + the regularizer's gradient, 4 (M M^T - I) M of each factor, times its weight
        soft = tl.load(soft_ptr + n * num_logits + l_, mask=in_l, other=0.0)
        diff = _fused._orthogonality_residual(soft, seg, col, in_l, r)  # (R, R)
        # entries[l, q] = M[q, col(l)]: the soft entry in row q and the column of logit l
        same_col = (col[:, None] == col[None, :]) & in_l[None, :]
        member = seg[:, None] == r[None, :]  # (L, R)
        entries = tl.sum(
            tl.where(same_col[:, :, None] & member[None, :, :], soft[None, :, None], 0.0), axis=1
        )
        # diff_rows[l, q] = diff[row(l), q]
        diff_rows = tl.sum(tl.where(member[:, :, None], diff[None, :, :], 0.0), axis=1)
        gorth = tl.load(gorth_ptr).to(tl.float32) * (4.0 * orth_scale)
        dsoft += gorth * tl.sum(diff_rows * entries, axis=1)

        # 5. the softmax's backward (each row of each factor), then the temperature
        same_row = (seg[:, None] == seg[None, :]) & in_l[None, :]
        dot = tl.sum(tl.where(same_row, (soft * dsoft)[None, :], 0.0), axis=1)
        if TAU_IN_MEMORY:  # (as in the forward kernel)
            dlogit = tl.where(in_l, soft * (dsoft - dot) * tl.load(inv_tau), 0.0)
        else:
            dlogit = tl.where(in_l, soft * (dsoft - dot) * inv_tau, 0.0)
        tl.store(dlogit_ptr + n * num_logits + l_, dlogit, mask=in_l)

        # 6. the generator's backward to the descriptor, one hidden unit at a time
        dz = tl.zeros([BLOCK_C], dtype=tl.float32)
        for j in range(0, hidden):
            w2 = tl.load(w2_ptr + l_ * hidden + j, mask=in_l, other=0.0)
            hj = tl.load(hidden_ptr + n * hidden + j)
            dh = tl.where(hj > 0.0, tl.sum(w2 * dlogit, axis=0), 0.0)
            tl.store(dhidden_ptr + n * hidden + j, dh)
            w1 = tl.load(w1_ptr + j * channels + c, mask=in_c, other=0.0)
            dz += w1 * dh
        dz = dz * inv_pixels

        # 7. the input's gradient: gx[p, c] = gy[p, inverse[c]] + dz[c] / pixels, to each part
        src = tl.load(index_inv_ptr + row * channels + c, mask=in_c, other=0)
        in0 = in_c & (c < c0)
        in1 = in_c & (c >= c0)
        for start in range(0, pixels, BLOCK_P):
            in_p, h, w = _fused._pixel_tile(start, pixels, width, BLOCK_P)
            offg = n * sgn + h * sgh + w * sgw
            v = tl.load(
                gy_ptr + offg[:, None] + src[None, :] * sgc,
                mask=in_p[:, None] & in_c[None, :],
                other=0.0,
            ).to(tl.float32)
            v += dz[None, :]
            off0 = n * s0n + h * s0h + w * s0w
            tl.store(gx0_ptr + off0[:, None] + c[None, :], v, mask=in_p[:, None] & in0[None, :])
            if TWO_PARTS:
                off1 = n * s1n + h * s1h + w * s1w
                tl.store(
                    gx1_ptr + off1[:, None] + (c - c0)[None, :],
                    v,
                    mask=in_p[:, None] & in1[None, :],
                )


def _forward(
    x0, x1, w1, b1, w2, b2, score, segment, column, index, num_a, tau, orth_scale, num_cols
):
    """The training forward: ``(y, orth_scale * sum_n R_n, pooled, hidden, soft, row)``, the
    last four the float32 descriptor, hidden layer and softmax factors and the int64 chosen pair
    of every sample, which the backward reads (``w1``-``b2`` float32, ``num_cols``: a + b;
    ``tau`` the temperature, or ``1 / tau`` in a one-element tensor, :func:`.fused.inv_tau`)."""
    n, channels, dev = x0.shape[0], index.shape[1], x0.device
    pooled = torch.empty(n, channels, device=dev)
    hid = torch.empty(n, w1.shape[0], device=dev)
    soft = torch.empty(n, w2.shape[0], device=dev)
    row = torch.empty(n, dtype=torch.int64, device=dev)
    orth = torch.empty(n, device=dev)  # (the kernel writes every sample's)
    save = (pooled, hid, soft, row, orth, column, orth_scale, num_cols)
    two = x1 is not None
    args = (x0, x1 if two else x0, w1, b1, w2, b2, score, segment, index, num_a, tau, two)
    y = _fused._run(*args, save=save)
    if y.numel() == 0:  # (no samples or no pixels: the kernel did not run)
        for t in (pooled, hid, soft, row, orth):
            t.zero_()
    return y, orth.sum(), pooled, hid, soft, row


def _backward(gy, gloss, y, soft, hid, row, w1, w2, tables, c0, two_parts, tau, orth_scale):
    """The backward kernel: ``(gx0, gx1, dlogit, dhidden)``, the gradients of the parts (``gx1``
    ``None`` for one part) and of the generator's logits and hidden layer (``w1``, ``w2``
    float32; ``tables``: ``(segment, column, rows, moved, inv_cols, index_inv)``; ``tau`` as in
    :func:`_forward`)."""
    segment, column, rows, moved, inv_cols, index_inv = tables
    n, channels, h, w = y.shape
    hidden, num_logits = hid.shape[1], soft.shape[1]
    dev = y.device
    shapes = [(n, c0, h, w)] + ([(n, channels - c0, h, w)] if two_parts else [])
    gxs = [
        torch.empty(s, dtype=y.dtype, device=dev, memory_format=torch.channels_last) for s in shapes
    ]
    dlogit = torch.empty(n, num_logits, device=dev)
    dhid = torch.empty(n, hidden, device=dev)
    if n:  # (no samples: the weight-gradient products and sums of these are zeros)
        gx0, gx1 = gxs[0], gxs[-1]
        block_c = _fused.pow2(channels)
        block_r = _fused.pow2(moved.shape[0])
        _ste_backward_kernel[(n,)](
            gy,
            y,
            gx0,
            gx1,
            soft,
            hid,
            row,
            w1,
            w2,
            segment,
            column,
            rows,
            moved,
            inv_cols,
            index_inv,
            dlogit,
            dhid,
            gloss.reshape(1),
            c0,
            channels,
            h * w,
            w,
            *gy.stride(),
            y.stride(0),
            y.stride(2),
            y.stride(3),
            gx0.stride(0),
            gx0.stride(2),
            gx0.stride(3),
            gx1.stride(0),
            gx1.stride(2),
            gx1.stride(3),
            hidden,
            num_logits,
            moved.shape[0],
            1.0 / (h * w),
            _fused.inv_tau(tau),
            orth_scale,
            TWO_PARTS=two_parts,
            BLOCK_C=block_c,
            BLOCK_P=max(1, _fused._TILE // (block_c * block_r)),
            BLOCK_L=_fused.pow2(num_logits),
            BLOCK_R=block_r,
            TAU_IN_MEMORY=isinstance(tau, Tensor),
        )
    return gxs[0], gxs[1] if two_parts else None, dlogit, dhid


def _weight_grads(dhid, dlogit, pooled, hid, dtypes, need):
    """The gradients of ``w1, b1, w2, b2``: sums over the samples in PyTorch (deterministic), in
    ``dtypes`` (``None`` where ``need`` is false)."""
    return (
        _as_dtype(dhid.T @ pooled, dtypes[0]) if need[0] else None,
        _as_dtype(dhid.sum(0), dtypes[1]) if need[1] else None,
        _as_dtype(dlogit.T @ hid, dtypes[2]) if need[2] else None,
        _as_dtype(dlogit.sum(0), dtypes[3]) if need[3] else None,
    )


class _FusedSTE(torch.autograd.Function):
    """The layer's STE step in eager mode: ``(x0, x1, w1, b1, w2, b2) -> (y, regularizer)`` with
    the tables of the layer as constants (see :func:`ste_shuffle`; under ``torch.compile`` the
    operator ``dyshuffle::ste_shuffle`` does the same)."""

    @staticmethod
    def forward(ctx, x0, x1, w1, b1, w2, b2, tables, tau, orth_scale):  # type: ignore[override]
        score, segment, column, index, index_inv, inv_cols, rows, moved, num_a = tables
        f32 = [_fused.float32(t) for t in (w1, b1, w2, b2)]
        y, loss, pooled, hid, soft, row = _forward(
            x0, x1, *f32, score, segment, column, index, num_a, tau, orth_scale, moved.shape[0]
        )
        ctx.save_for_backward(y, pooled, hid, soft, row, *f32[::2])
        ctx.tables = (segment, column, rows, moved, inv_cols, index_inv)
        ctx.tau, ctx.orth_scale = tau, orth_scale
        ctx.c0, ctx.two_parts = x0.shape[1], x1 is not None
        ctx.weight_dtypes = [t.dtype for t in (w1, b1, w2, b2)]
        return y, loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # (the kernels' gradients have no gradient)
    def backward(ctx, gy, gloss):  # type: ignore[override]
        # (gloss is never None: autograd materializes the gradient of an unused output)
        y, pooled, hid, soft, row, w1, w2 = ctx.saved_tensors
        gx0, gx1, dlogit, dhid = _backward(
            gy,
            gloss,
            y,
            soft,
            hid,
            row,
            w1,
            w2,
            ctx.tables,
            ctx.c0,
            ctx.two_parts,
            ctx.tau,
            ctx.orth_scale,
        )
        need = ctx.needs_input_grad
        grads = _weight_grads(dhid, dlogit, pooled, hid, ctx.weight_dtypes, need[2:6])
        return gx0 if need[0] else None, gx1 if need[1] else None, *grads, None, None, None


# Under torch.compile the step is a pair of custom operators with their autograd formula and
# shapes registered, which Dynamo and Inductor keep as calls (CUDA graphs capture them): the
# autograd function above launches kernels that tracing cannot see into. (Opaque operators
# rather than ``triton_op``: those run under Triton's interpreter too, where the tests trace
# them on the CPU; ``wrap_triton`` of an interpreted kernel cannot be traced.)


@torch.library.custom_op("dyshuffle::ste_shuffle", mutates_args=())
def _ste_op(
    x0: Tensor,
    x1: Tensor | None,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    score: Tensor,
    segment: Tensor,
    column: Tensor,
    index: Tensor,
    index_inv: Tensor,
    inv_cols: Tensor,
    rows: Tensor,
    moved: Tensor,
    num_a: int,
    inv_tau: Tensor,
    orth_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`ste_shuffle`'s forward: the output, the regularizer and what the backward reads
    (``index_inv``, ``inv_cols`` and ``rows`` are the backward's, inputs so that it has them;
    ``inv_tau``: ``1 / tau`` in a one-element float32 tensor, so that a new temperature is not a
    new compiled graph)."""
    x0, x1 = _fused.unit_channel_stride(x0, x1)
    f32 = [_fused.float32(t) for t in (w1, b1, w2, b2)]
    return _forward(
        x0, x1, *f32, score, segment, column, index, num_a, inv_tau, orth_scale, moved.shape[0]
    )


@_ste_op.register_fake
def _(x0, x1, w1, b1, w2, b2, score, segment, column, index, *_):
    n, channels, h, w = x0.shape[0], index.shape[1], x0.shape[2], x0.shape[3]
    cl = torch.channels_last  # (strides as the kernel's output, also for 1 x 1 maps)
    y = torch.empty((n, channels, h, w), dtype=x0.dtype, device=x0.device, memory_format=cl)
    f32 = torch.float32
    return (
        y,
        x0.new_empty((), dtype=f32),
        x0.new_empty((n, channels), dtype=f32),
        x0.new_empty((n, w1.shape[0]), dtype=f32),
        x0.new_empty((n, w2.shape[0]), dtype=f32),
        x0.new_empty((n,), dtype=torch.int64),
    )


@torch.library.custom_op("dyshuffle::ste_shuffle_backward", mutates_args=())
def _ste_backward_op(
    gy: Tensor,
    gloss: Tensor,
    y: Tensor,
    soft: Tensor,
    hid: Tensor,
    row: Tensor,
    w1: Tensor,
    w2: Tensor,
    segment: Tensor,
    column: Tensor,
    rows: Tensor,
    moved: Tensor,
    inv_cols: Tensor,
    index_inv: Tensor,
    c0: int,
    two_parts: bool,
    inv_tau: Tensor,
    orth_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward kernel of :func:`_ste_op`: the parts' gradients (the second one empty for one
    part) and those of the logits and the hidden layer."""
    tables = (segment, column, rows, moved, inv_cols, index_inv)
    w1, w2 = _fused.float32(w1), _fused.float32(w2)
    gx0, gx1, dlogit, dhid = _backward(
        gy, gloss, y, soft, hid, row, w1, w2, tables, c0, two_parts, inv_tau, orth_scale
    )
    return gx0, gx1 if gx1 is not None else y.new_empty(0), dlogit, dhid


@_ste_backward_op.register_fake
def _(gy, gloss, y, soft, hid, *rest):
    c0, two_parts = rest[-4:-2]  # (then tau and orth_scale)
    n, channels, h, w = y.shape

    def part(c: int) -> Tensor:
        shape, cl = (n, c, h, w), torch.channels_last
        return torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=cl)

    gx1 = part(channels - c0) if two_parts else y.new_empty(0)
    return part(c0), gx1, soft.new_empty(soft.shape), hid.new_empty(hid.shape)


def _ste_setup(ctx, inputs, output) -> None:
    x0, x1, w1, b1, w2, b2 = inputs[:6]
    # (the operator's arguments 7-8 and 10-13, in the order of the backward operator's)
    segment, column, rows, moved, inv_cols, index_inv = (inputs[k] for k in (7, 8, 12, 13, 11, 10))
    inv_tau, ctx.orth_scale = inputs[15:]
    y, _, pooled, hid, soft, row = output
    tables = (segment, column, rows, moved, inv_cols, index_inv)
    ctx.save_for_backward(y, pooled, hid, soft, row, w1, w2, inv_tau, *tables)
    ctx.c0, ctx.two_parts = x0.shape[1], x1 is not None
    ctx.weight_dtypes = [t.dtype for t in (w1, b1, w2, b2)]


def _ste_op_backward(ctx, gy, gloss, *_):
    y, pooled, hid, soft, row, w1, w2, inv_tau, *tables = ctx.saved_tensors
    args = (gy, gloss, y, soft, hid, row, w1, w2, *tables)
    gx0, gx1, dlogit, dhid = _ste_backward_op(*args, ctx.c0, ctx.two_parts, inv_tau, ctx.orth_scale)
    need = ctx.needs_input_grad
    grads = _weight_grads(dhid, dlogit, pooled, hid, ctx.weight_dtypes, need[2:6])
    gx1 = gx1 if ctx.two_parts and need[1] else None
    return (gx0 if need[0] else None, gx1, *grads) + (None,) * 11


_ste_op.register_autograd(_ste_op_backward, setup_context=_ste_setup)


def ste_shuffle(
    parts: tuple[Tensor, ...],
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    tables: tuple,
    tau: float,
    orth_scale: float,
) -> tuple[Tensor, Tensor]:
    """The STE training forward of a dynamic shuffle with shared factors, as two kernels.

    Args:
        parts: one or two channels_last ``(N, C_i, H, W)`` tensors of one dtype (the channel
            concatenation is the layer's input).
        w1, b1, w2, b2: the generator's two linear layers (any float dtype; the kernels read
            them in float32 and the gradients come in their dtype's float32 form).
        tables: ``(score, segment, column, index, index_inv, inv_cols, rows, moved, Na)``: the
            layer's scoring tables (:func:`~dyshuffle.layers.fused.score_table`), the column of
            each logit, the joint index table and its inverses, the inverse factor columns of
            every pair, :func:`channel_tables` and the first factor's number of permutations.
        tau: softmax temperature.
        orth_scale: weight of each sample's regularizer in the returned sum.

    Returns:
        The permuted ``(N, C, H, W)`` channels_last output and ``orth_scale * sum_n R_n``, with
        ``R_n = ||A A^T - I||^2 + ||B B^T - I||^2`` of sample ``n``; gradients reach the parts
        (the inverse gather and the descriptor's share) and the four weights.
    """
    x1 = parts[1] if len(parts) == 2 else None
    if torch.compiler.is_compiling():  # (the operator's arguments: the tables unpacked)
        # (a tensor operation on tau, which Dynamo makes an input of the graph: not a constant)
        inv_tau = torch.ones(1, device=parts[0].device) / tau
        y, loss, *_ = _ste_op(parts[0], x1, w1, b1, w2, b2, *tables, inv_tau, float(orth_scale))
        return y, loss
    return _FusedSTE.apply(parts[0], x1, w1, b1, w2, b2, tables, float(tau), float(orth_scale))
