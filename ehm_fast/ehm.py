"""The EHM training step: critic phase, then the wake and sleep phases (docs/math.md).

    from ehm_fast import EHM
    from ehm_fast.models import EHMModels
    models = EHMModels(image_size=32, channels=1, z_dim=32, width=32).to(device)
    ehm = EHM(models, objective="ehm", n_critic=5)
    for _ in range(steps):
        metrics = ehm.step(batches)      # an iterator of [B, C, S, S] batches in [-1, 1]

`step` pulls `ehm.batches_needed()` batches (one per critic step, one for the wake phase) and
returns a dict of 0-d tensors; nothing in it waits for the device (read them with .item() only
when you log). Every loss goes through `ehm_fast.losses`.

Speed paths (each on by default on a GPU, off on the CPU): bf16 autocast, channels_last, the
layer levers of `ehm_fast.nn`, and the capture of a whole iteration (all critic steps and the
generator step, optimizer steps included) in one CUDA graph per critic-step count. How a loss
becomes an update (optimizers, skipping non-finite steps into `bad_steps`, DDP per phase, the
graphs) is `ehm_fast.engine`; this module is the mathematics of docs/math.md.

Data-parallel (torch.distributed initialised, e.g. under torchrun): every random draw is made for
the global batch from a generator seeded alike on every rank, and each rank takes its slice: N
ranks with batch B compute what one process with batch N*B does (docs/ddp.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import losses
from .config import ConfigError, EHMConfig, check_compile
from .distributed import global_log_partition, rank_and_world
from .engine import IterationGraphs, LossClosure, Metrics, StepEngine, compile_closure, make_optimizer, wrap_phase
from .likelihood import sample_image
from .models import EHMModels
from .nn.layers import profile_range
from .nn.options import levers_for
from .nn.weights import WeightCache
from .optim.replay import preserved_buffers
from .sampling import AISResult, ais_log_partition


class EHM:
    """One training iteration of the EHM (or of the svae / vae / wgan-gp baselines) on `models`.

    `config` is an `EHMConfig` (a `TrainConfig` works too); keyword arguments override its fields.
    `batch_source` (an iterator of batches, e.g. the training loader) feeds SVRG's snapshot
    passes with fresh batches; without it a snapshot is taken on the current batch.
    """

    def __init__(self, models: EHMModels, config: EHMConfig | None = None, *,
                 batch_source: Iterator[Tensor] | None = None, **overrides: Any) -> None:
        cfg = dataclasses.replace(config or EHMConfig(), **overrides)
        self.batch_source = batch_source
        self.cfg, self.models = cfg, models
        self.device = models.decoder.top_bias.device
        on_gpu = self.device.type == "cuda"
        self.amp = (on_gpu and torch.cuda.is_bf16_supported()) if cfg.amp is None else bool(cfg.amp)
        self.channels_last = on_gpu if cfg.channels_last is None else bool(cfg.channels_last)
        self.rank, self.world_size = rank_and_world()
        graph_ok = on_gpu and self.world_size == 1
        if cfg.cuda_graph and not graph_ok:
            why = "it needs a CUDA device" if not on_gpu else "it needs one process"
            warnings.warn(f"cuda_graph is off: {why}", RuntimeWarning, stacklevel=2)
        self.cuda_graph = graph_ok if cfg.cuda_graph is None else bool(cfg.cuda_graph) and graph_ok
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        models.to(memory_format=self.memory_format)
        self.layers = layers = models.configure_layers(levers=levers_for(cfg.layer_levers, self.device.type), backend=cfg.backend,
                                         image_layers=cfg.image_layers, conv_kernel=cfg.conv_kernel)
        check_compile(cfg, layers.levers)
        # SVRG/STORM evaluate at swapped-in weights, which a cache would not see
        cached = self.amp and cfg.optimizer == "adam" and "weight_cache" in layers.levers
        self.weight_cache = WeightCache(models.conv_parameters()) if cached else None
        self.estimator = "jensen" if cfg.objective == "wgan-gp" else cfg.estimator
        if self.estimator == "ais" and cfg.likelihood == "bernoulli":
            raise ConfigError("estimator ais moves x~ by Langevin steps, which needs a continuous likelihood")
        if self.estimator == "importance" and not cfg.sleep_noise and cfg.objective in ("ehm", "svae"):
            warnings.warn("estimator=importance trains the critic on sampled images x~ ~ p(x|z) while the sleep "
                          "phase scores the decoder's mean images (sleep_noise off): turn sleep_noise on so both "
                          "see the same distribution", RuntimeWarning, stacklevel=2)
        self.uses_critic = cfg.objective != "vae"
        self.g_params = models.generator_parameters()
        self.c_params = [p for p in models.critic.parameters() if p.requires_grad]
        joint = cfg.vr_reference == "joint" and self.uses_critic
        common = {"device": self.device, "capturable": self.cuda_graph, "snapshot_every": cfg.snapshot_every,
                  "snapshot_batches": cfg.snapshot_batches, "modules": [models]}
        self.opt_g = make_optimizer(cfg.optimizer, self.g_params, cfg.lr, cfg.betas,
                                    held=self.c_params if joint else (), **common)
        self.opt_c = make_optimizer(cfg.optimizer, self.c_params, cfg.lr_critic, cfg.betas,
                                    held=self.g_params if joint else (), **common)
        # DDP per phase (built last: its constructor broadcasts rank 0's weights).
        self.ddp_g = wrap_phase(self._generator_trained()) if self.world_size > 1 else None
        self.ddp_c = wrap_phase(self.c_params) if self.world_size > 1 and self.uses_critic else None
        self.engine = StepEngine(self.device, self.world_size)
        self.graphs = IterationGraphs(self._iteration, self._state_tensors, [self.opt_g, self.opt_c])
        # SVRG's snapshots are taken here, at iteration boundaries, with or without CUDA graphs (a
        # replay runs no Python): one schedule, so graph and eager training are the same
        self.schedule_by_caller = cfg.optimizer == "svrg"
        for opt in (self.opt_g, self.opt_c):
            if hasattr(opt, "schedule_by_caller"):
                opt.schedule_by_caller = self.schedule_by_caller
        self.step_count = 0  # generator steps done

    @property
    def bad_steps(self) -> Tensor:
        """Optimizer steps skipped because their loss or gradients were not finite (0-d tensor)."""
        return self.engine.bad_steps

    # ------------------------------------------------------------------ data parallel
    def _generator_trained(self) -> list[nn.Parameter]:
        """The generator-phase parameters that receive a gradient: DDP must see every one of them
        in each backward: the decoder alone for wgan-gp, which like a Bernoulli decoder leaves
        log_scale out (find_unused_parameters would find them too, at a graph walk per step)."""
        dec, wgan = self.models.decoder, self.cfg.objective == "wgan-gp"
        params = [p for p in dec.parameters() if p.requires_grad] if wgan else self.g_params
        if wgan or self.cfg.likelihood == "bernoulli":
            params = [p for p in params if p is not dec.log_scale]
        return params

    def _draw(self, kind: str, shape: tuple[int, ...], **kw: Any) -> Tensor:
        """torch.randn / rand / randint (kind) for the global batch, this rank's slice: the first
        dim of `shape` is the per-rank batch. One process draws exactly what it always did."""
        b, w = shape[0], self.world_size
        full = (w * b, *shape[1:])
        draw = getattr(torch, kind)(size=full, device=self.device, **kw)
        return draw if w == 1 else draw[self.rank * b:(self.rank + 1) * b]

    def _sample_prior(self, b: int) -> Tensor:
        eps = self._draw("randn", (b, self.models.encoder.z_dim))
        k = None
        if self.models.prior is not None:
            k = self._draw("randint", (b,), high=self.models.prior.pseudo_inputs.shape[0])
        return self.models.prior_latents(eps, k)

    # ------------------------------------------------------------------ schedule
    def n_critic_now(self) -> int:
        """Critic steps of the next iteration (WGAN's schedule: 100 early on and every 500th step)."""
        if not self.uses_critic:
            return 0
        s = self.step_count
        if self.cfg.critic_schedule == "wgan" and (s < 25 or s % 500 == 0):
            return 100
        return self.cfg.n_critic

    def batches_needed(self) -> int:
        return self.n_critic_now() + 1

    # ------------------------------------------------------------------ public step
    def step(self, batches: Iterator[Tensor] | Iterable[Tensor] | Sequence[Tensor] | Tensor) -> Metrics:
        """One iteration: n_critic critic steps, then one generator step.

        `batches`: an iterator (pulled `batches_needed()` times), a sequence of exactly that many
        [B, C, S, S] tensors, or one [B, C, S, S] tensor used by every phase. Returns 0-d tensors
        (overwritten by the next step when a CUDA graph runs: .clone() what you keep).
        """
        n = self.n_critic_now()
        real = [self._prepare(b) for b in self._take(batches, n + 1)]
        if self.schedule_by_caller:
            self._refresh_due_snapshots(real, n)
        if self.cuda_graph and self._optimizers_ready():
            metrics = self.graphs.run(real, n)
        else:  # STORM's first step creates its state: eager, then captured
            metrics = self._iteration(real, n)
        if self.schedule_by_caller:
            self.opt_c.advance_schedule(n)
            self.opt_g.advance_schedule(1)
        self.step_count += 1
        return metrics

    def _optimizers_ready(self) -> bool:
        """Whether every optimizer's state exists, so that a captured step finds it (Adam's is
        created by the capture's warm-up, whose zeros are a fresh Adam's)."""
        return all(isinstance(opt, torch.optim.Adam) or opt.ready() for opt in (self.opt_g, self.opt_c))

    def _refresh_due_snapshots(self, real: list[Tensor], n: int) -> None:
        """SVRG snapshots that the schedule asks for, taken eagerly before the iteration (a
        snapshot due inside an iteration of several critic steps waits for the next one)."""
        for opt, critic, ddp, x, steps in ((self.opt_c, True, self.ddp_c, real[0], n),
                                           (self.opt_g, False, self.ddp_g, real[n], 1)):
            if steps and opt.snapshot_due:
                closure = self._critic_closure if critic else self._generator_closure
                with self._trainable(critic=critic):
                    self.engine.refresh_snapshot(opt, ddp, lambda c=closure, x=x: c(self._fresh_batch(x)))

    def _take(self, batches: Any, count: int) -> list[Tensor]:
        if isinstance(batches, Tensor):
            if batches.dim() == 4:
                return [batches] * count
            batches = list(batches.unbind(0))
        if isinstance(batches, Sequence):
            if len(batches) != count:
                raise ValueError(f"this step needs {count} batches (n_critic + 1), got {len(batches)}")
            return list(batches)
        it = iter(batches)
        return [next(it) for _ in range(count)]

    def _prepare(self, x: Tensor) -> Tensor:
        return x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def _autocast(self) -> torch.autocast:
        # Cached weight casts would live outside the graph's memory pool: no cache while capturing.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=not self.cuda_graph)

    # ------------------------------------------------------------------ one iteration
    def _iteration(self, real: list[Tensor], n_critic: int) -> Metrics:
        metrics: Metrics = {}
        with self.models.encoder.body.layers.cached(self.weight_cache):
            if self.weight_cache is not None:
                self.weight_cache.refresh()  # the weights as this iteration finds them
            for i in range(n_critic):
                with profile_range("critic_step"):
                    metrics.update(self._critic_step(real[i]))
            with profile_range("generator_step"):
                metrics.update(self._generator_step(real[n_critic]))
        metrics["bad_steps"] = self.bad_steps
        return metrics

    def _draw_noise(self, like: Tensor) -> Tensor:
        """Standard noise for one draw of p(x|z), drawn before a closure so that a re-evaluation
        (SVRG/STORM) sees the same draw: normal for gaussian, uniform(0, 1) otherwise."""
        return self._draw("randn" if self.cfg.likelihood == "gaussian" else "rand", tuple(like.shape))

    def _sample_x(self, out: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x~ ~ p(x|z) as an image in [-1, 1] and log p(x~|z) in fp32 (the mean image and None
        without noise)."""
        dec = self.models.decoder
        return sample_image(self.cfg.likelihood, out, dec.log_scale, noise, to_image=dec.to_image,
                            backend=self.cfg.backend)

    def _critic_step(self, x: Tensor) -> Metrics:
        with self._trainable(critic=True):
            metrics = self.engine.optimize(self.opt_c, self.c_params, self._compiled(self._critic_closure(x)), self.ddp_c,
                                     lambda: self._critic_closure(self._fresh_batch(x)))
        if self.cfg.lipschitz == "clip":
            with torch.no_grad():
                torch._foreach_clamp_min_(self.c_params, -self.cfg.clip_value)
                torch._foreach_clamp_max_(self.c_params, self.cfg.clip_value)
        if self.weight_cache is not None:
            self.weight_cache.refresh(self.c_params)  # the generator step and the next critic step read them
        return metrics

    def _compiled(self, closure: LossClosure) -> LossClosure:
        return compile_closure(closure) if self.cfg.compile else closure

    def _fresh_batch(self, x: Tensor) -> Tensor:
        return x if self.batch_source is None else self._prepare(next(self.batch_source))

    def _critic_loss(self, f_real: Tensor, f_fake: Tensor, log_p: Tensor | None) -> Tensor:
        """-mean f(x) + log Z_hat; with several ranks the importance estimate's logsumexp runs over
        the generated samples of every rank unless local_log_partition (the Jensen bound is a mean,
        which DDP's averaging already makes global)."""
        backend = self.cfg.backend
        if self.estimator == "importance" and self.world_size > 1 and not self.cfg.local_log_partition:
            return -f_real.mean() + global_log_partition(f_fake.reshape(-1), log_p.reshape(-1), backend=backend)
        proposal = log_p if self.estimator == "importance" else None
        return losses.critic_loss(f_real, f_fake, proposal, estimator=self.estimator, backend=backend)

    def _critic_closure(self, x: Tensor) -> LossClosure:
        """The critic loss on batch `x`, with its fakes and noise drawn now (before the closure)."""
        m, cfg = self.models, self.cfg
        b = x.shape[0]
        noisy = self.estimator in ("importance", "ais") or (cfg.objective != "wgan-gp" and cfg.sleep_noise)
        with torch.no_grad(), self._autocast():
            z = self._sample_prior(b)
            out = m.decoder.output(z)
            fake, log_p = self._sample_x(out, self._draw_noise(out) if noisy else None)
        ais = self._anneal(fake, out) if self.estimator == "ais" else None
        if ais is not None:
            fake = ais.x  # the chains' final samples, drawn at the current critic (detached)
        fake = fake.to(x.dtype).contiguous(memory_format=self.memory_format)
        e = self._draw("rand", (b, 1, 1, 1), dtype=x.dtype)

        def closure() -> tuple[Tensor, Metrics]:
            with self._autocast(), profile_range("critic_loss"):
                f_real, f_fake = m.critic(torch.cat([x, fake])).float().split(b)
            if ais is None:
                loss = self._critic_loss(f_real, f_fake, log_p)
            else:  # log Z_hat, with the gradient sum_i w_i grad f(x_i) at the final samples
                loss = -f_real.mean() + ais.surrogate(f_fake)
            out = {"critic_loss": loss.detach(), "critic_gap": (f_real.mean() - f_fake.mean()).detach()}
            total = loss
            if cfg.lipschitz == "gp":
                gp = cfg.gp_weight * self._gradient_penalty(x, fake, e)
                out["gp"] = gp.detach()
                total = total + gp
            if self.estimator == "importance":
                out["ess"] = losses.importance_weights(f_fake.detach(), log_p)[1]
            elif ais is not None:
                out["ess"], out["ais_acceptance"] = ais.weights()[1], ais.acceptance.mean()
            return total, out

        return closure

    def _anneal(self, x0: Tensor, out: Tensor) -> AISResult:
        """AIS chains from x0 ~ p(x|z) (z fixed, decoder output `out`) to exp(f), detached:
        log_proposal = log p(x|z), MALA steps of ais_step_size * s^2."""
        cfg, dec = self.cfg, self.models.decoder
        out = out.detach().float()
        log_scale = dec.log_scale.detach().float()
        nll = losses.gaussian_nll if cfg.likelihood == "gaussian" else losses.laplace_nll

        def f(x: Tensor) -> Tensor:
            with self._autocast():
                return self.models.critic(x.contiguous(memory_format=self.memory_format)).float()

        def log_proposal(x: Tensor) -> Tensor:
            return -nll(x, out, log_scale, backend=cfg.backend)

        step = cfg.ais_step_size * torch.exp(2 * log_scale).mean()
        with profile_range("ais"), self._frozen(self.models.critic):
            return ais_log_partition(f, log_proposal, x0.float(), n_steps=cfg.ais_steps, step_size=step,
                                     backend=cfg.backend)

    @staticmethod
    @contextlib.contextmanager
    def _frozen(module: nn.Module) -> Iterator[None]:
        """The chain differentiates f in x only: no parameter gradients recorded, buffers kept."""
        flags = [(p, p.requires_grad) for p in module.parameters()]
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            with preserved_buffers([module]):
                yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def _gradient_penalty(self, x: Tensor, fake: Tensor, e: Tensor) -> Tensor:
        critic = self.models.critic
        if "explicit_penalty" in critic.body.layers.levers:  # first-order passes, no double backward
            from .nn.critic_penalty import gradient_penalty

            with self._autocast(), profile_range("penalty_explicit"):
                return gradient_penalty(critic, e * x + (1 - e) * fake, self.cfg.gp_eps)[0]
        x_hat = (e * x + (1 - e) * fake).requires_grad_(True)
        with self._autocast(), profile_range("penalty_forward"):
            f_hat = self.models.critic(x_hat)
        with profile_range("penalty_input_gradient"):
            (g,) = torch.autograd.grad(f_hat.float().sum(), x_hat, create_graph=True)
        norm = torch.sqrt(g.float().pow(2).flatten(1).sum(1) + self.cfg.gp_eps)
        return (norm - 1).pow(2).mean()

    def _generator_step(self, x: Tensor) -> Metrics:
        with self._trainable(critic=False):
            metrics = self.engine.optimize(self.opt_g, self.g_params, self._compiled(self._generator_closure(x)), self.ddp_g,
                                     lambda: self._generator_closure(self._fresh_batch(x)))
        metrics["log_scale"] = self.models.decoder.log_scale.detach().float().mean()
        return metrics

    def _generator_closure(self, x: Tensor) -> LossClosure:
        """The wake + sleep (or wgan-gp generator) loss on batch `x`, noise drawn now."""
        m, cfg = self.models, self.cfg
        b, obj = x.shape[0], cfg.objective
        eps_wake = self._draw("randn", (b, m.encoder.z_dim))
        with torch.no_grad():
            z_sleep = self._sample_prior(b).float()
        noise_x = self._draw_noise(x) if cfg.sleep_noise and obj in ("ehm", "svae") else None

        def closure() -> tuple[Tensor, Metrics]:
            if obj == "wgan-gp":
                with self._autocast():
                    f = m.critic(m.decoder(z_sleep).contiguous(memory_format=self.memory_format)).float()
                loss = -f.mean()
                return loss, {"gen_loss": loss.detach()}
            sleeps = obj in ("ehm", "svae")
            with profile_range("wake"):
                mu, lv, z = self._encode(x, eps_wake)
            out_wake, out_sleep = self._decode(z, z_sleep if sleeps else None)
            with profile_range("wake"):
                wake, out = self._wake(x, mu, lv, z, out_wake)
            total = wake.mean()
            out["wake_loss"] = total.detach()
            if sleeps:
                with profile_range("sleep"):
                    sleep = self._sleep(z_sleep, noise_x, out_sleep).mean()
                out["sleep_loss"] = sleep.detach()
                total = total + sleep
            out["gen_loss"] = total.detach()
            return total, out

        return closure

    def _prior_components(self) -> tuple[Tensor, Tensor] | str:
        m = self.models
        if m.prior is None:
            return "normal"
        mu_k, lv_k = m.prior.components(m.encoder)
        return mu_k.float(), lv_k.float()

    def _reconstruction_nll(self, x: Tensor, out: Tensor) -> Tensor:
        lik, b = self.cfg.likelihood, self.cfg.backend
        if lik == "bernoulli":
            return losses.bernoulli_nll((x + 1) / 2, out, backend=b)
        fn = losses.gaussian_nll if lik == "gaussian" else losses.laplace_nll
        return fn(x, out, self.models.decoder.log_scale.float(), backend=b)

    def _encode(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mu, logvar, z ~ q(z|x)) in fp32, z reparameterised with the standard noise eps."""
        with self._autocast():
            mu, lv = self.models.encoder(x)
        mu, lv = mu.float(), lv.float()
        return mu, lv, mu + torch.exp(0.5 * lv) * eps

    def _decode(self, z_wake: Tensor, z_sleep: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The decoder's output for the wake codes (fp32) and the sleep codes (None without): one
        call under the merge lever, each half with its own batch-norm statistics."""
        dec = self.models.decoder
        with self._autocast():
            if z_sleep is not None and "merge" in self.layers.levers:
                with profile_range("decoder.wake_and_sleep"):
                    out_wake, out_sleep = dec.output(torch.cat([z_wake, z_sleep]), segments=2).split(len(z_wake))
                return out_wake.float(), out_sleep
            with profile_range("wake"):
                out_wake = dec.output(z_wake).float()
            if z_sleep is None:
                return out_wake, None
            with profile_range("sleep"):
                return out_wake, dec.output(z_sleep)

    def _wake(self, x: Tensor, mu: Tensor, lv: Tensor, z: Tensor, out: Tensor) -> tuple[Tensor, Metrics]:
        """Per-sample wake loss -log p(x|z) - log p(z) (+ log q(z|x) for svae / vae), z ~ q(z|x)
        with the decoder's output `out`."""
        m, cfg = self.models, self.cfg
        x32 = x.float()
        rec = self._reconstruction_nll(x32, out)
        prior = self._prior_components()
        metrics = {"rec_nll": rec.mean().detach(), "rec_mse": (m.decoder.to_image(out) - x32).pow(2).mean().detach()}
        if cfg.objective == "vae" and prior == "normal":
            return rec + losses.kl_normal(mu, lv, backend=cfg.backend), metrics
        pri = losses.std_normal_nll(z, backend=cfg.backend) if prior == "normal" else losses.vamp_prior_nll(
            z, *prior, backend=cfg.backend
        )
        wake = rec + pri
        if cfg.objective in ("svae", "vae"):
            wake = wake - losses.latent_nll(z, mu, lv, backend=cfg.backend)
        return wake, metrics

    def _sleep(self, z: Tensor, noise_x: Tensor | None, out: Tensor) -> Tensor:
        """Per-sample sleep loss -log q(z|x~) - w f(x~) (+ log p(x~|z) for svae), z ~ p(z) with
        the decoder's output `out`."""
        m, cfg = self.models, self.cfg
        x_s, log_p = self._sample_x(out, noise_x)
        if not cfg.sleep_decoder_grad:
            x_s = x_s.detach()
        x_in = x_s.contiguous(memory_format=self.memory_format)
        with self._autocast():
            f, (mu, lv) = m.critic_and_encoder(x_in)
        f = f.float() * cfg.critic_weight
        mu, lv = mu.float(), lv.float()
        if cfg.sleep_latent == "kl":
            lv_t = torch.full_like(z, 2 * math.log(cfg.sleep_code_noise))
            sleep = losses.kl_normal(z, lv_t, mu, lv, backend=cfg.backend) - f
        else:
            sleep = losses.sleep_loss(z, mu, lv, f, backend=cfg.backend)
        if cfg.objective == "svae":
            sleep = sleep + (self._log_likelihood_of_mean(out) if log_p is None else log_p)
        return sleep

    def _log_likelihood_of_mean(self, out: Tensor) -> Tensor:
        """log p(x~|z) at x~ = the decoder's mean image: the symmetric VAE's sleep term when x~ is
        not sampled (for gaussian and laplace it depends on the scale alone; for bernoulli it is
        minus the entropy of the pixel probabilities)."""
        lik, b, out = self.cfg.likelihood, self.cfg.backend, out.float()
        if lik == "bernoulli":
            return -losses.bernoulli_nll(torch.sigmoid(out), out, backend=b)
        fn = losses.gaussian_nll if lik == "gaussian" else losses.laplace_nll
        return -fn(out, out, self.models.decoder.log_scale.float(), backend=b)

    # ------------------------------------------------------------------ phases
    @contextlib.contextmanager
    def _trainable(self, critic: bool) -> Iterator[None]:
        """Only the phase's own parameters collect gradients (no critic weight-gradients in the
        generator step); everything is trainable again afterwards."""
        for p in self.c_params:
            p.requires_grad_(critic)
        for p in self.g_params:
            p.requires_grad_(not critic)
        try:
            yield
        finally:
            for p in self.c_params + self.g_params:
                p.requires_grad_(True)

    def _state_tensors(self) -> list[tuple[str, Tensor]]:
        """Every tensor an iteration changes: weights, buffers, optimizer state, the skip count."""
        items = [("m." + k, v) for k, v in self.models.state_dict(keep_vars=True).items()]
        for name, opt in (("g", self.opt_g), ("c", self.opt_c)):
            for i, st in enumerate(opt.state.values()):
                items += [(f"{name}{i}.{k}", v) for k, v in st.items() if isinstance(v, Tensor)]
            if not isinstance(opt, torch.optim.Adam):  # SVRG's / STORM's values of the other player
                items += [(f"{name}.held{i}", v) for i, v in enumerate(opt.held_reference())]
        return items + [("bad", self.bad_steps)]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "models": self.models.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_c": self.opt_c.state_dict(),
            "step": self.step_count,
            "bad_steps": float(self.bad_steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.models.load_state_dict(state["models"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_c.load_state_dict(state["opt_c"])
        self.step_count = int(state["step"])
        self.bad_steps.fill_(state["bad_steps"])
        self.graphs.clear()  # captured graphs point at the old optimizer state tensors
