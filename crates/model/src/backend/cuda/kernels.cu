// switchyard's CUDA kernels, compiled at run time with NVRTC (no toolkit needed at build time).
//
// Activations are f32. Weights stay in their stored dtype: f32, or 16-bit bf16 / f16 passed as
// raw `unsigned short` (conversions are written out below, so no CUDA header is needed and the
// source also parses as plain C++ for the host-side syntax test). Every kernel is `extern "C"`
// so the host can look it up by name; the names are listed in `kernels.rs`.

typedef unsigned short u16;
typedef unsigned int u32;

// -inf without math.h (NVRTC has no standard headers).
#define NEG_INF (__int_as_float(0xff800000))

// ---- dtype conversions -------------------------------------------------------------------

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    u32 sign = ((u32)(h & 0x8000u)) << 16;
    u32 exp = (h >> 10) & 0x1fu;
    u32 mant = h & 0x3ffu;
    if (exp == 0) {
        // Zero or subnormal: mant * 2^-24.
        float f = (float)mant * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    if (exp == 31) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
    return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even, NaN kept quiet.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// Round to nearest even; overflow becomes infinity, tiny values become subnormals.
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u32 x = __float_as_uint(f);
    u32 sign = (x >> 16) & 0x8000u;
    u32 ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (u16)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) return (u16)(sign | 0x7c00u);
    if (ax < 0x38800000u) {
        u32 r = (u32)rintf(__uint_as_float(ax) * 16777216.0f);
        return (u16)(sign | r);
    }
    u32 r = ax - 0x38000000u;
    r = (r + 0x0fffu + ((r >> 13) & 1u)) >> 13;
    return (u16)(sign | r);
}

struct LoadF32 { typedef float T; static __device__ __forceinline__ float at(const float* p, long i) { return p[i]; } };
struct LoadBf16 { typedef u16 T; static __device__ __forceinline__ float at(const u16* p, long i) { return bf16_to_f32(p[i]); } };
struct LoadF16 { typedef u16 T; static __device__ __forceinline__ float at(const u16* p, long i) { return f16_to_f32(p[i]); } };

// ---- casts for the GEMM inputs -----------------------------------------------------------

extern "C" __global__ void cast_f32_bf16(const float* x, u16* y, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void cast_f32_f16(const float* x, u16* y, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = f32_to_f16(x[i]);
}

// ---- embedding: out[r] = table[ids[r]] widened to f32 -------------------------------------

template <class L>
__device__ void embedding_impl(const typename L::T* table, const u32* ids, float* out, int rows, int width) {
    long n = (long)rows * width;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / width, c = i % width;
        out[i] = L::at(table, (long)ids[r] * width + c);
    }
}
extern "C" __global__ void embedding_f32(const float* t, const u32* ids, float* out, int rows, int width) { embedding_impl<LoadF32>(t, ids, out, rows, width); }
extern "C" __global__ void embedding_bf16(const u16* t, const u32* ids, float* out, int rows, int width) { embedding_impl<LoadBf16>(t, ids, out, rows, width); }
extern "C" __global__ void embedding_f16(const u16* t, const u32* ids, float* out, int rows, int width) { embedding_impl<LoadF16>(t, ids, out, rows, width); }

// ---- block-wide sum (blockDim.x a multiple of 32, at most 1024) ---------------------------

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ float block_sum(float v) {
    __shared__ float part[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (unsigned)warps) ? part[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) part[0] = v;
    __syncthreads();
    return part[0];
}

// ---- RMSNorm: one block per row -----------------------------------------------------------

template <class L>
__device__ void rms_norm_impl(const float* x, const typename L::T* w, float* out, int width, float eps) {
    const float* xr = x + (long)blockIdx.x * width;
    float* orow = out + (long)blockIdx.x * width;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) ss += xr[i] * xr[i];
    float inv = rsqrtf(block_sum(ss) / (float)width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) orow[i] = L::at(w, i) * (xr[i] * inv);
}
extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* out, int width, float eps) { rms_norm_impl<LoadF32>(x, w, out, width, eps); }
extern "C" __global__ void rms_norm_bf16(const float* x, const u16* w, float* out, int width, float eps) { rms_norm_impl<LoadBf16>(x, w, out, width, eps); }
extern "C" __global__ void rms_norm_f16(const float* x, const u16* w, float* out, int width, float eps) { rms_norm_impl<LoadF16>(x, w, out, width, eps); }

// ---- RoPE, rotate-half layout, tables [max_pos, head_dim / 2] -----------------------------

extern "C" __global__ void rope(float* x, const float* cos_t, const float* sin_t, const u32* positions,
                                int rows, int width, int head_dim) {
    int half = head_dim / 2;
    long pairs_per_row = width / 2;
    long n = (long)rows * pairs_per_row;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / pairs_per_row, rem = i % pairs_per_row;
        long head = rem / half, j = rem % half;
        float* h = x + r * width + head * head_dim;
        long t = (long)positions[r] * half + j;
        float c = cos_t[t], s = sin_t[t];
        float x1 = h[j], x2 = h[j + half];
        h[j] = x1 * c - x2 * s;
        h[j + half] = x2 * c + x1 * s;
    }
}

// ---- paged KV cache write: rows of src to positions pos0.. of one sequence ----------------

extern "C" __global__ void kv_write(float* cache, const float* src, const u32* blocks, int rows, int kv_dim,
                                    int pos0, int block_size) {
    long n = (long)rows * kv_dim;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / kv_dim, c = i % kv_dim;
        long pos = pos0 + r;
        long slot = (long)blocks[pos / block_size] * block_size + pos % block_size;
        cache[slot * kv_dim + c] = src[i];
    }
}

// ---- attention over the paged cache ------------------------------------------------------
//
// One block per (query row, head), ATTN_WARPS warps. Each warp walks a strided share of the
// keys with an online softmax (lanes split head_dim), then the warps' partial states merge in
// shared memory. Decode (one query row per sequence) and prefill (many) use the same kernel;
// row_pos / row_blocks give each query row its absolute position and its block table's start
// in the flattened `blocks`.

#define ATTN_WARPS 4
#define ATTN_MAX_HEAD_DIM 256
#define ATTN_PER_LANE (ATTN_MAX_HEAD_DIM / 32)

extern "C" __global__ void attention(const float* q, const float* k_cache, const float* v_cache, float* out,
                                     const u32* row_pos, const u32* row_blocks, const u32* blocks,
                                     int heads, int kv_heads, int head_dim, int block_size, int window,
                                     float scale) {
    __shared__ float s_m[ATTN_WARPS];
    __shared__ float s_l[ATTN_WARPS];
    __shared__ float s_acc[ATTN_WARPS][ATTN_MAX_HEAD_DIM];
    int row = blockIdx.x, head = blockIdx.y;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int group = heads / kv_heads, g = head / group;
    long q_dim = (long)heads * head_dim, kv_dim = (long)kv_heads * head_dim;
    const float* qv = q + row * q_dim + (long)head * head_dim;
    const u32* table = blocks + row_blocks[row];
    long pos = row_pos[row];
    long lo = (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;

    float qr[ATTN_PER_LANE], acc[ATTN_PER_LANE];
    for (int t = 0; t < ATTN_PER_LANE; t++) {
        int d = lane + 32 * t;
        qr[t] = d < head_dim ? qv[d] : 0.0f;
        acc[t] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (long j = lo + warp; j <= pos; j += ATTN_WARPS) {
        long slot = (long)table[j / block_size] * block_size + j % block_size;
        const float* kr = k_cache + slot * kv_dim + (long)g * head_dim;
        const float* vr = v_cache + slot * kv_dim + (long)g * head_dim;
        float dot = 0.0f;
        for (int t = 0; t < ATTN_PER_LANE; t++) {
            int d = lane + 32 * t;
            if (d < head_dim) dot += qr[t] * kr[d];
        }
        float s = warp_sum(dot) * scale;
        float m_new = fmaxf(m, s);
        float corr = __expf(m - m_new);
        float p = __expf(s - m_new);
        l = l * corr + p;
        for (int t = 0; t < ATTN_PER_LANE; t++) {
            int d = lane + 32 * t;
            acc[t] = acc[t] * corr + (d < head_dim ? p * vr[d] : 0.0f);
        }
        m = m_new;
    }
    if (lane == 0) { s_m[warp] = m; s_l[warp] = l; }
    for (int t = 0; t < ATTN_PER_LANE; t++) {
        int d = lane + 32 * t;
        if (d < head_dim) s_acc[warp][d] = acc[t];
    }
    __syncthreads();
    float big = NEG_INF;
    for (int w = 0; w < ATTN_WARPS; w++) big = fmaxf(big, s_m[w]);
    float total = 0.0f;
    for (int w = 0; w < ATTN_WARPS; w++) total += s_m[w] == NEG_INF ? 0.0f : s_l[w] * __expf(s_m[w] - big);
    float* o = out + row * q_dim + (long)head * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < ATTN_WARPS; w++)
            if (s_m[w] != NEG_INF) v += s_acc[w][d] * __expf(s_m[w] - big);
        o[d] = v / total;
    }
}

// ---- elementwise -------------------------------------------------------------------------

extern "C" __global__ void silu_mul(float* gate, const float* up, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float g = gate[i];
        gate[i] = g / (1.0f + __expf(-g)) * up[i];
    }
}

extern "C" __global__ void add_assign(float* x, const float* y, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// ---- router: softmax over experts, top-k, renormalised (Mixtral) --------------------------
//
// One thread per token row; ties go to the lower expert id, as on the CPU.

#define ROUTER_MAX_EXPERTS 256

extern "C" __global__ void router_topk(const float* logits, u32* ids, float* weights, int rows, int n_experts, int k) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* l = logits + (long)r * n_experts;
    float mx = NEG_INF;
    for (int e = 0; e < n_experts; e++) mx = fmaxf(mx, l[e]);
    float sum = 0.0f;
    for (int e = 0; e < n_experts; e++) sum += __expf(l[e] - mx);
    unsigned char taken[ROUTER_MAX_EXPERTS];
    for (int e = 0; e < n_experts; e++) taken[e] = 0;
    float top_sum = 0.0f;
    for (int i = 0; i < k; i++) {
        int best = -1;
        float bp = -1.0f;
        for (int e = 0; e < n_experts; e++) {
            float p = __expf(l[e] - mx) / sum;
            if (!taken[e] && p > bp) { bp = p; best = e; }
        }
        taken[best] = 1;
        ids[(long)r * k + i] = (u32)best;
        weights[(long)r * k + i] = bp;
        top_sum += bp;
    }
    for (int i = 0; i < k; i++) weights[(long)r * k + i] /= top_sum;
}
