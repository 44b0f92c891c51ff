"""Autograd for the attention backends that run as custom ops (FlashAttention-4's, cuDNN's): each is a forward
op `(q, k, v, cu, max_seqlen, causal, scale) -> (out, aux)` and a backward op
`(grad, q, k, v, out, aux, cu, max_seqlen, causal, scale) -> (dq, dk, dv)`, where `aux` is whatever the kernel's
backward needs from its forward (the log-sum-exp, in the kernel's own layout). It is not differentiated."""

from __future__ import annotations


def register_varlen_autograd(forward_op, backward_op) -> None:
    """Make `forward_op` differentiable in q, k and v through `backward_op`."""

    def setup(ctx, inputs, output):
        q, k, v, cu, max_seqlen, causal, scale = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], cu)
        ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale

    def grad(ctx, grad_out, _grad_aux):
        q, k, v, out, aux, cu = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out, q, k, v, out, aux, cu, ctx.max_seqlen, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None

    forward_op.register_autograd(grad, setup_context=setup)
