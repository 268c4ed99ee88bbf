"""The gradient penalty of the critic with its parameter gradient as explicit first-order ops.

    GP = mean_i ( sqrt(|g_i|^2 + eps) - 1 )^2,      g = df/dx at x_hat

autograd takes g with create_graph=True and differentiates through its own backward (a double
backward, which torch.compile's aot_autograd refuses). Here every pass is written out
(docs/critic_penalty.md derives them):

1. forward of the critic body at x_hat, keeping the LeakyReLU masks (and, with a layer norm, the
   normalised activations and 1/sigma per sample); the head's forward is not needed;
2. g by a hand-written backward: transposed convolutions with the same weights, the masks, the
   norm's backward;
3. the parameter gradient of GP, which is that of <u, g> with u = dGP/dg held fixed, i.e. of the
   directional derivative D_u f: one tangent (linearised) forward of u through the body, whose
   adjoint is the backward chain of 2 again, plus one weight-gradient call per layer. A layer norm
   also makes the tangent depend on the forward activations: its second-derivative term starts a
   backward chain through the primal layers below, whose weight gradient is concatenated with the
   tangent's along the batch (one call per layer; the sum over the batch makes this exact).
   LeakyReLU's second derivative is zero, so without a norm there is no such chain at all.

Supported: exactly models.Critic (4x4 stride-2 padding-1 bias-free convolutions, LeakyReLU(0.2),
no norm or GroupNorm(1, C) with its affine, i.e. models.CRITIC_NORMS, and a head convolution to a
1x1 score). Anything else (a batch norm, another activation or geometry) raises ValueError. The
convolutions run ehm_fast.nn.conv's kernels (Geometry.kernel: cuDNN or Triton) in the compute
dtype (autocast's, else the input's), the norm in fp32 as autocast runs GroupNorm; the
image_layers="matmul" form of the first layer is the same sum, here a convolution. Weight clipping
needs none of this (it has no penalty).

`penalty_and_gradients` is the autograd-free form; `gradient_penalty` wraps it in an
autograd.Function whose backward is first order, so `.backward()` on the returned gp fills the
critic's .grad like autograd's double backward does (the head bias receives none: g does not
depend on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.contract import acc_dtype
from .conv import Geometry, _apply, _weight_grad
from .layers import LRELU_SLOPE, cast, compute_dtype

_DIMS = (1, 2, 3)  # a layer norm's per-sample reduction


@dataclass(frozen=True)
class _Plan:
    """What the passes need to know of one critic (hashable: torch.compile specialises on it)."""

    geometry: Geometry  # of the body's convolutions
    norm_eps: tuple[float | None, ...]  # per body layer: the layer norm's eps, None without a norm
    eps: float  # the penalty's, inside the square root


def _plan(critic: nn.Module, eps: float) -> _Plan:
    """Checks that `critic` is models.Critic's architecture (a clear error, never a fallback)."""
    body, head = getattr(critic, "body", None), getattr(critic, "head", None)
    convs, norms = getattr(body, "convs", None), getattr(body, "norms", None)
    if convs is None or norms is None or not isinstance(head, nn.Conv2d) or len(convs) != len(norms):
        raise ValueError("the explicit gradient penalty needs models.Critic (body.convs, body.norms, head)")
    for conv in convs:
        if not (isinstance(conv, nn.Conv2d) and conv.kernel_size == (4, 4) and conv.stride == (2, 2)
                and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is None):
            raise ValueError(f"the explicit gradient penalty needs bias-free 4x4/2/1 body convolutions, got {conv}")
    norm_eps = []
    for norm in norms:
        if isinstance(norm, nn.Identity):
            norm_eps.append(None)
        elif isinstance(norm, nn.GroupNorm) and norm.num_groups == 1 and norm.affine:
            norm_eps.append(float(norm.eps))
        else:
            raise ValueError("the explicit gradient penalty supports the critic norms 'layer' (GroupNorm(1, C) "
                             f"with affine) and 'none' (models.CRITIC_NORMS), got {norm}")
    if head.stride != (1, 1) or head.padding != (0, 0) or head.out_channels != 1 or head.groups != 1:
        raise ValueError(f"the explicit gradient penalty needs a head convolution to one value, got {head}")
    kernel = body.layers.conv_kernel if hasattr(body, "layers") else "cudnn"
    return _Plan(Geometry(2, 1, kernel=kernel), tuple(norm_eps), float(eps))


def _leaky(mask: Tensor, v: Tensor) -> Tensor:
    """v * lrelu'(.) for the saved mask (pre-activation > 0, where torch's backward decides)."""
    return torch.where(mask, v, v * LRELU_SLOPE)


def _norm_adjoint(v: Tensor, xhat: Tensor, inv_sigma: Tensor) -> Tensor:
    """P v = (v - mean v - xhat mean(xhat v)) / sigma per sample: the derivative of xhat = (a - mean a)
    / sigma along v, and (P is symmetric) its adjoint."""
    return (v - v.mean(_DIMS, keepdim=True) - xhat * (v * xhat).mean(_DIMS, keepdim=True)) * inv_sigma


def _channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


def _unpack(plan: _Plan, params: tuple[Tensor, ...]) -> tuple[list[Tensor], list[tuple[Tensor, Tensor] | None], Tensor]:
    """(body weights, per layer (gamma, beta) or None, head weight) from the flat parameter list."""
    it = iter(params)
    weights, affines = [], []
    for e in plan.norm_eps:
        weights.append(next(it))
        affines.append(None if e is None else (next(it), next(it)))
    return weights, affines, next(it)


def _flat_params(critic: nn.Module) -> list[Tensor]:
    """The parameters in `_unpack`'s order (the head bias last: GP does not depend on it)."""
    out = []
    for conv, norm in zip(critic.body.convs, critic.body.norms):
        out.append(conv.weight)
        if isinstance(norm, nn.GroupNorm):
            out += [norm.weight, norm.bias]
    return out + [critic.head.weight]


def _forward(plan: _Plan, x: Tensor, params: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, tuple[Tensor | None, ...]]:
    """(gp, |g| per sample, what the gradient passes read: per layer its input (where a norm needs
    the primal chain), mask, normalised activations, 1/sigma, df/d(pre-activation), df/d(norm
    output), then g and |g|). x and the weights in the compute dtype."""
    weights, affines, head_w = _unpack(plan, params)
    dtype, acc, n_layers = x.dtype, acc_dtype(x.dtype), len(weights)
    hs, masks, stats = [], [], []
    h = x
    for w, affine, e in zip(weights, affines, plan.norm_eps):
        hs.append(h)
        a = _apply(h, w, None, plan.geometry)
        if affine is None:
            n, stat = a, None
        else:  # in fp32 (fp64 for fp64), as autocast runs GroupNorm
            a = a.to(acc)
            mean, var = a.mean(_DIMS, keepdim=True), a.var(_DIMS, keepdim=True, unbiased=False)
            inv_sigma = torch.rsqrt(var + e)
            xhat = (a - mean) * inv_sigma
            n, stat = xhat * _channel(affine[0]) + _channel(affine[1]), (xhat, inv_sigma)
        mask = n > 0
        masks.append(mask)
        stats.append(stat)
        h = _leaky(mask, n).to(dtype)
    if h.shape[-2:] != head_w.shape[-2:]:
        raise ValueError(f"the critic head must read the whole {tuple(h.shape[-2:])} map, its kernel is "
                         f"{tuple(head_w.shape[-2:])}")
    # the backward chain: d = df/dh, from the head (df_b/dh_b is its weight) down to the image
    d = head_w.expand(x.shape[0], -1, -1, -1)
    cs: list[Tensor] = [None] * n_layers  # df/d(pre-activation) of each layer, what the convolution saw
    es: list[Tensor | None] = [None] * n_layers  # df/dn (after the norm), kept where a norm is
    for k in reversed(range(n_layers)):
        if stats[k] is None:
            c = _leaky(masks[k], d)
        else:
            xhat, inv_sigma = stats[k]
            es[k] = _leaky(masks[k], d.to(acc))
            c = _norm_adjoint(es[k] * _channel(affines[k][0]), xhat, inv_sigma).to(dtype)
        cs[k] = c
        d = _apply(c, weights[k], None, plan.geometry.adjoint(hs[k].shape[-2:], c.shape[-2:], 4))
    g = d.to(acc)
    g_norm = torch.sqrt(g.square().sum(_DIMS) + plan.eps)
    gp = (g_norm - 1).square().mean()
    if all(s is None for s in stats):
        hs = [None] * n_layers
    xhats, inv_sigmas = ([None if s is None else s[i] for s in stats] for i in range(2))
    return gp, g_norm, (*hs, *masks, *xhats, *inv_sigmas, *cs, *es, g, g_norm)


def _backward(plan: _Plan, params: tuple[Tensor, ...], saved: tuple[Tensor | None, ...], grad_gp: Tensor,
              need_x: bool) -> tuple[Tensor | None, list[Tensor]]:
    """(dGP/dx or None, dGP/dparams in `_unpack`'s order) times grad_gp, first-order ops only."""
    weights, affines, _ = _unpack(plan, params)
    n_layers = len(weights)
    hs, masks, xhats, inv_sigmas, cs, es = (saved[i * n_layers:(i + 1) * n_layers] for i in range(6))
    stats = [None if xh is None else (xh, s) for xh, s in zip(xhats, inv_sigmas)]
    g, g_norm = saved[-2:]
    dtype, acc, b = cs[0].dtype, g.dtype, g.shape[0]
    u = (grad_gp.to(acc) * (2 / b)) * ((g_norm - 1) / g_norm).view(-1, 1, 1, 1) * g  # dGP/dg
    # the tangent forward: t_k = the directional derivative of layer k's input along u
    t, ts, adots, xdots = u.to(dtype), [], [], []
    for k in range(n_layers):
        ts.append(t)
        adot = _apply(t, weights[k], None, plan.geometry)
        if stats[k] is None:
            ndot, xdot = adot, None
            adots.append(None)
        else:
            adot = adot.to(acc)
            xdot = _norm_adjoint(adot, *stats[k])
            ndot = xdot * _channel(affines[k][0])
            adots.append(adot)
        xdots.append(xdot)
        t = _leaky(masks[k], ndot).to(dtype)
    head_grad = t.sum(0, keepdim=True, dtype=acc).to(dtype)  # d(sum_b <W_head, t_b>)/dW_head
    # the primal chain: p = d(D_u f)/dh through the forward activations, started by each norm's
    # second-derivative term s (none without a norm: LeakyReLU's second derivative is zero)
    grads: list[list[Tensor]] = [[] for _ in range(n_layers)]  # per layer: weight (, gamma, beta)
    p: Tensor | None = None
    dx = None
    for k in reversed(range(n_layers)):
        pn = None if p is None else _leaky(masks[k], p.to(acc))
        affine_grads = []
        if stats[k] is None:
            pa = pn
        else:
            xhat, inv_sigma = stats[k]
            gamma = _channel(affines[k][0])
            c, e, adot, xdot = cs[k].to(acc), es[k], adots[k], xdots[k]
            n = xhat[0].numel()
            # s = d<e, gamma P(adot)>/da, per sample: -(1/sigma) (q xhat + m_a P(gamma e) + m_e P(adot))
            q = (adot * c).sum(_DIMS, keepdim=True) / n
            m_a = (xhat * adot).mean(_DIMS, keepdim=True)
            m_e = (e * gamma * xhat).mean(_DIMS, keepdim=True)
            pa = -inv_sigma * (q * xhat + m_a * c + m_e * xdot)
            d_gamma = (e * xdot).sum((0, 2, 3))
            d_beta = torch.zeros_like(affines[k][1])
            if pn is not None:
                pa = pa + _norm_adjoint(pn * gamma, xhat, inv_sigma)
                d_gamma = d_gamma + (pn * xhat).sum((0, 2, 3))
                d_beta = pn.sum((0, 2, 3))
            affine_grads = [d_gamma.to(affines[k][0].dtype), d_beta.to(affines[k][1].dtype)]
        if pa is None:
            w_grad = _weight_grad(cs[k], ts[k], weights[k], plan.geometry)
        else:  # the tangent's and the primal chain's weight gradients in one call, along the batch
            pa = pa.to(dtype)
            w_grad = _weight_grad(torch.cat([cs[k], pa]), torch.cat([ts[k], hs[k]]), weights[k], plan.geometry)
            if k > 0 or need_x:
                p = _apply(pa, weights[k], None, plan.geometry.adjoint(hs[k].shape[-2:], pa.shape[-2:], 4))
        grads[k] = [w_grad, *affine_grads]
    if need_x:  # the Hessian-vector product of f along u: zero without a norm
        dx = p.to(dtype) if p is not None else torch.zeros_like(ts[0])
    return dx, [t for layer in grads for t in layer] + [head_grad]


class _GradientPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, plan: _Plan, x: Tensor, *params: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):
            gp, g_norm, saved = _forward(plan, x, params)
        ctx.plan, ctx.n_params = plan, len(params)
        ctx.save_for_backward(*params, *saved)
        ctx.mark_non_differentiable(g_norm)
        return gp, g_norm

    @staticmethod
    def backward(ctx: Any, grad_gp: Tensor, _grad_norm: Tensor | None) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        params, saved = saved[:ctx.n_params], saved[ctx.n_params:]
        with torch.autocast(grad_gp.device.type, enabled=False):
            dx, grads = _backward(ctx.plan, params, saved, grad_gp, ctx.needs_input_grad[1])
        return (None, dx, *(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[2:])))


def _operands(critic: nn.Module, x_hat: Tensor) -> tuple[Tensor, list[Tensor]]:
    """x_hat and the parameters in the compute dtype (the norm's affine stays fp32, as autocast
    keeps it), weights read from the layers' cache where it holds them."""
    dtype, opts = compute_dtype(x_hat), critic.body.layers
    params = [cast(p, dtype, opts) if p.dim() == 4 else p.to(acc_dtype(p.dtype)) for p in _flat_params(critic)]
    return x_hat.to(dtype), params


def gradient_penalty(critic: nn.Module, x_hat: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(GP, |g| per sample) for models.Critic at x_hat [B, C, S, S]: GP = mean (sqrt(|g|^2 + eps) - 1)^2,
    g = df/dx. gp.backward() fills the critic's parameter gradients (and x_hat's, if it requires
    one) by first-order passes only; |g| carries no gradient."""
    plan = _plan(critic, eps)
    x, params = _operands(critic, x_hat)
    return _GradientPenalty.apply(plan, x, *params)


@torch.no_grad()
def penalty_and_gradients(critic: nn.Module, x_hat: Tensor, eps: float,
                          weight: float = 1.0) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The autograd-free form: (GP, g = df/dx at x_hat, {parameter name: d(weight * GP)/dparameter})
    for models.Critic, g in fp32 (fp64 for fp64), the gradients in the parameters' dtypes (the head
    bias, on which GP does not depend, is left out)."""
    plan = _plan(critic, eps)
    x, params = _operands(critic, x_hat)
    with torch.autocast(x.device.type, enabled=False):
        gp, _, saved = _forward(plan, x, tuple(params))
        _, grads = _backward(plan, tuple(params), saved, torch.tensor(weight, dtype=torch.float64, device=x.device),
                             False)
    names = {id(p): name for name, p in critic.named_parameters()}
    return gp, saved[-2], {names[id(p)]: gr.to(p.dtype) for p, gr in zip(_flat_params(critic), grads)}
