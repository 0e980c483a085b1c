// fastema's CPU kernel (core/native.py builds it): `ema.lerp_(model, weight)` for many (EMA, model) pairs in one
// OpenMP-parallel pass. ATen's foreach on CPU builds a TensorIterator and forks threads once per tensor (about
// a microsecond each, and small tensors run on one thread); here the pairs are one index space split across
// the threads once, and a bfloat16 model value is widened in registers for a float32 EMA.
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kGrain = 32768;  // ATen's grain: below it one thread does the whole pass

inline float widen(float value) { return value; }

inline float widen(c10::BFloat16 value) {
  const uint32_t bits = static_cast<uint32_t>(value.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// ATen's lerp for a scalar weight: fma(w, end - ema, ema) below 0.5, fma(w - 1, end - ema, end) above.
template <typename M>
void lerp_range(float* __restrict__ ema, const M* __restrict__ model, int64_t n, float weight) {
  if (std::abs(weight) < 0.5f) {
    for (int64_t i = 0; i < n; ++i) ema[i] = std::fma(weight, widen(model[i]) - ema[i], ema[i]);
  } else {
    const float coeff = weight - 1.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float end = widen(model[i]);
      ema[i] = std::fma(coeff, end - ema[i], end);
    }
  }
}

template <typename M>
void lerp_all(const std::vector<void*>& ema, const std::vector<const void*>& model,
              const std::vector<int64_t>& offsets, float weight) {
  const int64_t count = static_cast<int64_t>(ema.size());
  at::parallel_for(0, offsets[count], kGrain, [&](int64_t begin, int64_t end) {
    int64_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    for (; t < count && offsets[t] < end; ++t) {
      const int64_t low = std::max(begin, offsets[t]), high = std::min(end, offsets[t + 1]);
      lerp_range<M>(static_cast<float*>(ema[t]) + (low - offsets[t]), static_cast<const M*>(model[t]) + (low - offsets[t]), high - low,
                    weight);
    }
  });
}

}  // namespace

// The memory of every (EMA, model) pair: plain CPU tensors of one size and one dense layout on both sides, one
// dtype on each side; false when a pair is not that (the caller then writes nothing).
struct Pairs {
  std::vector<void*> ema;
  std::vector<const void*> model;
  std::vector<int64_t> offsets;  // pair i holds elements offsets[i] to offsets[i + 1] of the whole index space
  std::vector<c10::TensorImpl*> written;
  std::vector<c10::Storage> held;  // the storages, owned for the call: the GIL is released while they are used
  c10::ScalarType ema_type = c10::ScalarType::Undefined;
  c10::ScalarType model_type = c10::ScalarType::Undefined;

  bool collect(PyObject* ema_list, PyObject* model_list) {
    const Py_ssize_t count = PyList_GET_SIZE(ema_list);
    if (count == 0 || PyList_GET_SIZE(model_list) != count) return false;
    ema.resize(count);
    model.resize(count);
    written.resize(count);
    held.reserve(2 * count);
    offsets.assign(count + 1, 0);
    for (Py_ssize_t i = 0; i < count; ++i) {
      PyObject* ema_object = PyList_GET_ITEM(ema_list, i);
      PyObject* model_object = PyList_GET_ITEM(model_list, i);
      if (!THPVariable_Check(ema_object) || !THPVariable_Check(model_object)) return false;
      c10::TensorImpl* e = THPVariable_Unpack(ema_object).unsafeGetTensorImpl();
      c10::TensorImpl* m = THPVariable_Unpack(model_object).unsafeGetTensorImpl();
      if (i == 0) {
        ema_type = e->dtype().toScalarType();
        model_type = m->dtype().toScalarType();
      }
      const bool same_layout = (e->is_contiguous() && m->is_contiguous()) ||
                               (e->is_non_overlapping_and_dense() && m->is_non_overlapping_and_dense() &&
                                e->strides() == m->strides());
      if (e->dtype().toScalarType() != ema_type || m->dtype().toScalarType() != model_type ||
          !e->device().is_cpu() || !m->device().is_cpu() || e->numel() == 0 || e->sizes() != m->sizes() ||
          !same_layout || !e->has_storage() || !m->has_storage() || e->is_python_dispatch() ||
          m->is_python_dispatch() || e->is_neg() || m->is_neg() || e->is_conj() || m->is_conj() ||
          (e->is_inference() && !c10::InferenceMode::is_enabled()))
        return false;  // subclasses (DTensor, fake tensors) and lazy negation have no plain memory to read; an
                       // inference tensor is written only in inference mode (eager lerp_ raises: it says why)
      held.push_back(e->storage());
      held.push_back(m->storage());
      ema[i] = e->mutable_data();
      model[i] = m->data();
      offsets[i + 1] = offsets[i] + e->numel();
      written[i] = e;
    }
    return true;
  }

  void bump_versions() const {
    for (c10::TensorImpl* e : written) {
      if (!e->is_inference()) e->bump_version();  // as lerp_ and copy_ do: autograd sees the write
    }
  }
};

// ema.lerp_(model, weight) for every pair (a float32 EMA of float32 or bfloat16 tensors); false, and nothing
// written, when a pair is not what the kernel takes.
bool lerp_many(py::list ema_list, py::list model_list, double weight) {
  Pairs pairs;
  if (!pairs.collect(ema_list.ptr(), model_list.ptr()) || pairs.ema_type != c10::ScalarType::Float ||
      (pairs.model_type != c10::ScalarType::Float && pairs.model_type != c10::ScalarType::BFloat16))
    return false;
  pairs.bump_versions();
  py::gil_scoped_release no_gil;  // a background thread's update must not stall the training thread
  if (pairs.model_type == c10::ScalarType::Float) {
    lerp_all<float>(pairs.ema, pairs.model, pairs.offsets, static_cast<float>(weight));
  } else {
    lerp_all<c10::BFloat16>(pairs.ema, pairs.model, pairs.offsets, static_cast<float>(weight));
  }
  return true;
}

// ema.copy_(model) for every pair of one dtype (the integer counts an EMA copies); false, and nothing written,
// when a pair is not what the kernel takes.
bool copy_many(py::list ema_list, py::list model_list) {
  Pairs pairs;
  if (!pairs.collect(ema_list.ptr(), model_list.ptr()) || pairs.ema_type != pairs.model_type ||
      !c10::isIntegralType(pairs.ema_type, /*includeBool=*/true))
    return false;  // quantized tensors carry a scale and zero point beside their integers: copy_ copies those
  pairs.bump_versions();
  const int64_t item = static_cast<int64_t>(c10::elementSize(pairs.ema_type));
  for (size_t i = 0; i < pairs.ema.size(); ++i) {
    std::memcpy(pairs.ema[i], pairs.model[i], (pairs.offsets[i + 1] - pairs.offsets[i]) * item);
  }
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("lerp_many", &lerp_many, "ema.lerp_(model, weight) for every pair, in one parallel pass");
  module.def("copy_many", &copy_many, "ema.copy_(model) for every pair of one dtype");
}
