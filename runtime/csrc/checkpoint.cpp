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
