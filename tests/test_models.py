"""Encoder/head contract, parametrised over the ENCODERS registry (timm style): a new entry
is tested automatically. Small configurations on 32^2 inputs keep it fast on a CPU."""

from __future__ import annotations

import pytest
import torch

from ctssl_core.config import ConfigError
from ctssl_core.models import (ENCODERS, ClassifierHead, UNetDecoder, VQDecoderHead, build_dense_head,
                               build_encoder, dense_forward)
from ctssl_core.models.vqvae import VectorQuantizer, count_params

torch.set_num_threads(1)

# Small settings per registry key (new keys are built with their defaults).
SMALL = {
    "resnet18": {"width": 0.25},
    "resnet34": {"width": 0.25},
    "resnet50": {"width": 0.125},
    "paper": {"dims": (16, 32), "n_res": 2, "latent_dim": 8, "n_codes": 16},
}


def small(name: str, **kw):
    torch.manual_seed(0)
    return build_encoder(name, **{**SMALL.get(name, {}), **kw})


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_features_and_embed_shapes(name):
    enc = small(name).eval()
    x = torch.rand(2, 1, 32, 32)
    feats = enc.forward_features(x)
    assert len(feats) == len(enc.feature_channels) == len(enc.feature_strides) >= 2
    assert enc.feature_strides == sorted(enc.feature_strides)
    for f, c, s in zip(feats, enc.feature_channels, enc.feature_strides):
        assert f.shape == (2, c, 32 // s, 32 // s)
    z = enc.embed(x)
    assert z.shape == (2, enc.embed_dim) and z.dtype == torch.float32
    assert torch.isfinite(z).all()
    assert torch.allclose(z, feats[-1].mean(dim=(-2, -1)), atol=1e-6)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_dense_head_output_at_input_resolution_with_gradients(name):
    enc = small(name)
    head = build_dense_head(enc, out_ch=1)
    x = torch.rand(2, 1, 32, 32)
    pred, aux = dense_forward(head, enc.forward_features(x), x.shape[-2:])
    assert pred.shape == (2, 1, 32, 32)
    loss = pred.pow(2).mean() + (aux if aux is not None else 0.0)
    loss.backward()
    first = next(p for p in enc.parameters() if p.dim() == 4)
    assert first.grad is not None and first.grad.abs().sum() > 0
    if name == "paper":
        assert isinstance(head, VQDecoderHead) and aux is not None and aux.dim() == 0
        assert pred.abs().max() <= 1.0                          # Tanh output
    else:
        assert isinstance(head, UNetDecoder) and aux is None


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_channels_last_gives_same_output(name):
    enc = small(name).eval()
    x = torch.rand(2, 1, 32, 32)
    ref = enc.embed(x)
    enc_cl = enc.to(memory_format=torch.channels_last)
    out = enc_cl.embed(x.to(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-4)


def test_unet_decoder_handles_sides_not_multiple_of_stride():
    enc = small("tiny")
    head = build_dense_head(enc, out_ch=3)
    x = torch.rand(2, 1, 36, 44)
    pred, _ = dense_forward(head, enc.forward_features(x), x.shape[-2:])
    assert pred.shape == (2, 3, 36, 44)


def test_paper_in_chans_replicates_grey_and_rejects_other_channel_counts():
    enc = small("paper").eval()
    assert enc.in_chans == 3
    grey = torch.rand(1, 1, 32, 32)
    assert torch.allclose(enc.embed(grey), enc.embed(grey.expand(-1, 3, -1, -1)))
    with pytest.raises(ConfigError, match="in_chans"):
        enc.embed(torch.rand(1, 2, 32, 32))


def test_paper_default_size_matches_the_released_model():
    enc = build_encoder("paper")
    head = build_dense_head(enc, out_ch=3)
    assert enc.feature_channels == [256, 512, 64] and enc.embed_dim == 64
    assert count_params(enc) / 1e6 == pytest.approx(51.7, abs=0.1)
    assert (count_params(enc) + count_params(head)) / 1e6 == pytest.approx(101.35, abs=0.2)
    assert head.quantizer.codebook.shape == (512, 64) and head.quantizer.beta == 0.25


def test_resnet_sizes_and_width_multiplier():
    r18, r50 = build_encoder("resnet18"), build_encoder("resnet50")
    half = build_encoder("resnet18", width=0.5)
    assert count_params(r18) / 1e6 == pytest.approx(11.17, abs=0.02)    # torchvision minus fc, 1-ch stem
    assert count_params(r50) / 1e6 == pytest.approx(23.50, abs=0.02)
    assert r18.feature_strides == [2, 4, 8, 16, 32] and r18.embed_dim == 512 and r50.embed_dim == 2048
    assert half.feature_channels == [32, 32, 64, 128, 256]


def test_vector_quantizer_snaps_to_codewords_with_straight_through_grad():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_codes=8, dim=4, beta=0.25)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, loss = vq(z)
    codes = vq.codebook.detach()                                   # (K, D)
    flat = z_q.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    dist = torch.cdist(flat, codes)
    assert torch.allclose(dist.min(1).values, torch.zeros(18), atol=1e-5)   # every vector is a codeword
    z_q.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))              # straight-through estimator
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_classifier_head_shapes_and_errors():
    assert ClassifierHead(16, 4)(torch.rand(3, 16)).shape == (3, 4)
    assert ClassifierHead(16, 2, hidden=8)(torch.rand(3, 16)).shape == (3, 2)
    with pytest.raises(ConfigError, match="n_out"):
        ClassifierHead(16, 0)


def test_build_encoder_unknown_name_or_option():
    with pytest.raises(ConfigError, match="resnet18"):
        build_encoder("resnet19")
    with pytest.raises(ConfigError, match="widht"):
        build_encoder("tiny", widht=2)
    with pytest.raises(ConfigError, match="width"):
        build_encoder("resnet18", width=0)
    with pytest.raises(ConfigError, match="dims"):
        build_encoder("paper", dims=(8,))


def test_unet_decoder_rejects_mismatched_features():
    with pytest.raises(ConfigError, match="equally long"):
        UNetDecoder([8, 16], [2], 1)
    with pytest.raises(ConfigError, match="shallow->deep"):
        UNetDecoder([8, 16], [4, 2], 1)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_identity_rebuilds_the_same_architecture(name):
    from ctssl_core.checkpoint import encoder_identity

    enc = small(name)
    reg, kwargs = encoder_identity(enc)
    assert reg == name
    twin = build_encoder(reg, **kwargs)
    assert {k: v.shape for k, v in twin.state_dict().items()} == {k: v.shape for k, v in enc.state_dict().items()}
    twin.load_state_dict(enc.state_dict(), strict=True)


def test_vector_quantizer_picks_the_same_codes_under_bf16_autocast():
    torch.manual_seed(1)
    vq = VectorQuantizer(n_codes=512, dim=64)
    with torch.no_grad():
        vq.codebook.normal_()
    z = torch.randn(8, 64, 8, 8) + 3.0        # large norms: bf16 distances would mis-assign ~1% of vectors
    ref, ref_loss = vq(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, loss = vq(z)
    assert torch.equal(out, ref) and loss.dtype == torch.float32 and loss.item() == pytest.approx(ref_loss.item())
