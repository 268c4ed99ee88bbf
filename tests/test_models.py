"""The DCGAN encoder, decoder, critic and VampPrior of ehm_fast.models."""

import pytest
import torch
import torch.nn.functional as F

from ehm_fast.models import Critic, Decoder, EHMModels, Encoder, VampPrior, level_widths


@pytest.mark.parametrize("size", [32, 64, 128])
def test_shapes_at_every_size(size):
    m = EHMModels(image_size=size, channels=3, z_dim=5, width=4)
    x = torch.rand(2, 3, size, size) * 2 - 1
    mu, logvar = m.encoder(x)
    assert mu.shape == logvar.shape == (2, 5)
    img = m.decoder(mu)
    assert img.shape == x.shape and img.abs().max() <= 1
    assert m.critic(img).shape == (2,)


def test_widths_double_and_cap_at_eight_times():
    assert level_widths(32, 64) == [64, 128, 256]
    assert level_widths(64, 64) == [64, 128, 256, 512]  # DCGAN at 64 px
    assert level_widths(128, 64) == [64, 128, 256, 512, 512]


@pytest.mark.parametrize("size", [16, 48, 256])
def test_unsupported_size_is_refused(size):
    with pytest.raises(ValueError, match="image_size must be one of"):
        Encoder(size, 3, 8)


def test_critic_refuses_batch_norm():
    with pytest.raises(ValueError, match="no BatchNorm"):
        Critic(32, 1, 8, norm="batch")


def test_tied_decoder_is_the_adjoint_of_the_encoder():
    enc = Encoder(32, 1, 6, width=4, norm="none")
    dec = Decoder(32, 1, 6, width=4, norm="none", tied_to=enc)
    assert dec.weights[0] is enc.body.convs[0].weight and dec.top_weight is enc.mu_head.weight
    # <conv(x), y> = <x, conv_transpose(y)> with the same weight: the decoder's layer is the transpose.
    w = enc.body.convs[0].weight.detach().double()
    x, y = torch.randn(2, 1, 32, 32, dtype=torch.float64), torch.randn(2, 4, 16, 16, dtype=torch.float64)
    lhs = (F.conv2d(x, w, stride=2, padding=1) * y).sum()
    rhs = (x * F.conv_transpose2d(y, w, stride=2, padding=1)).sum()
    torch.testing.assert_close(lhs, rhs)
    # One gradient step on the decoder moves the encoder's shared weight.
    before = enc.body.convs[0].weight.detach().clone()
    dec(torch.randn(3, 6)).sum().backward()
    assert enc.body.convs[0].weight.grad is not None
    with torch.no_grad():
        dec.weights[0].sub_(0.1 * dec.weights[0].grad)
    assert not torch.equal(enc.body.convs[0].weight, before)


def test_tied_models_list_shared_parameters_once_and_save_them():
    m = EHMModels(image_size=32, channels=1, z_dim=4, width=4, share_weights=True)
    params = m.generator_parameters()
    assert len({id(p) for p in params}) == len(params)
    untied = EHMModels(image_size=32, channels=1, z_dim=4, width=4)
    assert len(params) < len(untied.generator_parameters())
    copy = EHMModels(image_size=32, channels=1, z_dim=4, width=4, share_weights=True)
    copy.load_state_dict(m.state_dict())
    z = torch.randn(2, 4)
    torch.testing.assert_close(copy.decoder(z), m.decoder(z), rtol=0, atol=0)
    assert copy.decoder.weights[1] is copy.encoder.body.convs[1].weight  # still tied after loading


def test_tied_decoder_needs_matching_encoder():
    enc = Encoder(32, 1, 6, width=4)
    with pytest.raises(ValueError, match="width"):
        Decoder(32, 1, 6, width=8, tied_to=enc)


def test_bernoulli_decoder_outputs_logits_and_images():
    dec = Decoder(32, 1, 3, width=4, likelihood="bernoulli")
    z = torch.randn(2, 3) * 30
    out, img = dec.output(z), dec(z)
    assert img.min() >= -1 and img.max() <= 1
    torch.testing.assert_close(dec.to_image(out), torch.sigmoid(out) * 2 - 1)


def test_log_scale_shapes_and_fixed_scale():
    dec = Decoder(32, 3, 3, width=4, scale_shape="channel", learn_scale=False, log_scale=-1.5)
    assert dec.log_scale.shape == (3, 1, 1) and not dec.log_scale.requires_grad
    assert torch.all(dec.log_scale == -1.5)


def test_vamp_prior_components_and_latents():
    m = EHMModels(image_size=32, channels=1, z_dim=5, width=4, prior="vamp", vamp_components=7)
    mu_k, lv_k = m.prior.components(m.encoder)
    assert mu_k.shape == lv_k.shape == (7, 5)
    eps, k = m.draw_prior_noise(9, torch.device("cpu"))
    z = m.prior_latents(eps, k)
    torch.testing.assert_close(z, mu_k[k] + torch.exp(0.5 * lv_k[k]) * eps)
    # Gradients reach the pseudo-inputs through the encoder.
    z.sum().backward()
    assert m.prior.pseudo_inputs.grad is not None and m.prior.pseudo_inputs.grad.abs().sum() > 0
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    m.prior.init_from(images)
    torch.testing.assert_close(torch.tanh(m.prior.pseudo_inputs[4]), images[1].clamp(-0.99, 0.99), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        VampPrior(0, 32, 1)


def test_normal_prior_latents_are_the_noise():
    m = EHMModels(image_size=32, channels=1, z_dim=5, width=4)
    eps, k = m.draw_prior_noise(4, torch.device("cpu"))
    assert k is None and m.prior_latents(eps) is eps


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_image_layers_as_matmul_are_the_convolutions(device):
    from ehm_fast.nn.image import image_conv, image_conv_transpose

    g = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 3, 16, 16, generator=g).to(**f64).requires_grad_()
    w = torch.randn(8, 3, 4, 4, generator=g).to(**f64).requires_grad_()
    b = torch.randn(8, generator=g).to(**f64).requires_grad_()
    torch.testing.assert_close(image_conv(x, w, b), F.conv2d(x, w, b, stride=2, padding=1))
    torch.testing.assert_close(image_conv(x, w), F.conv2d(x, w, stride=2, padding=1))
    h = torch.randn(2, 8, 8, 8, generator=g).to(**f64).requires_grad_()
    wt = torch.randn(8, 3, 4, 4, generator=g).to(**f64).requires_grad_()
    bt = torch.randn(3, generator=g).to(**f64).requires_grad_()
    torch.testing.assert_close(image_conv_transpose(h, wt, bt), F.conv_transpose2d(h, wt, bt, stride=2, padding=1))
    # second derivatives too: the gradient penalty differentiates the critic's input gradient
    assert torch.autograd.gradgradcheck(image_conv, (x, w, b))
    assert torch.autograd.gradgradcheck(image_conv_transpose, (h, wt, bt))


@pytest.mark.parametrize("device", DEVICES)
def test_image_layers_as_matmul_keep_the_memory_format_and_the_autocast_dtype(device):
    from ehm_fast.nn.image import image_conv, image_conv_transpose

    x = torch.randn(4, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 3, 4, 4, device=device) * 0.1
    out = image_conv(x, w)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert image_conv(x.contiguous(), w).is_contiguous()
    with torch.autocast(device, dtype=torch.bfloat16):
        fast, ref = image_conv(x, w), F.conv2d(x, w, stride=2, padding=1)
        h = torch.randn(4, 16, 8, 8, device=device).contiguous(memory_format=torch.channels_last)
        up, up_ref = image_conv_transpose(h, w, None), F.conv_transpose2d(h, w, stride=2, padding=1)
    assert fast.dtype == ref.dtype == torch.bfloat16 and up.dtype == up_ref.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(up.float(), up_ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("share_weights", [False, True])
def test_ehm_step_with_matmul_image_layers_equals_cudnn(share_weights, monkeypatch):
    """The wiring: every image layer of the three networks (tied or not) takes the matmul path, and
    the training step's losses match cuDNN's to float32 rounding (the sums are exact in float64 above)."""
    from ehm_fast.nn import layers as models_module
    from ehm_fast.config import EHMConfig
    from ehm_fast.ehm import EHM

    calls = {"image_conv": 0, "image_conv_transpose": 0}
    for name in calls:
        original = getattr(models_module, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(models_module, name, counted)
    losses = {}
    for kind in ("cudnn", "matmul"):
        torch.manual_seed(0)
        models = EHMModels(image_size=32, channels=3, z_dim=8, width=8, share_weights=share_weights)
        step = EHM(models, EHMConfig(lipschitz="gp", backend="torch", image_layers=kind))
        x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
        torch.manual_seed(2)
        losses[kind] = [{k: float(v) for k, v in step.step(x).items()} for _ in range(3)]
        if kind == "cudnn":
            assert calls == {"image_conv": 0, "image_conv_transpose": 0}
    # one iteration: critic f(real), f(fake), f(interpolates); encoder on x and on generated x_s;
    # decoder for the wake reconstruction and the sleep samples
    assert calls["image_conv"] >= 3 * 5 and calls["image_conv_transpose"] >= 3 * 2, calls
    for it, (a, b) in enumerate(zip(losses["cudnn"], losses["matmul"])):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (it, key)


def test_unknown_image_layers_are_refused():
    with pytest.raises(ValueError, match="image layers must be one of"):
        EHMModels(image_size=32, channels=3, z_dim=4, width=4).configure_layers(image_layers="winograd")
