// SPDX-License-Identifier: Apache-2.0
//! \file component_kind.hpp
//! Component kinds as an open set: a user type that turns one component's input into tokens of
//! the U-ViT and tokens back into its output, with its own parameters, forward and backward
//! written with the backend primitives, registered by name and usable by every network built or
//! loaded afterwards (docs/CUSTOM_LAYOUTS.md §5). The built-in kinds (patched images, token
//! sequences) keep their own code paths (official names and fused kernels); a registered kind is
//! ComponentKind::custom with `custom_kind` naming it and `options` holding its settings.
//!
//! A kind type `K` provides, as static members:
//!
//!   static constexpr const char* name;                   // its JSON "kind", e.g. "wave"
//!   static void validate(const UViTComponent& c);        // checks c.options (unidiffuser::error)
//!   static Shape shape(const UViTComponent& c);          // input shape without the batch
//!   static std::int64_t tokens(const UViTComponent& c);  // tokens it contributes
//!   static std::vector<std::pair<std::string, Shape>> parameters(const UViTComponent& c,
//!                                                                 std::int64_t E);
//!   static std::array<std::int64_t, 2> scratch(const UViTComponent& c, std::int64_t E);
//!   template <class T, class B> static void embed(const Context<B>&, const KindCall<T, B>&,
//!       BatchBlock<const T, B> x,       // [S; 1, numel]  the component's input
//!       BatchBlock<T, B> scratch,       // [S; 1, scratch[0]] kept for embed_backward
//!       BatchBlock<T, B> tokens);       // [S; tokens, E] written
//!   template <class T, class B> static void embed_backward(const Context<B>&,
//!       const KindCall<T, B>&, BatchBlock<const T, B> x, BatchBlock<T, B> scratch,
//!       BatchBlock<const T, B> dtokens,  // adds the parameters' gradients (call.grads)
//!       BatchBlock<T, B> dx);            // [S; 1, numel] written, unless empty (not asked for)
//!   template <class T, class B> static void head(const Context<B>&, const KindCall<T, B>&,
//!       BatchBlock<const T, B> tokens,  // [S; tokens, E] the final-normed tokens
//!       BatchBlock<T, B> scratch,       // [S; 1, scratch[1]] kept for head_backward
//!       BatchBlock<T, B> out);          // [S; 1, numel] written
//!   template <class T, class B> static void head_backward(const Context<B>&,
//!       const KindCall<T, B>&, BatchBlock<const T, B> tokens, BatchBlock<T, B> scratch,
//!       BatchBlock<const T, B> dout,    // [S; 1, numel]
//!       BatchBlock<T, B> dtokens);      // [S; tokens, E] written; parameters' gradients added
//!
//! `S` is the samples of one call (a backend may split the batch; with several threads each
//! runs its own samples). A call's parameters come in the order `parameters()` lists them. A
//! backward may overwrite its scratch (the forward's saved data is not used again).
//! `register_kind<K, Backends...>()` (default: the CPU backend) instantiates the compute side
//! for float and double on each backend listed; registering the same name twice is an error
//! unless it is the same type.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <typeindex>
#include <utility>
#include <vector>

#include "unidiffuser/backend/tags.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/nn/uvit_config.hpp"

namespace unidiffuser::nn {

//! What one call of a kind's compute functions receives besides its activations.
template <class T, class Backend>
struct KindCall {
  const UViTComponent& component;
  std::int64_t embed_dim;
  std::span<const T* const> params;  //!< in parameters() order
  std::span<T* const> grads;         //!< the same order (backward calls only; else empty)
};

//! The compute side of a registered kind for element type T on Backend (type-erased).
template <class T, class Backend>
struct KindOps {
  using Call = KindCall<T, Backend>;
  using In = BatchBlock<const T, Backend>;
  using Out = BatchBlock<T, Backend>;
  void (*embed)(const Context<Backend>&, const Call&, In x, Out scratch, Out tokens) = nullptr;
  void (*embed_backward)(const Context<Backend>&, const Call&, In x, Out scratch, In dtokens,
                         Out dx) = nullptr;
  void (*head)(const Context<Backend>&, const Call&, In tokens, Out scratch, Out out) = nullptr;
  void (*head_backward)(const Context<Backend>&, const Call&, In tokens, Out scratch, In dout,
                        Out dtokens) = nullptr;
};

namespace detail {
template <class T, class Backend>
struct KindOpsTable {
  std::mutex m;
  std::map<std::string, KindOps<T, Backend>> ops;
};
template <class T, class Backend>
KindOpsTable<T, Backend>& kind_ops_table() {
  static KindOpsTable<T, Backend> t;
  return t;
}
inline std::map<std::string, std::type_index>& kind_types() {
  static std::map<std::string, std::type_index> t;
  return t;
}
template <class K, class T, class Backend>
void register_ops() {
  KindOps<T, Backend> o;
  o.embed = [](const Context<Backend>& ctx, const KindCall<T, Backend>& c,
               BatchBlock<const T, Backend> x, BatchBlock<T, Backend> s,
               BatchBlock<T, Backend> tok) { K::template embed<T, Backend>(ctx, c, x, s, tok); };
  o.embed_backward = [](const Context<Backend>& ctx, const KindCall<T, Backend>& c,
                        BatchBlock<const T, Backend> x, BatchBlock<T, Backend> s,
                        BatchBlock<const T, Backend> dt, BatchBlock<T, Backend> dx) {
    K::template embed_backward<T, Backend>(ctx, c, x, s, dt, dx);
  };
  o.head = [](const Context<Backend>& ctx, const KindCall<T, Backend>& c,
              BatchBlock<const T, Backend> tok, BatchBlock<T, Backend> s,
              BatchBlock<T, Backend> out) { K::template head<T, Backend>(ctx, c, tok, s, out); };
  o.head_backward = [](const Context<Backend>& ctx, const KindCall<T, Backend>& c,
                       BatchBlock<const T, Backend> tok, BatchBlock<T, Backend> s,
                       BatchBlock<const T, Backend> dout, BatchBlock<T, Backend> dtok) {
    K::template head_backward<T, Backend>(ctx, c, tok, s, dout, dtok);
  };
  auto& t = kind_ops_table<T, Backend>();
  std::lock_guard<std::mutex> lock(t.m);
  t.ops[K::name] = o;
}
}  // namespace detail

//! Registers kind type K (see the file comment) under K::name for the shape side and, for float
//! and double, on each of `Backends` (default: the CPU backend). Idempotent for the same type.
template <class K, class... Backends>
void register_kind() {
  const std::string name = K::name;
  if (name.empty() || name == "patched_image" || name == "tokens" || name == "custom")
    throw error("nn::register_kind", "name",
                "\"" + name + "\" is empty or the name of a built-in kind");
  {
    auto& t = detail::kind_table();
    std::lock_guard<std::mutex> lock(t.m);
    auto& types = detail::kind_types();
    const auto it = types.find(name);
    if (it != types.end() && it->second != std::type_index(typeid(K)))
      throw error("nn::register_kind", name, "another type is already registered under this name");
    types.emplace(name, std::type_index(typeid(K)));
    KindInfo info;
    info.name = name;
    info.validate = [](const UViTComponent& c) { K::validate(c); };
    info.shape = [](const UViTComponent& c) { return K::shape(c); };
    info.tokens = [](const UViTComponent& c) { return K::tokens(c); };
    info.parameters = [](const UViTComponent& c, std::int64_t E) { return K::parameters(c, E); };
    info.scratch = [](const UViTComponent& c, std::int64_t E) { return K::scratch(c, E); };
    t.kinds[name] = std::move(info);
  }
  if constexpr (sizeof...(Backends) == 0) {
    detail::register_ops<K, float, cpu>();
    detail::register_ops<K, double, cpu>();
  } else {
    (detail::register_ops<K, float, Backends>(), ...);
    (detail::register_ops<K, double, Backends>(), ...);
  }
}

//! The compute side of kind `name` for T on Backend, or an error saying how to register it.
template <class T, class Backend>
const KindOps<T, Backend>& kind_ops(const std::string& name, const std::string& who) {
  auto& t = detail::kind_ops_table<T, Backend>();
  std::lock_guard<std::mutex> lock(t.m);
  const auto it = t.ops.find(name);
  if (it == t.ops.end())
    throw error("UViT", who,
                "component kind \"" + name +
                    "\" has no implementation for this element type and backend (register_kind<" +
                    name + "-type, Backend...>() with this backend)");
  return it->second;  // entries are never removed
}

}  // namespace unidiffuser::nn
