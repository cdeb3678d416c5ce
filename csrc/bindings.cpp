// The one schema block of the `snapkv` op library: the whole native API on one screen.
// Kernels are registered per device in ops.cpp (CPU) and cuda/ (CUDA); fake (meta)
// implementations for torch.compile live in snapkv_ext/ops.py, and so do the allocating ops
// (snapkv::compact, snapkv::snapkv_compress), defined there over the _into ops below.
#include <Python.h>
#include <torch/library.h>

#include <stdexcept>

#include "cpu_isa.h"

TORCH_LIBRARY(snapkv, m) {
  // Window attention votes per KV head: [B,H_q,w,D] x [B,H_kv,L,D] -> [B,H_kv,L-w] float32 (Gemma 2 softcap).
  m.def("window_scores(Tensor q_window, Tensor keys, Tensor? pad_lengths=None, str group_reduce='mean', float? scale=None, float? softcap=None) -> Tensor");
  // 1-D max/avg pooling, odd kernel, stride 1, same length; positions < pad_lengths[b] -> -inf.
  m.def("pool_scores(Tensor scores, int kernel_size, str pooling='max', Tensor? pad_lengths=None) -> Tensor");
  // Top-k positions per row [B,H,N] -> [B,H,k] int64, sorted by position, ties to the lower one.
  m.def("select_topk(Tensor scores, int k) -> Tensor");
  // Gather kept rows then the last w rows into caller-owned buffers [B,H_kv,k+w,D].
  m.def("compact_into(Tensor keys, Tensor values, Tensor indices, int window_size, Tensor(a!) keys_out, Tensor(b!) values_out) -> ()");
  // The fused path (score, pool, top-k, compact) into caller-owned keys_out, values_out [B,H_kv,C',D],
  // C' = min(L, max_capacity_prompt) -> kept positions [B,H_kv,C'].
  m.def("snapkv_compress_into(Tensor q_window, Tensor keys, Tensor values, int max_capacity_prompt, Tensor(a!) keys_out, Tensor(b!) values_out, int kernel_size=7, str pooling='max', str group_reduce='mean', Tensor? pad_lengths=None, float? scale=None, float? softcap=None) -> Tensor");
  // Causal attention of q [B,H_q,n,D] over a ragged per-head store keys/values [N,D] (segments starts/lengths [B,H_kv]) -> [B,H_q,n,D].
  m.def("ragged_attention(Tensor q, Tensor keys, Tensor values, Tensor starts, Tensor lengths, float scale, float? softcap=None) -> Tensor");
}

// The CPU path (cpu_isa.h), for snapkv_ext.cpu_isa() / set_cpu_isa() / cpu_isas(): plain module
// functions, since they are process settings, not tensor ops.
namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(snapkv::cpu::isa_name(snapkv::cpu::active_isa())); }

PyObject* py_cpu_isas(PyObject*, PyObject*) {
  const auto isas = snapkv::cpu::available_isas();
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(isas.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < isas.size(); ++i)
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), PyUnicode_FromString(snapkv::cpu::isa_name(isas[i])));
  return out;
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    snapkv::cpu::set_isa(name);
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The CPU path the kernels use now."},
    {"cpu_isas", py_cpu_isas, METH_NOARGS, "The CPU paths this machine can run, best first."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O, "Force a CPU path by name ('auto': the best available)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import snapkv_ext._C` loads this library, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "snapkv native ops (see torch.ops.snapkv)", -1, methods};
  return PyModule_Create(&module);
}
