/* The row kernels compiled for baseline (flags in setup.py). */
#define FX_ISA baseline
#define FX_ISA_NAME "baseline"
#include "kernels_isa.h"
