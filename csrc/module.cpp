// The Python module rnn_fused._C. Importing it loads this library, whose static
// registrations (ops.cpp, cpu/, cuda/) add the operators to torch.ops.rnn_fused.
#include <Python.h>

namespace {

// The CPU kernels are compiled for the SIMD level of the machine that built them (see
// setup.py). Refuse to load on a CPU without it instead of dying on an illegal instruction.
#if defined(CPU_CAPABILITY_AVX512)
#define RF_BUILD_SIMD "AVX-512"
#elif defined(CPU_CAPABILITY_AVX2)
#define RF_BUILD_SIMD "AVX2"
#else
#define RF_BUILD_SIMD "no SIMD extension"
#endif

bool cpu_has_build_simd() {
#if defined(CPU_CAPABILITY_AVX512)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#elif defined(CPU_CAPABILITY_AVX2)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return true;
#endif
}

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "rnn_fused operators (imported for their registration)", -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  if (!cpu_has_build_simd()) {
    PyErr_SetString(PyExc_ImportError, "rnn_fused was built for a CPU with " RF_BUILD_SIMD
                                       " and this CPU lacks it; rebuild here with `make build`");
    return nullptr;
  }
  return PyModule_Create(&module_def);
}
