// SPDX-License-Identifier: Apache-2.0
//! \file optim.hpp
//! Optimisation over a network's parameter and gradient buffers, written against the backend
//! primitives (so every backend gets it): AdamW with decoupled weight decay and a configurable
//! no-decay set, a warm-up then cosine / linear / constant learning-rate schedule, gradient
//! clipping by global norm, and an exponential moving average of the weights.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numbers>
#include <string>
#include <utility>
#include <vector>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"

namespace unidiffuser::train {

//! One parameter tensor of a flat buffer: name, offset and element count.
struct ParamRange {
  std::string name;
  std::int64_t offset = 0, size = 0;
};

//! The parameter ranges of a network (anything with parameter_names(), parameter_offset() and
//! parameter_shape()).
template <class Net>
std::vector<ParamRange> parameter_ranges(const Net& net) {
  std::vector<ParamRange> r;
  for (const auto& n : net.parameter_names())
    r.push_back({n, net.parameter_offset(n), net.parameter_shape(n).numel()});
  return r;
}

//! The default no-decay set: biases, norms (gains and biases), positional embeddings and
//! learned tokens -- parameters whose decay would pull them to zero for no benefit.
inline bool default_no_decay(const std::string& name) {
  auto ends = [&](const char* s) {
    const std::string f(s);
    return name.size() >= f.size() && name.compare(name.size() - f.size(), f.size(), f) == 0;
  };
  return ends(".bias") || name.find("norm") != std::string::npos ||
         name.find("pos_embed") != std::string::npos ||
         name.find("token_embedding") != std::string::npos;
}

enum class Decay { cosine, linear, constant };

//! Learning rate at a step: linear warm-up from 0 over `warmup` steps, then cosine or linear decay
//! to `min_lr` at `total` steps (constant after), or constant.
struct LrSchedule {
  double lr = 1e-4, min_lr = 0;
  std::int64_t warmup = 0, total = 0;
  Decay decay = Decay::constant;
  double at(std::int64_t step) const {  // step counts from 0
    if (warmup > 0 && step < warmup) return lr * static_cast<double>(step + 1) / warmup;
    if (decay == Decay::constant || total <= warmup) return lr;
    const double u =
        std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(total - warmup));
    const double f = decay == Decay::cosine ? 0.5 * (1 + std::cos(std::numbers::pi * u)) : 1 - u;
    return min_lr + (lr - min_lr) * f;
  }
};

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.03;
  std::function<bool(const std::string&)> no_decay = default_no_decay;
};

template <class T, class Backend = cpu>
class Ema;

//! AdamW over a flat parameter buffer: first and second moments in buffers of the same layout.
template <class T, class Backend = cpu>
class AdamW {
 public:
  AdamW(std::vector<ParamRange> ranges, std::int64_t buffer_size, AdamWOptions opt = {})
      : ranges_(std::move(ranges)),
        opt_(std::move(opt)),
        m_(Shape{buffer_size}),
        v_(Shape{buffer_size}) {
    for (const auto& r : ranges_) {
      if (r.offset < 0 || r.size < 0 || r.offset + r.size > buffer_size)
        throw error("train::AdamW", r.name, "range outside the parameter buffer");
      decay_.push_back(!opt_.no_decay(r.name));
    }
    reset();
  }
  //! Zero moments and step count.
  void reset() {
    const Context<Backend> ctx{};
    ops::fill(ctx, m_.view(), T(0));
    ops::fill(ctx, v_.view(), T(0));
    t_ = 0;
  }
  //! One step with learning rate lr: params -= AdamW(grads).
  void step(const Context<Backend>& ctx, TensorView<T, Backend> params,
            TensorView<const T, Backend> grads, double lr) {
    if (params.size() != m_.size() || grads.size() != m_.size())
      throw_mismatch("train::AdamW::step", "params/grads", "element count", m_.size(),
                     params.size());
    ++t_;
    ops::AdamWStep s = step_of(lr);
    for (std::size_t i = 0; i < ranges_.size(); ++i) {
      const auto& r = ranges_[i];
      s.weight_decay = decay_[i] ? opt_.weight_decay : 0.0;
      ops::adamw_update<T>(ctx, params.data() + r.offset, grads.data() + r.offset,
                           m_.data() + r.offset, v_.data() + r.offset, r.size, s);
    }
  }
  //! One step fused with the rest of a training step where the backend offers it (the CPU
  //! backend: one pass over the buffers), else as separate passes: params -= AdamW(grads), then
  //! `ema` (if not null) updated with the new parameters, then the gradients zeroed (zero_grads).
  void step(const Context<Backend>& ctx, TensorView<T, Backend> params,
            TensorView<T, Backend> grads, double lr, Ema<T, Backend>* ema, bool zero_grads) {
    constexpr bool fused = requires(T * x, std::int64_t n, const ops::AdamWStep& s) {
      ops::adamw_update<T>(Context<Backend>{}, x, x, x, x, n, s, x, 0.0, true);
    };
    if constexpr (fused) {
      if (params.size() != m_.size() || grads.size() != m_.size())
        throw_mismatch("train::AdamW::step", "params/grads", "element count", m_.size(),
                       params.size());
      if (ema && ema->weights().size() != m_.size())
        throw_mismatch("train::AdamW::step", "ema", "element count", m_.size(),
                       ema->weights().size());
      ++t_;
      ops::AdamWStep s = step_of(lr);
      T* e = ema ? ema->weights().data() : nullptr;
      const double d = ema ? ema->decay() : 0.0;
      for (std::size_t i = 0; i < ranges_.size(); ++i) {
        const auto& r = ranges_[i];
        s.weight_decay = decay_[i] ? opt_.weight_decay : 0.0;
        ops::adamw_update<T>(ctx, params.data() + r.offset, grads.data() + r.offset,
                             m_.data() + r.offset, v_.data() + r.offset, r.size, s,
                             e ? e + r.offset : nullptr, d, zero_grads);
      }
    } else {
      step(ctx, params, TensorView<const T, Backend>(grads), lr);
      if (ema) ema->update(ctx, TensorView<const T, Backend>(params));
      if (zero_grads) ops::fill(ctx, grads, T(0));
    }
  }
  std::int64_t steps() const { return t_; }
  void set_steps(std::int64_t t) { t_ = t; }
  TensorView<T, Backend> first_moment() { return m_.view(); }
  TensorView<T, Backend> second_moment() { return v_.view(); }
  TensorView<const T, Backend> first_moment() const { return m_.view(); }
  TensorView<const T, Backend> second_moment() const { return v_.view(); }
  const std::vector<ParamRange>& ranges() const { return ranges_; }
  bool decays(std::size_t i) const { return decay_[i]; }

 private:
  // The step's constants after t_ was counted up.
  ops::AdamWStep step_of(double lr) const {
    ops::AdamWStep s;
    s.lr = lr;
    s.beta1 = opt_.beta1;
    s.beta2 = opt_.beta2;
    s.eps = opt_.eps;
    s.c1 = 1 - std::pow(opt_.beta1, static_cast<double>(t_));
    s.c2 = 1 - std::pow(opt_.beta2, static_cast<double>(t_));
    return s;
  }
  std::vector<ParamRange> ranges_;
  AdamWOptions opt_;
  std::vector<bool> decay_;
  Tensor<T, Backend> m_, v_;
  std::int64_t t_ = 0;
};

//! Scales the gradients so that their global L2 norm is at most max_norm; returns the norm before.
template <class T, class Backend>
double clip_grad_norm(const Context<Backend>& ctx, TensorView<T, Backend> grads, double max_norm) {
  const double norm = std::sqrt(ops::sum_squares<T>(ctx, grads.data(), grads.size()));
  if (max_norm > 0 && norm > max_norm) {
    const auto b = RowBlock<T, Backend>(grads.data(), 1, grads.size(), grads.size());
    ops::lincomb<T>(ctx, b, {{max_norm / (norm + 1e-6), b}});
  }
  return norm;
}

//! Exponential moving average of a parameter buffer: ema = d ema + (1 - d) params.
template <class T, class Backend>
class Ema {
 public:
  Ema(const Context<Backend>& ctx, TensorView<const T, Backend> params, double decay = 0.9999)
      : decay_(decay), w_(params.shape()) {
    ops::copy<T>(ctx, params, w_.view());
  }
  void update(const Context<Backend>& ctx, TensorView<const T, Backend> params) {
    if (params.size() != w_.size())
      throw_mismatch("train::Ema::update", "params", "element count", w_.size(), params.size());
    const auto e = RowBlock<T, Backend>(w_.data(), 1, w_.size(), w_.size());
    ops::lincomb<T>(
        ctx, e,
        {{decay_, e},
         {1 - decay_, RowBlock<const T, Backend>(params.data(), 1, w_.size(), w_.size())}});
  }
  double decay() const { return decay_; }
  TensorView<T, Backend> weights() { return w_.view(); }
  TensorView<const T, Backend> weights() const { return w_.view(); }

 private:
  double decay_;
  Tensor<T, Backend> w_;
};

}  // namespace unidiffuser::train
