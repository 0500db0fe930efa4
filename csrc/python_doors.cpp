// The eager doors `_C.layer` and `_C.cell` as plain CPython functions (METH_FASTCALL) instead
// of pybind11 ones: pybind11's argument matching took about a fifth of a short call
// (rnn_fused::layer at B=1 H=32, about 1 us of 5; perf on the Intel Xeon kind). Arguments
// are positional only. A wrong type raises TypeError, as pybind11 did, so that the modules'
// fast step (modules.py, _fast_step) still falls back to torch.nn's checks; the operator's
// own checks raise RuntimeError through torch's error translation.
#include "python_doors.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <initializer_list>
#include <string_view>

#include "autocast_call.h"
#include "op_adapters.h"

namespace rnn_fused {
namespace {

// The positional arguments of one call of a door named `door`.
struct Args {
  const char* door;
  PyObject* const* items;
  Py_ssize_t count;

  [[noreturn]] void refuse(int k, const char* name, const char* expected) const {
    throw torch::TypeError(c10::str("rnn_fused._C.", door, ": argument ", k, " (", name,
                                    ") must be ", expected, ", got ", Py_TYPE(items[k])->tp_name));
  }
  // Argument k, or None past the `count` given.
  PyObject* at(int k) const { return k < count ? items[k] : Py_None; }
  std::string_view mode(int k) const {
    Py_ssize_t size = 0;
    const char* s = PyUnicode_Check(items[k]) ? PyUnicode_AsUTF8AndSize(items[k], &size) : nullptr;
    if (s == nullptr) {
      PyErr_Clear();
      refuse(k, "mode", "a str");
    }
    return {s, size_t(size)};
  }
  const at::Tensor& tensor(int k, const char* name) const {
    if (!THPVariable_Check(items[k])) refuse(k, name, "a Tensor");
    return THPVariable_Unpack(items[k]);
  }
  OptTensor optional(int k, const char* name) const {
    if (at(k) == Py_None) return std::nullopt;
    if (!THPVariable_Check(items[k])) refuse(k, name, "a Tensor or None");
    return THPVariable_Unpack(items[k]);
  }
  bool flag(int k, const char* name) const {
    if (!PyBool_Check(items[k])) refuse(k, name, "a bool");
    return items[k] == Py_True;
  }
};

void check_count(const char* door, Py_ssize_t given, Py_ssize_t least, Py_ssize_t most) {
  if (given < least || given > most) {
    throw torch::TypeError(c10::str("rnn_fused._C.", door, " takes ", least,
                                    least == most ? "" : c10::str(" to ", most),
                                    " positional arguments, got ", given));
  }
}

// (a, b, ...) of new references, or nullptr (with a Python error set) if any is nullptr.
PyObject* tuple_of(std::initializer_list<PyObject*> items) {
  bool ok = true;
  for (PyObject* o : items) ok = ok && o != nullptr;
  PyObject* result = ok ? PyTuple_New(Py_ssize_t(items.size())) : nullptr;
  Py_ssize_t k = 0;
  for (PyObject* o : items) {
    if (result != nullptr) {
      PyTuple_SET_ITEM(result, k++, o);  // steals the reference
    } else {
      Py_XDECREF(o);
    }
  }
  return result;
}

// rnn_fused::layer with the GIL released, as torch's own bindings run their operators.
LayerResult call_layer_without_gil(const LayerArgs& a, bool output_wanted) {
  const pybind11::gil_scoped_release no_gil;
  return call_layer(a, output_wanted);
}

// The arguments both doors begin with: (mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh).
LayerArgs step_args(const Args& in) {
  LayerArgs a;
  a.mode = in.mode(0);
  a.input = in.tensor(1, "input");
  a.hx = in.optional(2, "hx");
  a.cx = in.optional(3, "cx");
  a.w_ih = in.tensor(4, "w_ih");
  a.w_hh = in.tensor(5, "w_hh");
  a.b_ih = in.optional(6, "b_ih");
  a.b_hh = in.optional(7, "b_hh");
  return a;
}

// Whether ops.rnn_layer's Python must run the call (the doors then return None): forward-mode
// AD, or any torch.func transform (the Python tells those that differentiate from vmap). Asked
// here, not in Python before each door: about 0.3 us less a short call (AMD EPYC).
bool served_in_python() {
  return forward_ad_level_exists() ||
         c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// The door's call: under autocast with a float32 tensor to cast, as torch.nn's layers run it
// (autocast_call.h; in C++, not in ops.py's Python: RNNCell(64) at batch 1 under bfloat16
// autocast took 38 us that way against torch.nn's 32).
LayerResult door_call(const LayerArgs& a, bool cell, bool output_wanted) {
  if (!autocast_pending(a)) return call_layer_without_gil(a, output_wanted);
  const pybind11::gil_scoped_release no_gil;
  return layer_under_autocast(a, cell, output_wanted);
}

// A state as the operator takes it ([B, H]) from a module's [1, B, H]; a RuntimeError for
// another shape (the modules then run torch.nn's checks for its message).
OptTensor unstacked(const OptTensor& state, const char* name) {
  if (!state) return std::nullopt;
  TORCH_CHECK(state->dim() == 3 && state->size(0) == 1, "rnn_fused._C.layer: stacked ", name,
              " must be [1, batch, size], got ", state->sizes());
  return state->squeeze(0);
}

// _C.layer(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
// zoneout=None, layer_norm=None, stacked=False, cell=False): rnn_fused::layer through the
// dispatcher, (output, h_n, c_n), or None where ops.rnn_layer must run the call
// (served_in_python). stacked: hx, cx, h_n and c_n (LSTM) as one layer of torch.nn's states,
// [1, B, H], their views made here (about 0.2 us each against 0.9 from Python, AMD EPYC).
// cell: the call is a cell's step, whose results under autocast have a cell's dtypes.
PyObject* layer_door(PyObject*, PyObject* const* items, Py_ssize_t count) {
  HANDLE_TH_ERRORS
  check_count("layer", count, 11, 15);  // zoneout, layer_norm, stacked, cell may be left out
  const Args in{"layer", items, count};
  LayerArgs a = step_args(in);
  a.w_hr = in.optional(8, "w_hr");
  a.batch_sizes = in.optional(9, "batch_sizes");
  a.reverse = in.flag(10, "reverse");
  a.zoneout = in.optional(11, "zoneout");
  a.layer_norm = in.optional(12, "layer_norm");
  const bool stacked = count > 13 && in.flag(13, "stacked");
  const bool cell = count > 14 && in.flag(14, "cell");  // a cell's step: its autocast dtypes
  if (served_in_python()) Py_RETURN_NONE;
  if (stacked) {
    a.hx = unstacked(a.hx, "hx");
    a.cx = unstacked(a.cx, "cx");
  }
  auto [output, h_n, c_n] = door_call(a, cell, /*output_wanted=*/true);
  if (stacked) {
    h_n = h_n.unsqueeze(0);
    if (parse_mode(a.mode) == CellKind::LSTM) c_n = c_n.unsqueeze(0);
  }
  return tuple_of({THPVariable_Wrap(std::move(output)), THPVariable_Wrap(std::move(h_n)),
                   THPVariable_Wrap(std::move(c_n))});
  END_HANDLE_TH_ERRORS
}

// _C.cell(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh): one step of a cell on input [B, I]
// (or unbatched [I], with states [H]) through rnn_fused::layer, (h_n, c_n) with c_n None but
// for LSTM; states None are zeros. None where ops.rnn_layer must run the call (served_in_python)
// or where the parameters' dtype is not the input's outside autocast (the modules' door).
PyObject* cell_door(PyObject*, PyObject* const* items, Py_ssize_t count) {
  HANDLE_TH_ERRORS
  check_count("cell", count, 8, 8);
  const Args in{"cell", items, count};
  // The input [B, I] as one step, or [I] as an unbatched one (make_problem, as_batch_of_one).
  const LayerArgs a = step_args(in);
  TORCH_CHECK(a.input.dim() <= 2, "rnn_fused._C.cell: input must be one step, [B, I] or [I], got ",
              a.input.sizes());
  if (served_in_python()) Py_RETURN_NONE;
  // Parameters of another dtype than the input's outside autocast (the operator takes half-type
  // ones with a float32 input; torch.nn's cells refuse them): declined, for the module's checks
  // to raise torch.nn's error.
  if (a.w_ih.scalar_type() != a.input.scalar_type() && !autocast_pending(a)) Py_RETURN_NONE;
  LayerResult r = door_call(a, /*cell=*/true, /*output_wanted=*/false);  // a step's output is h_n
  auto& [output, h_n, c_n] = r;
  const bool lstm = parse_mode(a.mode) == CellKind::LSTM;
  return tuple_of({THPVariable_Wrap(std::move(h_n)),
                   lstm ? THPVariable_Wrap(std::move(c_n)) : Py_NewRef(Py_None)});
  END_HANDLE_TH_ERRORS
}

PyMethodDef kDoors[] = {
    {"layer", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&layer_door)),
     METH_FASTCALL,
     "layer(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, zoneout=None, "
     "layer_norm=None, stacked=False, cell=False): rnn_fused::layer called through the "
     "dispatcher, (output, h_n, c_n), or None where ops.rnn_layer runs the call (torch.func, "
     "forward-mode AD); stacked: states in and out as [1, B, H]; cell: a cell's step (its "
     "dtypes under autocast); positional arguments only."},
    {"cell", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&cell_door)), METH_FASTCALL,
     "cell(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh): one step of a cell on input [B, I] "
     "through rnn_fused::layer, (h_n, c_n) with c_n None but for LSTM, or None as layer's and "
     "for parameters of another dtype than the input's outside autocast; positional arguments "
     "only."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

void add_python_doors(PyObject* module) {
  if (PyModule_AddFunctions(module, kDoors) != 0) throw pybind11::error_already_set();
}

}  // namespace rnn_fused
