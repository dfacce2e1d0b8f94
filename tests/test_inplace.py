"""In-place code keeps its meaning: every pattern of the catalogue, against float64 finite differences.

Ground truth is the model run natively (``finite_difference`` resamples and calls the model as
written, Richardson-extrapolated in float64). The end-to-end jvp, the recorded program, the exact
decomposition (scalar and vector) and its total must all agree with it; the recording must compute
the model's own output; the caller's images and the model must come back untouched.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from inplace_catalogue import PATTERNS, PatternNet

from aliasscope.capture import record
from aliasscope.decomposition import decompose
from aliasscope.lie import finite_difference, lie_derivative
from aliasscope.spectrum import spectral

TOL = 1e-6


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pattern_agrees_with_finite_differences(pattern: str) -> None:
    model, x = PatternNet(PATTERNS[pattern]), _images()
    before = x.clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for transform in ("translate_x", "rotate"):
        fd = finite_difference(model, x, transform)
        assert rel_err(lie_derivative(model, x, transform), fd) < TOL, transform
        d = decompose(model, x, transform, target=1)
        assert rel_err(d.total, fd[:, 1]) < TOL, transform
        assert d.completeness_error < 1e-9, transform
    vec = decompose(model, x, "rotate", target=None)
    assert rel_err(vec.total, finite_difference(model, x, "rotate")) < TOL
    assert vec.completeness_error < 1e-9
    assert torch.equal(x, before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_recording_computes_the_models_output(pattern: str) -> None:
    model, x = PatternNet(PATTERNS[pattern]), _images()
    with torch.no_grad():
        native = model(x.clone())
        with record(model) as rec:
            recorded = model(x.clone())
    assert torch.equal(native, recorded)
    # every recorded op replays to its recorded outputs: activations kept their values
    for op in rec.ops:
        with torch.no_grad():
            again = op.replay(*op.inputs)
        outs = [t for t in ([again] if isinstance(again, torch.Tensor) else again) if t.is_floating_point()]
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(outs, op.outputs, strict=True)), op.name


@pytest.mark.parametrize("pattern", ["bare relu_", "slice assignment", "x.mul_ inside a block"])
def test_spectral_runs_on_the_functional_program(pattern: str) -> None:
    model, x = PatternNet(PATTERNS[pattern]), _images()
    sp = spectral(model, x, upsample=2)
    assert len(sp.table) > 3


def test_a_module_that_writes_its_input_gets_it_as_an_output() -> None:
    """The gate block returns the tensor it scaled in place: one op, replayed on copies."""
    model, x = PatternNet(PATTERNS["x.mul_ inside a block"]), _images()
    with torch.no_grad(), record(model) as rec:
        model(x)
    block_ops = [op for op in rec.ops if op.module.startswith("block")]
    assert block_ops, rec.names
    for op in block_ops:
        saved = [t.clone() for t in op.inputs]
        op.replay(*op.inputs)
        assert all(torch.equal(a, b) for a, b in zip(saved, op.inputs, strict=True))


def test_writes_into_model_state_are_refused() -> None:
    class Stateful(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("cache", torch.zeros(1, 3, 12, 12, dtype=torch.float64))
            self.conv = torch.nn.Conv2d(3, 2, 3, padding=1).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.cache.copy_(x[:1])
            return self.conv(x + self.cache).mean((2, 3))

    with pytest.raises(NotImplementedError, match="parameters or buffers"):
        decompose(Stateful().eval(), _images(), "rotate", target=0)
