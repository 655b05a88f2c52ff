/* The row kernels compiled for avx2 (flags in setup.py). */
#define FX_ISA avx2
#define FX_ISA_NAME "avx2"
#include "kernels_isa.h"
