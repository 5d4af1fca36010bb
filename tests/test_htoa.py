"""HtoA (PROTOCOL.md §4): what a PreHash h1 fixes, and the data order it implies."""

import hashlib
import math
from dataclasses import replace

import numpy as np
import pytest

from consensus.encoding import Hash, tagged_hash
from consensus.models import (
    Arch,
    ModelBlob,
    check_arch_in_space,
    compute_param_count,
    compute_param_shapes,
)
from consensus.params import DEV
from consensus.tasks import FAMILY_CNN, ArchSpace, validate_task
from mining.drbg import Drbg
from mining.htoa import (
    DataOrder,
    Hpp,
    compute_htoa,
    draw_arch,
    draw_data_seed,
    draw_hpp,
    draw_init,
)
from mining.trainer import to_bytes
from mining.watermark import compute_watermark_size

TASK = DEV.genesis_task
CNN_TASK = replace(TASK, k=10, arch=ArchSpace(FAMILY_CNN, depth_min=1, depth_max=3, width_min=4,
                                        width_max=8))
H1 = Hash(bytes(range(32)))
PROPERTY_HASHES = [tagged_hash("htoa-property", i) for i in range(300)]


def h(i: int) -> Hash:
    return tagged_hash("htoa-test", i)


def split(arch: Arch, flat: np.ndarray) -> list[np.ndarray]:
    """The flat parameters cut into their tensors, in declared order."""
    out, offset = [], 0
    for shape in compute_param_shapes(arch):
        n = math.prod(shape)
        out.append(flat[offset:offset + n].reshape(shape))
        offset += n
    assert offset == len(flat)
    return out


def test_cnn_task_is_valid():
    validate_task(CNN_TASK)  # the CNN space the tests below draw from is a legal task


# ---- determinism and frozen vectors ------------------------------------------------

@pytest.mark.parametrize("task", [TASK, CNN_TASK], ids=["mlp", "cnn"])
def test_same_h1_same_draw(task):
    a, b = compute_htoa(task, H1), compute_htoa(task, H1)
    assert a.arch == b.arch and a.hpp == b.hpp and a.data_seed == b.data_seed
    assert a.init.dtype == np.float32 and np.array_equal(a.init, b.init)
    assert (a.signature.data, a.signature.size) == (b.signature.data, b.signature.size)


def test_different_h1_different_draw():
    draws = [compute_htoa(TASK, h(i)) for i in range(8)]
    assert len({d.data_seed for d in draws}) == 8
    assert len({to_bytes(d.init) for d in draws}) == 8
    assert len({d.hpp for d in draws}) == 8
    assert len({d.arch for d in draws}) > 1


def test_frozen_vectors():
    """Any change to the derivation (labels, draw order, rounding) changes these."""
    arch = draw_arch(TASK, H1)
    assert arch == Arch(family=0, channels=1, height=8, width=8, classes=10, widths=(37, 59))
    assert draw_hpp(TASK, H1) == Hpp(lr_ppm=151016, momentum_ppm=903726, batch=32)
    init = draw_init(arch, H1)
    assert len(init) == 5247
    assert hashlib.sha256(to_bytes(init)).hexdigest() == (
        "213e6af2a1bea8de976139c72dbe1f4e66d4c0db11177ee12c7ade16e3fcc9f6")
    assert draw_data_seed(H1).hex() == (
        "6890a437d936da5d4f3bcb2339bbf2491e63d9dfb817155b3338f58f1801be78")
    draw = compute_htoa(TASK, H1)
    assert draw.h1 == H1
    assert draw.signature.data == H1 and draw.signature.size == 53  # ceil(1% of 5247)
    assert hashlib.sha256(to_bytes(draw.init)).hexdigest() == (
        "829f933a24636a4bc682140b0831dccd5cd19e3d155eccab545ab49f03904d49")


def _stream_word(label: str, h1: bytes, word: int) -> int:
    """Word `word` (8 bytes, big-endian) of the DRBG stream for `label`, by hand."""
    seed = tagged_hash(label, h1)
    block = hashlib.sha256(seed + (word // 4).to_bytes(8, "big")).digest()
    return int.from_bytes(block[8 * (word % 4):8 * (word % 4) + 8], "big")


def test_arch_and_data_seed_follow_the_written_derivation():
    """Depth then widths, one integer draw each, from SHA-256(H("arch", h1) ‖ counter)."""
    space = TASK.arch
    words = [_stream_word("arch", H1, i) for i in range(3)]
    assert all(w < (1 << 64) - (1 << 64) % 33 for w in words)  # no rejection here
    depth = space.depth_min + words[0] % (space.depth_max - space.depth_min + 1)
    widths = tuple(space.width_min + w % (space.width_max - space.width_min + 1)
                   for w in words[1:1 + depth])
    assert draw_arch(TASK, H1).widths == widths
    seed = tagged_hash("data", H1)
    assert draw_data_seed(H1) == hashlib.sha256(seed + bytes(8)).digest()


# ---- the spaces ---------------------------------------------------------------------

@pytest.mark.parametrize("task", [TASK, CNN_TASK], ids=["mlp", "cnn"])
def test_draws_stay_in_the_task_spaces(task):
    space, hpp_space = task.arch, task.hpp
    depths, widths, batches = set(), set(), set()
    for h1 in PROPERTY_HASHES:
        arch = draw_arch(task, h1)
        assert check_arch_in_space(arch, task)
        depths.add(len(arch.widths))
        widths.update(arch.widths)
        hpp = draw_hpp(task, h1)
        assert hpp_space.lr_min_ppm <= hpp.lr_ppm <= hpp_space.lr_max_ppm
        assert hpp_space.momentum_min_ppm <= hpp.momentum_ppm <= hpp_space.momentum_max_ppm
        assert hpp.batch in hpp_space.batch_sizes
        assert hpp.lr == hpp.lr_ppm / 1e6 and hpp.momentum == hpp.momentum_ppm / 1e6
        batches.add(hpp.batch)
    # Uniform draws over 300 hashes reach every depth, both ends of the width range and
    # every batch size: a draw biased away from an end (an off-by-one) would not.
    assert depths == set(range(space.depth_min, space.depth_max + 1))
    assert widths == set(range(space.width_min, space.width_max + 1))
    assert batches == set(hpp_space.batch_sizes)


# ---- initial weights ----------------------------------------------------------------

@pytest.mark.parametrize("task", [TASK, CNN_TASK], ids=["mlp", "cnn"])
@pytest.mark.parametrize("i", range(3))
def test_init_bounds_are_kaiming_uniform_per_tensor(task, i):
    arch = draw_arch(task, h(i))
    init = draw_init(arch, h(i))
    assert init.dtype == np.float32 and len(init) == compute_param_count(arch)
    tensors = split(arch, init)
    for t, shape in enumerate(compute_param_shapes(arch)):
        weight_shape = shape if len(shape) > 1 else compute_param_shapes(arch)[t - 1]
        bound = 1.0 / math.sqrt(math.prod(weight_shape[1:]))  # a bias uses its weight's
        x = np.abs(tensors[t])
        assert x.max() <= np.float32(bound)
        if x.size >= 200:  # and the whole range is used, so the bound is not narrower
            assert x.max() > 0.95 * bound
            assert abs(float(tensors[t].mean())) < 0.2 * bound


def test_init_is_the_init_stream_tensor_by_tensor():
    arch = Arch(FAMILY_CNN, 1, 8, 8, 10, (4, 6))
    rng = Drbg.for_label("init", H1)
    fans = [9, 9, 36, 36, 6 * 2 * 2, 6 * 2 * 2]  # conv 1·3·3, conv 4·3·3, linear 6·2·2
    expected = np.concatenate([
        rng.uniform_floats(math.prod(s), -1 / math.sqrt(f), 1 / math.sqrt(f))
        for s, f in zip(compute_param_shapes(arch), fans, strict=True)])
    assert np.array_equal(draw_init(arch, H1), expected)


def test_compute_htoa_stamps_the_watermark_on_the_drawn_init():
    draw = compute_htoa(TASK, H1)
    raw = draw_init(draw.arch, H1)
    idx, weights = draw.signature.draws(len(raw))
    assert draw.signature.size == compute_watermark_size(TASK.wm_ppm, len(raw))
    assert np.array_equal(draw.init[idx], weights)
    rest = np.ones(len(raw), bool)
    rest[idx] = False
    assert np.array_equal(draw.init[rest], raw[rest])
    assert draw.signature.verify_array(draw.init) and not draw.signature.verify_array(raw)


# ---- the reference path -------------------------------------------------------------

REFERENCE = compute_htoa(TASK, H1)  # a stamped model, as a previous block's would be


@pytest.mark.parametrize(
    "i,old_survives",
    [(0, False),  # h(0)'s positions overlap the old signature's: the old one breaks
     (2, True)],  # no overlap: the old watermark is left intact beside the new one
)
def test_reference_is_restamped_with_the_new_watermark(i, old_survives):
    h1 = tagged_hash("reference-test", i)
    blob = ModelBlob(REFERENCE.arch, to_bytes(REFERENCE.init))
    assert draw_arch(TASK, h1) != REFERENCE.arch  # so the arch below can only come from blob
    draw = compute_htoa(TASK, h1, blob)
    assert draw.arch == REFERENCE.arch
    assert np.array_equal(draw.init, draw.signature.sign_array(REFERENCE.init))
    assert draw.signature.data == h1
    assert draw.signature.size == compute_watermark_size(TASK.wm_ppm, len(REFERENCE.init))
    assert draw.hpp == draw_hpp(TASK, h1) and draw.data_seed == draw_data_seed(h1)
    assert draw.signature.verify_array(draw.init)
    n = len(draw.init)
    overlap = (set(draw.signature.draws(n)[0].tolist())
               & set(REFERENCE.signature.draws(n)[0].tolist()))
    assert bool(overlap) is not old_survives
    assert REFERENCE.signature.verify_array(draw.init) is old_survives


def test_reference_that_does_not_fit_its_arch_is_refused():
    blob = ModelBlob(REFERENCE.arch, to_bytes(REFERENCE.init[:-1]))
    with pytest.raises(ValueError, match="do not fit"):
        compute_htoa(TASK, h(0), blob)


# ---- data order ---------------------------------------------------------------------

N_TRAIN = TASK.dataset.train_size  # 1297: not a multiple of any batch size


def test_each_epoch_is_a_permutation_from_its_own_hash():
    order = DataOrder(b"r" * 32, N_TRAIN, 32)
    epochs = [order.epoch(e) for e in range(3)]
    for e, perm in enumerate(epochs):
        assert np.array_equal(np.sort(perm), np.arange(N_TRAIN))
        assert np.array_equal(perm, Drbg(tagged_hash("epoch", b"r" * 32, e)).shuffle(N_TRAIN))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(N_TRAIN))


@pytest.mark.parametrize("n,batch,start,steps", [
    (N_TRAIN, 32, 0, 3),
    (N_TRAIN, 32, 38, 5),  # step 40 holds rows 1280..1311: 17 of epoch 0, 15 of epoch 1
    (N_TRAIN, 64, 15, 30),  # crosses two epoch boundaries
    (5, 12, 0, 4),  # a batch longer than an epoch spans three epochs
    (5, 12, 3, 2),
])
def test_indices_slice_the_concatenated_epoch_stream(n, batch, start, steps):
    order = DataOrder(b"s" * 32, n, batch)
    last_epoch = (start + steps) * batch // n + 1
    stream = np.concatenate([DataOrder(b"s" * 32, n, batch).epoch(e)
                             for e in range(last_epoch + 1)])
    got = order.indices(start, steps)
    assert got.shape == (steps, batch)
    assert np.array_equal(got.reshape(-1), stream[start * batch:(start + steps) * batch])


def test_indices_do_not_depend_on_how_the_steps_are_asked_for():
    whole = DataOrder(b"w" * 32, N_TRAIN, 64).indices(0, 60)
    order = DataOrder(b"w" * 32, N_TRAIN, 64)
    parts = [order.indices(s, 6) for s in range(54, -1, -6)]  # backwards: cache evictions
    assert np.array_equal(np.concatenate(parts[::-1]), whole)


def test_same_seed_same_order_other_seed_other_order():
    a = DataOrder(b"a" * 32, N_TRAIN, 32).indices(0, 50)
    assert np.array_equal(a, DataOrder(b"a" * 32, N_TRAIN, 32).indices(0, 50))
    assert not np.array_equal(a, DataOrder(b"b" * 32, N_TRAIN, 32).indices(0, 50))


@pytest.mark.parametrize("n,batch", [(0, 32), (10, 0)])
def test_data_order_refuses_empty_sets_and_batches(n, batch):
    with pytest.raises(ValueError):
        DataOrder(b"x" * 32, n, batch)


@pytest.mark.parametrize("start", [
    1,  # start·batch = 3, inside epoch 0
    0,  # start·batch = 0, on an epoch boundary
])
def test_zero_steps_give_no_indices(start):
    assert DataOrder(b"z" * 32, 10, 3).indices(start, 0).shape == (0, 3)

