"""All transforms in one pass (``aliasscope._lie_pass``): the primal once, the K tangents together,
equal (float64, 1e-12) to one jvp per transform; fallbacks where vmap cannot batch or memory is short."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import random_images, rel_err, smooth_cnn
from torch import nn

import aliasscope._lie_pass as lie_pass
from aliasscope._forward_mode import jvp
from aliasscope.generators import apply_generator
from aliasscope.lie import equivariance_metrics, lie_derivative
from aliasscope.transforms import TRANSFORMS

ALL = list(TRANSFORMS)


def _family(name: str) -> nn.Module:
    torch.manual_seed(0)
    small = {
        "resnet18": {},
        "convnext_atto": {},
        "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8, "depth": 2},
        "mobilenetv3_small_050": {},  # hard-swish, squeeze-excite, in-place activations
    }[name]
    return timm.create_model(name, num_classes=7, **small).double().eval()


def _one_by_one(model: nn.Module, x: torch.Tensor, names: list[str], **kw) -> torch.Tensor:
    return torch.stack([lie_derivative(model, x, n, **kw) for n in names])


@pytest.mark.parametrize(
    "name", ["resnet18", "convnext_atto", "vit_tiny_patch16_224", "mobilenetv3_small_050"]
)
def test_one_pass_equals_one_jvp_per_transform(name: str) -> None:
    model, x = _family(name), random_images(2, 3, 32, 32)
    together = lie_derivative(model, x, transforms=ALL, output="softmax")
    assert together.shape == (len(ALL), 2, 7)
    assert rel_err(together, _one_by_one(model, x, ALL, output="softmax")) < 1e-12


def test_one_pass_on_image_like_outputs_subtracts_each_transforms_own_generator() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 2, 3, stride=2)).double()
    x = random_images(2, 3, 12, 14)
    together = lie_derivative(net, x, transforms=ALL, generator="fourier")
    assert rel_err(together, _one_by_one(net, x, ALL, generator="fourier")) < 1e-12


def test_one_pass_computes_the_primal_once() -> None:
    """One jvp call for K transforms (vmapped), not K."""
    calls = []

    def counting(fn, x, t):
        calls.append(t.shape)
        return jvp(fn, x, t)

    net, x = smooth_cnn(), random_images(3)
    tangents = torch.stack([apply_generator(x, n) for n in ALL])
    original = lie_pass.jvp
    lie_pass.jvp = counting
    try:
        y, dy = lie_pass.jvp_many(net, x, tangents)
    finally:
        lie_pass.jvp = original
    assert len(calls) == 1
    torch.testing.assert_close(y, net(x), rtol=0, atol=0)
    assert dy.shape == (len(ALL), 3, 5)


class _NoBatchingRule(torch.autograd.Function):
    """``x * 2`` with a forward-mode rule but no vmap rule: vmap refuses it, a plain jvp does not."""

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def jvp(ctx, dx):
        return dx * 2


def test_ops_vmap_cannot_batch_fall_back_to_one_jvp_per_transform() -> None:
    net = smooth_cnn()

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(_NoBatchingRule.apply(x))

    model, x = Wrapped(), random_images(2)
    with pytest.raises(RuntimeError):  # the premise: vmap alone refuses the op
        torch.func.vmap(lambda t: jvp(model, x, t))(torch.stack([x, x]))
    names = ["translate_x", "rotate", "brightness"]
    together = lie_derivative(model, x, transforms=names)
    assert rel_err(together, _one_by_one(model, x, names)) < 1e-12


def test_metrics_equal_the_per_transform_loop_across_batches() -> None:
    net, x = smooth_cnn(), random_images(5, 3, 16, 16)
    m = equivariance_metrics(net, x, ALL, batch_size=2, progress=False)
    expected = _one_by_one(net, x, ALL, output="softmax").abs().mean(2).T
    assert rel_err(m.values, expected) < 1e-12


def test_out_of_memory_splits_the_transforms_then_the_batch(monkeypatch) -> None:
    """A pass over more than 2 transforms or more than 1 image 'runs out of memory': the metrics are
    still complete and equal to the unsplit ones."""
    net, x = smooth_cnn(), random_images(3, 3, 16, 16)
    expected = equivariance_metrics(net, x, ALL, progress=False).values
    real = lie_pass.MetricPass.__call__
    seen = []

    def short_of_memory(self, chunk):
        seen.append((len(self.transforms), chunk.shape[0]))
        if len(self.transforms) > 2 or chunk.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, chunk)

    monkeypatch.setattr(lie_pass.MetricPass, "__call__", short_of_memory)
    m = equivariance_metrics(net, x, ALL, batch_size=3, progress=False)
    assert rel_err(m.values, expected) < 1e-12
    groups = [g for g, _ in seen]
    assert seen[0] == (len(ALL), 3) and groups[:5] == [10, 5, 3, 2, 1] and seen[-1] == (1, 1)


def test_non_finite_outputs_are_named_after_the_whole_loop() -> None:
    from aliasscope._checks import NonFiniteOutputError

    net, x = smooth_cnn(), random_images(4, 3, 16, 16)

    class Blows(nn.Module):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            y = net(z)
            return torch.where(z[:, :1, 0, 0] > 0.0, y, y / 0.0)

    bad = (x[:, 0, 0, 0] <= 0).nonzero().flatten().tolist()
    assert bad and len(bad) < 4  # the premise: some images blow up, some do not
    with pytest.raises(NonFiniteOutputError, match=str(bad[0])):
        equivariance_metrics(Blows(), x, ["rotate"], batch_size=2, progress=False)


def test_cuda_graph_true_where_it_cannot_apply_is_an_error() -> None:
    with pytest.raises(ValueError, match="cuda_graph=True cannot apply"):
        equivariance_metrics(smooth_cnn(), random_images(4), ["rotate"], cuda_graph=True, progress=False)


def test_lie_derivative_takes_one_transform_or_a_list() -> None:
    with pytest.raises(TypeError, match="not both"):
        lie_derivative(smooth_cnn(), random_images(), "rotate", transforms=["scale"])
    with pytest.raises(TypeError, match="not neither"):
        lie_derivative(smooth_cnn(), random_images())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_the_eager_metrics() -> None:
    model = _family("resnet18").float().cuda()
    x = torch.randn(12, 3, 32, 32, device="cuda")
    eager = equivariance_metrics(model, x, ALL, batch_size=4, cuda_graph=False, progress=False)
    graphed = equivariance_metrics(model, x, ALL, batch_size=4, cuda_graph=True, progress=False)
    torch.testing.assert_close(graphed.values, eager.values, rtol=1e-4, atol=1e-7)


def test_transforms_split_into_passes_of_a_few_rows_on_the_cpu(monkeypatch) -> None:
    """On the CPU about CPU_ROWS tangent rows go per pass (large passes outgrow the caches): the
    groups' results are joined in transform order."""
    monkeypatch.setattr(lie_pass, "CPU_ROWS", 4)
    assert lie_pass.transforms_per_pass(torch.device("cpu"), 2, len(ALL)) == 2
    assert lie_pass.transforms_per_pass(torch.device("cpu"), 9, len(ALL)) == 1
    assert lie_pass.transforms_per_pass(torch.device("cuda"), 64, len(ALL)) == len(ALL)
    net, x = smooth_cnn(), random_images(2)
    together = lie_derivative(net, x, transforms=ALL, output="softmax")
    assert rel_err(together, _one_by_one(net, x, ALL, output="softmax")) < 1e-12
    m = equivariance_metrics(net, random_images(5, 3, 16, 16), ALL, batch_size=2, progress=False)
    expected = _one_by_one(net, random_images(5, 3, 16, 16), ALL, output="softmax").abs().mean(2).T
    assert rel_err(m.values, expected) < 1e-12
