"""The FreezeNet watermark (PROTOCOL.md §5) on a small MLP and a small CNN."""

import numpy as np
import pytest
import torch
from torch import nn

from mining.drbg import Drbg
from mining.watermark import Signature, compute_watermark_size


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)
    )


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("make", [mlp, cnn])
def test_sign_flips_verification_between_signatures(make):
    model = make()
    # Over half the parameters, so the two index sets must overlap (pigeonhole): at 1%
    # they are usually disjoint, and re-signing with b would leave a's positions intact.
    size = n_params(model) // 2 + 1
    a, b = Signature(b"a" * 32, size), Signature(b"b" * 32, size)
    assert not a.verify(model) and not b.verify(model)
    a.sign(model)
    assert a.verify(model) and not b.verify(model)
    b.sign(model)
    assert b.verify(model) and not a.verify(model)


def test_sign_writes_the_drawn_weights_in_declared_order():
    model = cnn()
    sig = Signature(b"x", 50)
    before = flat(model)
    sig.sign(model)
    after = flat(model)
    rng = Drbg.for_label("wm", b"x")
    idx = rng.sample_without_replacement(n_params(model), 50)  # indices first,
    w = rng.uniform_floats(50, -1, 1)  # then weights
    assert np.array_equal(after[idx].numpy(), w)
    untouched = torch.ones(len(after), dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(after[untouched], before[untouched])


@pytest.mark.parametrize("delta", [1e-5, -1e-5])
def test_a_nudged_parameter_fails(delta):
    model = mlp()
    sig = Signature(b"n", 30)
    sig.sign(model)
    idx, _ = sig.draws(n_params(model))
    offset = 0
    for p in model.parameters():  # find the parameter holding the first watermarked index
        if idx[0] < offset + p.numel():
            with torch.no_grad():
                p.view(-1)[int(idx[0]) - offset] += delta
            break
        offset += p.numel()
    assert not sig.verify(model)


def test_training_with_sign_after_each_step_still_verifies():
    model = mlp()
    sig = Signature(b"t", compute_watermark_size(20_000, n_params(model)))
    sig.sign(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(1)
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert not sig.verify(model)  # the step moved watermarked weights ...
        sig.sign(model)
        assert sig.verify(model)  # ... and sign puts them back


def test_channels_last_parameters():
    model = cnn().to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    reference = cnn()
    sig = Signature(b"c", n_params(model) // 2)
    sig.sign(model)
    sig.sign(reference)
    assert sig.verify(model)
    assert torch.equal(flat(model), flat(reference))


def test_unsigned_model_fails_and_size_zero_verifies_anything():
    model = mlp()
    assert not Signature(b"u", 10).verify(model)
    empty = Signature(b"u", 0)  # constrains no parameter, so no model can fail it
    assert empty.verify(model)
    empty.sign(model)
    assert empty.verify(model)


def test_size_larger_than_model_raises():
    model = mlp()
    n = n_params(model)
    Signature(b"s", n).sign(model)  # the whole model is allowed
    with pytest.raises(ValueError, match="does not fit"):
        Signature(b"s", n + 1).sign(model)
    with pytest.raises(ValueError):
        Signature(b"s", -1)


@pytest.mark.parametrize(
    "ppm,n,size",
    [(0, 10**6, 0), (1, 1, 1), (10_000, 269_322, 2694), (10**6, 7, 7), (3, 10**6, 3)],
)
def test_compute_watermark_size(ppm, n, size):
    assert compute_watermark_size(ppm, n) == size


def test_disjoint_signatures_coexist():
    model = mlp()
    a, b = Signature(b"a", 1), Signature(b"b", 1)
    assert a.draws(n_params(model))[0][0] != b.draws(n_params(model))[0][0]
    a.sign(model)
    b.sign(model)
    assert a.verify(model) and b.verify(model)  # sign writes nothing outside its indices


# ---- the flat and numpy forms the trainer and the verifier use ------------------------

def flat_views(model: nn.Module) -> torch.Tensor:
    """Make every parameter of `model` a view of one flat buffer (as the Trainer does)."""
    flat_buf = flat(model).clone()
    offset = 0
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            view = flat_buf[offset:offset + p.numel()].view(p.shape)
            setattr(module, name, nn.Parameter(view))
            offset += p.numel()
    assert offset == len(flat_buf)
    return flat_buf


@pytest.mark.parametrize("make", [mlp, cnn])
def test_flat_stamp_equals_sign_on_the_model_it_backs(make):
    model, reference = make(), make()
    buf = flat_views(model)
    size = n_params(model) // 3  # spans every tensor
    sig = Signature(b"f" * 32, size)
    idx, _ = sig.draws(n_params(model))
    bounds = np.cumsum([p.numel() for p in model.parameters()])
    assert len(set(np.searchsorted(bounds, idx, side="right").tolist())) == len(bounds)
    with torch.no_grad():
        buf.put_(*sig.flat_stamp(buf))
    sig.sign(reference)
    assert torch.equal(buf, flat(reference))
    assert torch.equal(flat(model), buf)  # the model sees the stamp through its views
    assert sig.verify(model)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_sign_array_and_verify_array_agree_with_the_module_forms(make):
    model = make()
    sig = Signature(b"g" * 32, 40)
    raw = flat(model).numpy().copy()
    assert sig.verify_array(raw) is sig.verify(model) is False
    stamped = sig.sign_array(raw)
    assert np.array_equal(raw, flat(model).numpy())  # a copy: the input is untouched
    sig.sign(model)
    assert np.array_equal(stamped, flat(model).numpy())
    assert stamped.dtype == np.float32
    assert sig.verify_array(stamped) is sig.verify(model) is True


@pytest.mark.parametrize("delta,passes", [(5e-7, True), (-5e-7, True), (3e-6, False),
                                          (-3e-6, False)])
def test_verify_array_tolerance_is_absolute(delta, passes):
    sig = Signature(b"h" * 32, 20)
    stamped = sig.sign_array(np.zeros(500, np.float32))
    idx, weights = sig.draws(500)
    nudged = stamped.copy()
    nudged[idx[7]] = np.float32(float(weights[7]) + delta)
    assert sig.verify_array(nudged) is passes


def test_draws_depend_on_the_parameter_count():
    sig = Signature(b"d" * 32, 10)
    a, b = sig.draws(1000), sig.draws(1001)
    assert not np.array_equal(a[0], b[0])
    assert sig.draws(1000) is a  # cached per count
    assert len(set(a[0].tolist())) == 10 and a[0].min() >= 0 and a[0].max() < 1000
    assert ((a[1] >= -1) & (a[1] < 1)).all() and a[1].dtype == np.float32


def test_flat_stamp_refuses_a_buffer_too_small():
    with pytest.raises(ValueError, match="does not fit"):
        Signature(b"s", 11).flat_stamp(torch.zeros(10))


def test_flat_stamp_of_size_zero_is_none():
    assert Signature(b"s", 0).flat_stamp(torch.zeros(10)) is None
