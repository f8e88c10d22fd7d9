// The "torch" backend's common call in native code: one adapter, no dropout, inputs already in the compute
// dtype (float32, or float64). It computes docs/DESIGN.md §1 with ATen ops, as the torch backend's Python does
// (vera_kernels/backends/torch_backend.py). What moves here is the host cost: from Python each ATen op costs
// about a microsecond of argument parsing and an autograd Function a few more, which at decode sizes is more
// than the arithmetic.
// Here one Python call runs the whole forward and a C++ autograd Function records the node, saving only s
// (docs/DESIGN.md §1) besides references to the frozen W, A, B and the trainable vectors; its backward runs
// in C++ too.
//
// Python: vera_kernels._C.plain_vera_linear(x, weight, bias, lambda_d, lambda_b, A_K, B_N) -> y
// (bias may be None; x is [..., K], A_K [r, K] and B_N [N, r] the call's slices of the projection). The
// caller (the torch backend, through vera_linear) has validated the call; nothing here re-checks it.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// vera_kernels.autograd.DOUBLE_BACKWARD_ERROR, read once from Python (under the GIL) before the first node
// exists; backward threads only read it.
std::string double_backward_error;

void load_double_backward_error() {
  PyObject* module = PyImport_ImportModule("vera_kernels.autograd");
  if (module == nullptr) {
    throw python_error();
  }
  PyObject* text = PyObject_GetAttrString(module, "DOUBLE_BACKWARD_ERROR");
  Py_DECREF(module);
  if (text == nullptr) {
    throw python_error();
  }
  const char* utf8 = PyUnicode_AsUTF8(text);
  if (utf8 == nullptr) {
    Py_DECREF(text);
    throw python_error();
  }
  double_backward_error = utf8;
  Py_DECREF(text);
}

// Under create_graph=True, route the defined gradients through a node that raises double_backward_error
// when differentiated (what the Python Function does with torch._C._functions.DelayedError). The node's
// inputs also include `links` (the vectors and the incoming gradient), so that differentiating a gradient
// with respect to them reaches the error instead of finding no path (which would give None under
// allow_unused).
variable_list first_order_only(variable_list grads, const variable_list& links) {
  if (!at::GradMode::is_enabled()) {
    return grads;
  }
  variable_list inputs;
  for (const auto& g : grads) {
    if (g.defined()) {
      inputs.push_back(g.detach().requires_grad_(true));
    }
  }
  const size_t n = inputs.size();
  if (n == 0) {
    return grads;
  }
  for (const auto& t : links) {
    if (t.defined()) {
      inputs.push_back(t);
    }
  }
  torch::autograd::DelayedError err(double_backward_error, static_cast<int64_t>(inputs.size()));
  variable_list wrapped = err.apply(std::move(inputs));
  size_t next = 0;
  for (auto& g : grads) {
    if (g.defined()) {
      g = wrapped[next++];
    }
  }
  return grads;
}

// y (x's leading dims, N) and s [M, r]. For x of other than two dims y is an _unsafe_view of the [M, N]
// result: the product is not referenced anywhere else, and an ordinary view made inside a custom Function
// could not be modified in place by the caller.
std::pair<at::Tensor, at::Tensor> forward_math(const at::Tensor& x, const at::Tensor& lambda_d,
                                               const at::Tensor& lambda_b, const at::Tensor& weight,
                                               const at::Tensor& A_K, const at::Tensor& B_N,
                                               const std::optional<at::Tensor>& bias) {
  const at::Tensor x2d = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
  at::Tensor s = at::linear(x2d, A_K);              // [M, r]
  at::Tensor y = at::linear(x2d, weight, bias);     // [M, N], a fresh tensor
  y.addcmul_(lambda_b, at::linear(lambda_d * s, B_N));
  if (x.dim() != 2) {
    std::vector<int64_t> out_sizes = x.sizes().vec();
    out_sizes.back() = weight.size(0);
    y = at::_unsafe_view(y, out_sizes);
  }
  return {std::move(y), std::move(s)};
}

struct PlainVeRA : public torch::autograd::Function<PlainVeRA> {
  // Tensor inputs in order: x, lambda_d, lambda_b (the ones that can get gradients: needs_input_grad 0..2),
  // then weight, A_K, B_N and the optional bias.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& lambda_d,
                            const at::Tensor& lambda_b, const at::Tensor& weight, const at::Tensor& A_K,
                            const at::Tensor& B_N, const std::optional<at::Tensor>& bias) {
    auto [y, s] = forward_math(x, lambda_d, lambda_b, weight, A_K, B_N, bias);
    ctx->save_for_backward({s, weight, lambda_d, lambda_b});
    // A_K/B_N are slices of the projection's own cache, never changed in place: kept outside the saved
    // tensors so that saved-tensor hooks (offloading, checkpointing) see what the Python Function saves
    ctx->saved_data["A_K"] = A_K;
    ctx->saved_data["B_N"] = B_N;
    if (x.dim() != 2) {
      ctx->saved_data["x_sizes"] = x.sizes().vec();
    }
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_d = ctx->needs_input_grad(1);
    const bool need_b = ctx->needs_input_grad(2);
    if (!(need_x || need_d || need_b)) {
      return variable_list(7);
    }
    const variable_list saved = ctx->get_saved_variables();  // once: unpack hooks run once per backward
    const at::Tensor &s = saved[0], &weight = saved[1], &lambda_d = saved[2], &lambda_b = saved[3];
    at::Tensor grad_x, grad_d, grad_b;
    {
      const at::Tensor A_K = ctx->saved_data["A_K"].toTensor(), B_N = ctx->saved_data["B_N"].toTensor();
      at::NoGradGuard no_grad;
      const at::Tensor gy = grad_outputs[0].reshape({s.size(0), weight.size(0)});
      at::Tensor g;  // (gy * lambda_b) B_N = gy (lambda_b B_N), [M, r]: lambda_b on the small [N, r] side
      if (need_x || need_d) {
        g = at::mm(gy, B_N * lambda_b.unsqueeze(1));
      }
      if (need_d) {
        grad_d = (s * g).sum(0);
      }
      if (need_b) {  // two equal forms (docs/DESIGN.md §1); the one with the smaller transient
        if (s.size(0) <= s.size(1)) {
          grad_b = (gy * at::linear(lambda_d * s, B_N)).sum(0);  // [M, N]
        } else {
          grad_b = (B_N * at::mm(gy.t(), lambda_d * s)).sum(1);  // [N, r]
        }
      }
      if (need_x) {  // base and adapter parts in one addmm
        grad_x = at::addmm(at::mm(g * lambda_d, A_K), gy, weight);
        auto it = ctx->saved_data.find("x_sizes");
        if (it != ctx->saved_data.end()) {
          grad_x = grad_x.view(it->second.toIntVector());
        }
      }
    }
    variable_list grads = first_order_only({grad_x, grad_d, grad_b}, {lambda_d, lambda_b, grad_outputs[0]});
    grads.resize(7);  // no gradient for weight, A_K, B_N, bias
    return grads;
  }
};

struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

at::Tensor tensor_arg(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), "plain_vera_linear: ", name, " must be a tensor");
  return THPVariable_Unpack(obj);
}

PyObject* plain_vera_linear(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (double_backward_error.empty()) {
    load_double_backward_error();
  }
  TORCH_CHECK(nargs == 7, "plain_vera_linear takes 7 arguments (x, weight, bias, lambda_d, lambda_b, A_K, B_N), got ",
              nargs);
  const at::Tensor x = tensor_arg(args[0], "x");
  const at::Tensor weight = tensor_arg(args[1], "weight");
  std::optional<at::Tensor> bias;
  if (args[2] != Py_None) {
    bias = tensor_arg(args[2], "bias");
  }
  const at::Tensor lambda_d = tensor_arg(args[3], "lambda_d");
  const at::Tensor lambda_b = tensor_arg(args[4], "lambda_b");
  const at::Tensor A_K = tensor_arg(args[5], "A_K");
  const at::Tensor B_N = tensor_arg(args[6], "B_N");
  at::Tensor y;
  {
    ReleaseGil no_gil;  // as torch's own Python bindings do around an op
    const bool record = at::GradMode::is_enabled() &&
                        (x.requires_grad() || lambda_d.requires_grad() || lambda_b.requires_grad());
    if (record) {
      y = PlainVeRA::apply(x, lambda_d, lambda_b, weight, A_K, B_N, bias);
    } else {  // inference: no node, nothing saved
      at::AutoGradMode no_grad(false);
      y = forward_math(x, lambda_d, lambda_b, weight, A_K, B_N, bias).first;
    }
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"plain_vera_linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plain_vera_linear)),
     METH_FASTCALL, "y = x W^T + bias + lambda_b * ((lambda_d * (x A_K^T)) B_N^T), with a C++ autograd node"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Used by the module init in vera_ops.cpp.
PyMethodDef* vera_host_methods() {
  return kMethods;
}
