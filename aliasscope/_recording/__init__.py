"""Recording every op of a forward pass, in call order, with names, kinds and layouts.

``with record(model) as rec: model(x)`` runs the model under a
:class:`~torch.overrides.TorchFunctionMode` plus forward hooks on every module, and records:

* every call of a *leaf* module (no children) as one op, named by its module path;
* every torch call made by non-leaf code between them -- residual adds, position-embedding adds,
  functional activations, pooling/means, interpolation, token concatenation and slicing, reshapes,
  attention (``scaled_dot_product_attention``, ``q @ k^T``, softmax) -- named
  ``"<module path>.<function>"``;

each with ``#k`` appended for the k-th repeat of the same name. Every activation that depends on the
input gets a :class:`~aliasscope.layouts.Layout`, propagated call by call
(:mod:`aliasscope.layout_rules`). Where a layout cannot be known (attention scores inside Swin's
windows, pixels folded into the batch by custom code), the smallest enclosing module call whose inputs
and outputs have known layouts is recorded as one op instead. Ops on constants only (parameters,
buffers) are not ops: a parameter enters the analysis where it meets an activation (a position
embedding add is where the embedding breaks equivariance).

In-place writes (``ReLU(inplace=True)``, ``x += y``, ``x.mul_(g)``, ``x[i] = v``, ``out=``, writes
through views) are recorded in functional form (:mod:`aliasscope._mutation`): the new value is computed
into a new tensor, recorded as an op, and every later read of the written tensor -- or of a view
sharing its memory, or of the base a written view belongs to -- is redirected to its current value.
Recorded activations keep their values, and the recorded program computes exactly what the model
computes. A module that writes into its own inputs is replayed on copies, and its written inputs
become extra outputs of its op. The model's parameters and flags are never touched.

Op kinds (:data:`KINDS`): ``nonlinearity``, ``downsampling``, ``upsampling``, ``normalisation``,
``attention``, ``patch_embed``, ``position_embed``, ``pooling``, ``linear`` (stride-1 convs, linear
layers, per-channel scales), ``token_mixing`` (MLPs across tokens, as in MLP-Mixer), ``residual``
(sums of activations), ``layout`` (reshapes, permutes, slicing, concatenation, dropout in eval),
``block`` (a module recorded whole) and ``other``; each is a record of the registry
:mod:`aliasscope.kinds`, which also holds the function names that mean it.

The package has one job per module: :mod:`~aliasscope._recording.ops` (the recorded data,
:class:`OpRecord` and :class:`Recording`, and the queries on it), :mod:`~aliasscope._recording.tracer`
(the torch-function mode and module hooks that fill a recording, with all their working state),
:mod:`~aliasscope._recording.collapse` (regions with unknown layouts recorded as one op),
:mod:`~aliasscope._recording.classify` (the kind of each op) and :mod:`~aliasscope._recording.api`
(:func:`record`). :mod:`aliasscope.capture` is the stable import path for all of it.
"""

from ..kinds import KINDS
from .api import PAPER_UNITS, record
from .ops import OpRecord, Recording, select_ops
from .ops import _tensors as _tensors

__all__ = ["KINDS", "PAPER_UNITS", "OpRecord", "Recording", "record", "select_ops"]
