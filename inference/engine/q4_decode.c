/* One decode step of a Llama model in 4-bit weights, for a few rows at once, on the CPU.
 *
 * Built by inference/engine/q4_decode.py with the machine's C compiler (-O3 -march=native -fopenmp)
 * and called through ctypes once per step: every layer's norms, products, rotary embedding, key/value
 * write, attention, activation and residual adds, then the output layer, in one call and one OpenMP
 * parallel region, so that nothing but arithmetic and memory traffic is left between the products.
 *
 * Products run over tiles of 16 output rows, one output row per lane of a 512-bit register. Inputs are
 * quantized to int8 per group of 32 (scale = max |x| / 127), as llama.cpp does (Q4_1 x Q8_1), and with
 * AVX-512 VNNI one instruction adds 4 inputs' products into each of the 16 rows; the group's scales are
 * applied once per 32 inputs. Weights (q4_decode.py makes them from the model's dense ones):
 * - 4-bit layers: w = q * d + m, q in 0..15, d and m per output row and group of 32 inputs (fp16).
 *   Per tile and group, 256 bytes: 4 vectors of 64 bytes, byte 4i + j of vector L holding, for the
 *   tile's row i, input 4L + j in its low nibble and input 16 + 4L + j in its high one; then d and m
 *   as [tiles][groups][16].
 * - the output layer: int8 per weight stored as uint8 (w + 128), per tile and group 8 vectors of 64
 *   bytes (byte 4i + j of vector k: row i, input 4k + j), and one float scale per output row.
 * The residual stream, norms, rotary embedding, attention and the key/value cache are float32.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define Q4_VNNI 1
#else
#define Q4_VNNI 0
#endif

/* Rows one call decodes at most (q4_decode.py's CALL_ROWS); the output layer takes them HEAD_ROWS at a
 * time (its accumulators for more would not fit in the registers). */
#define MAX_ROWS 16
#define HEAD_ROWS 8

typedef struct {
    const uint8_t *w;   /* [out/16][in/32][256] */
    const uint16_t *d;  /* fp16 [out/16][in/32][16] */
    const uint16_t *m;  /* fp16 [out/16][in/32][16] */
} Q4;

typedef struct {
    Q4 qkv, o, gate_up, down;
    const float *input_norm, *post_norm;
} Layer;

typedef struct {
    int32_t layers, hidden, heads, kv_heads, head_dim, inter, vocab;
    float eps, scaling;
    const Layer *layer;
    const float *final_norm;
    const uint8_t *head_w;  /* [vocab/16][hidden/32][512], int8 + 128 */
    const float *head_s;    /* [vocab] */
} Model;

/* A row of activations quantized for the products: int8 values, a scale per group of 32, and each
 * group's sum times its scale (for the weights' offsets m, and the output layer's +128). */
typedef struct {
    int8_t *q;
    float *dx, *xs;
    float xs_total;
} Act;

const char *q4_decode_isa(void) { return Q4_VNNI ? "avx512-vnni" : "portable"; }

int q4_decode_max_rows(void) { return MAX_ROWS; }

static void quantize_act(const float *x, int n, Act *a) {
    a->xs_total = 0.0f;
    for (int g = 0; g < n / 32; g++) {
        const float *v = x + 32 * g;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            const int q = (int)lrintf(v[j] * inv);
            a->q[32 * g + j] = (int8_t)q;
            sum += q;
        }
        a->dx[g] = d;
        a->xs[g] = d * (float)sum;
        a->xs_total += a->xs[g];
    }
}

static inline float fp16_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    union { uint32_t u; float f; } c;
    if (exponent == 0) {
        c.f = (float)mantissa * 5.9604644775390625e-8f; /* subnormal: mantissa * 2^-24 */
        c.u |= sign;
    } else if (exponent == 31) {
        c.u = sign | 0x7F800000u | (mantissa << 13);
    } else {
        c.u = sign | ((exponent + 112) << 23) | (mantissa << 13);
    }
    return c.f;
}

/* Tile `tile` (16 output rows) of a 4-bit layer for each of `rows` activation rows:
 * out[r * stride + i] = w[16 tile + i] . x[r], i in 0..15. The tile's weights are unpacked once for
 * all rows. Inlined with `rows` a constant (tile_q4), so that the accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile_q4_rows(const Q4 *layer, int tile, int groups, const Act *a,
                                                               const int rows, float *out, size_t stride) {
    const uint8_t *w = layer->w + (size_t)tile * groups * 256;
    const uint16_t *d = layer->d + (size_t)tile * groups * 16, *m = layer->m + (size_t)tile * groups * 16;
#if Q4_VNNI
    __m512 acc[MAX_ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int g = 0; g < groups; g++) {
        __m512i op[8];
        for (int v = 0; v < 4; v++) {
            const __m512i bytes = _mm512_loadu_si512((const void *)(w + 256 * g + 64 * v));
            op[v] = _mm512_and_si512(bytes, low);
            op[v + 4] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
        }
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + 16 * g)));
        const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + 16 * g)));
        for (int r = 0; r < rows; r++) {
            const int8_t *x = a[r].q + 32 * g;
            __m512i sum = _mm512_setzero_si512();
            for (int k = 0; k < 8; k++) {
                int32_t four;
                memcpy(&four, x + 4 * k, sizeof four);
                sum = _mm512_dpbusd_epi32(sum, op[k], _mm512_set1_epi32(four));
            }
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dv, _mm512_set1_ps(a[r].dx[g])), acc[r]);
            acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a[r].xs[g]), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(out + r * stride, acc[r]);
#else
    for (int r = 0; r < rows; r++) {
        float sums[16] = {0};
        for (int g = 0; g < groups; g++) {
            const uint8_t *bytes = w + 256 * g;
            const int8_t *x = a[r].q + 32 * g;
            for (int i = 0; i < 16; i++) {
                int sum = 0;
                for (int v = 0; v < 4; v++)
                    for (int j = 0; j < 4; j++) {
                        const uint8_t byte = bytes[64 * v + 4 * i + j];
                        sum += (byte & 0x0F) * x[4 * v + j] + (byte >> 4) * x[16 + 4 * v + j];
                    }
                sums[i] += (float)sum * fp16_to_float(d[16 * g + i]) * a[r].dx[g]
                         + fp16_to_float(m[16 * g + i]) * a[r].xs[g];
            }
        }
        memcpy(out + r * stride, sums, sizeof sums);
    }
#endif
}

/* Tile `tile` of the int8 output layer for each of `rows` activation rows (as tile_q4_rows). */
static inline __attribute__((always_inline)) void tile_head_rows(const Model *model, int tile, const Act *a,
                                                                 const int rows, float *out, size_t stride) {
    const int groups = model->hidden / 32;
    const uint8_t *w = model->head_w + (size_t)tile * groups * 512;
    const float *scale = model->head_s + (size_t)tile * 16;
#if Q4_VNNI
    __m512 acc[MAX_ROWS];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i sums[MAX_ROWS];
        for (int r = 0; r < rows; r++) sums[r] = _mm512_setzero_si512();
        for (int k = 0; k < 8; k++) {
            const __m512i bytes = _mm512_loadu_si512((const void *)(w + 512 * g + 64 * k));
            for (int r = 0; r < rows; r++) {
                int32_t four;
                memcpy(&four, a[r].q + 32 * g + 4 * k, sizeof four);
                sums[r] = _mm512_dpbusd_epi32(sums[r], bytes, _mm512_set1_epi32(four));
            }
        }
        for (int r = 0; r < rows; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r]), _mm512_set1_ps(a[r].dx[g]), acc[r]);
    }
    const __m512 scales = _mm512_loadu_ps(scale);
    for (int r = 0; r < rows; r++)
        _mm512_storeu_ps(out + r * stride,
                         _mm512_mul_ps(_mm512_sub_ps(acc[r], _mm512_set1_ps(128.0f * a[r].xs_total)), scales));
#else
    for (int r = 0; r < rows; r++) {
        for (int i = 0; i < 16; i++) {
            float s = 0.0f;
            for (int g = 0; g < groups; g++) {
                int sum = 0;
                for (int k = 0; k < 8; k++)
                    for (int j = 0; j < 4; j++) sum += w[512 * g + 64 * k + 4 * i + j] * a[r].q[32 * g + 4 * k + j];
                s += (float)sum * a[r].dx[g];
            }
            out[r * stride + i] = (s - 128.0f * a[r].xs_total) * scale[i];
        }
    }
#endif
}

#define DISPATCH_ROWS(call)                                                                          \
    switch (rows) {                                                                                  \
    case 1: call(1); break;                                                                          \
    case 2: call(2); break;                                                                          \
    case 3: call(3); break;                                                                          \
    case 4: call(4); break;                                                                          \
    case 5: call(5); break;                                                                          \
    case 6: call(6); break;                                                                          \
    case 7: call(7); break;                                                                          \
    case 8: call(8); break;                                                                          \
    case 9: call(9); break;                                                                          \
    case 10: call(10); break;                                                                        \
    case 11: call(11); break;                                                                        \
    case 12: call(12); break;                                                                        \
    case 13: call(13); break;                                                                        \
    case 14: call(14); break;                                                                        \
    case 15: call(15); break;                                                                        \
    default: call(16); break;                                                                        \
    }

static void tile_q4(const Q4 *layer, int tile, int in, const Act *a, int rows, float *out, size_t stride) {
#define TILE_Q4(n) tile_q4_rows(layer, tile, in / 32, a, n, out, stride)
    DISPATCH_ROWS(TILE_Q4)
#undef TILE_Q4
}

static void tile_head(const Model *model, int tile, const Act *a, int all_rows, float *out, size_t stride) {
    for (int first = 0; first < all_rows; first += HEAD_ROWS) {
        const int rows = all_rows - first < HEAD_ROWS ? all_rows - first : HEAD_ROWS;
#define TILE_HEAD(n) tile_head_rows(model, tile, a + first, n, out + first * stride, stride)
        DISPATCH_ROWS(TILE_HEAD)
#undef TILE_HEAD
    }
}

static void rms_norm(const float *x, const float *weight, int n, float eps, float *out) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) sum += x[i] * x[i];
    const float scale = 1.0f / sqrtf(sum / (float)n + eps);
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] = x[i] * scale * weight[i];
}

/* rotate_half convention (as transformers' Llama): out = v * cos + cat(-v2, v1) * sin. */
static void rotate(float *v, const float *cos, const float *sin, int d) {
    const int half = d / 2;
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* Quantize `rows` rows of `n` floats (stride n) into acts[0..rows). */
static void quantize_rows(const float *x, int rows, int n, Act *acts) {
    for (int r = 0; r < rows; r++) quantize_act(x + (size_t)r * n, n, &acts[r]);
}

static void free_acts(Act *acts, int rows);

static Act *make_acts(int rows, int n) {
    Act *acts = calloc((size_t)rows, sizeof(Act));
    if (!acts) return NULL;
    for (int r = 0; r < rows; r++) {
        acts[r].q = aligned_alloc(64, (size_t)((n + 63) / 64) * 64);
        acts[r].dx = malloc(sizeof(float) * (size_t)(n / 32 + 1));
        acts[r].xs = malloc(sizeof(float) * (size_t)(n / 32 + 1));
        if (!acts[r].q || !acts[r].dx || !acts[r].xs) {
            free_acts(acts, rows);
            return NULL;
        }
    }
    return acts;
}

static void free_acts(Act *acts, int rows) {
    if (!acts) return;
    for (int r = 0; r < rows; r++) {
        free(acts[r].q);
        free(acts[r].dx);
        free(acts[r].xs);
    }
    free(acts);
}

/* y[r] = layer . a[r] for each row ([rows][out]): the tiles shared among the team (an orphaned `omp for`). */
static void project_q4(const Q4 *layer, int in, const Act *a, int rows, float *y, int out) {
#pragma omp for schedule(static)
    for (int t = 0; t < out / 16; t++) tile_q4(layer, t, in, a, rows, y + 16 * t, out);
}

/* x[r] += layer . a[r] for each row: the tiles shared among the team (an orphaned `omp for`). */
static void add_q4(const Q4 *layer, int in, const Act *a, int rows, float *x, int out) {
#pragma omp for schedule(static)
    for (int t = 0; t < out / 16; t++) {
        float y[MAX_ROWS * 16];
        tile_q4(layer, t, in, a, rows, y, 16);
        for (int r = 0; r < rows; r++)
            for (int i = 0; i < 16; i++) x[(size_t)r * out + 16 * t + i] += y[16 * r + i];
    }
}

/* h[r] = rms_norm(x[r]) quantized into acts[r], by one thread of the team. */
static void norm_rows(const float *x, const float *weight, int rows, int n, float eps, float *h, Act *acts) {
#pragma omp single
    for (int r = 0; r < rows; r++) {
        rms_norm(x + (size_t)r * n, weight, n, eps, h + (size_t)r * n);
        quantize_act(h + (size_t)r * n, n, &acts[r]);
    }
}

/* One decode step for `rows` rows (one new token each).
 *
 * x        [rows][hidden]  the new tokens' embeddings; the residual stream, overwritten
 * cos, sin [rows][head_dim] the rotary embedding at each row's position
 * keys, values [layers] pointers to [rows][kv_heads][capacity[layer]][head_dim] float buffers
 *          holding `length` cached positions; the new token's key and value are written at `length`
 * mask     [rows][length + 1] 1 for a real token, 0 for padding, or NULL when all are real
 * logits   [rows][vocab]    out
 * Returns 0; -1 when memory could not be allocated, -2 when rows is out of 1..MAX_ROWS (the caches are
 * left as they were then). */
int q4_decode_step(const Model *model, int rows, float *x, const float *cos, const float *sin,
                   float *const *keys, float *const *values, const int32_t *capacities, int length,
                   const uint8_t *mask, float *logits, int threads) {
    const int hidden = model->hidden, heads = model->heads, kv_heads = model->kv_heads, d = model->head_dim;
    const int inter = model->inter, qkv_out = (heads + 2 * kv_heads) * d, positions = length + 1;
    const int group = heads / kv_heads;
    int status = 0;
    if (rows < 1 || rows > MAX_ROWS) return -2;

    float *h = malloc(sizeof(float) * (size_t)rows * hidden);
    float *qkv = malloc(sizeof(float) * (size_t)rows * qkv_out);
    float *attended = malloc(sizeof(float) * (size_t)rows * heads * d);
    float *gate_up = malloc(sizeof(float) * (size_t)rows * 2 * inter);
    float *act = malloc(sizeof(float) * (size_t)rows * inter);
    float *scores = malloc(sizeof(float) * (size_t)rows * heads * positions);
    Act *small = make_acts(rows, hidden > heads * d ? hidden : heads * d);
    Act *wide = make_acts(rows, inter);
    if (!h || !qkv || !attended || !gate_up || !act || !scores || !small || !wide) {
        status = -1;
        goto done;
    }

#pragma omp parallel num_threads(threads)
    {
        for (int l = 0; l < model->layers; l++) {
            const Layer *layer = &model->layer[l];
            float *kc = keys[l], *vc = values[l];
            const size_t capacity = (size_t)capacities[l];

            norm_rows(x, layer->input_norm, rows, hidden, model->eps, h, small);

            project_q4(&layer->qkv, hidden, small, rows, qkv, qkv_out);

#pragma omp single
            for (int r = 0; r < rows; r++) {
                float *row = qkv + (size_t)r * qkv_out;
                for (int head = 0; head < heads + kv_heads; head++)
                    rotate(row + head * d, cos + (size_t)r * d, sin + (size_t)r * d, d);
                for (int kv = 0; kv < kv_heads; kv++) {
                    const size_t at = (((size_t)r * kv_heads + kv) * capacity + (size_t)length) * d;
                    memcpy(kc + at, row + (heads + kv) * d, sizeof(float) * d);
                    memcpy(vc + at, row + (heads + kv_heads + kv) * d, sizeof(float) * d);
                }
            }

#pragma omp for schedule(static)
            for (int task = 0; task < rows * heads; task++) {
                const int r = task / heads, head = task % heads, kv = head / group;
                const float *q = qkv + (size_t)r * qkv_out + head * d;
                const float *k = kc + ((size_t)r * kv_heads + kv) * capacity * d;
                const float *v = vc + ((size_t)r * kv_heads + kv) * capacity * d;
                const uint8_t *real = mask ? mask + (size_t)r * positions : NULL;
                float *s = scores + (size_t)task * positions, best = -3.0e38f, total = 0.0f;
                for (int t = 0; t < positions; t++) {
                    if (real && !real[t]) continue;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int i = 0; i < d; i++) dot += q[i] * k[(size_t)t * d + i];
                    s[t] = dot * model->scaling;
                    best = fmaxf(best, s[t]);
                }
                float *out = attended + (size_t)r * heads * d + head * d;
                memset(out, 0, sizeof(float) * d);
                for (int t = 0; t < positions; t++) {
                    if (real && !real[t]) continue;
                    const float p = expf(s[t] - best);
                    total += p;
#pragma omp simd
                    for (int i = 0; i < d; i++) out[i] += p * v[(size_t)t * d + i];
                }
                if (total > 0.0f)
                    for (int i = 0; i < d; i++) out[i] /= total;
            }

#pragma omp single
            quantize_rows(attended, rows, heads * d, small);

            add_q4(&layer->o, heads * d, small, rows, x, hidden);

            norm_rows(x, layer->post_norm, rows, hidden, model->eps, h, small);

            project_q4(&layer->gate_up, hidden, small, rows, gate_up, 2 * inter);

#pragma omp for schedule(static)
            for (int r = 0; r < rows; r++) {
                const float *g = gate_up + (size_t)r * 2 * inter, *u = g + inter;
                float *a = act + (size_t)r * inter;
#pragma omp simd
                for (int i = 0; i < inter; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
                quantize_act(a, inter, &wide[r]);
            }

            add_q4(&layer->down, inter, wide, rows, x, hidden);
        }

        norm_rows(x, model->final_norm, rows, hidden, model->eps, h, small);

#pragma omp for schedule(static)
        for (int t = 0; t < model->vocab / 16; t++) tile_head(model, t, small, rows, logits + 16 * t, model->vocab);
    }

done:
    free(h);
    free(qkv);
    free(attended);
    free(gate_up);
    free(act);
    free(scores);
    free_acts(small, rows);
    free_acts(wide, rows);
    return status;
}
