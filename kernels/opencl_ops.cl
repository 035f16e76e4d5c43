/* The OpenCL backend's kernels (GEMM goes to CLBlast). Built once per context and element type real_t. */
#include "portable.h"
#include "conv_pool.h"

/* activation kinds: the codes of the registry in sparkdl_hetero/backends/activations.py (a test compares them) */
#define ACT_SIGMOID 0
#define ACT_TANH 1
#define ACT_RELU 2
#define ACT_LEAKY_RELU 3
#define ACT_IDENTITY 4

KERNEL void fill(const long count, ARR(real_t, a), const real_t value) {
    const long i = ITEM;
    if (i < count) AT(a)[i] = value;
}

/* y += alpha * x */
KERNEL void axpy(const long count, ARR(real_t, y), ARR(const real_t, x), const real_t alpha) {
    const long i = ITEM;
    if (i < count) AT(y)[i] += alpha * AT(x)[i];
}

KERNEL void add(const long count, ARR(real_t, out), ARR(const real_t, a), ARR(const real_t, b)) {
    const long i = ITEM;
    if (i < count) AT(out)[i] = AT(a)[i] + AT(b)[i];
}

KERNEL void mul(const long count, ARR(real_t, out), ARR(const real_t, a), ARR(const real_t, b)) {
    const long i = ITEM;
    if (i < count) AT(out)[i] = AT(a)[i] * AT(b)[i];
}

/* count = rows*cols: y[r, j] += b[j] */
KERNEL void add_row(const long count, ARR(real_t, y), ARR(const real_t, b), const int cols) {
    const long i = ITEM;
    if (i < count) AT(y)[i] += AT(b)[(index_t)i % cols];
}

/* count = cols*chunks: partial[chunk, j] = sum of x[r, j] over the chunk's rows. */
KERNEL void col_sum_partial(const long count, ARR(real_t, partial), ARR(const real_t, x), const long rows, const int cols,
                            const long chunk_rows) {
    const long i = ITEM;
    if (i >= count) return;
    const int j = (int)(i % cols);
    const long start = (i / cols) * chunk_rows;
    const long end = start + chunk_rows < rows ? start + chunk_rows : rows;
    real_t s = (real_t)0, comp = (real_t)0; /* compensated (Kahan) summation */
    for (long r = start; r < end; ++r) {
        const real_t v = AT(x)[r * cols + j] - comp;
        const real_t t = s + v;
        comp = (t - s) - v;
        s = t;
    }
    AT(partial)[i] = s;
}

/* count = cols: out[j] = alpha * sum over chunks of partial[chunk, j] + beta * out[j] (out ignored if beta = 0) */
KERNEL void col_sum_final(const long count, ARR(real_t, out), ARR(const real_t, partial), const int chunks, const real_t alpha,
                          const real_t beta) {
    const long j = ITEM;
    if (j >= count) return;
    real_t s = (real_t)0;
    for (int k = 0; k < chunks; ++k) s += AT(partial)[k * count + j];
    AT(out)[j] = beta == (real_t)0 ? alpha * s : alpha * s + beta * AT(out)[j];
}

/* count = parts: partial[p] = sum of a over the p-th chunk of n elements (the host adds the partials). */
KERNEL void sum_partial(const long count, ARR(real_t, partial), ARR(const real_t, a), const long n, const long chunk) {
    const long p = ITEM;
    if (p >= count) return;
    const long start = p * chunk;
    const long end = start + chunk < n ? start + chunk : n;
    real_t s = (real_t)0, comp = (real_t)0; /* compensated (Kahan) summation */
    for (long i = start; i < end; ++i) {
        const real_t v = AT(a)[i] - comp;
        const real_t t = s + v;
        comp = (t - s) - v;
        s = t;
    }
    AT(partial)[p] = s;
}

DEVICE_FN real_t sigmoid_of(const real_t x) {
    const real_t e = exp(-fabs(x)); /* never overflows */
    return x >= (real_t)0 ? (real_t)1 / ((real_t)1 + e) : e / ((real_t)1 + e);
}

KERNEL void activation(const long count, ARR(real_t, y), ARR(const real_t, x), const int kind, const real_t alpha) {
    const long i = ITEM;
    if (i >= count) return;
    const real_t v = AT(x)[i];
    real_t r = v;
    switch (kind) {
        case ACT_SIGMOID: r = sigmoid_of(v); break;
        case ACT_TANH: r = tanh(v); break;
        case ACT_RELU: r = v > (real_t)0 ? v : (real_t)0; break;
        case ACT_LEAKY_RELU: r = v > (real_t)0 ? v : v * alpha; break;
        default: break;
    }
    AT(y)[i] = r;
}

/* delta * f'(x), from the forward output y = f(x) */
KERNEL void activation_backward(const long count, ARR(real_t, dx), ARR(const real_t, y), ARR(const real_t, delta), const int kind,
                                const real_t alpha) {
    const long i = ITEM;
    if (i >= count) return;
    const real_t v = AT(y)[i];
    const real_t d = AT(delta)[i];
    real_t r = d;
    switch (kind) {
        case ACT_SIGMOID: r = d * v * ((real_t)1 - v); break;
        case ACT_TANH: r = d * ((real_t)1 - v * v); break;
        case ACT_RELU: r = v > (real_t)0 ? d : (real_t)0; break;
        case ACT_LEAKY_RELU: r = v > (real_t)0 ? d : d * alpha; break;
        default: break;
    }
    AT(dx)[i] = r;
}

/* count = rows: a numerically stable row softmax. */
KERNEL void softmax(const long count, ARR(real_t, out), ARR(const real_t, z), const int cols) {
    const long i = ITEM;
    if (i >= count) return;
    const GLOBAL real_t *zr = AT(z) + i * cols;
    GLOBAL real_t *o = AT(out) + i * cols;
    real_t m;
    const real_t lse = row_log_sum_exp(zr, cols, &m);
    for (int j = 0; j < cols; ++j) o[j] = exp(zr[j] - m - lse);
}

/* o = sigmoid(z), e = o - t: sq[i] = e^2 (the host halves the sum), delta[i] = e * o * (1 - o) * scale */
KERNEL void sigmoid_sq(const long count, ARR(real_t, sq), ARR(real_t, delta), ARR(const real_t, z), ARR(const real_t, t),
                       const real_t scale) {
    const long i = ITEM;
    if (i >= count) return;
    const real_t o = sigmoid_of(AT(z)[i]);
    const real_t e = o - AT(t)[i];
    AT(sq)[i] = e * e;
    AT(delta)[i] = e * o * ((real_t)1 - o) * scale;
}

/* count = rows: r = sqrt(mean_j (a - b)^2); delta = scale * (a - b) / (cols * r), 0 where r = 0 */
KERNEL void row_rmse(const long count, ARR(real_t, r), ARR(real_t, delta), ARR(const real_t, a), ARR(const real_t, b), const int cols,
                     const real_t scale) {
    const long i = ITEM;
    if (i >= count) return;
    const GLOBAL real_t *ar = AT(a) + i * cols;
    const GLOBAL real_t *br = AT(b) + i * cols;
    GLOBAL real_t *dr = AT(delta) + i * cols;
    real_t s = (real_t)0;
    for (int j = 0; j < cols; ++j) s += (ar[j] - br[j]) * (ar[j] - br[j]);
    const real_t rms = sqrt(s / (real_t)cols);
    const real_t inv = rms > (real_t)0 ? scale / ((real_t)cols * rms) : (real_t)0;
    for (int j = 0; j < cols; ++j) dr[j] = (ar[j] - br[j]) * inv;
    AT(r)[i] = rms;
}
