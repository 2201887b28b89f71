// Operator schemas of glowfast._C (namespace `glowfast`) and the Python module stub.
// Kernels: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cpp + *.cu (CUDA, built with -DWITH_CUDA).
// Fake (meta) implementations and autograd formulas are registered in Python (glowfast/ops/batched_lu.py).
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(glowfast, m) {
  // Batched LU with partial pivoting of a packed ragged batch of square matrices (see csrc/batched_lu.h).
  // Returns the packed LU factors, (B, max_n) int32 pivots, per-matrix sign and log|det| (summed in float64)
  // and an int32 status per matrix (0 ok, 1 exactly singular, 2 non-finite input, 3 bad layout).
  m.def(
      "lu_factor_packed(Tensor packed, Tensor offsets, Tensor sizes, int max_n) -> "
      "(Tensor lu, Tensor pivots, Tensor sign, Tensor logabsdet, Tensor info)");
  // Inverse of each matrix from its LU factors; transpose=True writes W^-T; scale (B,) multiplies matrix b
  // by scale[b] (an exact zero gives zeros). Singular or non-finite factors give a NaN-filled block.
  m.def(
      "lu_inverse_packed(Tensor lu, Tensor pivots, Tensor offsets, Tensor sizes, int max_n, "
      "bool transpose=False, Tensor? scale=None) -> Tensor");
  // Factorisation + inverse in one op (what batched_inverse calls); info as in lu_factor_packed.
  m.def("inverse_packed(Tensor packed, Tensor offsets, Tensor sizes, int max_n) -> (Tensor inverse, Tensor info)");
  // Backward of inverse_packed: -(X^T G X^T) per matrix, X the inverse and G its incoming gradient.
  m.def("inverse_packed_backward(Tensor inverse, Tensor grad, Tensor offsets, Tensor sizes, int max_n) -> Tensor");
}

// `import glowfast._C` loads this shared object, which runs the registrations above.
static struct PyModuleDef glowfast_c_module = {PyModuleDef_HEAD_INIT, "_C", "glowfast C++/CUDA operators", -1,
                                               nullptr};

// `intra_op_parallel`: 1 when at::parallel_for in these kernels runs on torch's CPU threads. ATen's parallel_for is a
// header template: it is parallel only where the extension itself is compiled with the CPU backend's flags
// (setup.py adds -fopenmp), else it runs the whole range on the calling thread (tests/test_batched_lu.py checks it).
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&glowfast_c_module);
#ifdef INTRA_OP_PARALLEL
  constexpr long kIntraOpParallel = 1;
#else
  constexpr long kIntraOpParallel = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "intra_op_parallel", kIntraOpParallel) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
