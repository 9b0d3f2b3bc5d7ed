/* The `inputs` member of a JSON API body, read straight into float32 (service/tensor_json.py).
 *
 * Scans a body `{"inputs": [[[n, ...], ...], ...], ...}`: finds the top-level member `inputs`,
 * checks that its value is a list of sequences, each a non-empty list of equally long, non-empty
 * lists of JSON numbers, and writes the numbers, in order, as float32 into `out`: each parsed as a
 * double (strtod, correctly rounded, as orjson parses them) and then rounded to float32 (as numpy
 * casts them). Other members are skipped, not checked: the caller parses the rest of the body
 * with orjson. Returns 0 and fills `span` (the value's first and one-past-last byte), `nseq` and
 * `shapes` (T, N per sequence); any other return value means "not this simple shape" and the
 * caller takes its general path, whose errors are the API's:
 *   1 not an object, or a member that could not be skipped; 2 no `inputs`, or two;
 *   3 a key with an escape (it might decode to "inputs"); 4 `inputs` is not a list of matrices
 *   of numbers, or a ragged one; 5 a number JSON does not allow, an integer of more than 15
 *   digits, or one whose float32 is not finite; 6 more than `max_seq` sequences or `out_cap`
 *   numbers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static int64_t ws(const char *s, int64_t i, int64_t n) {
    while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++;
    return i;
}

/* past a JSON string starting at s[i] == '"' (-1: unterminated); *escaped: it holds a backslash */
static int64_t skip_string(const char *s, int64_t i, int64_t n, int *escaped) {
    *escaped = 0;
    for (i++; i < n; i++) {
        if (s[i] == '\\') { *escaped = 1; i++; }
        else if (s[i] == '"') return i + 1;
    }
    return -1;
}

/* past any JSON value starting at s[i] (brackets balanced, strings skipped); -1 on failure */
static int64_t skip_value(const char *s, int64_t i, int64_t n) {
    int64_t depth = 0;
    int escaped;
    do {
        if (i >= n) return -1;
        char c = s[i];
        if (c == '"') {
            i = skip_string(s, i, n, &escaped);
            if (i < 0) return -1;
        } else if (c == '[' || c == '{') {
            depth++; i++;
        } else if (c == ']' || c == '}') {
            if (depth == 0) return -1;
            depth--; i++;
        } else if (depth == 0) {  /* a scalar at the top: up to the next delimiter */
            while (i < n && s[i] != ',' && s[i] != '}' && s[i] != ']' && s[i] != ' ' && s[i] != '\t'
                   && s[i] != '\n' && s[i] != '\r') i++;
            return i;
        } else {
            i++;
        }
    } while (depth > 0);
    return i;
}

static const double POW10[23] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
                                  1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* One JSON number at s[i] into *out; returns the index past it, or -1. The double is correctly
 * rounded either way: exactly m * 10^e or m / 10^-e when m < 2^53 and |e| <= 22 (both operands
 * exact, one IEEE operation: Clinger's fast path), else strtod. */
static int64_t number(const char *s, int64_t i, int64_t n, float *out) {
    int64_t start = i, digits = 0, sig = 0, exp10 = 0;
    uint64_t mant = 0;
    int integer = 1, negative = 0;
    if (i < n && s[i] == '-') { negative = 1; i++; }
    if (i < n && s[i] == '0') { i++; digits = 1; }
    else if (i < n && s[i] >= '1' && s[i] <= '9') {
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            if (sig < 19) { mant = mant * 10 + (uint64_t)(s[i] - '0'); sig++; } else exp10++;
            i++; digits++;
        }
    } else return -1;
    if (i < n && s[i] == '.') {
        integer = 0; i++;
        if (!(i < n && s[i] >= '0' && s[i] <= '9')) return -1;
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            if (sig < 19 && (mant != 0 || s[i] != '0')) { mant = mant * 10 + (uint64_t)(s[i] - '0'); sig++; exp10--; }
            else if (mant == 0) exp10--;  /* leading zeros of the fraction */
            i++;
        }
    }
    int64_t e = 0;
    int exp_negative = 0, exp_digits = 0;
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        integer = 0; i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) { exp_negative = s[i] == '-'; i++; }
        if (!(i < n && s[i] >= '0' && s[i] <= '9')) return -1;
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            if (e < 100000) e = e * 10 + (s[i] - '0');
            i++; exp_digits++;
        }
    }
    if (integer && digits > 15) return -1;  /* orjson makes a Python int: leave big ones to it */
    double d;
    int64_t total = exp10 + (exp_negative ? -e : e);
    int exact_digits = (sig < 19) || (mant == 0);  /* no digit dropped from the mantissa */
    if (mant == 0) {
        d = 0.0;
    } else if (exact_digits && mant < (1ULL << 53) && total >= -22 && total <= 22) {
        d = total >= 0 ? (double)mant * POW10[total] : (double)mant / POW10[-total];
    } else {
        char buf[512];
        int64_t from = start + negative, len = i - from;  /* the sign is applied below */
        if (len >= (int64_t)sizeof buf) return -1;
        memcpy(buf, s + from, (size_t)len);
        buf[len] = 0;
        char *end;
        d = strtod(buf, &end);
        if (end != buf + len) return -1;
    }
    if (negative) d = -d;
    float f = (float)d;
    if (integer && mant == 0) f = 0.0f;  /* "-0" is the int 0 to orjson: +0.0 */
    if (f - f != 0.0f) return -1;  /* inf or nan: the general path names the value */
    *out = f;
    return i;
}

int icaserve_scan_inputs(const char *s, int64_t n, float *out, int64_t out_cap, int64_t *shapes,
                         int64_t max_seq, int64_t *nseq, int64_t *span) {
    int64_t i = ws(s, 0, n), found = 0, count = 0;
    int escaped;
    if (i >= n || s[i] != '{') return 1;
    i = ws(s, i + 1, n);
    if (i < n && s[i] == '}') return 2;
    for (;;) {
        if (i >= n || s[i] != '"') return 1;
        int64_t key = i;
        i = skip_string(s, i, n, &escaped);
        if (i < 0) return 1;
        if (escaped) return 3;
        int is_inputs = (i - key == 8 && memcmp(s + key, "\"inputs\"", 8) == 0);
        i = ws(s, i, n);
        if (i >= n || s[i] != ':') return 1;
        i = ws(s, i + 1, n);
        if (is_inputs) {
            if (found++) return 2;
            span[0] = i;
            if (i >= n || s[i] != '[') return 4;
            i = ws(s, i + 1, n);
            int64_t seq = 0;
            for (;;) {  /* sequences */
                if (i >= n || s[i] != '[') return 4;
                if (seq >= max_seq) return 6;
                i = ws(s, i + 1, n);
                int64_t t = 0, width = -1;
                for (;;) {  /* time steps */
                    if (i >= n || s[i] != '[') return 4;
                    i = ws(s, i + 1, n);
                    int64_t k = 0;
                    for (;;) {  /* values */
                        if (count >= out_cap) return 6;
                        i = number(s, i, n, out + count);
                        if (i < 0) return 5;
                        count++; k++;
                        i = ws(s, i, n);
                        if (i < n && s[i] == ',') { i = ws(s, i + 1, n); continue; }
                        if (i < n && s[i] == ']') { i++; break; }
                        return 4;
                    }
                    if (width < 0) width = k; else if (k != width) return 4;
                    t++;
                    i = ws(s, i, n);
                    if (i < n && s[i] == ',') { i = ws(s, i + 1, n); continue; }
                    if (i < n && s[i] == ']') { i++; break; }
                    return 4;
                }
                shapes[2 * seq] = t;
                shapes[2 * seq + 1] = width;
                seq++;
                i = ws(s, i, n);
                if (i < n && s[i] == ',') { i = ws(s, i + 1, n); continue; }
                if (i < n && s[i] == ']') { i++; break; }
                return 4;
            }
            span[1] = i;
            *nseq = seq;
        } else {
            i = skip_value(s, i, n);
            if (i < 0) return 1;
        }
        i = ws(s, i, n);
        if (i < n && s[i] == ',') { i = ws(s, i + 1, n); continue; }
        if (i < n && s[i] == '}') break;
        return 1;
    }
    if (ws(s, i + 1, n) != n) return 1;
    return found ? 0 : 2;
}
