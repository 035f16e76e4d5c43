/* Kernels shared by the OpenCL (opencl_ops.cl) and CUDA (cuda_ops.cu) backends: convolution lowering,
 * pooling and the fused softmax cross-entropy. Images are NHWC and contiguous; im2col rows are (n, oh, ow)
 * and columns (kh, kw, c). Backward passes gather (one work item per input element) instead of scattering,
 * so they need no atomics and are deterministic. Include portable.h first. */
#ifndef SPARKDL_CONV_POOL_H
#define SPARKDL_CONV_POOL_H

/* count = n*oh*ow*kh*kw*c: one column element each, zero where the window reaches into the padding. */
KERNEL void im2col(const long count, ARR(real_t, cols), ARR(const real_t, x), const int h, const int w, const int c,
                   const int kh, const int kw, const int stride, const int pad, const int oh, const int ow) {
    const long i = ITEM;
    if (i >= count) return;
    const int ch = (index_t)i % c;
    index_t r = (index_t)i / c;
    const int kj = r % kw; r /= kw;
    const int ki = r % kh; r /= kh;
    const int oj = r % ow; r /= ow;
    const int oi = r % oh;
    const index_t b = r / oh;
    const int y = oi * stride - pad + ki;
    const int xx = oj * stride - pad + kj;
    real_t v = (real_t)0;
    if (y >= 0 && y < h && xx >= 0 && xx < w) v = AT(x)[((b * h + y) * w + xx) * c + ch];
    AT(cols)[i] = v;
}

/* count = n*h*w*c: the adjoint of im2col, summing every column element that was read from this pixel. */
KERNEL void col2im(const long count, ARR(real_t, dx), ARR(const real_t, cols), const int h, const int w, const int c,
                   const int kh, const int kw, const int stride, const int pad, const int oh, const int ow) {
    const long i = ITEM;
    if (i >= count) return;
    const int ch = (index_t)i % c;
    index_t r = (index_t)i / c;
    const int xx = r % w; r /= w;
    const int y = r % h;
    const index_t b = r / h;
    const GLOBAL real_t *src = AT(cols);
    real_t s = (real_t)0;
    for (int ki = 0; ki < kh; ++ki) {
        const int ty = y + pad - ki;
        if (ty < 0) break;
        if (ty % stride != 0 || ty / stride >= oh) continue;
        const int oi = ty / stride;
        for (int kj = 0; kj < kw; ++kj) {
            const int tx = xx + pad - kj;
            if (tx < 0) break;
            if (tx % stride != 0 || tx / stride >= ow) continue;
            const int oj = tx / stride;
            s += src[((((b * oh + oi) * ow + oj) * kh + ki) * kw + kj) * c + ch];
        }
    }
    AT(dx)[i] = s;
}

/* count = n*oh*ow*c: the window maximum and its position p = di*k + dj (the first one on ties). */
KERNEL void maxpool(const long count, ARR(real_t, y), ARR(int, idx), ARR(const real_t, x), const int h, const int w,
                    const int c, const int k, const int stride, const int oh, const int ow) {
    const long i = ITEM;
    if (i >= count) return;
    const int ch = (index_t)i % c;
    index_t r = (index_t)i / c;
    const int oj = r % ow; r /= ow;
    const int oi = r % oh;
    const index_t b = r / oh;
    const GLOBAL real_t *win = AT(x) + ((b * h + oi * stride) * w + oj * stride) * c + ch;
    real_t best = win[0];
    int arg = 0;
    for (int p = 1; p < k * k; ++p) {
        const real_t v = win[((p / k) * w + p % k) * c];
        if (v > best) {
            best = v;
            arg = p;
        }
    }
    AT(y)[i] = best;
    AT(idx)[i] = arg;
}

/* count = n*h*w*c: the sum of dy over the windows whose maximum was this pixel. */
KERNEL void maxpool_backward(const long count, ARR(real_t, dx), ARR(const real_t, dy), ARR(const int, idx), const int h,
                             const int w, const int c, const int k, const int stride, const int oh,
                             const int ow) {
    const long i = ITEM;
    if (i >= count) return;
    const int ch = (index_t)i % c;
    index_t r = (index_t)i / c;
    const int xx = r % w; r /= w;
    const int y = r % h;
    const index_t b = r / h;
    real_t s = (real_t)0;
    for (int oi = y / stride; oi >= 0 && oi * stride + k > y; --oi) {
        if (oi >= oh) continue;
        for (int oj = xx / stride; oj >= 0 && oj * stride + k > xx; --oj) {
            if (oj >= ow) continue;
            const index_t o = ((b * oh + oi) * ow + oj) * c + ch;
            if (AT(idx)[o] == (y - oi * stride) * k + (xx - oj * stride)) s += AT(dy)[o];
        }
    }
    AT(dx)[i] = s;
}

/* count = n*oh*ow*c: the window mean. */
KERNEL void avgpool(const long count, ARR(real_t, y), ARR(const real_t, x), const int h, const int w, const int c,
                    const int k, const int stride, const int oh, const int ow) {
    const long i = ITEM;
    if (i >= count) return;
    const int ch = (index_t)i % c;
    index_t r = (index_t)i / c;
    const int oj = r % ow; r /= ow;
    const int oi = r % oh;
    const index_t b = r / oh;
    const GLOBAL real_t *win = AT(x) + ((b * h + oi * stride) * w + oj * stride) * c + ch;
    real_t s = (real_t)0;
    for (int p = 0; p < k * k; ++p) s += win[((p / k) * w + p % k) * c];
    AT(y)[i] = s * ((real_t)1 / (real_t)(k * k));
}

/* count = n*h*w*c: the sum of dy / k^2 over the windows covering this pixel. */
KERNEL void avgpool_backward(const long count, ARR(real_t, dx), ARR(const real_t, dy), const int h, const int w,
                             const int c, const int k, const int stride, const int oh, const int ow) {
    const long i = ITEM;
    if (i >= count) return;
    const int ch = (index_t)i % c;
    index_t r = (index_t)i / c;
    const int xx = r % w; r /= w;
    const int y = r % h;
    const index_t b = r / h;
    const real_t inv = (real_t)1 / (real_t)(k * k);
    real_t s = (real_t)0;
    for (int oi = y / stride; oi >= 0 && oi * stride + k > y; --oi) {
        if (oi >= oh) continue;
        for (int oj = xx / stride; oj >= 0 && oj * stride + k > xx; --oj) {
            if (oj < ow) s += AT(dy)[((b * oh + oi) * ow + oj) * c + ch] * inv;
        }
    }
    AT(dx)[i] = s;
}

/* count = rows: per row, loss = -sum t * log_softmax(z) and delta = (softmax(z) - t) * scale, through the
 * log-sum-exp of the shifted row so that nothing overflows and an underflowing probability stays finite. */
KERNEL void softmax_xent(const long count, ARR(real_t, loss), ARR(real_t, delta), ARR(const real_t, z), ARR(const real_t, t),
                         const int cols, const real_t scale) {
    const long i = ITEM;
    if (i >= count) return;
    const GLOBAL real_t *zr = AT(z) + i * cols;
    const GLOBAL real_t *tr = AT(t) + i * cols;
    GLOBAL real_t *dr = AT(delta) + i * cols;
    real_t m = zr[0];
    for (int j = 1; j < cols; ++j) m = zr[j] > m ? zr[j] : m;
    real_t s = (real_t)0;
    for (int j = 0; j < cols; ++j) s += exp(zr[j] - m);
    const real_t lse = log(s);
    real_t l = (real_t)0;
    for (int j = 0; j < cols; ++j) {
        const real_t lp = zr[j] - m - lse;
        l -= tr[j] * lp;
        dr[j] = (exp(lp) - tr[j]) * scale;
    }
    AT(loss)[i] = l;
}

#endif
