"""The CPU backend: ms_xent's compiled C++ kernels (``ms_xent/csrc``) as aot ``ops.Custom`` primitives."""
