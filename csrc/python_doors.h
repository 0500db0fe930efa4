// The eager doors of rnn_fused._C called per step (python_doors.cpp).
#pragma once

#include <Python.h>

namespace rnn_fused {

// Adds `layer` and `cell` to the module.
void add_python_doors(PyObject* module);

}  // namespace rnn_fused
