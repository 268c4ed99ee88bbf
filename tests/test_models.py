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
