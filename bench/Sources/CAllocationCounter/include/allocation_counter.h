// A measuring instrument for qlora-bench only (never linked into the library or the CLI): the bench
// binary defines malloc and friends, which count calls and requested bytes and hand the work to
// glibc's own allocator, so a benchmark can report how much a training step allocates.
#pragma once
#include <stddef.h>
#include <stdint.h>

/// Calls and bytes requested by everything but OpenBLAS.
uint64_t qlora_allocation_count(void);
uint64_t qlora_allocated_bytes(void);
/// Calls and bytes requested by OpenBLAS's own code (its work buffers).
uint64_t qlora_blas_allocation_count(void);
uint64_t qlora_blas_allocated_bytes(void);
/// 1 once this process's malloc has been the counting one (glibc: the symbols are interposed), else 0.
int qlora_allocation_counter_active(void);
