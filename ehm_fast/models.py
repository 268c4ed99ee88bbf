"""DCGAN-style encoder, decoder and critic for 32, 64 and 128 px images, and a VampPrior.

Each network halves (or doubles) the resolution with 4x4 stride-2 convolutions between the image
and a 4x4 feature map; channel widths double per level from `width`, capped at 8 * width (64 px:
width, 2w, 4w, 8w as in DCGAN). The encoder's conv weights have exactly the shapes of the decoder's
transposed convs, so `share_weights=True` makes the decoder run the adjoint of the encoder's
layers with the very same Parameter objects (the seed's tied encoder/decoder).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .nn import layers as L
from .nn.layers import LayerOptions
from .nn.options import CONV_KERNELS, IMAGE_LAYERS, parse_levers

IMAGE_SIZES = (32, 64, 128)
NORMS = ("batch", "layer", "none")
CRITIC_NORMS = ("layer", "none")  # no BatchNorm under a gradient penalty (it couples samples)
LIKELIHOODS = ("gaussian", "laplace", "bernoulli")
SCALE_SHAPES = ("scalar", "channel")


def check_image_size(image_size: int) -> int:
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES} (the DCGAN models' sizes), got {image_size}")
    return image_size


def level_widths(image_size: int, width: int) -> list[int]:
    """Channel count after each stride-2 level, from the image down to the 4x4 map."""
    levels = int(math.log2(check_image_size(image_size))) - 2
    return [min(width * 2**i, width * 8) for i in range(levels)]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # LayerNorm over (C, H, W) with a per-channel affine
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def _dcgan_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _DownStack(nn.Module):
    """Image [B, C, S, S] -> features [B, widths[-1], 4, 4]; no norm on the first level (DCGAN)."""

    def __init__(self, channels: int, widths: list[int], norm: str, name: str) -> None:
        super().__init__()
        self.name = name  # of its profiler ranges
        ins = [channels] + widths[:-1]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, 4, 2, 1, bias=False) for i, o in zip(ins, widths))
        self.norms = nn.ModuleList(nn.Identity() if k == 0 else _norm(norm, o) for k, o in enumerate(widths))
        self.layers = LayerOptions()

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        """The stack from layer `start` (0: the image) on."""
        for k in range(start, len(self.convs)):
            conv, norm = self.convs[k], self.norms[k]
            with L.profile_range(f"{self.name}.layer{k + 1}"):
                x = L.conv2d(x, conv.weight, conv.bias, 2, 1, self.layers, image=k == 0)
                x = L.norm_act(x, norm, "lrelu", self.layers)
        return x


class Encoder(nn.Module):
    """q(z|x) = N(mu(x), diag exp(logvar(x))); forward returns (mu, logvar), each [B, z_dim]."""

    def __init__(self, image_size: int, channels: int, z_dim: int, width: int = 64, norm: str = "batch") -> None:
        super().__init__()
        self.image_size, self.channels, self.z_dim = image_size, channels, z_dim
        widths = level_widths(image_size, width)
        self.body = _DownStack(channels, widths, norm, "encoder")
        self.mu_head = nn.Conv2d(widths[-1], z_dim, 4, 1, 0)
        self.logvar_head = nn.Conv2d(widths[-1], z_dim, 4, 1, 0)
        _dcgan_init(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(self.body(x))

    def heads(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) from the body's features."""
        opts = self.body.layers
        heads = (self.mu_head, self.logvar_head)
        with L.profile_range("encoder.heads"):
            if "merge" in opts.levers:  # both heads read h: one call with both weight sets
                dtype = L.compute_dtype(h)
                weight, bias = (torch.cat([L.cast(t, dtype, opts) for t in ts])
                                for ts in ((m.weight for m in heads), (m.bias for m in heads)))
                mu, logvar = L.conv2d(h, weight, bias, 1, 0, opts).flatten(1).split(self.z_dim, 1)
            else:
                mu, logvar = (L.conv2d(h, m.weight, m.bias, 1, 0, opts).flatten(1) for m in heads)
        return mu, logvar


class Decoder(nn.Module):
    """p(x|z): G(z) through transposed convs, plus the likelihood's log_scale.

    `output(z)` gives the likelihood's parameter (the mean in [-1, 1] for gaussian/laplace, the
    logits of pixels in [0, 1] for bernoulli); `forward(z)` always gives an image in [-1, 1].
    With `tied_to=encoder` the transposed-conv weights are the encoder's own Parameters.
    """

    def __init__(
        self,
        image_size: int,
        channels: int,
        z_dim: int,
        width: int = 64,
        norm: str = "batch",
        *,
        likelihood: str = "gaussian",
        log_scale: float = math.log(0.1),
        learn_scale: bool = True,
        scale_shape: str = "scalar",
        tied_to: Encoder | None = None,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if scale_shape not in SCALE_SHAPES:
            raise ValueError(f"scale_shape must be one of {SCALE_SHAPES}, got {scale_shape!r}")
        self.image_size, self.channels, self.z_dim, self.likelihood = image_size, channels, z_dim, likelihood
        widths = level_widths(image_size, width)
        # Layer k maps outs[k] -> ins[k]: the adjoint of the encoder's conv k (weight [outs[k], ins[k], 4, 4]).
        self._ins, self._outs = [channels] + widths[:-1], widths
        self.tied = tied_to is not None
        if tied_to is not None:
            if (tied_to.image_size, tied_to.channels, tied_to.z_dim) != (image_size, channels, z_dim):
                raise ValueError("a tied decoder needs the encoder's image_size, channels and z_dim")
            weights = [c.weight for c in tied_to.body.convs]
            if [tuple(w.shape[:2]) for w in weights] != list(zip(self._outs, self._ins)):
                raise ValueError("a tied decoder needs the encoder's width")
            self.weights = nn.ParameterList(weights)
            self.top_weight = tied_to.mu_head.weight  # [z_dim, widths[-1], 4, 4] = ConvTranspose(z -> widths[-1])
        else:
            self.weights = nn.ParameterList(
                nn.Parameter(torch.randn(o, i, 4, 4) * 0.02) for i, o in zip(self._ins, self._outs)
            )
            self.top_weight = nn.Parameter(torch.randn(z_dim, widths[-1], 4, 4) * 0.02)
        self.top_bias = nn.Parameter(torch.zeros(widths[-1]))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(i)) for i in self._ins)
        # Norm after every transposed conv except the output one.
        self.top_norm = _norm(norm, widths[-1])
        self.norms = nn.ModuleList(_norm(norm, i) for i in self._ins[1:])
        shape = (1, 1, 1) if scale_shape == "scalar" else (channels, 1, 1)
        self.log_scale = nn.Parameter(torch.full(shape, float(log_scale)), requires_grad=learn_scale)
        self.layers = LayerOptions()

    def _up(self, h: Tensor, weight: Tensor, bias: Tensor, norm: nn.Module | None, stride: int, padding: int,
            segments: int = 1) -> Tensor:
        """Transposed conv + bias + norm + activation (ReLU; the output layer's tanh or none). The
        bias joins the fused op that follows where a lever fuses it, else the convolution."""
        opts = self.layers
        activation = "relu" if norm is not None else ("linear" if self.likelihood == "bernoulli" else "tanh")
        fold = L.folds_bias(norm, opts)
        h = L.conv_transpose2d(h, weight, None if fold else bias, stride, padding, opts, image=norm is None)
        if norm is None:
            return L.bias_act(h, bias if fold else None, activation, opts)
        return L.norm_act(h, norm, activation, opts, input_bias=bias if fold else None, segments=segments)

    def output(self, z: Tensor, segments: int = 1) -> Tensor:
        """The likelihood's parameter for codes z [n, z_dim]; `segments`: z holds that many batches
        of equal size decoded in one call, each with its own batch-norm statistics."""
        with L.profile_range("decoder.top"):
            h = self._up(z[:, :, None, None], self.top_weight, self.top_bias, self.top_norm, 1, 0, segments)
        for k in reversed(range(len(self.weights))):
            with L.profile_range(f"decoder.layer{k + 1}"):
                h = self._up(h, self.weights[k], self.biases[k], self.norms[k - 1] if k > 0 else None, 2, 1, segments)
        return h

    def to_image(self, out: Tensor) -> Tensor:
        """The likelihood's parameter as an image in [-1, 1] (its mean)."""
        return torch.sigmoid(out) * 2 - 1 if self.likelihood == "bernoulli" else out

    def forward(self, z: Tensor) -> Tensor:
        return self.to_image(self.output(z))


class Critic(nn.Module):
    """f(x): an unnormalised log-density of images, [B, C, S, S] -> [B]."""

    def __init__(self, image_size: int, channels: int, width: int = 64, norm: str = "none") -> None:
        super().__init__()
        if norm not in CRITIC_NORMS:
            raise ValueError(f"critic norm must be one of {CRITIC_NORMS} (no BatchNorm under a gradient penalty), got {norm!r}")
        widths = level_widths(image_size, width)
        self.body = _DownStack(channels, widths, norm, "critic")
        self.head = nn.Conv2d(widths[-1], 1, 4, 1, 0)
        _dcgan_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.score(self.body(x))

    def score(self, h: Tensor) -> Tensor:
        """f from the body's features: [B]."""
        with L.profile_range("critic.head"):
            return L.conv2d(h, self.head.weight, self.head.bias, 1, 0, self.body.layers).flatten()


class VampPrior(nn.Module):
    """p(z) = 1/K sum_k q(z|u_k) with K learned pseudo-inputs u_k (images squashed by tanh)."""

    def __init__(self, n_components: int, image_size: int, channels: int) -> None:
        super().__init__()
        if n_components < 1:
            raise ValueError(f"the VampPrior needs at least one pseudo-input, got {n_components}")
        self.pseudo_inputs = nn.Parameter(torch.randn(n_components, channels, image_size, image_size) * 0.5)

    @torch.no_grad()
    def init_from(self, images: Tensor) -> None:
        """Start the pseudo-inputs at real images in [-1, 1] (cycled if fewer than K)."""
        k = self.pseudo_inputs.shape[0]
        idx = torch.arange(k, device=images.device) % images.shape[0]
        self.pseudo_inputs.copy_(torch.atanh(images[idx].clamp(-0.99, 0.99)).to(self.pseudo_inputs))

    def components(self, encoder: Encoder) -> tuple[Tensor, Tensor]:
        """(mu_k, logvar_k), each [K, z_dim]."""
        u = torch.tanh(self.pseudo_inputs)
        if u.dtype != next(encoder.parameters()).dtype:
            u = u.to(next(encoder.parameters()).dtype)
        return encoder(u.contiguous(memory_format=_memory_format_of(encoder)))

    def latents(self, encoder: Encoder, eps: Tensor, k: Tensor) -> Tensor:
        """z = mu_k + exp(logvar_k / 2) * eps for component indices k [n] and noise eps [n, z_dim]."""
        mu_k, logvar_k = self.components(encoder)
        return mu_k[k] + torch.exp(0.5 * logvar_k[k]) * eps.to(mu_k.dtype)


def _memory_format_of(module: nn.Module) -> torch.memory_format:
    for p in module.parameters():
        if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous():
            return torch.channels_last
    return torch.contiguous_format


class EHMModels(nn.Module):
    """The players of one run: encoder, decoder (+ its log_scale), critic and an optional VampPrior."""

    def __init__(
        self,
        *,
        image_size: int,
        channels: int,
        z_dim: int = 100,
        width: int = 64,
        critic_width: int | None = None,
        norm: str = "batch",
        critic_norm: str = "none",
        share_weights: bool = False,
        likelihood: str = "gaussian",
        log_scale: float = math.log(0.1),
        learn_scale: bool = True,
        scale_shape: str = "scalar",
        prior: str = "normal",
        vamp_components: int = 64,
    ) -> None:
        super().__init__()
        check_image_size(image_size)
        if prior not in ("normal", "vamp"):
            raise ValueError(f"prior must be 'normal' or 'vamp', got {prior!r}")
        self.encoder = Encoder(image_size, channels, z_dim, width, norm)
        self.decoder = Decoder(
            image_size,
            channels,
            z_dim,
            width,
            norm,
            likelihood=likelihood,
            log_scale=log_scale,
            learn_scale=learn_scale,
            scale_shape=scale_shape,
            tied_to=self.encoder if share_weights else None,
        )
        self.critic = Critic(image_size, channels, critic_width or width, critic_norm)
        self.prior = VampPrior(vamp_components, image_size, channels) if prior == "vamp" else None
        shared = self.encoder.body.layers  # one set of options for every layer
        self.critic.body.layers = self.decoder.layers = shared

    def configure_layers(self, *, levers: str | tuple[str, ...] | None = None, backend: str | None = None,
                         image_layers: str | None = None, conv_kernel: str | None = None,
                         process_group: Any = None) -> LayerOptions:
        """What every layer of the players runs (one shared `LayerOptions`; arguments left None keep
        their value): `levers`, ehm_fast.nn's speedups in force (see ehm_fast.nn.options: "all",
        "none" or a list); `backend` of the fused layer ops (None: the global default); the form
        of the layers that read or write images: "cudnn" (conv2d / conv_transpose2d) or "matmul"
        (the same sums as im2col + matmul); `conv_kernel`, the convolutions' kernels ("cudnn" or
        "triton"); `process_group` of synchronised batch norm."""
        opts = self.encoder.body.layers
        if image_layers is not None:
            if image_layers not in IMAGE_LAYERS:
                raise ValueError(f"image layers must be one of {IMAGE_LAYERS}, got {image_layers!r}")
            opts.image_layers = image_layers
        if conv_kernel is not None:
            if conv_kernel not in CONV_KERNELS:
                raise ValueError(f"conv kernel must be one of {CONV_KERNELS}, got {conv_kernel!r}")
            opts.conv_kernel = conv_kernel
        if levers is not None:
            opts.levers = parse_levers(levers)
        if backend is not None:
            opts.backend = backend
        if process_group is not None:
            opts.process_group = process_group
        return opts

    def critic_and_encoder(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(f(x), (mu(x), logvar(x))): the sleep phase's two reads of x~. Under the merge lever
        their first layers (both a bias-free convolution of the image and a LeakyReLU) run as one
        convolution with both weight sets."""
        critic, encoder, opts = self.critic, self.encoder, self.encoder.body.layers
        if "merge" not in opts.levers:
            return critic(x), encoder(x)
        with L.profile_range("sleep.first_layers"):
            dtype = L.compute_dtype(x)
            convs = (critic.body.convs[0], encoder.body.convs[0])
            weight = torch.cat([L.cast(c.weight, dtype, opts) for c in convs])
            h = L.norm_act(L.conv2d(x, weight, None, 2, 1, opts, image=True), nn.Identity(), "lrelu", opts)
            h_critic, h_encoder = h.split([c.out_channels for c in convs], 1)
        return critic.score(critic.body(h_critic, start=1)), encoder.heads(encoder.body(h_encoder, start=1))

    def conv_parameters(self) -> list[nn.Parameter]:
        """The weights and biases that convolutions read (what a weight cache holds), each once."""
        convs = [m for m in self.modules() if isinstance(m, nn.Conv2d)]
        dec = self.decoder
        found = [p for m in convs for p in (m.weight, m.bias) if p is not None]
        found += [*dec.weights, dec.top_weight]
        return list({id(p): p for p in found}.values())

    def generator_parameters(self) -> list[nn.Parameter]:
        """Encoder, decoder and prior parameters, each once (tied weights are shared), trainable only."""
        seen: dict[int, nn.Parameter] = {}
        for module in (self.encoder, self.decoder, self.prior):
            if module is not None:
                for p in module.parameters():
                    if p.requires_grad:
                        seen.setdefault(id(p), p)
        return list(seen.values())

    def prior_latents(self, eps: Tensor, k: Tensor | None = None) -> Tensor:
        """z ~ p(z) from given noise: eps [n, z_dim] ~ N(0, I) and, for the VampPrior, component indices k [n]."""
        if self.prior is None:
            return eps
        if k is None:
            raise ValueError("the VampPrior needs component indices k")
        return self.prior.latents(self.encoder, eps, k)

    def draw_prior_noise(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """The noise `prior_latents` turns into n codes."""
        eps = torch.randn(n, self.encoder.z_dim, device=device, generator=generator)
        if self.prior is None:
            return eps, None
        k = torch.randint(0, self.prior.pseudo_inputs.shape[0], (n,), device=device, generator=generator)
        return eps, k

    def sample_prior(self, n: int, device: torch.device | None = None) -> Tensor:
        """z ~ p(z), [n, z_dim], from the device's default generator."""
        return self.prior_latents(*self.draw_prior_noise(n, device or self.decoder.top_bias.device))
