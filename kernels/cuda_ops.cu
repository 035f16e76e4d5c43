/* The CuPy backend's own kernels (cuBLAS and cupy's element-wise ops do the rest). The kernel text is shared
 * with the OpenCL backend (conv_pool.h), so the CPU OpenCL device tests the same code. real_t defaults to float;
 * the backend builds it once per element type with -DREAL=float / -DREAL=double. */
#include "portable.h"
#include "conv_pool.h"
