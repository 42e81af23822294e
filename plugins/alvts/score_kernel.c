/* ALVTS's block-causal importance totals on the CPU, one pass per (sample, head): what
 * selector.scaled_importance computes with a chunked matmul, softmax and weighted sums, without ever
 * writing a (rows x keys) matrix larger than ROWS x keys to memory. folded_totals also makes the
 * head's rotated queries and keys from the low-rank factors (selector.FoldedQueryKey), in cache.
 *
 * For every query row i with a non-zero weight w_i:
 *     p_i = softmax_j<=i(q_i . k_j)            (causal: keys up to the row itself)
 *     totals[sample, head, target_i, j] += w_i * p_i[j]
 * target_i picks the V2V (0) or the T2V (1) sum. The logits of ROWS rows at a time are computed by a
 * register-tiled product (ROWS rows x 2 WIDTH keys of accumulators), then each row's softmax and its
 * weighted sum run on that tile while it is still in cache.
 *
 * Threads: OpenMP, the runtime torch itself runs on (the loader only builds this where torch's libgomp
 * is loaded), so the work goes to torch's own threads instead of competing with them.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { ROWS = 12, WIDTH = 16, PROJECTED = 4 };
typedef float lane __attribute__((vector_size(WIDTH * sizeof(float)), aligned(4)));

/* WIDTH floats from `from`, or the first `count` of them and zeros (a row's tail). */
static lane load_lane(const float *from, int64_t count)
{
    if (count >= WIDTH) return *(const lane *)from;
    lane value = {0};
    memcpy(&value, from, (size_t)count * sizeof(float));
    return value;
}

static void store_lane(float *to, lane value, int64_t count)
{
    if (count >= WIDTH) *(lane *)to = value;
    else memcpy(to, &value, (size_t)count * sizeof(float));
}

/* A tile row's length for `length` keys: whole pairs of vectors. */
static int64_t tile_stride(int64_t length)
{
    return (length + 2 * WIDTH - 1) / (2 * WIDTH) * (2 * WIDTH);
}

/* One step of the register tile: ROWS rows times two vectors of keys, one query element each. */
static inline __attribute__((always_inline)) void accumulate(lane acc[ROWS][2], const float *const row[ROWS],
                                                             int64_t t, lane keys0, lane keys1)
{
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
        acc[r][0] += row[r][t] * keys0;
        acc[r][1] += row[r][t] * keys1;
    }
}

/* One (sample, head) pair: queries (length, dim), keys_t (dim, length), its sample's row weights and
 * targets (length), its totals (2, length); tile: ROWS x stride floats of scratch. */
static void task_totals(const float *q, const float *kt, const float *weight, const uint8_t *target,
                        float *out, float *tile, int64_t length, int64_t dim, int64_t stride)
{
    for (int64_t start = 0; start < length; start += ROWS) {
        const int64_t rows = length - start < ROWS ? length - start : ROWS;
        int needed = 0;
        for (int64_t r = 0; r < rows; ++r) needed |= weight[start + r] != 0.0f;
        if (!needed) continue;
        const float *row[ROWS];  /* a short last block repeats its last row: computed, never used */
        for (int r = 0; r < ROWS; ++r) row[r] = q + (start + (r < rows ? r : rows - 1)) * dim;
        const int64_t keys = start + rows;
        for (int64_t j = 0; j < keys; j += 2 * WIDTH) {
            lane acc[ROWS][2] = {{{0}}};
            const int64_t count = length - j;
            if (count >= 2 * WIDTH)  /* the common case, without the tail's branches */
                for (int64_t t = 0; t < dim; ++t) {
                    const float *at = kt + t * length + j;
                    accumulate(acc, row, t, *(const lane *)at, *(const lane *)(at + WIDTH));
                }
            else
                for (int64_t t = 0; t < dim; ++t) {
                    const float *at = kt + t * length + j;
                    accumulate(acc, row, t, load_lane(at, count),
                               count > WIDTH ? load_lane(at + WIDTH, count - WIDTH) : (lane){0});
                }
            for (int r = 0; r < ROWS; ++r) {
                *(lane *)(tile + r * stride + j) = acc[r][0];
                *(lane *)(tile + r * stride + j + WIDTH) = acc[r][1];
            }
        }
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = start + r;
            if (weight[i] == 0.0f) continue;
            float *logits = tile + r * stride, *sums = out + target[i] * length;
            float top = logits[0], sum = 0.0f;
            for (int64_t j = 1; j <= i; ++j) top = logits[j] > top ? logits[j] : top;
            for (int64_t j = 0; j <= i; ++j) {
                logits[j] = expf(logits[j] - top);
                sum += logits[j];
            }
            const float scale = weight[i] / sum;
            for (int64_t j = 0; j <= i; ++j) sums[j] += scale * logits[j];
        }
    }
}

/* queries: (tasks, length, dim) contiguous, tasks = samples x heads; keys_t: (tasks, dim, length)
 * contiguous; row_weight, row_target: (samples, length); totals: (tasks, 2, length), accumulated into.
 * Returns 0, or -1 if a thread's tile could not be allocated (the totals are then incomplete). */
int block_causal_totals(const float *queries, const float *keys_t, const float *row_weight,
                        const uint8_t *row_target, float *totals, int64_t tasks, int64_t heads,
                        int64_t length, int64_t dim, int threads)
{
    const int64_t stride = tile_stride(length);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *tile = malloc((size_t)(ROWS * stride) * sizeof(float));
        failed = tile == NULL;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; ++task) {
            if (tile == NULL) continue;
            const int64_t sample = task / heads;
            task_totals(queries + task * length * dim, keys_t + task * dim * length, row_weight + sample * length,
                        row_target + sample * length, totals + task * 2 * length, tile, length, dim, stride);
        }
        free(tile);
    }
    return failed ? -1 : 0;
}

/* One head's rotated rows, (length, dim): out_i = (low_i U + b) * cos_i + (low_i TU + Tb) * sin_i, with
 * low (length, low_stride) of which the first `rank` columns are this stream's, up and turned_up
 * (rank, dim), bias and turned_bias (dim) or NULL. With `transposed`, written as (dim, length).
 * PROJECTED rows at a time share each load of the up-projections. */
static void rotated_rows(const float *low, int64_t low_stride, int64_t rank, const float *up,
                         const float *turned_up, const float *bias, const float *turned_bias, const float *cos,
                         const float *sin, float *out, int transposed, int64_t length, int64_t dim)
{
    for (int64_t start = 0; start < length; start += PROJECTED) {
        const int64_t rows = length - start < PROJECTED ? length - start : PROJECTED;
        const float *factors[PROJECTED];  /* a short last block repeats its last row: computed, not stored */
        for (int r = 0; r < PROJECTED; ++r) factors[r] = low + (start + (r < rows ? r : rows - 1)) * low_stride;
        for (int64_t t = 0; t < dim; t += WIDTH) {
            const int64_t count = dim - t;
            lane plain[PROJECTED], turned[PROJECTED];
            for (int r = 0; r < PROJECTED; ++r) {
                plain[r] = bias ? load_lane(bias + t, count) : (lane){0};
                turned[r] = bias ? load_lane(turned_bias + t, count) : (lane){0};
            }
            for (int64_t k = 0; k < rank; ++k) {
                const lane u = load_lane(up + k * dim + t, count), v = load_lane(turned_up + k * dim + t, count);
#pragma GCC unroll 4
                for (int r = 0; r < PROJECTED; ++r) {
                    plain[r] += factors[r][k] * u;
                    turned[r] += factors[r][k] * v;
                }
            }
            float block[PROJECTED][WIDTH];
            for (int64_t r = 0; r < rows; ++r) {
                const int64_t i = start + r;
                const lane value = plain[r] * load_lane(cos + i * dim + t, count)
                                   + turned[r] * load_lane(sin + i * dim + t, count);
                if (transposed) memcpy(block[r], &value, sizeof(block[r]));
                else store_lane(out + i * dim + t, value, count);
            }
            if (transposed)  /* PROJECTED consecutive floats of each of WIDTH rows of out */
                for (int64_t c = 0; c < WIDTH && c < count; ++c)
                    for (int64_t r = 0; r < rows; ++r) out[(t + c) * length + start + r] = block[r][c];
        }
    }
}

/* block_causal_totals from the folded low-rank factors: low (samples, length, q_rank + k_rank), the
 * normed hidden states times both down-projections; q_up (2, heads, q_rank, dim) and k_up (2, heads,
 * k_rank, dim) as selector.FoldedQueryKey holds them (the scale folded into q_up); q_bias, k_bias
 * (2, heads, dim) or NULL; cos, sin (samples, length, dim). */
int folded_totals(const float *low, const float *q_up, const float *k_up, const float *q_bias,
                  const float *k_bias, const float *cos, const float *sin, const float *row_weight,
                  const uint8_t *row_target, float *totals, int64_t samples, int64_t heads, int64_t length,
                  int64_t dim, int64_t q_rank, int64_t k_rank, int threads)
{
    const int64_t stride = tile_stride(length), low_stride = q_rank + k_rank;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *tile = malloc((size_t)(ROWS * stride + 2 * length * dim) * sizeof(float));
        failed = tile == NULL;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < samples * heads; ++task) {
            if (tile == NULL) continue;
            const int64_t sample = task / heads, head = task % heads;
            float *queries = tile + ROWS * stride, *keys_t = queries + length * dim;
            const float *sample_low = low + sample * length * low_stride;
            const float *sample_cos = cos + sample * length * dim, *sample_sin = sin + sample * length * dim;
            /* (2, heads, ...) layouts: a head's plain part, then `heads` parts further its turned part */
            rotated_rows(sample_low, low_stride, q_rank, q_up + head * q_rank * dim,
                         q_up + (heads + head) * q_rank * dim, q_bias ? q_bias + head * dim : NULL,
                         q_bias ? q_bias + (heads + head) * dim : NULL, sample_cos, sample_sin, queries, 0,
                         length, dim);
            rotated_rows(sample_low + q_rank, low_stride, k_rank, k_up + head * k_rank * dim,
                         k_up + (heads + head) * k_rank * dim, k_bias ? k_bias + head * dim : NULL,
                         k_bias ? k_bias + (heads + head) * dim : NULL, sample_cos, sample_sin, keys_t, 1,
                         length, dim);
            task_totals(queries, keys_t, row_weight + sample * length, row_target + sample * length,
                        totals + task * 2 * length, tile, length, dim, stride);
        }
        free(tile);
    }
    return failed ? -1 : 0;
}
