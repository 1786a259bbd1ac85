// SPDX-License-Identifier: Apache-2.0
//! \file ops.hpp
//! Every backend's primitives: code above the backend layer (nn/, diffusion/, sampler/) includes
//! this header and calls `ops::name(ctx, ...)`; overload resolution on the context type selects
//! the backend (the pattern of Thrust's execution policies). The CUDA backend's primitives join
//! here in translation units compiled by nvcc.
#pragma once

#include "unidiffuser/backend/common.hpp"
#include "unidiffuser/backend/cpu/nn.hpp"
#include "unidiffuser/backend/cpu/ops.hpp"
#include "unidiffuser/backend/cpu/optim.hpp"
#include "unidiffuser/backend/reference/nn.hpp"
#include "unidiffuser/backend/reference/ops.hpp"
#include "unidiffuser/backend/tags.hpp"
#if defined(__CUDACC__)
#include "unidiffuser/backend/cuda/nn.cuh"
#include "unidiffuser/backend/cuda/ops.cuh"
#endif
