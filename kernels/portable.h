/* Portability layer: the same kernel text compiles as OpenCL C and as CUDA C++.
 *
 * Conventions shared by every kernel (the launchers in sparkdl_hetero/backends rely on them):
 * - real_t is the element type: REAL (float or double), set by the launcher with -DREAL=...;
 * - every array argument is a pair (pointer, element offset): ARR(T, x) declares it, AT(x) gives the
 *   pointer to the first element (the OpenCL backend passes buffer + offset of a view, CUDA passes 0);
 * - every kernel is 1-D over `count` work items and returns when ITEM >= count;
 * - DEVICE_FN declares a helper function that kernels call (inlined by both compilers);
 * - index_t (32-bit) indexes elements within one tensor: launchers reject tensors of 2^31 or more elements.
 */
#ifndef SPARKDL_PORTABLE_H
#define SPARKDL_PORTABLE_H

#ifndef REAL
#define REAL float
#endif

#ifdef __OPENCL_VERSION__
#if defined(cl_khr_fp64)
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif
#define KERNEL __kernel
#define DEVICE_FN inline
#define GLOBAL __global
#define ITEM ((long)get_global_id(0))
#else
#define KERNEL extern "C" __global__
#define DEVICE_FN __device__ inline
#define GLOBAL
#define ITEM ((long)blockIdx.x * (long)blockDim.x + (long)threadIdx.x)
#endif

#define ARR(type, name) GLOBAL type *name##_base, const long name##_off
#define AT(name) (name##_base + name##_off)

typedef REAL real_t;
typedef int index_t;

#endif
