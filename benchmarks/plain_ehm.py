"""The baseline of bench_train.py: one EHM iteration written in plain PyTorch, as a user would.

DCGAN 64x64 encoder / decoder / critic (width 64, nz 100), a critic step with the importance
estimate of log Z and a gradient penalty, then a wake + sleep generator step, each with torch's
fused Adam. `PlainEHM(..., amp=True, channels_last=True)` plus `capture_cuda_graph` is the best a
skilled user gets without ehm_fast (row 2 of the benchmark).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from benchmarks.harness import capture_graph

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _down(cin: int, cout: int, norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, 2, 1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    return layers + [nn.LeakyReLU(0.2, inplace=True)]


class Encoder(nn.Module):
    def __init__(self, nz: int = 100, width: int = 64, channels: int = 3):
        super().__init__()
        w = width
        self.body = nn.Sequential(*_down(channels, w, False), *_down(w, 2 * w, True), *_down(2 * w, 4 * w, True),
                                  *_down(4 * w, 8 * w, True), nn.Conv2d(8 * w, 2 * nz, 4, 1, 0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.body(x).flatten(1).chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    def __init__(self, nz: int = 100, width: int = 64, channels: int = 3):
        super().__init__()
        w = width

        def up(cin, cout):
            return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

        self.body = nn.Sequential(nn.ConvTranspose2d(nz, 8 * w, 4, 1, 0, bias=False), nn.BatchNorm2d(8 * w),
                                  nn.ReLU(True), *up(8 * w, 4 * w), *up(4 * w, 2 * w), *up(2 * w, w),
                                  nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Tanh())
        self.log_scale = nn.Parameter(torch.full((channels, 1, 1), math.log(0.1)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z[:, :, None, None])


class Critic(nn.Module):
    def __init__(self, width: int = 64, channels: int = 3):
        super().__init__()
        w = width
        self.body = nn.Sequential(*_down(channels, w, False), *_down(w, 2 * w, False), *_down(2 * w, 4 * w, False),
                                  *_down(4 * w, 8 * w, False), nn.Conv2d(8 * w, 1, 4, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten()


def gaussian_nll(x, mean, log_scale):
    return (0.5 * (x - mean) ** 2 * torch.exp(-2 * log_scale) + log_scale + HALF_LOG_2PI).flatten(1).sum(1)


class PlainEHM:
    """Models, optimizers and one `step(x)` = critic step + generator (wake + sleep) step."""

    def __init__(self, device: torch.device, *, nz: int = 100, width: int = 64, gp_lambda: float = 10.0,
                 amp: bool = False, channels_last: bool = False, lr: float = 2e-4):
        self.device, self.nz, self.gp_lambda, self.amp = device, nz, gp_lambda, amp
        self.enc, self.dec, self.critic = Encoder(nz, width).to(device), Decoder(nz, width).to(device), Critic(width).to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for m in (self.enc, self.dec, self.critic):
            m.to(memory_format=self.memory_format)
        fused = device.type == "cuda"
        kw = dict(lr=lr, betas=(0.5, 0.999), fused=fused, capturable=fused)
        self.opt_c = torch.optim.Adam(self.critic.parameters(), **kw)
        self.opt_g = torch.optim.Adam(list(self.enc.parameters()) + list(self.dec.parameters()), **kw)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def critic_step(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        with torch.no_grad(), self._autocast():
            z = torch.randn(b, self.nz, device=self.device)
            mean = self.dec(z).float()
            fake = mean + torch.exp(self.dec.log_scale) * torch.randn_like(mean)
            log_p = -gaussian_nll(fake, mean, self.dec.log_scale)
        fake = fake.contiguous(memory_format=self.memory_format)
        with self._autocast():
            f_real = self.critic(x).float()
            f_fake = self.critic(fake).float()
            loss = -f_real.mean() + torch.logsumexp(f_fake - log_p, 0) - math.log(b)
            e = torch.rand(b, 1, 1, 1, device=self.device)
            mix = (e * x + (1 - e) * fake).requires_grad_(True)
            (grad,) = torch.autograd.grad(self.critic(mix).float().sum(), mix, create_graph=True)
            penalty = ((grad.float().flatten(1).pow(2).sum(1) + 1e-12).sqrt() - 1).pow(2).mean()
            loss = loss + self.gp_lambda * penalty
        self.opt_c.zero_grad(set_to_none=False)
        loss.backward()
        self.opt_c.step()
        return loss.detach()

    def generator_step(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        with self._autocast():
            mu, logvar = self.enc(x)
            mu, logvar = mu.float(), logvar.float()
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            mean = self.dec(z).float()
            wake = gaussian_nll(x.float(), mean, self.dec.log_scale) + (0.5 * z * z + HALF_LOG_2PI).sum(1)
            z_s = torch.randn(b, self.nz, device=self.device)
            x_s = self.dec(z_s).contiguous(memory_format=self.memory_format)
            mu_s, logvar_s = self.enc(x_s)
            mu_s, logvar_s = mu_s.float(), logvar_s.float()
            latent = (0.5 * (z_s - mu_s) ** 2 * torch.exp(-logvar_s) + 0.5 * logvar_s + HALF_LOG_2PI).sum(1)
            sleep = latent - self.critic(x_s).float()
            loss = wake.mean() + sleep.mean()
        self.opt_g.zero_grad(set_to_none=False)
        loss.backward()
        self.opt_g.step()
        return loss.detach()

    def step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.critic_step(x), self.generator_step(x)


def capture_cuda_graph(step: Callable[[torch.Tensor], tuple], x: torch.Tensor, warmup: int = 3):
    """Captures step(static_x) in one CUDA graph; returns (replay(x) -> losses, static input)."""
    static_x = x.clone()
    graph, static_out = capture_graph(lambda: step(static_x), warmup)

    def replay(batch: torch.Tensor):
        static_x.copy_(batch, non_blocking=True)
        graph.replay()
        return static_out

    return replay, static_x
