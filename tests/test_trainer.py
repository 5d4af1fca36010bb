"""The trainer (PROTOCOL.md §6) on the dev `digits` task: the model it builds, the update
it applies, and the bit-for-bit reproducibility a verifier's replay relies on."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from consensus.checkpoints import NORM_SCALE
from consensus.models import Arch, compute_param_shapes
from consensus.params import DEV
from consensus.tasks import FAMILY_CNN, FAMILY_MLP, ArchSpace
from mining.htoa import compute_htoa
from mining.trainer import (
    DataCache,
    Trainer,
    build_model,
    compute_update_norm,
    from_bytes,
    to_bytes,
)

TASK = DEV.genesis_task
K = TASK.k
H1 = bytes(range(32))  # draws a (37, 59) MLP, lr 0.151, momentum 0.904, batch 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def draw():
    return compute_htoa(TASK, H1)


def mlp_forward(arch: Arch, flat: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """The MLP of compute_param_shapes, written out with F.linear (not build_model)."""
    shapes = compute_param_shapes(arch)
    flat_t = torch.from_numpy(flat.copy())
    tensors, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        tensors.append(flat_t[offset:offset + n].view(shape))
        offset += n
    h = x.flatten(1)
    for layer in range(len(shapes) // 2):
        h = F.linear(h, tensors[2 * layer], tensors[2 * layer + 1])
        if layer < len(shapes) // 2 - 1:
            h = F.relu(h)
    return h


# ---- the model --------------------------------------------------------------------

DIGITS_ARCHS = [
    Arch(FAMILY_MLP, 1, 8, 8, 10, (40,)),
    Arch(FAMILY_MLP, 1, 8, 8, 10, (37, 59)),
    Arch(FAMILY_CNN, 1, 8, 8, 10, (4,)),
    Arch(FAMILY_CNN, 1, 8, 8, 10, (4, 6, 8)),  # 8 → 4 → 2 → 1 pixel
    Arch(FAMILY_CNN, 3, 9, 7, 5, (3, 2)),  # odd sizes: pooling floors
]


@pytest.mark.parametrize("arch", DIGITS_ARCHS, ids=str)
def test_build_model_declares_parameters_in_consensus_order(arch):
    model = build_model(arch)
    assert tuple(tuple(p.shape) for p in model.parameters()) == compute_param_shapes(arch)
    x = torch.zeros(5, arch.channels, arch.height, arch.width)
    assert model(x).shape == (5, arch.classes)


def test_cnn_forward_on_digits(data):
    model = build_model(Arch(FAMILY_CNN, 1, 8, 8, 10, (4, 6)))
    logits = model(data.val_x[:16])
    assert data.val_x.shape[1:] == (1, 8, 8)
    assert logits.shape == (16, 10) and torch.isfinite(logits).all()


def test_mlp_matches_a_hand_written_forward(data, draw):
    model = build_model(draw.arch)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(draw.init.copy()), model.parameters())
    with torch.no_grad():
        assert torch.equal(model(data.val_x), mlp_forward(draw.arch, draw.init, data.val_x))


# ---- the trainer ----------------------------------------------------------------------

CNN_TASK = replace(TASK, arch=ArchSpace(FAMILY_CNN, depth_min=2, depth_max=3, width_min=4,
                                        width_max=8))


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def any_draw(request, draw):
    return draw if request.param == "mlp" else compute_htoa(CNN_TASK, H1)


def test_trainer_starts_at_the_draw_with_zero_momentum(data, any_draw):
    draw = any_draw
    trainer = Trainer(draw, data)
    params, momentum = trainer.snapshot()
    assert np.array_equal(params, draw.init)
    assert momentum.dtype == np.float32 and not momentum.any()
    # the model's parameters are views of the flat buffer, in declared order
    assert tuple(tuple(p.shape) for p in trainer.model.parameters()) == (
        compute_param_shapes(draw.arch))
    flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    assert torch.equal(flat, trainer.flat)
    with torch.no_grad():
        trainer.flat[-1] = 42.0
    assert float(list(trainer.model.parameters())[-1].detach()[-1]) == 42.0


def test_cnn_trains_reproducibly_under_its_watermark(data):
    draw = compute_htoa(CNN_TASK, H1)
    assert draw.arch.family == FAMILY_CNN
    a, b = Trainer(draw, data), Trainer(draw, data)
    a.train(0, K)
    mid = a.snapshot()
    a.train(K, K)
    b.load(*mid)
    b.train(K, K)
    end = a.snapshot()
    assert to_bytes(end[0]) == to_bytes(b.snapshot()[0])
    assert draw.signature.verify_array(mid[0]) and draw.signature.verify(a.model)
    assert not np.allclose(end[0], draw.init, atol=1e-4)


def test_update_is_sgd_with_momentum_then_the_watermark(data, draw):
    """Steps 0..29 against the rule of PROTOCOL.md §6 written out per tensor on a
    separately built model (buf = m·buf + g; p = p − lr·buf; then Signature.sign).
    torch.optim.SGD applies the same rule, but its first step imports torch._dynamo (3 s).
    """
    steps = 30
    trainer = Trainer(draw, data)
    trainer.train(0, steps)
    params, momentum = trainer.snapshot()

    model = build_model(draw.arch)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(draw.init.copy()), model.parameters())
    bufs = [torch.zeros_like(p) for p in model.parameters()]
    for rows in trainer.order.indices(0, steps):
        rows = torch.from_numpy(rows)
        model.zero_grad()
        F.cross_entropy(model(data.train_x[rows]), data.train_y[rows]).backward()
        with torch.no_grad():
            for p, buf in zip(model.parameters(), bufs, strict=True):
                buf.mul_(draw.hpp.momentum).add_(p.grad)
                p.sub_(draw.hpp.lr * buf)
        draw.signature.sign(model)
    ref_params = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
    ref_momentum = torch.cat([buf.reshape(-1) for buf in bufs]).numpy()
    np.testing.assert_allclose(params, ref_params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(momentum, ref_momentum, rtol=1e-5, atol=1e-6)
    assert not np.allclose(params, draw.init, atol=1e-3)  # it did move


def test_first_step_momentum_is_the_gradient(data, draw):
    trainer = Trainer(draw, data)
    trainer.train(0, 1)
    params, momentum = trainer.snapshot()
    model = build_model(draw.arch)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(draw.init.copy()), model.parameters())
    rows = torch.from_numpy(trainer.order.indices(0, 1)[0])
    F.cross_entropy(model(data.train_x[rows]), data.train_y[rows]).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    np.testing.assert_allclose(momentum, grad, rtol=1e-6, atol=1e-8)
    stepped = draw.signature.sign_array(draw.init - np.float32(draw.hpp.lr) * grad)
    np.testing.assert_allclose(params, stepped, rtol=1e-6, atol=1e-7)


def test_two_trainers_are_bit_identical(data, draw):
    a, b = Trainer(draw, data), Trainer(draw, data)
    a.train(0, 2 * K)
    b.train(0, K)
    b.train(K, K)  # the same steps asked for in two calls
    for x, y in zip(a.snapshot(), b.snapshot(), strict=True):
        assert to_bytes(x) == to_bytes(y)


@pytest.fixture(scope="module")
def run(data, draw):
    """Checkpoints 0..4 of one honest run, each (params, momentum)."""
    trainer = Trainer(draw, data)
    checkpoints = [trainer.snapshot()]
    for i in range(4):
        trainer.train(i * K, K)
        checkpoints.append(trainer.snapshot())
    return checkpoints


@pytest.mark.parametrize("i", range(4))
def test_replaying_one_interval_reproduces_the_next_checkpoint(data, draw, run, i):
    """What a verifier's audit does: a fresh trainer loaded with checkpoint i."""
    trainer = Trainer(draw, data)
    params, momentum = run[i]
    trainer.load(from_bytes(to_bytes(params)), from_bytes(to_bytes(momentum)))
    trainer.train(i * K, K)
    replayed = trainer.snapshot()
    assert to_bytes(replayed[0]) == to_bytes(run[i + 1][0])
    assert to_bytes(replayed[1]) == to_bytes(run[i + 1][1])


def test_replaying_with_the_wrong_step_offset_diverges(data, draw, run):
    trainer = Trainer(draw, data)
    trainer.load(*run[1])
    trainer.train(0, K)  # interval 1 replayed with interval 0's batches
    assert not np.allclose(trainer.snapshot()[0], run[2][0], atol=1e-4)


def test_watermark_holds_at_every_checkpoint(data, draw, run):
    for params, _ in run:
        assert draw.signature.verify_array(params)
    trainer = Trainer(draw, data)
    trainer.load(*run[-1])
    assert draw.signature.verify(trainer.model)


def test_accuracy_rises_on_digits(data, draw):
    trainer = Trainer(draw, data)
    before = trainer.count_correct()
    trainer.train(0, 200)
    after = trainer.count_correct()
    assert before < 60  # about chance: 25 of 250
    assert after >= 180 and after > before + 120
    with torch.no_grad():  # and count_correct is the argmax count, recomputed by hand
        logits = mlp_forward(draw.arch, trainer.snapshot()[0], data.val_x)
    assert after == int((logits.argmax(dim=1) == data.val_y).sum())


def test_capture_copies_out_the_current_state(data, draw):
    trainer = Trainer(draw, data)
    trainer.train(0, K)
    expected = trainer.snapshot()
    n_correct = trainer.count_correct()
    snap = trainer.capture(evaluate=True)
    trainer.train(K, K)  # training on must not change what was captured
    params, momentum, correct = snap.wait()
    assert np.array_equal(params, expected[0]) and np.array_equal(momentum, expected[1])
    assert correct == n_correct
    assert trainer.capture(evaluate=False).wait()[2] is None


@pytest.mark.parametrize("cut", [
    pytest.param(1, id="longer"),
    pytest.param(-1, id="shorter"),
])
def test_trainer_refuses_an_init_that_does_not_fit(data, draw, cut):
    init = np.concatenate([draw.init, np.zeros(1, np.float32)]) if cut > 0 else draw.init[:-1]
    with pytest.raises(ValueError, match="do not fit"):
        Trainer(replace(draw, init=init), data)


# ---- helpers ---------------------------------------------------------------------------

@pytest.mark.parametrize("before,after,norm", [
    ([0, 0], [3, 4], 5 * NORM_SCALE),
    ([1, 2, 3], [1.5, 2, 1], 2_061_553),  # sqrt(4.25) = 2.0615528128..., rounded
    ([1, 2, 3], [1, 2, 3], 0),
    ([0.25] * 64, [0.0] * 64, 2 * NORM_SCALE),  # sqrt(64 · 1/16)
    ([0.0], [1e-7], 0),  # 0.1192 rounds down (float32(1e-7) ≈ 1.00000001e-7)
    ([0.0], [2**-20], 1),  # 0.9537 rounds up
])
def test_compute_update_norm_fixed_point(before, after, norm):
    b, a = np.array(before, np.float32), np.array(after, np.float32)
    assert compute_update_norm(b, a) == norm
    assert compute_update_norm(a, b) == norm


def test_update_norm_is_taken_in_float64():
    # 10^6 differences of float32(0.1) = 0.100000001490116...: in float64 the norm is
    # 100.0000014901..., 100_000_001 in fixed point; summed or rooted in float32 it
    # would come out as 100.0, 100_000_000.
    before = np.zeros(10**6, np.float32)
    after = np.full(10**6, 0.1, np.float32)
    assert compute_update_norm(before, after) == 100_000_001


def test_tensor_bytes_are_float32_little_endian():
    assert to_bytes(np.array([1.0, -2.0], np.float32)) == bytes.fromhex("0000803f000000c0")
    assert to_bytes(np.array([1.0], ">f4")) == bytes.fromhex("0000803f")  # byte-swapped
    back = from_bytes(bytes.fromhex("0000803f000000c0"))
    assert back.dtype == np.float32 and back.tolist() == [1.0, -2.0]
    back[0] = 3.0  # a writable copy, loadable into a trainer without a warning
    assert back[0] == 3.0


def test_data_cache_loads_once_and_keeps_splits_resident():
    cache = DataCache()
    a = cache.resident(TASK.dataset, "cpu")
    assert cache.resident(TASK.dataset, torch.device("cpu")) is a
    assert a.train_x.shape == (TASK.dataset.train_size, 1, 8, 8)
    assert a.val_y.shape == (TASK.dataset.val_size,)
    assert a.train_x.dtype == torch.float32
    assert float(a.train_x.min()) == 0.0 and float(a.train_x.max()) == 1.0
