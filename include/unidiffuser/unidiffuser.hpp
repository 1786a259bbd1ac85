// SPDX-License-Identifier: Apache-2.0
//! \file unidiffuser.hpp
//! Umbrella header: the whole public API on the CPU backend — tensors, schedules, K-group
//! diffusion, tasks and guidance, samplers, the U-ViT (config, network, noise predictor),
//! checkpoints, optimisation and the trainer. Not included: the CUDA backend
//! (backend/cuda/*.cuh, for nvcc translation units), the MPI gradient reducer (train/mpi.hpp,
//! needs MPI) and the double-precision reference backend (backend/reference/*). Prefer the
//! fine-grained headers in code that cares about compile time.
#pragma once

#include "unidiffuser/backend/cpu/ops.hpp"
#include "unidiffuser/backend/tags.hpp"
#include "unidiffuser/config.hpp"
#include "unidiffuser/core/dtype.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/rng.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/diffusion/forward.hpp"
#include "unidiffuser/diffusion/groups.hpp"
#include "unidiffuser/diffusion/guidance.hpp"
#include "unidiffuser/diffusion/noise.hpp"
#include "unidiffuser/diffusion/objective.hpp"
#include "unidiffuser/diffusion/pipeline.hpp"
#include "unidiffuser/diffusion/task.hpp"
#include "unidiffuser/io/checkpoint.hpp"
#include "unidiffuser/io/safetensors.hpp"
#include "unidiffuser/nn/component_kind.hpp"
#include "unidiffuser/nn/time_embedding.hpp"
#include "unidiffuser/nn/uvit.hpp"
#include "unidiffuser/nn/uvit_config.hpp"
#include "unidiffuser/nn/uvit_predictor.hpp"
#include "unidiffuser/oracle/gaussian_oracle.hpp"
#include "unidiffuser/sampler/ddim.hpp"
#include "unidiffuser/sampler/dpm_solver.hpp"
#include "unidiffuser/sampler/timesteps.hpp"
#include "unidiffuser/schedule/discrete.hpp"
#include "unidiffuser/schedule/vp.hpp"
#include "unidiffuser/train/optim.hpp"
#include "unidiffuser/train/trainer.hpp"
