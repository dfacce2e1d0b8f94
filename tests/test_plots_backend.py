"""Drawing a figure leaves the user's matplotlib state alone: backend, open figures, rc settings.

Run in a subprocess, as a notebook would be: a backend chosen first (here "svg", standing for an inline
or interactive one), a figure of the user's open, then aliasscope's figures drawn and saved.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import matplotlib
    matplotlib.use("svg")
    import matplotlib.pyplot as plt
    import torch
    mine = plt.figure()
    plt.plot([0, 1], [1, 0])
    before = (matplotlib.get_backend(), plt.get_fignums(), dict(matplotlib.rcParams))

    import aliasscope as asc
    from aliasscope import _plots as plots
    from aliasscope.lie import EquivarianceMetrics

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GELU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(2, 3, 16, 16)
    m = EquivarianceMetrics(torch.rand(4, 2, dtype=torch.float64), ["rotate", "scale"], "central", "softmax")
    d = asc.decompose(net, x, "rotate", target=0, keep_maps=True)
    figs = [
        plots.plot_transforms(m, "{out}/transforms"),
        plots.plot_layer_attribution({{"rotate": d}}, "{out}/attribution"),
        plots.plot_spectral(asc.spectral(net, x[:1], upsample=2), "{out}/spectral"),
        plots.plot_where(x, d, "{out}/where"),
    ]
    after = (matplotlib.get_backend(), plt.get_fignums(), dict(matplotlib.rcParams))
    assert before[0] == after[0] == "svg", (before[0], after[0])
    assert after[1] == before[1] == [mine.number], (before[1], after[1])
    assert before[2] == after[2], [k for k in before[2] if before[2][k] != after[2][k]]
    assert all(type(f).__name__ == "Figure" and f.savefig for f in figs)
    print("untouched")
    """
)


def test_drawing_leaves_the_backend_and_open_figures_alone(tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(out=tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and "untouched" in run.stdout, run.stderr[-3000:]
    for name in ("transforms", "attribution", "spectral", "where"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000, name
