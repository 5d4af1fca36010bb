"""Task files as `dpodl task submit` reads them: defaults from the dataset's genesis
task, every field overridable, every mistake named."""

import pytest

from consensus.params import DEV, TESTNET
from consensus.tasks import FAMILY_CNN, compute_task_id
from node.taskfile import TaskFileError, load_task_file

PUBLISHER = bytes(range(20))


def load(tmp_path, text: str):
    path = tmp_path / "task.toml"
    path.write_text(text)
    return load_task_file(path, PUBLISHER)


def test_a_short_file_takes_the_datasets_genesis_task(tmp_path):
    task = load(tmp_path, 'dataset = "mnist"\nbounty = 1000\n')
    assert task.dataset == TESTNET.genesis_task.dataset
    assert (task.publisher, task.bounty) == (PUBLISHER, 1000)
    assert task.k == TESTNET.genesis_task.k and task.arch == TESTNET.genesis_task.arch
    assert compute_task_id(task) != compute_task_id(TESTNET.genesis_task)


def test_every_field_can_be_set(tmp_path):
    task = load(tmp_path, """
dataset = "digits"
family = "cnn"
depth = [1, 2]
width = [8, 16]
lr_ppm = [20000, 50000]
momentum_ppm = [800000, 900000]
batch_sizes = [32]
t_acc = 200
t_min = 150
wm_ppm = 30000
k = 10
s_min = 20
s_max = 200
l_ref = 5
delta_ppm = 2000
eps_correct = 3
duration = 7
bounty = 9
""")
    assert task.dataset == DEV.genesis_task.dataset and task.arch.family == FAMILY_CNN
    assert (task.arch.depth_min, task.arch.depth_max, task.arch.width_min,
            task.arch.width_max) == (1, 2, 8, 16)
    assert (task.hpp.lr_min_ppm, task.hpp.momentum_max_ppm, task.hpp.batch_sizes) == (
        20000, 900000, (32,))
    assert (task.t_acc, task.t_min, task.wm_ppm, task.k, task.s_min, task.s_max, task.l_ref,
            task.delta_ppm, task.eps_correct, task.duration, task.bounty) == (
        200, 150, 30000, 10, 20, 200, 5, 2000, 3, 7, 9)


@pytest.mark.parametrize(("text", "message"), [
    ("bounty = 1\n", "dataset must be one of digits, mnist"),
    ('dataset = "cifar"\n', "dataset must be one of"),
    ('dataset = ["mnist"]\n', "dataset must be one of"),
    ('dataset = "digits"\nfamily = ["mlp"]\n', "family must be mlp or cnn"),
    ('dataset = "digits"\nbountty = 1\n', "unknown field(s) bountty"),
    ('dataset = "digits"\nfamily = "rnn"\n', "family must be mlp or cnn"),
    ('dataset = "digits"\ndepth = 2\n', "depth must be [min, max]"),
    ('dataset = "digits"\nk = -1\n', "k must be an integer from 0"),
    ('dataset = "digits"\nk = 4294967296\n', "k must be an integer from 0 to 4294967295"),
    ('dataset = "digits"\nbatch_sizes = []\n', "batch_sizes must be a list"),
    ('dataset = "digits"\nk = 30\n', "bad-task-params"),  # k must divide s_max
    ('dataset = "digits"\nfamily = "cnn"\nk = 20\n', "at most 10"),
    ('dataset = "digits"\nbounty = "lots"\n', "bounty must be an integer"),
    ("dataset = \n", "not TOML"),
])
def test_mistakes_are_named(tmp_path, text, message):
    with pytest.raises(TaskFileError, match=None) as exc:
        load(tmp_path, text)
    assert message in str(exc.value) and "task.toml" in str(exc.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(TaskFileError, match="nothere.toml"):
        load_task_file(tmp_path / "nothere.toml", PUBLISHER)
