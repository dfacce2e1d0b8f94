"""Exact attribution of a Lie derivative to the ops of a network, by the chain rule.

Write the network as ops ``h_out = f_i(h_in)``. Each op's *local* Lie derivative is

    v_i = J_{f_i}(h_in) . (D h_in) - D h_out

(``D``: the generator in that tensor's layout, 0 on invariant tensors). Writing ``e_h = dh - D h``
for the equivariance error carried by an activation, ``e_out = v_i + J_{f_i} e_in``, and ``e = 0`` at
the input, so the total telescopes:

    L_X F(x) = sum_i J_{>i} . v_i

where ``J_{>i}`` is the Jacobian of the rest of the network with respect to op i's output. For a
scalar target ``T`` (a class logit or probability per image) each op's contribution is the number
``c_i = <dT/dh_out_i, v_i> = sum_inputs <J_i^T dT/dh_out_i, D h_in> - <dT/dh_out_i, D h_out_i>``. While
recording, every op gets private aliases (free views) of its inputs, so ONE backward pass yields both
``dT/dh_out_i`` and ``J_i^T dT/dh_out_i`` for every op: one forward, one backward and the generator on
each activation give all contributions, no forward-mode pass at all. The same backward gives the total
independently of the ops, as ``<dT/dx, D x> - <dT/dF, D F>``; a test checks the contributions against
the forward-mode route (``J_i D h_in`` by jvp) and against finite differences. ``completeness_error``
compares the total with the sum of contributions: zero to float precision when no computation between
input and output escaped the recording. The whole-output route (``target=None``) pushes every ``v_i``
forward by jvp instead, and there the check also covers each op's replay.

Modules, one job each: :mod:`.api` (``decompose``: validate, batches, method, result, checks, warn),
:mod:`.settings` (its keywords as one frozen :class:`~.settings.Settings`), :mod:`.targets` (the
attributed scalar), :mod:`.forward` (the recorded forward, inner products), :mod:`.local` (``v_i``),
:mod:`.scalar`, :mod:`.vector`, :mod:`.probe` (the three methods), :mod:`.cuda_graph` (replay over
batches), :mod:`.self_checks` (``CHECKS``, ``TOLERANCES``), :mod:`.result` (``Decomposition``).
"""

from ._api import decompose
from ._local import local_lie_derivative
from ._result import Decomposition
from ._self_checks import CHECKS, FD_TOLERANCE, TOLERANCES, SelfCheckWarning

__all__ = [
    "decompose",
    "Decomposition",
    "local_lie_derivative",
    "CHECKS",
    "TOLERANCES",
    "FD_TOLERANCE",
    "SelfCheckWarning",
]
