"""The ``modalimmune::`` ops are defined here, once, in Python (docs/adding_an_op.md).

:func:`define` gives an op its schema, its fake kernel (so that ``torch.compile``
and ``opcheck`` work whether or not ``modalimmune._C`` loaded) and its autograd
behaviour. The compiled extension only implements ops
(``TORCH_LIBRARY_IMPL(modalimmune, CPU|CUDA, m)`` in csrc/); a Triton backend is
a second op, ``<op>_triton``, defined from the same schema string with a Python
kernel.

Load order: an extension built from older sources still defines the schemas
itself (``TORCH_LIBRARY``). Loaded after the definitions below, it would abort
the process on the duplicate; so the extension is loaded first, and an op that
already exists when it is defined here can only come from such a build, which
is then refused with a message.
"""

import torch

from .. import _extension

NAMESPACE = "modalimmune"

_extension.load()
_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")
_STALE = ("modalimmune._C was built from older sources, which define the op schemas in C++ "
          "(TORCH_LIBRARY); rebuild it with `make install`")


def define(name, schema, fake, *, kernel=None, autograd=None, tags=()):
    """Defines ``modalimmune::<name><schema>``; returns its ``OpOverload``.

    Args:
        fake: the fake kernel: output metadata from input metadata.
        kernel: a Python kernel for every device (Triton backends); None when
            modalimmune._C implements the op.
        autograd: ``(backward, setup_context)`` of a differentiable op
            (``torch.library.register_autograd``). An op without one is not
            differentiable; if it writes some of its arguments it refuses, as
            PyTorch's in-place ops do, to write a tensor that requires grad, and
            bumps the version counter of every tensor it writes, so that
            autograd detects a saved tensor it modified.
        tags: ``torch.Tag`` values besides ``pt2_compliant_tag``.
    """
    if hasattr(torch.ops.modalimmune, name):  # defined before us: by a stale extension
        _extension.refuse(_STALE)
        return getattr(torch.ops.modalimmune, name).default
    _LIBRARY.define(name + schema, tags=(torch.Tag.pt2_compliant_tag, *tags))
    op = getattr(torch.ops.modalimmune, name).default
    torch.library.register_fake(op, fake, lib=_LIBRARY)
    if kernel is not None:
        _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
    if autograd is not None:
        torch.library.register_autograd(op, autograd[0], setup_context=autograd[1], lib=_LIBRARY)
        return op
    written = [(i, arg.name) for i, arg in enumerate(op._schema.arguments)
               if arg.alias_info is not None and arg.alias_info.is_write]
    _LIBRARY.impl(name, _not_differentiable(op, written), "Autograd", with_keyset=True)
    if written:
        _LIBRARY.impl(name, _bumping_versions(op, written), "ADInplaceOrView", with_keyset=True)
    return op


def _as_list(value):
    """The tensors of an argument: a tensor, a list of tensors, or None."""
    return [value] if isinstance(value, torch.Tensor) else value or ()


def check_writable(name, value, op_name):
    """Raises, as PyTorch's in-place ops do, when grad mode is on and a tensor of the
    argument ``name`` that the op writes requires grad (the op has no derivative)."""
    if not torch.is_grad_enabled():
        return
    tensors = _as_list(value)
    for i, tensor in enumerate(tensors):
        if tensor.requires_grad:
            label = name if isinstance(value, torch.Tensor) else f"{name}[{i}]"
            kind = "a leaf Variable" if tensor.is_leaf else "a tensor"
            raise RuntimeError(f"{label}: expected a tensor that does not require grad "
                               f"({op_name} writes it in place and has no derivative), got {kind} that requires grad")


def _not_differentiable(op, written):
    """Autograd kernel of an op without a derivative: the tensors it writes are checked by
    :func:`check_writable`, then it runs below autograd (its outputs do not require grad)."""
    def kernel(keyset, *args):
        for index, name in written:
            check_writable(name, args[index], op.name())
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
    return kernel


def _bumping_versions(op, written):
    """ADInplaceOrView kernel of an op that writes its arguments: the version counter of
    every tensor written goes up by one, as after an in-place PyTorch op."""
    def kernel(keyset, *args):
        out = op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)
        for index, _ in written:
            torch.autograd.graph.increment_version(_as_list(args[index]))
        return out
    return kernel
