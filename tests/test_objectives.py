"""The step's loss closures equal the objectives of docs/math.md, written out here in float64 from
the same draws (the step computes in float32: agreement to its rounding): EHM, the symmetric VAE,
the VAE, WGAN-GP's generator, and the critic's loss."""

import copy
import math

import pytest
import torch

from ehm_fast.ehm import EHM
from ehm_fast.models import EHMModels

LOG_2PI = math.log(2 * math.pi)


def recorded(ehm):
    """Wraps ehm._draw so the test sees every random draw the closures make, in order."""
    draws, real_draw = [], ehm._draw

    def draw(*args, **kw):
        out = real_draw(*args, **kw)
        draws.append(out)
        return out

    ehm._draw = draw
    return draws


def gaussian_nll(x, mean, log_scale):
    return ((x - mean) ** 2 / (2 * torch.exp(2 * log_scale)) + log_scale + 0.5 * LOG_2PI).flatten(1).sum(1)


def laplace_nll(x, mean, log_scale):
    return ((x - mean).abs() / torch.exp(log_scale) + log_scale + math.log(2)).flatten(1).sum(1)


def normal_nll(z, mu, logvar):
    return ((z - mu) ** 2 / (2 * torch.exp(logvar)) + 0.5 * logvar + 0.5 * LOG_2PI).sum(1)


def setup(objective, likelihood="gaussian", **kw):
    torch.manual_seed(int(torch.randint(2**31, ())))
    models = EHMModels(image_size=32, channels=1, z_dim=4, width=4, likelihood=likelihood)
    ehm = EHM(models, objective=objective, likelihood=likelihood, backend="torch", n_critic=1, **kw)
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    return copy.deepcopy(models).double(), ehm, x


def close(got, expected):
    torch.testing.assert_close(got.detach().double(), expected.detach(), rtol=2e-5, atol=1e-4)


def nll(likelihood, x, out, log_scale):
    return gaussian_nll(x, out, log_scale) if likelihood == "gaussian" else laplace_nll(x, out, log_scale)


@pytest.mark.parametrize("objective", ["ehm", "svae", "vae"])
@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_generator_loss_is_the_objective(objective, likelihood):
    m, ehm, x = setup(objective, likelihood, critic_weight=3.0)
    draws = recorded(ehm)
    loss, metrics = ehm._generator_closure(x)()
    draws = [d.double() for d in draws]
    x = x.double()
    eps = draws[0]
    ls = m.decoder.log_scale
    with torch.no_grad():
        mu, lv = m.encoder(x)
        z = mu + torch.exp(0.5 * lv) * eps
        out = m.decoder.output(z)
        rec = nll(likelihood, x, out, ls)
        prior = normal_nll(z, torch.zeros_like(z), torch.zeros_like(z))
        q = normal_nll(z, mu, lv)
        if objective == "vae":
            kl = 0.5 * (torch.exp(lv) + mu**2 - 1 - lv).sum(1)
            expected = (rec + kl).mean()
        else:
            wake = rec + prior - (q if objective == "svae" else 0)
            z_s = draws[1]
            out_s = m.decoder.output(z_s)
            x_s = m.decoder.to_image(out_s)
            mu_s, lv_s = m.encoder(x_s)
            sleep = normal_nll(z_s, mu_s, lv_s) - 3.0 * m.critic(x_s)
            if objective == "svae":  # + log p(x~|z) at the mean image x~ = G(z)
                sleep = sleep - nll(likelihood, out_s, out_s, ls)
            expected = wake.mean() + sleep.mean()
    close(loss.detach(), expected)
    close(metrics["wake_loss"], (rec + kl).mean() if objective == "vae" else wake.mean())


def test_svae_sleep_term_with_sampled_images():
    m, ehm, x = setup("svae", "gaussian", sleep_noise=True, critic_weight=1.0)
    draws = recorded(ehm)
    loss, metrics = ehm._generator_closure(x)()
    draws = [d.double() for d in draws]
    z_s, noise = draws[1], draws[2]
    with torch.no_grad():
        out_s = m.decoder.output(z_s)
        x_s = out_s + torch.exp(m.decoder.log_scale) * noise
        mu_s, lv_s = m.encoder(x_s)
        sleep = normal_nll(z_s, mu_s, lv_s) - m.critic(x_s) - gaussian_nll(x_s, out_s, m.decoder.log_scale)
    close(metrics["sleep_loss"], sleep.mean())


def test_wgan_generator_loss():
    m, ehm, x = setup("wgan-gp")
    draws = recorded(ehm)
    loss, _ = ehm._generator_closure(x)()
    draws = [d.double() for d in draws]
    with torch.no_grad():
        expected = -m.critic(m.decoder(draws[1])).mean()
    close(loss.detach(), expected)


@pytest.mark.parametrize("estimator", ["jensen", "importance"])
def test_critic_loss_is_the_cross_entropy_plus_the_penalty(estimator):
    m, ehm, x = setup("ehm", "gaussian", estimator=estimator, sleep_noise=True, gp_weight=7.0)
    draws = recorded(ehm)
    loss, metrics = ehm._critic_closure(x)()
    draws = [d.double() for d in draws]
    x = x.double()
    z, e = draws[0], draws[-1]
    out = m.decoder.output(z).detach()
    if estimator == "importance":
        fake = out + torch.exp(m.decoder.log_scale.detach()) * draws[1]
        log_p = -gaussian_nll(fake, out, m.decoder.log_scale.detach())
    else:
        fake = out
    f_real, f_fake = m.critic(x), m.critic(fake)
    if estimator == "importance":
        log_z = torch.logsumexp(f_fake - log_p, 0) - math.log(len(x))
    else:
        log_z = f_fake.mean()
    x_hat = (e * x + (1 - e) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(m.critic(x_hat).sum(), x_hat)
    gp = ((torch.sqrt(g.pow(2).flatten(1).sum(1) + ehm.cfg.gp_eps) - 1) ** 2).mean()
    expected = -f_real.mean() + log_z + 7.0 * gp
    close(loss.detach(), expected.detach())
    close(metrics["gp"], 7.0 * gp.detach())


def test_ais_critic_loss_is_log_z_hat_with_the_weighted_gradient():
    """estimator=ais: the loss is -mean f(x) + log Z_hat of the chains, and its gradient is
    -mean grad f(x) + sum_i w_i grad f(x_i) at the chains' final samples (self-normalised w)."""
    _, ehm, x = setup("ehm", "gaussian", estimator="ais", sleep_noise=True, lipschitz="none", ais_steps=3)
    captured, anneal = {}, ehm._anneal
    ehm._anneal = lambda *args: captured.setdefault("chains", anneal(*args))
    critic = ehm.models.critic
    loss, metrics = ehm._critic_closure(x)()
    chains = captured["chains"]
    params = [p for p in critic.parameters()]
    got = torch.autograd.grad(loss, params)
    w = torch.softmax(chains.log_weights, 0)
    expected = -critic(x).mean() + (w.detach() * critic(chains.x)).sum()
    want = torch.autograd.grad(expected, params)
    torch.testing.assert_close(loss.detach(), -critic(x).mean().detach() + chains.log_z, rtol=1e-5, atol=1e-4)
    # the weights come from float32 log-weights near -1e3, whose rounding (~6e-5 there) moves their
    # sum from 1 by ~1e-5: the bias gradient -1 + sum w is that small, not zero
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert 0 < float(metrics["ais_acceptance"]) <= 1 and 1 <= float(metrics["ess"]) <= len(x)
