"""The hard dynamic shuffle of inference as one Triton kernel (issue 5).

In ``eval()`` a :class:`~dyshuffle.layers.DynamicShuffle` with shared factors does, per sample:
pool the input over H and W, run the two-layer generator, take a softmax over every row of the
two factor matrices, pick each factor's nearest permutation from its table, look up the composed
``(C,)`` index and gather the channels. In PyTorch that is a dozen operators (and the
concatenation of the parts before them); on a GPU each is a kernel launch and, in eager mode, a
dispatch from Python, which is where the dynamic model lost against the fixed shuffle
(docs/BENCHMARKS.md: both models are launch-bound on the CIFAR stem up to batch 1024).

:func:`hard_shuffle` does all of it in one kernel, one program per sample: it reads the sample's
parts once to pool them, evaluates the generator, the softmax and the choice in registers, and
reads them again to write the permuted channels (a sample is a few hundred kilobytes at most
in ShuffleNetV2, so the second read can come from the L2 cache; not measured). The parts of a
channel concatenation (``mix_concat``) are read where they are, so the concatenation's copy goes
as well. What it saved on an H200 is in docs/BENCHMARKS.md (session 15).

Numbers: the pooled means, the generator and the softmax are computed in float32 whatever the
input's dtype (under autocast the PyTorch path computes the generator in bfloat16), so a sample
whose two best permutations score within rounding of each other may be given the other one; the
permuted values themselves are copied, never rounded. Everywhere else the output is the PyTorch
path's, bit for bit (tests/test_fused.py).

The kernel runs on CUDA; the tests also run it on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``). On the CPU the layers call the same algorithm in C instead
(:mod:`~dyshuffle.layers.fused_cpu`), through :func:`launch` and :func:`hard_shuffle` alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor

from . import fused_cpu as _cpu

try:  # Triton ships with PyTorch's CUDA wheels on Linux; elsewhere the layer keeps PyTorch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

#: Triton's interpreter was switched on when it was imported (kernels then run on CPU tensors)
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: the layers may use the kernel: ``DYSHUFFLE_FUSED=0`` when dyshuffle is imported switches it off
ENABLED = os.environ.get("DYSHUFFLE_FUSED", "1") != "0"

__all__ = [
    "ENABLED",
    "FUSED_DTYPES",
    "FUSED_MAX_CHANNELS",
    "available",
    "hard_shuffle",
    "launch",
]

#: input dtypes the kernel takes (the pooled means and the generator are float32 in every case)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: most channels of one layer: the kernel holds a sample's channels in one block of registers
FUSED_MAX_CHANNELS = 4096

#: elements of one tile of (pixels x channels) that a program loads at a time
_TILE = 4096


def available(device: torch.device) -> bool:
    """The kernel can run on ``device`` (and :data:`ENABLED`): on CUDA, the Triton kernel (Triton
    installed); on the CPU, the C kernel of :mod:`~dyshuffle.layers.fused_cpu` (a C compiler
    at hand; built on the first call), or the Triton kernel under Triton's interpreter
    (``TRITON_INTERPRET=1`` set before Triton was imported: how the tests run it without a
    GPU). ``torch.compile`` keeps either kernel as the custom operator
    ``dyshuffle::hard_shuffle``."""
    if not ENABLED:
        return False
    if device.type == "cuda":
        return triton is not None
    if device.type == "cpu":
        return triton is not None if _INTERPRETED else _cpu.available()
    return False


if triton is not None:

    @triton.jit
    def _orthogonality_residual(soft, seg, col, in_l, r):
        """``M M^T - I`` of the softmax factors, rows of both factors together: ``(R, R)`` (zero
        outside the ``a + b`` rows; its squared sum is the orthogonal regularizer).

        ``soft`` ``(L,)`` holds the factor matrices' entries, ``seg`` the row (``0..a-1`` for
        ``A``, ``a..a+b-1`` for ``B``) and ``col`` the column (numbered apart for the two factors,
        so that the entries of ``A`` and ``B`` never meet) of each; ``r`` ``(R,)`` the rows.
        """
        same_col = (col[:, None] == col[None, :]) & in_l[:, None] & in_l[None, :]
        prod = tl.where(same_col, soft[:, None] * soft[None, :], 0.0)  # (L, L)
        member = seg[:, None] == r[None, :]  # (L, R): logit l lies in row r
        # rows[r, l'] = sum_{l in row r} prod[l, l'], then gram[r, r'] = sum_{l' in row r'} rows
        rows = tl.sum(tl.where(member[:, :, None], prod[:, None, :], 0.0), axis=0)  # (R, L)
        gram = tl.sum(tl.where(member[None, :, :], rows[:, :, None], 0.0), axis=1)  # (R, R)
        eye = (r[:, None] == r[None, :]) & (r[:, None] < _num_rows(seg, in_l))
        return gram - eye.to(tl.float32)

    @triton.jit
    def _pixel_tile(start, pixels, width, BLOCK_P: tl.constexpr):
        """The ``BLOCK_P`` pixels from ``start``: which are in the map, their rows and columns."""
        p = start + tl.arange(0, BLOCK_P)
        h = p // width
        return p < pixels, h, p - h * width

    @triton.jit
    def _num_rows(seg, in_l):
        """How many rows the two factors have together, ``a + b``."""
        return tl.max(tl.where(in_l, seg, -1), axis=0) + 1

    @triton.jit
    def _hard_shuffle_kernel(
        x0_ptr,
        x1_ptr,
        out_ptr,
        w1_ptr,
        b1_ptr,
        w2_ptr,
        b2_ptr,
        score_ptr,
        segment_ptr,
        index_ptr,
        c0,
        channels,
        pixels,
        width,
        s0n,
        s0h,
        s0w,
        s1n,
        s1h,
        s1w,
        son,
        soh,
        sow,
        hidden,
        num_logits,
        num_a,
        num_b,
        inv_pixels,
        inv_tau,
        pooled_ptr,
        hidden_ptr,
        soft_ptr,
        row_ptr,
        orth_ptr,
        column_ptr,
        orth_scale,
        TWO_PARTS: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SAVE: tl.constexpr = False,
        BLOCK_R: tl.constexpr = 1,
        TAU_IN_MEMORY: tl.constexpr = False,
    ):
        # SAVE (the STE training forward of dyshuffle.layers.fused_training): also write what its
        # backward needs, per sample: the descriptor, the generator's hidden layer (after the
        # ReLU), the softmax factors, the chosen pair's row and the orthogonal regularizer
        n = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK_C)
        in_c = c < channels
        in0 = c < c0
        in1 = in_c & (c >= c0)
        # (no selects between 1-D vectors here: the Triton of torch 2.11 failed to compile them
        # for blocks of 32 and 64 channels; masked lanes' offsets are never read)

        # 1. the descriptor: mean over the pixels of every channel of the concatenation
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, pixels, BLOCK_P):
            in_p, h, w = _pixel_tile(start, pixels, width, BLOCK_P)
            off0 = n * s0n + h * s0h + w * s0w
            v = tl.load(
                x0_ptr + off0[:, None] + c[None, :], mask=in_p[:, None] & in0[None, :], other=0.0
            )
            acc += tl.sum(v.to(tl.float32), axis=0)
            if TWO_PARTS:
                off1 = n * s1n + h * s1h + w * s1w
                v1 = tl.load(
                    x1_ptr + off1[:, None] + (c - c0)[None, :],
                    mask=in_p[:, None] & in1[None, :],
                    other=0.0,
                )
                acc += tl.sum(v1.to(tl.float32), axis=0)
        pooled = acc * inv_pixels
        if SAVE:
            tl.store(pooled_ptr + n * channels + c, pooled, mask=in_c)

        # 2. the generator, one hidden unit at a time: logits = W2 relu(W1 pooled + b1) + b2
        l_ = tl.arange(0, BLOCK_L)
        in_l = l_ < num_logits
        logits = tl.load(b2_ptr + l_, mask=in_l, other=0.0)
        for j in range(0, hidden):
            w1 = tl.load(w1_ptr + j * channels + c, mask=in_c, other=0.0)
            hj = tl.sum(w1 * pooled, axis=0) + tl.load(b1_ptr + j)
            hj = tl.maximum(hj, 0.0)
            if SAVE:
                tl.store(hidden_ptr + n * hidden + j, hj)
            w2 = tl.load(w2_ptr + l_ * hidden + j, mask=in_l, other=0.0)
            logits += w2 * hj
        if TAU_IN_MEMORY:  # (a compiled training step's: a new tau is not a new graph)
            logits = logits * tl.load(inv_tau)
        else:
            logits = logits * inv_tau

        # 3. softmax over every row of the two factor matrices (segment[l]: the row of logit l)
        seg = tl.load(segment_ptr + l_, mask=in_l, other=-1)
        same = (seg[:, None] == seg[None, :]) & in_l[None, :]
        row_max = tl.max(tl.where(same, logits[None, :], float("-inf")), axis=1)
        e = tl.exp(tl.where(in_l, logits - row_max, float("-inf")))
        row_sum = tl.sum(tl.where(same, e[None, :], 0.0), axis=1)
        soft = tl.where(in_l, e / tl.where(in_l, row_sum, 1.0), 0.0)

        # 4. each factor's nearest permutation: argmax_k <M, P_k> (the first on ties)
        k = tl.arange(0, BLOCK_K)
        in_k = k < num_a + num_b
        table = tl.load(
            score_ptr + k[:, None] * num_logits + l_[None, :],
            mask=in_k[:, None] & in_l[None, :],
            other=0.0,
        )
        scores = tl.sum(table * soft[None, :], axis=1)
        choice_a = tl.argmax(tl.where(k < num_a, scores, float("-inf")), axis=0)
        choice_b = tl.argmax(tl.where((k >= num_a) & in_k, scores, float("-inf")), axis=0)
        row = choice_a.to(tl.int64) * num_b + (choice_b.to(tl.int64) - num_a)
        if SAVE:
            tl.store(soft_ptr + n * num_logits + l_, soft, mask=in_l)
            tl.store(row_ptr + n, row)
            col = tl.load(column_ptr + l_, mask=in_l, other=-1)
            r = tl.arange(0, BLOCK_R)
            diff = _orthogonality_residual(soft, seg, col, in_l, r)
            tl.store(orth_ptr + n, tl.sum(tl.sum(diff * diff, axis=1), axis=0) * orth_scale)

        # 5. the composed index of that pair, and the gather
        src = tl.load(index_ptr + row * channels + c, mask=in_c, other=0)
        from0 = in_c & (src < c0)
        from1 = in_c & (src >= c0)
        for start in range(0, pixels, BLOCK_P):
            in_p, h, w = _pixel_tile(start, pixels, width, BLOCK_P)
            off0 = n * s0n + h * s0h + w * s0w
            take0 = in_p[:, None] & from0[None, :]
            v = tl.load(x0_ptr + off0[:, None] + src[None, :], mask=take0, other=0.0)
            if TWO_PARTS:
                off1 = n * s1n + h * s1h + w * s1w
                v1 = tl.load(
                    x1_ptr + off1[:, None] + (src - c0)[None, :],
                    mask=in_p[:, None] & from1[None, :],
                    other=0.0,
                )
                v = tl.where(take0, v, v1)
            off = n * son + h * soh + w * sow
            tl.store(out_ptr + off[:, None] + c[None, :], v, mask=in_p[:, None] & in_c[None, :])


def pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (``triton.next_power_of_2``, without its wrapper's
    host time: a few microseconds per call, three calls per launch)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def float32(t: Tensor) -> Tensor:
    """``t`` as the kernel reads a weight: contiguous float32 (``t`` itself when it is)."""
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    return t.detach().float().contiguous()


def score_table(onehot_a: Tensor, onehot_b: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel's scoring tables of a pair of factors of sizes ``a`` and ``b``.

    Args:
        onehot_a: ``(Na, a * a)`` flat permutation matrices of the first factor's table.
        onehot_b: ``(Nb, b * b)`` those of the second.

    Returns:
        ``(Na + Nb, a*a + b*b)`` float32 rows ``[P_k, 0]`` then ``[0, Q_j]`` (the score of every
        candidate of both factors is one product with the softmax logits), and the
        ``(a*a + b*b,)`` int32 row of each logit in its factor matrix (the softmax segments).
    """
    na, aa = onehot_a.shape
    nb, bb = onehot_b.shape
    a, b = round(aa**0.5), round(bb**0.5)
    table = torch.zeros(na + nb, aa + bb)
    table[:na, :aa] = onehot_a
    table[na:, aa:] = onehot_b
    segment = torch.cat([torch.arange(aa) // a, a + torch.arange(bb) // b]).to(torch.int32)
    return table, segment


def hard_shuffle(
    parts: Sequence[Tensor],
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    table: Tensor,
    segment: Tensor,
    num_a: int,
    index: Tensor,
    tau: float = 1.0,
) -> Tensor:
    """The hard dynamic shuffle of the channel concatenation of ``parts``, in one kernel.

    ``y[n, c] = cat(parts)[n, index[r_n, c]]`` with ``r_n = i * Nb + j`` the pair of
    permutations nearest to the softmax factors the generator gives sample ``n``.

    Args:
        parts: one or two ``(N, C_i, H, W)`` tensors whose channels are the innermost dimension
            (channels_last), of one dtype of :data:`FUSED_DTYPES`, on one device.
        w1, b1, w2, b2: the generator's two linear layers, ``(hidden, C)``, ``(hidden,)``,
            ``(a*a + b*b, hidden)``, ``(a*a + b*b,)``.
        table, segment: :func:`score_table` of the two factors' tables.
        num_a: ``Na``, the first factor's number of permutations.
        index: ``(Na * Nb, C)`` the composed channel index of every pair.
        tau: softmax temperature.

    Returns:
        ``(N, C, H, W)`` channels_last, the dtype of ``parts``.
    """
    if not 1 <= len(parts) <= 2:
        raise ValueError(f"the fused kernel takes one or two parts, got {len(parts)}")
    x0 = parts[0]
    x1 = parts[1] if len(parts) == 2 else None
    n, c0, h, w = x0.shape
    channels = sum(p.shape[1] for p in parts)
    for p in parts:
        if p.dim() != 4 or p.shape[0] != n or p.shape[2:] != x0.shape[2:]:
            shapes = [tuple(q.shape) for q in parts]
            raise ValueError(f"parts of shapes {shapes} do not concatenate")
        if p.stride(1) != 1 or p.dtype != x0.dtype or p.dtype not in FUSED_DTYPES:
            raise ValueError(
                f"the fused kernel needs channels_last parts of one dtype of {FUSED_DTYPES}, "
                f"got strides {[q.stride() for q in parts]} and dtypes {[q.dtype for q in parts]}"
            )
    if index.dim() != 2 or index.shape[1] != channels:
        raise ValueError(f"index of shape {tuple(index.shape)} for {channels} channels")
    if channels > FUSED_MAX_CHANNELS:
        raise ValueError(f"{channels} channels: the kernel takes at most {FUSED_MAX_CHANNELS}")
    if not available(x0.device):
        raise RuntimeError(f"the fused dynamic shuffle is not available on {x0.device}")
    return launch(x0, x1, w1, b1, w2, b2, table, segment, index, int(num_a), float(tau))


def launch(
    x0: Tensor,
    x1: Tensor | None,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    table: Tensor,
    segment: Tensor,
    index: Tensor,
    num_a: int,
    tau: float,
) -> Tensor:
    """:func:`hard_shuffle` of inputs already checked (``x1``: the second part, or ``None``).

    The layer calls this after its own checks: in eager mode on a GPU the host time per call,
    not the kernel, is what a small model pays.
    """
    two = x1 is not None
    compiling = torch.compiler.is_compiling()
    if compiling:
        # the hard permutation has no gradient for the generator: the weights enter the graph's
        # operator detached (an operator without an autograd formula given trainable weights,
        # an eval layer compiled in grad mode, failed to compile)
        w1, b1, w2, b2 = (w.detach() for w in (w1, b1, w2, b2))
    args = (x0, x1 if two else x0, w1, b1, w2, b2, table, segment, index, num_a, tau, two)
    if compiling:  # a custom op that torch.compile (and CUDA graphs) keeps
        return torch.ops.dyshuffle.hard_shuffle(*args)
    return _kernel(*args)


def _kernel(x0, x1, w1, b1, w2, b2, table, segment, index, num_a, tau, two_parts) -> Tensor:
    """The C kernel on the CPU, the Triton kernel elsewhere (and on the CPU under Triton's
    interpreter), on the arguments of the operator ``dyshuffle::hard_shuffle``."""
    if x0.device.type == "cpu" and not _INTERPRETED:
        x1 = x1 if two_parts else None
        return _cpu.launch(x0, x1, w1, b1, w2, b2, table, segment, index, num_a, tau)
    return _run(x0, x1, w1, b1, w2, b2, table, segment, index, num_a, tau, two_parts)


def inv_tau(tau: float | Tensor) -> float | Tensor:
    """What the kernels take for the temperature: ``1 / tau``, or a one-element float32 tensor
    that holds it (their ``TAU_IN_MEMORY`` form, which the compiled training step uses: an
    operator's float arguments are constants of a compiled graph) as it is."""
    return tau if isinstance(tau, Tensor) else 1.0 / tau


def _run(*args, save: tuple | None = None) -> Tensor:
    """Launch the kernel on the arguments of the operator ``dyshuffle::hard_shuffle``
    (:func:`_hard_shuffle_op`; ``tau`` may also be a tensor that holds ``1 / tau``,
    :func:`inv_tau`)."""
    # save: (pooled, hidden, soft, row, orth, column, orth_scale, a + b): the training outputs
    # that the forward of dyshuffle.layers.fused_training has the kernel write (SAVE)
    x0, x1, w1, b1, w2, b2, table, segment, index, num_a, tau, two_parts = args
    n, c0, h, w = x0.shape
    channels = index.shape[1]
    out = torch.empty(
        (n, channels, h, w), dtype=x0.dtype, device=x0.device, memory_format=torch.channels_last
    )
    if out.numel() == 0:
        return out
    block_c = pow2(channels)
    num_logits = w2.shape[0]
    # (without save, the training outputs' pointers are placeholders, never written)
    training = save[:-1] if save is not None else (out, out, out, out, out, segment, 1.0)
    _hard_shuffle_kernel[(n,)](
        x0,
        x1,
        out,
        w1,
        b1,
        w2,
        b2,
        table,
        segment,
        index,
        c0,
        channels,
        h * w,
        w,
        x0.stride(0),
        x0.stride(2),
        x0.stride(3),
        x1.stride(0),
        x1.stride(2),
        x1.stride(3),
        out.stride(0),
        out.stride(2),
        out.stride(3),
        w1.shape[0],
        num_logits,
        num_a,
        table.shape[0] - num_a,
        1.0 / (h * w),
        inv_tau(tau),
        *training,
        TWO_PARTS=two_parts,
        BLOCK_C=block_c,
        BLOCK_P=max(1, _TILE // block_c),
        BLOCK_L=pow2(num_logits),
        BLOCK_K=pow2(table.shape[0]),
        SAVE=save is not None,
        BLOCK_R=1 if save is None else pow2(save[-1]),
        TAU_IN_MEMORY=isinstance(tau, Tensor),
    )
    return out


def unit_channel_stride(*parts: Tensor | None) -> tuple[Tensor | None, ...]:
    """``parts`` with the channel stride 1 that the fused kernels read (``None`` kept): the
    inputs of their operators, which a compiled graph may have laid out otherwise (eager calls
    never do)."""
    return tuple(
        p if p is None or p.stride(1) == 1 else p.contiguous(memory_format=torch.channels_last)
        for p in parts
    )


# An opaque custom operator, which torch.compile keeps as a call (CUDA graphs capture it), rather
# than a ``triton_op``: its graphs can be traced under Triton's interpreter too, where the tests
# compile the layer on the CPU (``wrap_triton`` of an interpreted kernel cannot be traced).
@torch.library.custom_op("dyshuffle::hard_shuffle", mutates_args=())
def _hard_shuffle_op(
    x0: Tensor,
    x1: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    table: Tensor,
    segment: Tensor,
    index: Tensor,
    num_a: int,
    tau: float,
    two_parts: bool,
) -> Tensor:
    """:func:`hard_shuffle` as an operator that ``torch.compile`` keeps in its graph (``x1`` is
    ``x0`` when ``two_parts`` is ``False``)."""
    x0, x1 = unit_channel_stride(x0, x1)
    return _kernel(x0, x1, w1, b1, w2, b2, table, segment, index, num_a, tau, two_parts)


@_hard_shuffle_op.register_fake
def _(x0, x1, w1, b1, w2, b2, table, segment, index, num_a, tau, two_parts):
    n, _, h, w = x0.shape
    shape = (n, index.shape[1], h, w)
    return torch.empty(shape, dtype=x0.dtype, device=x0.device, memory_format=torch.channels_last)
