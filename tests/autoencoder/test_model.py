"""The autoencoder's networks: shapes for f=4 and f=8, KL, losses."""

import pytest
import torch

from latentdiff.autoencoder.encoder import DiagonalGaussian
from latentdiff.autoencoder.losses import AutoencoderLoss
from latentdiff.autoencoder.model import Autoencoder, AutoencoderLossConfig, AutoencoderModelConfig
from latentdiff.decoder.losses import PatchDiscriminator
from latentdiff.decoder.network import Decoder, DecoderConfig


@pytest.mark.parametrize("channels,f", [((8, 16, 16), 4), ((8, 16, 16, 16), 8)])
def test_encoder_decoder_shapes(channels, f):
    cfg = AutoencoderModelConfig(channels=channels, latent_channels=3)
    model = Autoencoder(cfg)
    assert cfg.downsampling == f
    x = torch.randn(2, 3, 32, 32)
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, 3, 32 // f, 32 // f)
    x_hat, _ = model(x)
    assert x_hat.shape == x.shape


def test_upscaling_decoder_shape():
    dec = Decoder(DecoderConfig(channels=(8, 16, 16), latent_channels=4, upscale=2))
    assert dec(torch.randn(1, 4, 8, 8)).shape == (1, 3, 64, 64)


def test_kl_is_nonnegative_and_zero_at_the_prior():
    moments = torch.randn(4, 8, 5, 5) * 3
    assert (DiagonalGaussian(moments).kl() >= 0).all()
    assert torch.allclose(DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl(), torch.zeros(2))


def test_kl_matches_torch_distributions():
    moments = torch.randn(3, 4, 2, 2)
    q = DiagonalGaussian(moments)
    ref = (
        torch.distributions.kl_divergence(
            torch.distributions.Normal(q.mean, q.std), torch.distributions.Normal(0.0, 1.0)
        )
        .flatten(1)
        .sum(1)
    )
    assert torch.allclose(q.kl(), ref, atol=1e-5)


def test_losses_are_per_sample_and_gan_switches_on():
    cfg = AutoencoderLossConfig(disc_weight=0.5, disc_start=2, disc_channels=8, disc_layers=2)
    loss = AutoencoderLoss(cfg)
    model = Autoencoder(AutoencoderModelConfig(channels=(8, 16, 16)))
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    x_hat, post = model(x)
    early = loss(x, x_hat, post, step=0, last_layer=model.decoder.last_layer)
    assert early["loss"].shape == (3,) and "gan" not in early
    late = loss(x, x_hat, post, step=2, last_layer=model.decoder.last_layer)
    assert "gan" in late and late["loss"].shape == (3,)
    assert loss.discriminator_loss(x, x_hat).shape == (3,)
    assert PatchDiscriminator(3, 8, 2)(x).ndim == 4


def test_missing_lpips_weights_message(tmp_path, monkeypatch):
    from latentdiff.decoder import perceptual

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="vgg16-397923af.pth.*perceptual"):
        perceptual.load_lpips()
