/* Kernels shared by the OpenCL (opencl_ops.cl) and CUDA (cuda_ops.cu) backends: convolution lowering,
 * pooling and the fused softmax cross-entropy. Images are NHWC and contiguous; im2col rows are (n, oh, ow)
 * and columns (kh, kw, c). A work item handles all channels of one pixel (or one kernel row), so that index
 * arithmetic is paid per pixel and the inner loops run over contiguous memory. Backward passes gather (one work
 * item per input pixel) instead of scattering, so they need no atomics and are deterministic. Include
 * portable.h first. */
#ifndef SPARKDL_CONV_POOL_H
#define SPARKDL_CONV_POOL_H

/* First and last output positions (clipped to [0, out)) of the windows of size k, sliding by stride, that cover
 * input position `pos` (in padded coordinates). */
#define WINDOW_FIRST(pos, k, stride) ((pos) - (k) + 1 <= 0 ? 0 : ((pos) - (k) + (stride)) / (stride))
#define WINDOW_LAST(pos, stride, out) ((pos) / (stride) < (out) - 1 ? (pos) / (stride) : (out) - 1)

/* Declares the coordinates of pixel e of an (n, height, width) grid, e = (b * height + row) * width + col:
 * `const int col`, `const int row` and `const index_t b`, under the names given. */
#define PIXEL_COORDS(e, height, width, b, row, col) \
    const int col = (e) % (width);                  \
    const int row = (e) / (width) % (height);       \
    const index_t b = (e) / (width) / (height)

/* Sets the c channels of pixel e of the NHWC tensor a to zero and returns a pointer to them: the gathering backward
 * passes accumulate into it. */
DEVICE_FN GLOBAL real_t *zeroed_pixel(GLOBAL real_t *a, const index_t e, const int c) {
    GLOBAL real_t *p = a + e * c;
    for (int ch = 0; ch < c; ++ch) p[ch] = (real_t)0;
    return p;
}

/* Returns lse = log(sum_j exp(zr[j] - m)) and stores in *m the maximum m of the row zr[0..cols): then
 * log_softmax(z)_j = zr[j] - m - lse, with nothing overflowing. */
DEVICE_FN real_t row_log_sum_exp(const GLOBAL real_t *zr, const int cols, real_t *m) {
    real_t mx = zr[0];
    for (int j = 1; j < cols; ++j) mx = zr[j] > mx ? zr[j] : mx;
    real_t s = (real_t)0;
    for (int j = 0; j < cols; ++j) s += exp(zr[j] - mx);
    *m = mx;
    return log(s);
}

/* count = n*oh*ow*kh: one kernel row of one output position each, kw*c contiguous column values (zeros where
 * the window reaches into the padding). */
KERNEL void im2col(const long count, ARR(real_t, cols), ARR(const real_t, x), const int h, const int w, const int c,
                   const int kh, const int kw, const int stride, const int pad, const int oh, const int ow) {
    const long i = ITEM;
    if (i >= count) return;
    const index_t e = (index_t)i;
    const int ki = e % kh;
    PIXEL_COORDS(e / kh, oh, ow, b, oi, oj);
    const int y = oi * stride - pad + ki;
    const int x0 = oj * stride - pad;
    GLOBAL real_t *dst = AT(cols) + e * kw * c;
    const GLOBAL real_t *src = AT(x) + (b * h + y) * w * c;
    for (int kj = 0; kj < kw; ++kj) {
        const int xx = x0 + kj;
        const int inside = y >= 0 && y < h && xx >= 0 && xx < w;
        for (int ch = 0; ch < c; ++ch) dst[kj * c + ch] = inside ? src[xx * c + ch] : (real_t)0;
    }
}

/* count = n*h*w: the adjoint of im2col for one pixel (all channels): the sum of every column value read from it. */
KERNEL void col2im(const long count, ARR(real_t, dx), ARR(const real_t, cols), const int h, const int w, const int c,
                   const int kh, const int kw, const int stride, const int pad, const int oh, const int ow) {
    const long i = ITEM;
    if (i >= count) return;
    const index_t e = (index_t)i;
    PIXEL_COORDS(e, h, w, b, y, xx);
    GLOBAL real_t *out = zeroed_pixel(AT(dx), e, c);
    const int py = y + pad, px = xx + pad;
    const int oi_last = WINDOW_LAST(py, stride, oh), oj_last = WINDOW_LAST(px, stride, ow);
    for (int oi = WINDOW_FIRST(py, kh, stride); oi <= oi_last; ++oi) {
        const int ki = py - oi * stride;
        for (int oj = WINDOW_FIRST(px, kw, stride); oj <= oj_last; ++oj) {
            const int kj = px - oj * stride;
            const GLOBAL real_t *src = AT(cols) + ((((b * oh + oi) * ow + oj) * kh + ki) * kw + kj) * c;
            for (int ch = 0; ch < c; ++ch) out[ch] += src[ch];
        }
    }
}

/* count = n*oh*ow: per channel, the window maximum and its position p = di*k + dj in the padded window (the first
 * one on ties); positions in the padding are skipped (pad <= k/2: every window holds an input pixel). */
KERNEL void maxpool(const long count, ARR(real_t, y), ARR(int, idx), ARR(const real_t, x), const int h, const int w,
                    const int c, const int k, const int stride, const int pad, const int oh, const int ow) {
    const long i = ITEM;
    if (i >= count) return;
    const index_t e = (index_t)i;
    PIXEL_COORDS(e, oh, ow, b, oi, oj);
    const int y0 = oi * stride - pad, x0 = oj * stride - pad;
    const GLOBAL real_t *img = AT(x) + b * h * w * c;
    for (int ch = 0; ch < c; ++ch) {
        real_t best = (real_t)0;
        int arg = -1;
        for (int di = 0; di < k; ++di) {
            const int yy = y0 + di;
            if (yy < 0 || yy >= h) continue;
            for (int dj = 0; dj < k; ++dj) {
                const int xx = x0 + dj;
                if (xx < 0 || xx >= w) continue;
                const real_t v = img[(yy * w + xx) * c + ch];
                if (arg < 0 || v > best) {
                    best = v;
                    arg = di * k + dj;
                }
            }
        }
        AT(y)[e * c + ch] = best;
        AT(idx)[e * c + ch] = arg;
    }
}

/* count = n*h*w: per channel, the sum of dy over the windows whose maximum was this pixel. */
KERNEL void maxpool_backward(const long count, ARR(real_t, dx), ARR(const real_t, dy), ARR(const int, idx), const int h,
                             const int w, const int c, const int k, const int stride, const int pad, const int oh,
                             const int ow) {
    const long i = ITEM;
    if (i >= count) return;
    const index_t e = (index_t)i;
    PIXEL_COORDS(e, h, w, b, y, xx);
    GLOBAL real_t *out = zeroed_pixel(AT(dx), e, c);
    const int py = y + pad, px = xx + pad;
    const int oi_last = WINDOW_LAST(py, stride, oh), oj_last = WINDOW_LAST(px, stride, ow);
    for (int oi = WINDOW_FIRST(py, k, stride); oi <= oi_last; ++oi) {
        for (int oj = WINDOW_FIRST(px, k, stride); oj <= oj_last; ++oj) {
            const int p = (py - oi * stride) * k + (px - oj * stride);
            const index_t o = ((b * oh + oi) * ow + oj) * c;
            for (int ch = 0; ch < c; ++ch) {
                if (AT(idx)[o + ch] == p) out[ch] += AT(dy)[o + ch];
            }
        }
    }
}

/* count = n*oh*ow: per channel, the window sum over k*k (zeros in the padding count: count_include_pad). */
KERNEL void avgpool(const long count, ARR(real_t, y), ARR(const real_t, x), const int h, const int w, const int c,
                    const int k, const int stride, const int pad, const int oh, const int ow) {
    const long i = ITEM;
    if (i >= count) return;
    const index_t e = (index_t)i;
    PIXEL_COORDS(e, oh, ow, b, oi, oj);
    const int y0 = oi * stride - pad, x0 = oj * stride - pad;
    const GLOBAL real_t *img = AT(x) + b * h * w * c;
    const real_t inv = (real_t)1 / (real_t)(k * k);
    for (int ch = 0; ch < c; ++ch) {
        real_t s = (real_t)0;
        for (int di = 0; di < k; ++di) {
            const int yy = y0 + di;
            if (yy < 0 || yy >= h) continue;
            for (int dj = 0; dj < k; ++dj) {
                const int xx = x0 + dj;
                if (xx >= 0 && xx < w) s += img[(yy * w + xx) * c + ch];
            }
        }
        AT(y)[e * c + ch] = s * inv;
    }
}

/* count = n*h*w: per channel, the sum of dy / k^2 over the windows covering this pixel. */
KERNEL void avgpool_backward(const long count, ARR(real_t, dx), ARR(const real_t, dy), const int h, const int w,
                             const int c, const int k, const int stride, const int pad, const int oh, const int ow) {
    const long i = ITEM;
    if (i >= count) return;
    const index_t e = (index_t)i;
    PIXEL_COORDS(e, h, w, b, y, xx);
    const real_t inv = (real_t)1 / (real_t)(k * k);
    GLOBAL real_t *out = zeroed_pixel(AT(dx), e, c);
    const int py = y + pad, px = xx + pad;
    const int oi_last = WINDOW_LAST(py, stride, oh), oj_last = WINDOW_LAST(px, stride, ow);
    for (int oi = WINDOW_FIRST(py, k, stride); oi <= oi_last; ++oi) {
        for (int oj = WINDOW_FIRST(px, k, stride); oj <= oj_last; ++oj) {
            const GLOBAL real_t *g = AT(dy) + ((b * oh + oi) * ow + oj) * c;
            for (int ch = 0; ch < c; ++ch) out[ch] += g[ch] * inv;
        }
    }
}

/* count = n*c: the mean of channel ch of image b over its hw pixels. */
KERNEL void global_avgpool(const long count, ARR(real_t, y), ARR(const real_t, x), const int hw, const int c) {
    const long i = ITEM;
    if (i >= count) return;
    const index_t e = (index_t)i;
    const int ch = e % c;
    const GLOBAL real_t *src = AT(x) + (e / c) * hw * c + ch;
    real_t s = (real_t)0;
    for (int p = 0; p < hw; ++p) s += src[p * c];
    AT(y)[e] = s / (real_t)hw;
}

/* count = n*hw*c: dx[b, pixel, ch] = dy[b, ch] / hw. */
KERNEL void global_avgpool_backward(const long count, ARR(real_t, dx), ARR(const real_t, dy), const int hw, const int c) {
    const long i = ITEM;
    if (i >= count) return;
    const index_t e = (index_t)i;
    AT(dx)[e] = AT(dy)[e / (hw * c) * c + e % c] / (real_t)hw;
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
    real_t m;
    const real_t lse = row_log_sum_exp(zr, cols, &m);
    real_t l = (real_t)0;
    for (int j = 0; j < cols; ++j) {
        const real_t lp = zr[j] - m - lse;
        l -= tr[j] * lp;
        dr[j] = (exp(lp) - tr[j]) * scale;
    }
    AT(loss)[i] = l;
}

#endif
