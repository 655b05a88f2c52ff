/* The row kernels compiled for avx512 (flags in setup.py). */
#define FX_ISA avx512
#define FX_ISA_NAME "avx512"
#include "kernels_isa.h"
