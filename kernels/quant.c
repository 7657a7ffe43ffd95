/* Grouped low-bit K/V codes (kernels/quant.py's quantize_groups / dequantize_groups and a payload's quantize_kv /
 * dequantize_kv), in a few passes over the message each, no allocation beyond bounded scratch.
 *
 * Bit for bit the torch reference's arithmetic: float32 throughout, float16 scale and minimum rounded
 * outward, round-half-to-even codes; built with -ffp-contract=off so no multiply-add is fused. Inputs and
 * outputs are float32, bfloat16 or float16, converted as torch converts. A NaN input gives NaN statistics
 * and outputs, as torch's do, though not always the same NaN bits (no receiver takes a non-finite payload).
 * Keys (dim 0) group tokens per head and channel (`*_tokens`), values (dim -1) channels per token and
 * head (`*_channels`), each as its reference lays out codes, scales and minima.
 * Codes are packed along the channel axis D: channel c in bits [bits*(c % k), ...) of byte c / k, k = 8 / bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t half;  /* float16 bits: converted by hand, so no compiler or instruction-set support is needed */

static const float F16_MAX = 65504.0f;

static uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }
static float float_of(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }

/* float32 -> float16, rounded to nearest even (as torch converts): overflow to infinity, NaN to a quiet NaN.
 * Branch-free (every case computed, one selected), so loops over many statistics vectorise. */
static inline half half_of(float f) {
    const uint32_t sign = bits_of(f) & 0x80000000u, x = bits_of(f) ^ sign;
    const uint32_t huge = x > 0x7F800000u ? 0x7E00u : 0x7C00u;  /* >= 2^16: NaN or infinity */
    const uint32_t tiny = bits_of(float_of(x) + 0.5f) - bits_of(0.5f);  /* below 2^-14: a subnormal, rounded by the
                                                                        * float addition of 0.5 */
    /* rebias the exponent, round the 13 dropped mantissa bits half to even (a carry may reach infinity) */
    const uint32_t normal = (x + 0xC8000FFFu + ((x >> 13) & 1u)) >> 13;
    return (half)((x >= 0x47800000u ? huge : x < 0x38800000u ? tiny : normal) | (sign >> 16));
}

/* float16 -> float32, exactly (branch-free). */
static inline float float_of_half(half h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    const uint32_t subnormal = bits_of((float)mantissa * 0x1p-24f);  /* zero or subnormal: mantissa * 2^-24 */
    const uint32_t normal = (exponent == 0x1Fu ? 0x7F800000u : (exponent + 112u) << 23) | mantissa << 13;
    return float_of(sign | (exponent == 0 ? subnormal : normal));
}

/* The float16 next to h toward -inf (down) or +inf; NaN and infinities in that direction stay. */
static inline half next_half(half h, int down) {
    const int stays = ((h & 0x7FFFu) > 0x7C00u) | (h == (down ? 0xFC00u : 0x7C00u));  /* no branch */
    const half from_zero = down ? 0x8001u : 0x0001u;
    const half along = (half)((h >> 15) == (unsigned)down ? h + 1 : h - 1);  /* away from zero, or toward it */
    return stays ? h : (h & 0x7FFFu) == 0 ? from_zero : along;
}

/* x as float16, rounded toward -inf (down) or +inf where rounding to nearest went the other way. */
static inline half round_toward(float x, int down) {
    const half h = half_of(x);
    const float back = float_of_half(h);
    return (down ? back > x : back < x) ? next_half(h, down) : h;
}

/* Element types of the tensors the kernels read and write (torch's float32, bfloat16, float16). */
enum { FLOAT32 = 0, BFLOAT16 = 1, FLOAT16 = 2 };

/* float32 -> bfloat16, rounded to nearest even (as torch converts), NaN to a quiet NaN. */
static inline uint16_t bfloat16_of(float f) {
    const uint32_t u = bits_of(f);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* n elements of `dtype` at x (from element `first`) -> float32 row. */
static inline void load_row(const void *x, int64_t first, int64_t n, int dtype, float *row) {
    if (dtype == FLOAT32) memcpy(row, (const float *)x + first, (size_t)n * sizeof(float));
    else if (dtype == BFLOAT16)
        for (int64_t i = 0; i < n; i++) row[i] = float_of((uint32_t)((const uint16_t *)x)[first + i] << 16);
    else for (int64_t i = 0; i < n; i++) row[i] = float_of_half(((const uint16_t *)x)[first + i]);
}

/* float32 row -> n elements of `dtype` at out (from element `first`). */
static inline void store_row(const float *row, int64_t n, int dtype, void *out, int64_t first) {
    if (dtype == FLOAT32) memcpy((float *)out + first, row, (size_t)n * sizeof(float));
    else if (dtype == BFLOAT16) for (int64_t i = 0; i < n; i++) ((uint16_t *)out)[first + i] = bfloat16_of(row[i]);
    else for (int64_t i = 0; i < n; i++) ((uint16_t *)out)[first + i] = half_of(row[i]);
}

/* Scratch of `bytes` (at least one, so an empty row is no allocation failure); NULL where memory ran out. */
static void *scratch(int64_t bytes) { return malloc(bytes > 0 ? (size_t)bytes : 1); }

static inline float clamp_f16(float v) { return v < -F16_MAX ? -F16_MAX : v > F16_MAX ? F16_MAX : v; }

/* Running extremes and NaN flag, taking in v (clamped to float16's range). */
static inline void extend(float v, float *lo, float *hi, float *nan) {
    v = clamp_f16(v);
    *nan = v == v ? *nan : 1.0f;
    *lo = v < *lo ? v : *lo;
    *hi = v > *hi ? v : *hi;
}

/* n groups' statistics from their clamped extremes (NaN where a group holds one): the stored float16 scale and
 * minimum, and in place of the extremes the minimum and step codes_of takes (the scale, 1 where that is 0). A zero
 * extreme counts as +0 (adding +0 makes -0 so): the order a group is reduced in cannot change a bit. */
static void stats_of(float *smallest, float *largest, int64_t n, int levels, half *scale_out, half *low_out) {
    for (int64_t i = 0; i < n; i++) {
        const half low = round_toward(smallest[i] + 0.0f, 1);
        const float low_f = float_of_half(low);
        const half scale = round_toward((largest[i] + 0.0f - low_f) / (float)levels, 0);
        const float scale_f = float_of_half(scale);
        low_out[i] = low, scale_out[i] = scale;
        smallest[i] = low_f, largest[i] = scale_f > 0.0f ? scale_f : 1.0f;
    }
}

/* The code of x (clamped) against its group's minimum and step (the scale, 1 where that is 0): the quotient
 * clamped to [0, levels] (NaN to 0) and rounded half to even (adding and taking away 1.5 * 2^23 rounds a float
 * below 2^22 so). Branch-free, so the loops around it vectorise. */
static inline uint8_t code_of(float x, float low, float step, int levels) {
    float code = (clamp_f16(x) - low) / step;
    code = code == code ? code : 0.0f;
    code = code < 0.0f ? 0.0f : code;
    code = code > (float)levels ? (float)levels : code;
    return (uint8_t)(int)((code + 12582912.0f) - 12582912.0f);
}

/* codes[i] of x[i], each against its own column's minimum and step (keys). */
static void codes_of(const float *x, const float *low, const float *step, int64_t n, int levels, uint8_t *codes) {
    for (int64_t i = 0; i < n; i++) codes[i] = code_of(x[i], low[i], step[i], levels);
}

/* Packing moves each code of a word of codes, one a byte, to its place in a packed byte, by shifted copies ORed
 * together (w | w >> s | w >> 2s ..., s = 8 - bits: codes below 2^bits never overlap, so no carry); unpacking
 * spreads a packed byte's codes back into a word by the opposite shifts, masked. Whole words of plain integer
 * operations, so the loops vectorise. A word's first byte is its first code: little-endian machines only. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kernels/quant.c packs codes through little-endian words"
#endif

/* `channels` codes -> their packed bytes: channel c in bits [bits*(c % k), ...) of byte c / k, k = 8 / bits. */
static void pack_row(const uint8_t *codes, int64_t channels, int bits, uint8_t *packed) {
    const int per_byte = 8 / bits;
    const int64_t whole = channels / per_byte;  /* bytes every one of whose codes is a channel */
    if (bits == 2)
        for (int64_t b = 0; b < whole; b++) {
            uint32_t w;
            memcpy(&w, codes + 4 * b, sizeof w);
            packed[b] = (uint8_t)(w | w >> 6 | w >> 12 | w >> 18);
        }
    else if (bits == 4)
        for (int64_t b = 0; b < whole; b++) {
            uint16_t w;
            memcpy(&w, codes + 2 * b, sizeof w);
            packed[b] = (uint8_t)(w | w >> 4);
        }
    else memcpy(packed, codes, (size_t)whole);
    if (whole * per_byte < channels) {
        uint8_t byte = 0;
        for (int64_t c = whole * per_byte; c < channels; c++) byte |= (uint8_t)(codes[c] << (bits * (c % per_byte)));
        packed[whole] = byte;
    }
}

/* `rows` rows of `channels` codes, back to back -> their packed bytes, rows `row_bytes` apart: one long run where
 * no row ends in a part-filled byte and `row_bytes` is just a row's bytes (the loop vectorises), else row by row. */
static void pack_rows(const uint8_t *codes, int64_t rows, int64_t channels, int bits, int64_t row_bytes,
                      uint8_t *packed) {
    if (channels % (8 / bits) == 0 && row_bytes * 8 == channels * bits)
        pack_row(codes, rows * channels, bits, packed);
    else for (int64_t r = 0; r < rows; r++) pack_row(codes + r * channels, channels, bits, packed + r * row_bytes);
}

/* Keys x (T, H*D) of `dtype`, a token's H*D elements `stride` elements after the previous token's, in groups of
 * `group` tokens per column -> packed codes (T, H, packed), scale and low (ceil(T / group), H*D). 0, or -1 where
 * its scratch could not be allocated. */
int quantize_tokens(const void *x, int dtype, int64_t tokens, int64_t heads, int64_t channels, int64_t stride,
                    int64_t group, int bits, int64_t packed, uint8_t *codes, half *scale_out, half *low_out) {
    const int levels = (1 << bits) - 1;
    const int64_t columns = heads * channels;
    float *stats = scratch(4 * columns * sizeof(float));
    uint8_t *group_codes = scratch((group < tokens ? group : tokens) * columns);  /* a group's codes, by token */
    if (stats == NULL || group_codes == NULL) return free(stats), free(group_codes), -1;
    float *smallest = stats, *largest = stats + columns, *nan = stats + 2 * columns, *row = stats + 3 * columns;
    for (int64_t first = 0, g = 0; first < tokens; first += group, g++) {
        const int64_t last = first + group < tokens ? first + group : tokens;
        for (int64_t i = 0; i < columns; i++) smallest[i] = INFINITY, largest[i] = -INFINITY, nan[i] = 0.0f;
        for (int64_t t = first; t < last; t++) {
            load_row(x, t * stride, columns, dtype, row);
            for (int64_t i = 0; i < columns; i++) extend(row[i], smallest + i, largest + i, nan + i);
        }
        for (int64_t i = 0; i < columns; i++)
            smallest[i] = nan[i] != 0.0f ? NAN : smallest[i], largest[i] = nan[i] != 0.0f ? NAN : largest[i];
        stats_of(smallest, largest, columns, levels, scale_out + g * columns, low_out + g * columns);
        for (int64_t t = first; t < last; t++) {  /* smallest, largest: each column's minimum and step */
            load_row(x, t * stride, columns, dtype, row);
            codes_of(row, smallest, largest, columns, levels, group_codes + (t - first) * columns);
        }
        pack_rows(group_codes, (last - first) * heads, channels, bits, packed, codes + first * heads * packed);
    }
    free(stats), free(group_codes);
    return 0;
}

/* A float's bits as an int32 that orders as the floats do (a negative float's magnitude bits flipped), and back:
 * extremes of these are integer reductions, which the compiler vectorises (float ones it may not reorder). */
static inline int32_t ordered(float f) {
    const uint32_t u = bits_of(f);
    return (int32_t)(u ^ ((0u - (u >> 31)) >> 1));  /* the sign bit set: flip the other 31 */
}
static inline float unordered(int32_t i) {
    const uint32_t u = (uint32_t)i;
    return float_of(u ^ ((0u - (u >> 31)) >> 1));
}

/* The smallest and largest of x[0..n) (n >= 1) clamped to float16's range, both NaN where one is. -0 orders below
 * +0 here, where floats compare them equal: stats_of makes either +0, so no bit depends on it. */
static inline void group_range(const float *x, int64_t n, float *smallest, float *largest) {
    int32_t lo = INT32_MAX, hi = INT32_MIN;
    uint32_t nan = 0;
    for (int64_t i = 0; i < n; i++) {
        const int32_t o = ordered(x[i]);
        lo = o < lo ? o : lo;
        hi = o > hi ? o : hi;
        nan |= (bits_of(x[i]) & 0x7FFFFFFFu) > 0x7F800000u;
    }
    *smallest = nan ? NAN : clamp_f16(unordered(lo));
    *largest = nan ? NAN : clamp_f16(unordered(hi));
}

/* Each group's extremes (group_range) of rows of `channels` values, groups of `group` channels (a row's last one
 * shorter where `group` does not divide `channels`). Where every group is full, one flat run of equal groups: the
 * loop the compiler vectorises best. */
static void group_ranges(const float *values, int64_t rows, int64_t channels, int64_t group, float *smallest,
                         float *largest) {
    if (channels % group == 0)
        for (int64_t g = 0; g < rows * channels / group; g++)
            group_range(values + g * group, group, smallest + g, largest + g);
    else
        for (int64_t r = 0, g = 0; r < rows; r++)
            for (int64_t first = 0; first < channels; first += group, g++)
                group_range(values + r * channels + first, first + group < channels ? group : channels - first,
                            smallest + g, largest + g);
}

/* Each value's code (code_of) against its group's minimum and step, groups as group_ranges takes them. */
static void group_codes(const float *values, int64_t rows, int64_t channels, int64_t group, const float *low,
                        const float *step, int levels, uint8_t *codes) {
    if (channels % group == 0)
        for (int64_t g = 0; g < rows * channels / group; g++)
            for (int64_t i = g * group; i < (g + 1) * group; i++)
                codes[i] = code_of(values[i], low[g], step[g], levels);
    else
        for (int64_t r = 0, g = 0; r < rows; r++)
            for (int64_t first = 0; first < channels; first += group, g++) {
                const int64_t at = r * channels + first;
                const int64_t last = at + (first + group < channels ? group : channels - first);
                for (int64_t i = at; i < last; i++) codes[i] = code_of(values[i], low[g], step[g], levels);
            }
}

enum { ROW_BLOCK = 1024 };  /* value rows a pass covers: long passes, scratch bounded whatever the message */

static int64_t element_bytes(int dtype) { return dtype == FLOAT32 ? 4 : 2; }

/* quantize_channels over rows (at most ROW_BLOCK): every group's extremes, then every group's statistics in one
 * loop, then every code, then the packing (a short row's work is mostly per pass). */
static int quantize_channel_rows(const void *x, int dtype, int64_t rows, int64_t channels, int64_t stride,
                                 int64_t group, int bits, int64_t packed, uint8_t *codes, half *scale_out,
                                 half *low_out) {
    const int levels = (1 << bits) - 1;
    const int64_t n_groups = (channels + group - 1) / group, groups = rows * n_groups, n = rows * channels;
    float *stats = scratch((2 * groups + n) * sizeof(float));
    uint8_t *all_codes = scratch(n);
    if (stats == NULL || all_codes == NULL) return free(stats), free(all_codes), -1;
    float *smallest = stats, *largest = stats + groups, *values = stats + 2 * groups;
    for (int64_t r = 0; r < rows; r++) load_row(x, r * stride, channels, dtype, values + r * channels);
    group_ranges(values, rows, channels, group, smallest, largest);
    stats_of(smallest, largest, groups, levels, scale_out, low_out);  /* smallest, largest: minimum, step */
    group_codes(values, rows, channels, group, smallest, largest, levels, all_codes);
    pack_rows(all_codes, rows, channels, bits, packed, codes);
    free(stats), free(all_codes);
    return 0;
}

/* Values x (rows = T*H, D) of `dtype`, a row `stride` elements after the previous one, in groups of `group`
 * channels per row -> packed codes (rows, packed), scale and low (rows, ceil(D / group)). 0, or -1 where its
 * scratch could not be allocated. */
int quantize_channels(const void *x, int dtype, int64_t rows, int64_t channels, int64_t stride, int64_t group,
                      int bits, int64_t packed, uint8_t *codes, half *scale_out, half *low_out) {
    const int64_t n_groups = (channels + group - 1) / group;
    for (int64_t first = 0; first < rows; first += ROW_BLOCK)
        if (quantize_channel_rows((const uint8_t *)x + first * stride * element_bytes(dtype), dtype,
                                  rows - first < ROW_BLOCK ? rows - first : ROW_BLOCK, channels, stride, group, bits,
                                  packed, codes + first * packed, scale_out + first * n_groups,
                                  low_out + first * n_groups))
            return -1;
    return 0;
}

/* One row's packed bytes -> its `channels` codes (pack_row's inverse). */
static void unpack_row(const uint8_t *packed, int64_t channels, int bits, uint8_t *codes) {
    const int per_byte = 8 / bits, mask = (1 << bits) - 1;
    const int64_t whole = channels / per_byte;
    if (bits == 2)
        for (int64_t b = 0; b < whole; b++) {
            const uint32_t x = packed[b], w = (x | x << 6 | x << 12 | x << 18) & 0x03030303u;
            memcpy(codes + 4 * b, &w, sizeof w);
        }
    else if (bits == 4)
        for (int64_t b = 0; b < whole; b++) {
            const uint16_t w = (uint16_t)((packed[b] | packed[b] << 4) & 0x0F0F);
            memcpy(codes + 2 * b, &w, sizeof w);
        }
    else memcpy(codes, packed, (size_t)whole);
    for (int64_t c = whole * per_byte; c < channels; c++)
        codes[c] = (uint8_t)((packed[c / per_byte] >> (bits * (c % per_byte))) & mask);
}

/* `rows` rows of packed bytes, `row_bytes` apart -> their codes, `channels` apart: one long run where no row ends in
 * a part-filled byte and `row_bytes` is just a row's bytes (the loop vectorises), else row by row. */
static void unpack_rows(const uint8_t *packed, int64_t rows, int64_t channels, int bits, int64_t row_bytes,
                        uint8_t *codes) {
    if (channels % (8 / bits) == 0 && row_bytes * 8 == channels * bits)
        unpack_row(packed, rows * channels, bits, codes);
    else for (int64_t r = 0; r < rows; r++) unpack_row(packed + r * row_bytes, channels, bits, codes + r * channels);
}

/* Inverse of quantize_tokens: out (T, H*D) of `dtype`, a token `stride` elements after the previous one. 0, or -1
 * where its scratch could not be allocated. */
int dequantize_tokens(const uint8_t *codes, const half *scale_in, const half *low_in, int64_t tokens, int64_t heads,
                      int64_t channels, int64_t group, int bits, int64_t packed, void *out, int64_t stride,
                      int dtype) {
    const int64_t columns = heads * channels;
    float *stats = scratch(3 * columns * sizeof(float));
    uint8_t *group_codes = scratch((group < tokens ? group : tokens) * columns);  /* a group's codes, by token */
    if (stats == NULL || group_codes == NULL) return free(stats), free(group_codes), -1;
    float *low = stats, *scale = stats + columns, *row = stats + 2 * columns;
    for (int64_t first = 0, g = 0; first < tokens; first += group, g++) {
        const int64_t last = first + group < tokens ? first + group : tokens;
        for (int64_t i = 0; i < columns; i++)
            low[i] = float_of_half(low_in[g * columns + i]), scale[i] = float_of_half(scale_in[g * columns + i]);
        unpack_rows(codes + first * heads * packed, (last - first) * heads, channels, bits, packed, group_codes);
        for (int64_t t = first; t < last; t++) {
            const uint8_t *row_codes = group_codes + (t - first) * columns;
            for (int64_t i = 0; i < columns; i++) row[i] = low[i] + (float)row_codes[i] * scale[i];
            store_row(row, columns, dtype, out, t * stride);
        }
    }
    free(stats), free(group_codes);
    return 0;
}

/* Each value (minimum + code * scale) of its group's float16 statistics, groups as group_ranges takes them. */
static void group_values(const uint8_t *codes, int64_t rows, int64_t channels, int64_t group, const half *low,
                         const half *scale, float *values) {
    if (channels % group == 0)
        for (int64_t g = 0; g < rows * channels / group; g++) {
            const float low_g = float_of_half(low[g]), scale_g = float_of_half(scale[g]);
            for (int64_t i = g * group; i < (g + 1) * group; i++) values[i] = low_g + (float)codes[i] * scale_g;
        }
    else
        for (int64_t r = 0, g = 0; r < rows; r++)
            for (int64_t first = 0; first < channels; first += group, g++) {
                const float low_g = float_of_half(low[g]), scale_g = float_of_half(scale[g]);
                const int64_t at = r * channels + first;
                const int64_t last = at + (first + group < channels ? group : channels - first);
                for (int64_t i = at; i < last; i++) values[i] = low_g + (float)codes[i] * scale_g;
            }
}

/* dequantize_channels over rows (at most ROW_BLOCK), each step a pass over them all. */
static int dequantize_channel_rows(const uint8_t *codes, const half *scale_in, const half *low_in, int64_t rows,
                                   int64_t channels, int64_t group, int bits, int64_t packed, void *out,
                                   int64_t stride, int dtype) {
    const int64_t n = rows * channels;
    float *values = scratch(n * sizeof(float));
    uint8_t *all_codes = scratch(n);
    if (values == NULL || all_codes == NULL) return free(values), free(all_codes), -1;
    unpack_rows(codes, rows, channels, bits, packed, all_codes);
    group_values(all_codes, rows, channels, group, low_in, scale_in, values);
    for (int64_t r = 0; r < rows; r++) store_row(values + r * channels, channels, dtype, out, r * stride);
    free(values), free(all_codes);
    return 0;
}

/* Inverse of quantize_channels: out (rows, D) of `dtype`, rows `stride` elements apart. 0, or -1 where its scratch
 * could not be allocated. */
int dequantize_channels(const uint8_t *codes, const half *scale_in, const half *low_in, int64_t rows,
                        int64_t channels, int64_t group, int bits, int64_t packed, void *out, int64_t stride,
                        int dtype) {
    const int64_t n_groups = (channels + group - 1) / group;
    for (int64_t first = 0; first < rows; first += ROW_BLOCK)
        if (dequantize_channel_rows(codes + first * packed, scale_in + first * n_groups, low_in + first * n_groups,
                                    rows - first < ROW_BLOCK ? rows - first : ROW_BLOCK, channels, group, bits,
                                    packed, (uint8_t *)out + first * stride * element_bytes(dtype), stride, dtype))
            return -1;
    return 0;
}

/* Where a head's parts lie in its rows of a payload (kernels/quant.py's payload_layout): codes in bytes of its
 * codes row, statistics in elements of its statistics row. */
typedef struct { int64_t key_codes, key_scale, key_low, value_codes, value_scale, value_low; } Parts;

/* One payload (kernels/quant.py's quantize_kv): k and v (T, H, D) of `dtype` -> each head's keys (quantize_tokens,
 * groups of `key_group` tokens) and values (quantize_channels, groups of `value_group` channels) in that head's
 * row of `stats` (`head_stats` float16 elements) and of `codes` (`head_codes` bytes), its parts at `at`. 0, or -1
 * where scratch could not be allocated. */
int quantize_kv(const void *k, const void *v, int dtype, int64_t tokens, int64_t heads, int64_t channels,
                int key_bits, int64_t key_group, int64_t key_packed, int value_bits, int64_t value_group,
                int64_t value_packed, half *stats, int64_t head_stats, uint8_t *codes, int64_t head_codes,
                const Parts *at) {
    const int64_t stride = heads * channels, head_in = channels * element_bytes(dtype);
    for (int64_t h = 0; h < heads; h++) {
        half *s = stats + h * head_stats;
        uint8_t *c = codes + h * head_codes;
        if (quantize_tokens((const uint8_t *)k + h * head_in, dtype, tokens, 1, channels, stride, key_group, key_bits,
                            key_packed, c + at->key_codes, s + at->key_scale, s + at->key_low) ||
            quantize_channels((const uint8_t *)v + h * head_in, dtype, tokens, channels, stride, value_group,
                              value_bits, value_packed, c + at->value_codes, s + at->value_scale, s + at->value_low))
            return -1;
    }
    return 0;
}

int all_finite(const void *data, int64_t n, int dtype);

/* |f|'s bits: they order as |f| does, every NaN's above infinity's, so their maximum is torch's amax. */
static inline uint32_t magnitude(float f) { return bits_of(f) & 0x7FFFFFFFu; }

/* The int8 scale of a slice whose largest magnitude has the bits `largest`: that / 127, 1 where it is 0. */
static inline float int8_scale(uint32_t largest) {
    const float s = float_of(largest) / 127.0f;
    return s == 0.0f ? 1.0f : s;
}

/* Symmetric int8 codes (kernels/quant.py's quantize_int8) of x (rows, columns) of `dtype`, a float32 scale per
 * column over the rows (per_row = 0: keys, rows T, columns H*D) or per row over its columns (per_row = 1: values,
 * rows T*H, columns D): scale = max |x| / 127 (1 where that is 0; NaN where an element is, infinite where one
 * is), q = x / scale rounded half to even and clamped to +-127 (0 where NaN). 0, or -1 where scratch could not be
 * allocated. */
int quantize_int8(const void *x, int dtype, int64_t rows, int64_t columns, int per_row, int8_t *q, float *scale) {
    float *row = scratch(columns * sizeof(float));
    uint32_t *largest = per_row ? NULL : scratch(columns * sizeof(uint32_t));
    if (row == NULL || (!per_row && largest == NULL)) return free(row), free(largest), -1;
    if (!per_row) {
        for (int64_t i = 0; i < columns; i++) largest[i] = 0;
        for (int64_t r = 0; r < rows; r++) {
            load_row(x, r * columns, columns, dtype, row);
            for (int64_t i = 0; i < columns; i++) {
                const uint32_t m = magnitude(row[i]);
                largest[i] = m > largest[i] ? m : largest[i];
            }
        }
        for (int64_t i = 0; i < columns; i++) scale[i] = int8_scale(largest[i]);
    }
    for (int64_t r = 0; r < rows; r++) {
        load_row(x, r * columns, columns, dtype, row);
        if (per_row) {
            uint32_t most = 0;
            for (int64_t i = 0; i < columns; i++) most = magnitude(row[i]) > most ? magnitude(row[i]) : most;
            scale[r] = int8_scale(most);
        }
        for (int64_t i = 0; i < columns; i++) {
            float v = row[i] / scale[per_row ? r : i];
            v = v == v ? v : 0.0f;
            v = v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v;
            q[r * columns + i] = (int8_t)(int)((v + 12582912.0f) - 12582912.0f);  /* half to even, as code_of */
        }
    }
    free(row), free(largest);
    return 0;
}

/* Inverse of quantize_int8 into out (rows, columns) of `dtype`: q * its scale, rounded as torch converts. 0, or -1
 * where scratch could not be allocated. */
static int dequantize_int8_rows(const int8_t *q, const float *scale, int64_t rows, int64_t columns, int per_row,
                                void *out, int dtype) {
    float *row = scratch(columns * sizeof(float));
    if (row == NULL) return -1;
    for (int64_t r = 0; r < rows; r++) {
        if (per_row)
            for (int64_t i = 0; i < columns; i++) row[i] = (float)q[r * columns + i] * scale[r];
        else
            for (int64_t i = 0; i < columns; i++) row[i] = (float)q[r * columns + i] * scale[i];
        store_row(row, columns, dtype, out, r * columns);
    }
    free(row);
    return 0;
}

/* One int8 payload as dequantize_int8_kv reads it: the addresses of its key codes, value codes, key scales (one a
 * head and channel) and value scales (one a token and head), and its token count; every field an int64. */
typedef struct { int64_t keys, values, key_scales, value_scales, tokens; } Int8Source;

/* n int8 payloads (a layer's, one a source) into k_out and v_out (T, H, D) of `dtype`, each source's tokens after
 * the previous source's, then their finite check (the payloads came from other parties). 0; 1 where a decoded
 * value is not finite; -1 where scratch could not be allocated. */
int dequantize_int8_kv(const Int8Source *sources, int64_t n, int64_t heads, int64_t channels, void *k_out,
                       void *v_out, int dtype) {
    const int64_t stride = heads * channels;
    int64_t tokens = 0;  /* decoded so far */
    for (const Int8Source *source = sources; source < sources + n; tokens += source->tokens, source++) {
        const int64_t out = tokens * stride * element_bytes(dtype);
        if (dequantize_int8_rows((const int8_t *)(intptr_t)source->keys, (const float *)(intptr_t)source->key_scales,
                                 source->tokens, stride, 0, (uint8_t *)k_out + out, dtype) ||
            dequantize_int8_rows((const int8_t *)(intptr_t)source->values,
                                 (const float *)(intptr_t)source->value_scales, source->tokens * heads, channels, 1,
                                 (uint8_t *)v_out + out, dtype))
            return -1;
    }
    return all_finite(k_out, tokens * stride, dtype) && all_finite(v_out, tokens * stride, dtype) ? 0 : 1;
}

/* One payload as dequantize_kv reads it: the addresses of its statistics and codes, a head's row of each (float16
 * elements, bytes), its token count and its parts' place in a head's rows; every field an int64, so that the caller
 * passes a flat array. */
typedef struct { int64_t statistics, head_stats, codes, head_codes, tokens; Parts at; } Source;

/* quantize_kv's inverse for n payloads (a layer's, one a source) into k_out and v_out (T, H, D) of `dtype`, each
 * source's tokens after the previous source's, then their finite check (the payloads came from other parties).
 * 0; 1 where a decoded value is not finite; -1 where scratch could not be allocated. */
int dequantize_kv(const Source *sources, int64_t n, int64_t heads, int64_t channels, int key_bits, int64_t key_group,
                  int64_t key_packed, int value_bits, int64_t value_group, int64_t value_packed, void *k_out,
                  void *v_out, int dtype) {
    const int64_t stride = heads * channels, head_out = channels * element_bytes(dtype);
    int64_t tokens = 0;  /* decoded so far */
    for (const Source *source = sources; source < sources + n; tokens += source->tokens, source++)
        for (int64_t h = 0; h < heads; h++) {
            const half *s = (const half *)(intptr_t)source->statistics + h * source->head_stats;
            const uint8_t *c = (const uint8_t *)(intptr_t)source->codes + h * source->head_codes;
            const Parts *at = &source->at;
            const int64_t out = (tokens * stride) * element_bytes(dtype) + h * head_out;
            if (dequantize_tokens(c + at->key_codes, s + at->key_scale, s + at->key_low, source->tokens, 1, channels,
                                  key_group, key_bits, key_packed, (uint8_t *)k_out + out, stride, dtype) ||
                dequantize_channels(c + at->value_codes, s + at->value_scale, s + at->value_low, source->tokens,
                                    channels, value_group, value_bits, value_packed, (uint8_t *)v_out + out, stride,
                                    dtype))
                return -1;
        }
    return all_finite(k_out, tokens * stride, dtype) && all_finite(v_out, tokens * stride, dtype) ? 0 : 1;
}

/* 1 where every one of n elements of `dtype` is finite (neither infinite nor NaN: not every exponent bit set),
 * else 0. A received payload's check, in one vectorised pass. */
int all_finite(const void *data, int64_t n, int dtype) {
    uint32_t bad = 0;
    if (dtype == FLOAT32) {
        const uint32_t *x = data;
        for (int64_t i = 0; i < n; i++) bad |= (x[i] & 0x7F800000u) == 0x7F800000u;
    } else {
        const uint16_t *x = data, exponent = dtype == BFLOAT16 ? 0x7F80u : 0x7C00u;
        for (int64_t i = 0; i < n; i++) bad |= (x[i] & exponent) == exponent;
    }
    return !bad;
}
