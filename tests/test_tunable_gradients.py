"""Fine-tuning's gradients are the same bits on every run: a tunable layer's codebook
lookup must not use PyTorch's CPU index backward, which adds with atomics once the index
is large (the demo model's fine-tuned checkpoints differed run to run in 19 tensors)."""

import hashlib

import pytest
import torch

from pvq.methods import get_method
from pvq.methods.base import lookup


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(16,), (40, 3), (7, 2, 2)])
def test_lookup_is_indexing(shape):
    g = torch.Generator().manual_seed(len(shape))
    table = torch.randn(shape, generator=g, requires_grad=True)
    index = torch.randint(0, shape[0], (33, 5), generator=g)
    upstream = torch.randn(33, 5, *shape[1:], generator=g)
    out = lookup(table, index)
    assert torch.equal(out, table[index])
    (grad,) = torch.autograd.grad((out * upstream).sum(), table)
    (expected,) = torch.autograd.grad((table[index] * upstream).sum(), table)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


def _digest(tensors) -> str:
    return hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in tensors)).hexdigest()


def test_lookup_gradient_is_the_same_bits_every_time(two_threads):
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 16, (1536, 72), generator=g)  # > 32768 entries: where atomics start
    upstream = torch.randn(1536, 72, generator=g)
    seen = set()
    for _ in range(12):
        table = torch.linspace(-1, 1, 16).requires_grad_()
        (lookup(table, index) * upstream).sum().backward()
        seen.add(_digest([table.grad]))
    assert len(seen) == 1


@pytest.mark.parametrize("method,fields", [
    ("pvq", {"group_size": 8, "shape_bits": 2.0, "gain": "empirical"}),
    ("gptvq", {"dim": 2, "bits": 2.0, "group_size": 256, "group_columns": 32}),
])
def test_tunable_weight_gradients_are_the_same_bits_every_time(two_threads, method, fields):
    torch.manual_seed(0)
    W, X = torch.randn(256, 1024), torch.randn(2048, 1024)  # 32768 pvq groups
    m = get_method(method)
    config = m.make_config(fields)
    qt = m.quantize(W, X.T @ X, config)
    upstream = torch.randn(qt.shape)
    seen = set()
    for _ in range(8):
        tw = m.tunable(qt)
        (tw() * upstream).sum().backward()
        seen.add(_digest(p.grad for p in tw.parameters()))
    assert len(seen) == 1


def test_finetuning_a_model_wide_enough_for_parallel_index_kernels_repeats_its_bytes(two_threads, tmp_path):
    """The float32 state (trained values and Adam's moments) compared, not only the stored
    float16 payload, where a last-bit difference seldom survives the rounding."""
    import copy

    from pvq.calibrate.finetune import STATE_DIR, finetune
    from pvq.models import tiny_llama
    from pvq.oneshot import Recipe, oneshot

    model = tiny_llama(seed=0, hidden=256, intermediate=1024, layers=1, init_std=0.08)
    reference = copy.deepcopy(model)
    windows = torch.randint(2, 250, (5, 32), generator=torch.Generator().manual_seed(0))
    fields = {"group_size": 8, "shape_bits": 2.0, "gain": "empirical"}  # 32768 groups in each MLP layer
    oneshot(model, None, Recipe(method="pvq", config=fields, calib_windows=5, calib_seqlen=32, finetune=None),
            windows=windows, progress=False)
    settings = {"steps": 2, "eval_every": 2, "val_windows": 1, "batch": 2}
    states = []
    for run in range(3):
        finetune(copy.deepcopy(model), reference, windows, settings, work_dir=tmp_path / str(run), progress=False)
        states.append((tmp_path / str(run) / STATE_DIR / "state.safetensors").read_bytes())
    assert states[0] == states[1] == states[2]
