// See include/allocation_counter.h. Each function forwards to glibc's __libc_* entry point; freeing is
// never counted, so the numbers are what was asked for, not what is live. Calls made by OpenBLAS itself
// (its per-call work buffers) are counted apart, by the caller's address.
#define _GNU_SOURCE
#include "allocation_counter.h"
#include <errno.h>
#include <link.h>
#include <stdatomic.h>
#include <string.h>

#if defined(__GLIBC__)
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

static _Atomic uint64_t calls, bytes, blasCalls, blasBytes;
static _Atomic int active;
static uintptr_t blasStart, blasEnd;

static int findBLAS(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size; (void)data;
    if (!info->dlpi_name || !strstr(info->dlpi_name, "openblas")) return 0;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *p = &info->dlpi_phdr[i];
        if (p->p_type != PT_LOAD || !(p->p_flags & PF_X)) continue;
        blasStart = info->dlpi_addr + p->p_vaddr;
        blasEnd = blasStart + p->p_memsz;
    }
    return 1;
}

__attribute__((constructor)) static void locateBLAS(void) { dl_iterate_phdr(findBLAS, NULL); }

static inline void count(size_t n, void *caller) {
    uintptr_t c = (uintptr_t)caller;
    if (c >= blasStart && c < blasEnd) {
        atomic_fetch_add_explicit(&blasCalls, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&blasBytes, n, memory_order_relaxed);
    } else {
        atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&bytes, n, memory_order_relaxed);
    }
    atomic_store_explicit(&active, 1, memory_order_relaxed);
}

#define CALLER __builtin_return_address(0)
void *malloc(size_t n) { count(n, CALLER); return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { count(a * b, CALLER); return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { count(n, CALLER); return __libc_realloc(p, n); }
void *memalign(size_t alignment, size_t n) { count(n, CALLER); return __libc_memalign(alignment, n); }
void *aligned_alloc(size_t alignment, size_t n) { count(n, CALLER); return __libc_memalign(alignment, n); }
int posix_memalign(void **out, size_t alignment, size_t n) {
    count(n, CALLER);
    void *p = __libc_memalign(alignment, n);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}
void free(void *p) { __libc_free(p); }

uint64_t qlora_allocation_count(void) { return atomic_load(&calls); }
uint64_t qlora_allocated_bytes(void) { return atomic_load(&bytes); }
uint64_t qlora_blas_allocation_count(void) { return atomic_load(&blasCalls); }
uint64_t qlora_blas_allocated_bytes(void) { return atomic_load(&blasBytes); }
int qlora_allocation_counter_active(void) { return atomic_load(&active); }
#else
uint64_t qlora_allocation_count(void) { return 0; }
uint64_t qlora_allocated_bytes(void) { return 0; }
uint64_t qlora_blas_allocation_count(void) { return 0; }
uint64_t qlora_blas_allocated_bytes(void) { return 0; }
int qlora_allocation_counter_active(void) { return 0; }
#endif
