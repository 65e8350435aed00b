// hasten's C++ shim: the few libtorch calls tch does not expose, compiled against the same libtorch
// headers tch uses. Each function catches every exception; failures come back as -1.
//
// Autocast: tch can only switch CUDA autocast on with libtorch's default dtype (fp16). Accelerate needs
// bf16 as well, and CPU autocast, so we set the device type's enabled flag and dtype ourselves.

#include <ATen/autocast_mode.h>
#include <cstdio>

namespace {
c10::DeviceType device_type(int device) {
  return device == 1 ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
}
}  // namespace

extern "C" {

int hasten_autocast_is_enabled(int device) {
  try {
    return at::autocast::is_autocast_enabled(device_type(device)) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

int hasten_autocast_set_enabled(int device, int enabled) {
  try {
    at::autocast::set_autocast_enabled(device_type(device), enabled != 0);
    return 0;
  } catch (...) {
    return -1;
  }
}

int hasten_autocast_get_dtype(int device) {
  try {
    return static_cast<int>(at::autocast::get_autocast_dtype(device_type(device)));
  } catch (...) {
    return -1;
  }
}

int hasten_autocast_set_dtype(int device, int scalar_type) {
  try {
    at::autocast::set_autocast_dtype(device_type(device), static_cast<at::ScalarType>(scalar_type));
    return 0;
  } catch (...) {
    return -1;
  }
}

int hasten_autocast_increment_nesting() {
  try {
    return at::autocast::increment_nesting();
  } catch (...) {
    return -1;
  }
}

int hasten_autocast_decrement_nesting() {
  try {
    return at::autocast::decrement_nesting();
  } catch (...) {
    return -1;
  }
}

void hasten_autocast_clear_cache() {
  try {
    at::autocast::clear_cache();
  } catch (...) {
  }
}

}  // extern "C"

// Optimizer support. tch's tensors are `at::Tensor*` behind an opaque pointer.
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/_fused_sgd.h>
#include <vector>

extern "C" {

// Drops each tensor's gradient (PyTorch's zero_grad(set_to_none=True), its default since 2.0): the next
// backward writes fresh gradients instead of zero-filling and then adding.
int hasten_clear_grads(at::Tensor** tensors, int n) {
  try {
    for (int i = 0; i < n; ++i) {
      tensors[i]->mutable_grad().reset();
    }
    return 0;
  } catch (...) {
    return -1;
  }
}

// Makes `grad` the gradient of `tensor` (a view into a gradient bucket, so the all-reduce runs in place).
int hasten_set_grad(at::Tensor* tensor, at::Tensor* grad) {
  try {
    tensor->mutable_grad() = *grad;
    return 0;
  } catch (...) {
    return -1;
  }
}

// One fused AdamW step over every parameter that has a gradient (at::_fused_adamw_, the kernel behind
// torch.optim.AdamW(fused=True)). State tensors are per parameter; steps are float tensors on the device.
int hasten_fused_adamw(at::Tensor** params, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs, at::Tensor** steps,
                       int n, double lr, double beta1, double beta2, double weight_decay, double eps) {
  try {
    std::vector<at::Tensor> p, g, m, v, s;
    for (int i = 0; i < n; ++i) {
      const at::Tensor& grad = params[i]->grad();
      if (!grad.defined()) continue;
      // The kernel expects the step count already advanced (torch.optim does `_foreach_add_(steps, 1)`).
      steps[i]->add_(1);
      p.push_back(*params[i]);
      g.push_back(grad);
      m.push_back(*exp_avgs[i]);
      v.push_back(*exp_avg_sqs[i]);
      s.push_back(*steps[i]);
    }
    if (p.empty()) return 0;
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps, false, false);
    return 0;
  } catch (const std::exception& e) {
    fprintf(stderr, "hasten_fused_adamw: %s\n", e.what());
    return -1;
  } catch (...) {
    return -1;
  }
}

// One fused SGD step over every parameter that has a gradient (at::_fused_sgd_, the kernel behind
// torch.optim.SGD(fused=True); PyTorch's default foreach path is one multi-tensor launch as well).
// `momenta` holds one buffer per parameter when momentum != 0 (else it is ignored); `first` says they
// are uninitialised, so the kernel seeds them with the gradient as torch.optim.SGD does.
int hasten_fused_sgd(at::Tensor** params, at::Tensor** momenta, int n, double lr, double momentum,
                     double dampening, double weight_decay, int nesterov, int maximize, int first) {
  try {
    std::vector<at::Tensor> p, g, m;
    for (int i = 0; i < n; ++i) {
      const at::Tensor& grad = params[i]->grad();
      if (!grad.defined()) continue;
      p.push_back(*params[i]);
      g.push_back(grad);
      if (momentum != 0.0) m.push_back(*momenta[i]);
    }
    if (p.empty()) return 0;
    at::_fused_sgd_(p, g, m, weight_decay, momentum, lr, dampening, nesterov != 0, maximize != 0, first != 0);
    return 0;
  } catch (const std::exception& e) {
    fprintf(stderr, "hasten_fused_sgd: %s\n", e.what());
    return -1;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"

// Page-locked host memory, for fast and asynchronous copies to GPUs (checkpoint loading and offloaded
// weights). tch can only pin by copying an existing tensor; this allocates pinned memory directly, from
// libtorch's caching host allocator. Needs libtorch's CUDA half loaded; nullptr on failure.
#include <ATen/ops/empty.h>

extern "C" {

at::Tensor* hasten_empty_pinned_bytes(int64_t nbytes) {
  try {
    return new at::Tensor(at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true)));
  } catch (const std::exception& e) {
    fprintf(stderr, "hasten_empty_pinned_bytes: %s\n", e.what());
    return nullptr;
  } catch (...) {
    return nullptr;
  }
}

}  // extern "C"

// Gradient-ready hooks, for averaging gradients across ranks while the backward still runs (what
// PyTorch's DDP does with its reducer). tch exposes no autograd hooks; libtorch keeps one
// "post-accumulate-grad" hook per leaf tensor, called right after its .grad has been written. The hook
// calls back into Rust with the parameter's index; `drop` releases the Rust context when the hook is
// replaced, cleared, or the tensor dies.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <memory>

namespace {
struct GradReadyHook : torch::autograd::PostAccumulateGradHook {
  void (*call)(void*, int64_t);
  void (*drop)(void*);
  void* ctx;
  int64_t index;
  GradReadyHook(void (*c)(void*, int64_t), void (*d)(void*), void* x, int64_t i)
      : call(c), drop(d), ctx(x), index(i) {}
  ~GradReadyHook() override { drop(ctx); }
  void operator()(const torch::autograd::Variable& /*tensor*/) override { call(ctx, index); }
};
}  // namespace

extern "C" {

// Replaces `tensor`'s post-accumulate-grad hook. On success the hook owns `ctx` (freed through `drop`).
int hasten_set_grad_ready_hook(at::Tensor* tensor, void (*call)(void*, int64_t), void (*drop)(void*), void* ctx,
                               int64_t index) {
  try {
    auto hook = std::make_unique<GradReadyHook>(call, drop, ctx, index);
    torch::autograd::impl::set_post_acc_grad_hooks(*tensor, std::move(hook));
    return 0;
  } catch (const std::exception& e) {
    fprintf(stderr, "hasten_set_grad_ready_hook: %s\n", e.what());
    return -1;
  } catch (...) {
    return -1;
  }
}

// Removes `tensor`'s post-accumulate-grad hook (its context is dropped).
int hasten_clear_grad_ready_hook(at::Tensor* tensor) {
  try {
    torch::autograd::impl::set_post_acc_grad_hooks(*tensor, nullptr);
    return 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"

// Generator states, for save_state/load_state: libtorch's default CPU generator and each CUDA device's
// (device_type 1, through the CUDA hooks, so no CUDA headers are needed here). The state is a uint8
// tensor; nullptr / -1 on failure.
#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <mutex>

namespace {
at::Generator default_generator(int device_type, int index) {
  if (device_type == 1) {
    return at::globalContext().defaultGenerator(c10::Device(c10::DeviceType::CUDA, index));
  }
  return at::globalContext().defaultGenerator(c10::Device(c10::DeviceType::CPU));
}
}  // namespace

extern "C" {

at::Tensor* hasten_rng_get_state(int device_type, int index) {
  try {
    auto gen = default_generator(device_type, index);
    std::lock_guard<std::mutex> lock(gen.mutex());
    return new at::Tensor(gen.get_state());
  } catch (const std::exception& e) {
    fprintf(stderr, "hasten_rng_get_state: %s\n", e.what());
    return nullptr;
  } catch (...) {
    return nullptr;
  }
}

int hasten_rng_set_state(int device_type, int index, at::Tensor* state) {
  try {
    auto gen = default_generator(device_type, index);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(*state);
    return 0;
  } catch (const std::exception& e) {
    fprintf(stderr, "hasten_rng_set_state: %s\n", e.what());
    return -1;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"

// A permutation of 0..n drawn as PyTorch draws one for `torch.randperm(n, generator=g)` with
// `g = torch.Generator().manual_seed(seed)`: Accelerate's SeedableRandomSampler, so a hasten loader and a
// Python Accelerate loader with the same seed visit the same samples. A generator of its own: the global
// one is left alone. nullptr on failure.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/randperm.h>

extern "C" {

at::Tensor* hasten_randperm(int64_t n, uint64_t seed) {
  try {
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    return new at::Tensor(at::randperm(n, gen, at::TensorOptions().dtype(at::kLong)));
  } catch (const std::exception& e) {
    fprintf(stderr, "hasten_randperm: %s\n", e.what());
    return nullptr;
  } catch (...) {
    return nullptr;
  }
}

}  // extern "C"

// Accelerate's clear_device_cache: returns the memory the device's caching allocator keeps but does not
// use (torch.cuda.empty_cache()). Called only where CUDA is initialised; -1 on failure.
#include <ATen/DeviceAccelerator.h>

extern "C" {

int hasten_empty_device_cache() {
  try {
    if (!at::accelerator::getAccelerator(false).has_value()) {
      return 0;
    }
    at::accelerator::emptyCache();
    return 0;
  } catch (const std::exception& e) {
    fprintf(stderr, "hasten_empty_device_cache: %s\n", e.what());
    return -1;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"

// Freeing and re-allocating a tensor's storage in place, for sharded data parallelism: a parameter's
// unsharded buffer is released after the forward and filled again before the backward. Autograd saved
// views of the parameters during the forward; they share the storage's StorageImpl, so refilling that
// same StorageImpl (rather than allocating a new tensor) keeps them valid. PyTorch's FSDP does the same
// with `untyped_storage().resize_()`, which tch does not expose.
#include <c10/core/DeviceGuard.h>
#include <c10/core/StorageImpl.h>

extern "C" {

// Gives `tensor`'s storage `nbytes` bytes: 0 frees them (the tensor keeps its sizes and must not be read
// until it has bytes again); otherwise fresh, uninitialised bytes from the storage's own allocator.
int hasten_storage_resize(at::Tensor* tensor, int64_t nbytes) {
  try {
    c10::StorageImpl* storage = tensor->storage().unsafeGetStorageImpl();
    if (nbytes == 0) {
      storage->set_data_ptr_noswap(at::DataPtr(nullptr, storage->device()));
      storage->set_nbytes(0);
      return 0;
    }
    c10::Allocator* allocator = storage->allocator();
    if (allocator == nullptr) {
      fprintf(stderr, "hasten_storage_resize: the storage has no allocator\n");
      return -1;
    }
    c10::OptionalDeviceGuard guard(storage->device());
    storage->set_data_ptr_noswap(allocator->allocate(nbytes));
    storage->set_nbytes(nbytes);
    return 0;
  } catch (const std::exception& e) {
    fprintf(stderr, "hasten_storage_resize: %s\n", e.what());
    return -1;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"

// Backward pre-hooks on a block's output, for sharded data parallelism: when the gradient of a block's
// output has been computed (the block's own backward is next), FSDP gathers the block's parameters
// again. The hook calls back into Rust with an index; `drop` releases the Rust context when the graph
// holding the hook is freed.
extern "C" {

// Registers a hook on the gradient of the non-leaf `tensor`. On success the hook owns `ctx`; on failure
// `drop(ctx)` has been called.
int hasten_register_grad_pre_hook(at::Tensor* tensor, void (*call)(void*, int64_t), void (*drop)(void*), void* ctx,
                                  int64_t index) {
  std::shared_ptr<void> owner(ctx, drop);
  try {
    tensor->register_hook([call, owner, index](const at::TensorBase& /*grad*/) { call(owner.get(), index); });
    return 0;
  } catch (const std::exception& e) {
    fprintf(stderr, "hasten_register_grad_pre_hook: %s\n", e.what());
    return -1;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"

// The device caching allocator's byte counts (what torch.cuda.memory_allocated / max_memory_allocated
// report), through c10's device-allocator interface, so no CUDA headers are needed. `which`: 0 bytes
// allocated now, 1 their peak, 2 resets the peak (returns 0). -1 on failure (no CUDA allocator).
#include <c10/core/CachingDeviceAllocator.h>

extern "C" {

int64_t hasten_device_memory_stat(int device_type, int index, int which) {
  try {
    c10::DeviceAllocator* allocator = c10::getDeviceAllocator(::device_type(device_type));
    auto device = static_cast<c10::DeviceIndex>(index);
    if (which == 2) {
      allocator->resetPeakStats(device);
      return 0;
    }
    auto stats = allocator->getDeviceStats(device);
    const auto& stat = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    return which == 0 ? stat.current : stat.peak;
  } catch (const std::exception& e) {
    fprintf(stderr, "hasten_device_memory_stat: %s\n", e.what());
    return -1;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"

// Activation checkpointing of a block (FSDP_ACTIVATION_CHECKPOINTING): the block's forward runs without
// keeping its activations, and a node of ours in the autograd graph runs it again, with gradients, when
// the backward reaches it, then backpropagates through that recomputation — PyTorch's reentrant
// torch.utils.checkpoint. tch has no custom autograd functions, so the node lives here; the block's
// forward is a Rust callback. Every entry point catches every exception.

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Generator.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

namespace {

// The block's forward: runs it on `input` (whose ownership it takes) and returns a new tensor, or
// nullptr with a message in `error` (at most `len` bytes, NUL-terminated).
using Forward = at::Tensor* (*)(void* ctx, at::Tensor* input, char* error, size_t len);

at::Tensor run(Forward forward, void* ctx, const at::Tensor& input) {
  char error[1024] = {0};
  at::Tensor* out = forward(ctx, new at::Tensor(input), error, sizeof error);
  if (out == nullptr) {
    throw std::runtime_error(error[0] ? error : "the checkpointed block's forward failed");
  }
  at::Tensor value = std::move(*out);
  delete out;
  return value;
}

// A generator's state, and where it belongs.
struct Rng {
  c10::Device device;
  at::Tensor state;
  static Rng save(c10::Device device) {
    auto gen = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    return Rng{device, gen.get_state()};
  }
  void restore() const {
    auto gen = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
  }
};

// Autocast as the forward ran it, for one device type.
struct Autocast {
  c10::DeviceType device;
  bool enabled;
  at::ScalarType dtype;
  static Autocast save(c10::DeviceType d) {
    return Autocast{d, at::autocast::is_autocast_enabled(d), at::autocast::get_autocast_dtype(d)};
  }
  void apply() const {
    at::autocast::set_autocast_enabled(device, enabled);
    at::autocast::set_autocast_dtype(device, dtype);
  }
};

// What the forward ran under, put back for the recomputation and undone after it (as torch.autocast
// does: nesting counted, the cast cache cleared on leaving, so no stale casts outlive an optimizer step).
struct Replay {
  std::vector<Autocast> autocast_now;
  std::vector<Rng> rng_now;
  Replay(const std::vector<Autocast>& autocast, const std::vector<Rng>& rng) {
    for (const auto& a : autocast) {
      autocast_now.push_back(Autocast::save(a.device));
      a.apply();
    }
    at::autocast::increment_nesting();
    for (const auto& r : rng) {
      rng_now.push_back(Rng::save(r.device));
      r.restore();
    }
  }
  ~Replay() {
    try {
      for (const auto& r : rng_now) r.restore();
      if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
      for (const auto& a : autocast_now) a.apply();
    } catch (...) {
    }
  }
};

struct CheckpointedBlockBackward : torch::autograd::Node {
  std::shared_ptr<void> owner;  // the Rust forward's context, dropped with the node
  Forward forward;
  // The one activation kept: the block's input, saved as autograd saves inputs, so an in-place change
  // to it before the backward is libtorch's "modified by an inplace operation" error, as in PyTorch's
  // checkpoint, not a recomputation from the changed values.
  torch::autograd::SavedVariable input;
  bool input_requires_grad;
  std::vector<Autocast> autocast;
  std::vector<Rng> rng;

  std::string name() const override { return "hasten::CheckpointedBlockBackward"; }

  void release_variables() override { input.reset_data(); }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    if (grads.empty() || !grads[0].defined()) {
      return {at::Tensor(), at::Tensor()};
    }
    at::Tensor x = input.unpack().detach();
    x.set_requires_grad(input_requires_grad);
    at::Tensor y;
    {
      c10::AutoGradMode enable(true);
      Replay replay(autocast, rng);
      y = run(forward, owner.get(), x);
    }
    if (!y.requires_grad()) {
      return {at::Tensor(), at::Tensor()};
    }
    // Reentrant: the parameters' gradients accumulate as in an ordinary backward; the input's comes back.
    torch::autograd::backward({y}, {grads[0]});
    return {input_requires_grad ? x.grad() : at::Tensor(), at::Tensor()};
  }
};

void fail(char* error, size_t len, const char* what) {
  if (len == 0) return;
  std::strncpy(error, what, len - 1);
  error[len - 1] = '\0';
}

}  // namespace

extern "C" {

// Runs `forward` on `input` as a checkpointed block: without gradients, the output getting a node that
// recomputes it in the backward. `anchor` (a parameter of the block) ties the node into the graph when
// the input needs no gradient (the first block). With gradients off it just runs `forward`. The node
// owns `ctx` (dropped through `drop`, also on failure). Returns a new tensor, or nullptr with `error`.
at::Tensor* hasten_checkpoint(at::Tensor* input, at::Tensor* anchor, Forward forward, void (*drop)(void*), void* ctx,
                              char* error, size_t len) {
  std::shared_ptr<void> owner(ctx, drop);
  try {
    if (!c10::GradMode::is_enabled() || !(input->requires_grad() || anchor->requires_grad())) {
      return new at::Tensor(run(forward, owner.get(), *input));
    }
    auto node = std::shared_ptr<CheckpointedBlockBackward>(new CheckpointedBlockBackward(),
                                                           torch::autograd::deleteNode);
    for (auto d : {c10::DeviceType::CPU, c10::DeviceType::CUDA}) {
      node->autocast.push_back(Autocast::save(d));
    }
    node->rng.push_back(Rng::save(c10::Device(c10::DeviceType::CPU)));
    if (input->is_cuda()) {
      node->rng.push_back(Rng::save(input->device()));
    }
    at::Tensor out;
    {
      at::NoGradGuard no_grad;
      out = run(forward, owner.get(), *input);
      if (!out.is_floating_point()) {
        throw std::runtime_error("a checkpointed block must return a floating-point tensor");
      }
      // The output gets a history of its own: never a view of, or the same tensor as, the input.
      if (out.is_view() || out.is_same(*input)) {
        out = out.clone();
      }
    }
    node->owner = owner;
    node->forward = forward;
    node->input = torch::autograd::SavedVariable(*input, false);
    node->input_requires_grad = input->requires_grad();
    node->set_next_edges(torch::autograd::collect_next_edges(*input, *anchor));
    torch::autograd::set_history(out, node);
    return new at::Tensor(out);
  } catch (const std::exception& e) {
    fail(error, len, e.what());
    return nullptr;
  } catch (...) {
    fail(error, len, "an unknown C++ exception");
    return nullptr;
  }
}

}  // extern "C"
