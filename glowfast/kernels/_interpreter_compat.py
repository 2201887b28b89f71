"""Triton-interpreter compatibility (TRITON_INTERPRET=1 only; compiled kernels are untouched).

Triton 3.6's interpreter turns a scalar tensor into a Python int with ``int(handle.data)``, where a program id's
data is a numpy array of shape (1,); numpy 2.4 refuses that ("only 0-dimensional arrays can be converted to Python
scalars"), so every kernel looping ``for pt in range(tl.program_id(0), n, G)`` failed under the interpreter with
triton 3.6 and numpy 2.4 (found on the GPU machine, whose CPU-side tests run the interpreter). Triton 3.8
squeezes the array first; `apply` installs that same conversion on older versions.
"""

from __future__ import annotations


def apply() -> bool:
    """Make the interpreter's tensor.__index__ squeeze before int() (as triton 3.8 does). Idempotent; returns
    whether the interpreter's patch hook was found."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        return False
    if getattr(original, "glowfast_compat", False):
        return True

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.glowfast_compat = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
