// OpenBLAS's CBLAS interface (Debian: libopenblas-dev puts cblas.h on the multiarch include path).
#include <cblas.h>

#include <stddef.h>

/* LAPACK's divide-and-conquer SVD, which OpenBLAS ships (no LAPACKE there): column-major, Fortran's calling convention
   (every argument by reference; gfortran passes the length of the character argument last). */
void dgesdd_(const char *jobz, const int *m, const int *n, double *a, const int *lda, double *s, double *u, const int *ldu,
             double *vt, const int *ldvt, double *work, const int *lwork, int *iwork, int *info, size_t jobz_length);
