// SPDX-License-Identifier: Apache-2.0
//! \file mpi.hpp
//! Data-parallel training over MPI: a train::Reducer whose sums are MPI_Allreduce over a
//! communicator. Each process runs a Trainer with the reducer on its share of every global batch
//! (Trainer takes rank and world from it); after the local backward passes the gradient buffer
//! and the loss sums are summed in place, so every process applies the same update. Needs MPI
//! (CMake: the library finds it and defines UNIDIFFUSER_WITH_MPI for targets linking
//! unidiffuser::mpi).
#pragma once

#if !defined(UNIDIFFUSER_WITH_MPI)
#error \
    "unidiffuser/train/mpi.hpp needs MPI: link the unidiffuser::mpi target (found when CMake finds MPI)"
#endif

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

#include "unidiffuser/core/error.hpp"
#include "unidiffuser/train/trainer.hpp"

namespace unidiffuser::train {

namespace detail {
template <class T>
void mpi_sum(MPI_Comm comm, MPI_Datatype type, T* data, std::int64_t n) {
  for (std::int64_t done = 0; done < n;) {  // counts are int: INT_MAX elements per call
    const int count = static_cast<int>(std::min<std::int64_t>(n - done, INT_MAX));
    const int rc = MPI_Allreduce(MPI_IN_PLACE, data + done, count, type, MPI_SUM, comm);
    if (rc != MPI_SUCCESS) {
      char msg[MPI_MAX_ERROR_STRING];
      int len = 0;
      MPI_Error_string(rc, msg, &len);
      throw error("train::mpi_reducer", "MPI_Allreduce",
                  std::string(msg, static_cast<std::size_t>(len)));
    }
    done += count;
  }
}
}  // namespace detail

//! A Reducer over `comm` (MPI must be initialised and outlive the reducer's use).
inline Reducer mpi_reducer(MPI_Comm comm = MPI_COMM_WORLD) {
  Reducer r;
  MPI_Comm_rank(comm, &r.rank);
  MPI_Comm_size(comm, &r.world);
  r.sum_f32 = [comm](float* d, std::int64_t n) { detail::mpi_sum(comm, MPI_FLOAT, d, n); };
  r.sum_f64 = [comm](double* d, std::int64_t n) { detail::mpi_sum(comm, MPI_DOUBLE, d, n); };
  return r;
}

}  // namespace unidiffuser::train
