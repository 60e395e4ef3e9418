/* The fast path of `tdvmcall trace`: one pass over a chunk's bytes, in C (built by setuptools at
 * `pip install`; see docs/trace.md, "Speed").
 *
 * scan()  sorts every line of a newline-aligned chunk into header/blank, other event, kvm_exit
 *         parsed here, or "slow": a line this scanner is not sure about, which the caller hands to
 *         the reference parser (reference.py).  The shapes it accepts are those of docs/abi.md §7 as
 *         the reference parser reads them (the rules are listed in scan.py); every parsed line is
 *         one 40-byte record (timestamp, info1, offset, line number, vCPU, prefix id, reason id),
 *         the task prefixes and reason texts interned per chunk.
 * fold()  groups a chunk's records by (task, vCPU, reason, mask, time bucket), once the caller has
 *         named the distinct prefixes and reasons.
 * group() merges rows of equal int64 keys (the aggregates of many chunks).
 *
 * All three release the GIL while they run: two threads work on two chunks at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------------------------------- */
/* records                                                                                         */

typedef struct {
    double ts;
    uint64_t info1;
    int64_t start; /* offset of the line in the chunk */
    uint32_t line; /* 1-based line number in the chunk */
    uint32_t vcpu;
    uint32_t prefix; /* id of the task prefix (the line up to its timestamp) */
    uint32_t reason; /* id of the reason text (name and flags) */
} exit_rec;

typedef struct {
    int64_t line, start, end; /* end excludes the newline */
} slow_rec;

typedef struct {
    int64_t task, vcpu, rid;
    uint64_t mask;
    int64_t bucket, n;
    double first, last;
} group_rec;

/* a growable array of fixed-size records */
typedef struct {
    char *data;
    Py_ssize_t len, cap, size;
} vec;

static int vec_init(vec *v, Py_ssize_t size, Py_ssize_t cap) {
    v->size = size;
    v->len = 0;
    v->cap = cap > 0 ? cap : 1;
    v->data = malloc((size_t)(v->cap * size));
    return v->data != NULL;
}

static void *vec_push(vec *v) {
    if (v->len == v->cap) {
        Py_ssize_t cap = v->cap * 2;
        char *d = realloc(v->data, (size_t)(cap * v->size));
        if (d == NULL)
            return NULL;
        v->data = d;
        v->cap = cap;
    }
    return v->data + (v->len++) * v->size;
}

/* ---------------------------------------------------------------------------------------------- */
/* interning: an open-addressing table of byte strings of the chunk                                 */

#define INTERN_SLOTS (1 << 16) /* at most half as many strings: then the slow path */

typedef struct {
    int32_t *slots;
    int64_t (*reps)[2]; /* (start, end) of each string's first occurrence */
    uint64_t *hash;
    int32_t *slot_of; /* the slot of each string: cleared after the chunk, not the whole table */
    Py_ssize_t count;
    Py_ssize_t last; /* the id found last: lines of one task often follow each other */
} table;

static void table_free(table *t) {
    free(t->slots);
    free(t->reps);
    free(t->hash);
    free(t->slot_of);
    free(t);
}

/* tables are kept from chunk to chunk (allocated once, cleared by the strings they hold, not
 * whole), in a small pool guarded by the GIL: a chunk's scan allocates nothing but its results,
 * and the pool never holds more than POOL tables, however many threads come and go */
#define POOL 8
static table *pool[POOL];
static int pool_n;

/* a cleared table (called with the GIL held); NULL when out of memory */
static table *table_take(void) {
    if (pool_n > 0)
        return pool[--pool_n];
    table *t = calloc(1, sizeof(table));
    if (t == NULL)
        return NULL;
    t->slots = malloc(sizeof(int32_t) * INTERN_SLOTS);
    t->reps = malloc(sizeof(int64_t[2]) * (INTERN_SLOTS / 2));
    t->hash = malloc(sizeof(uint64_t) * (INTERN_SLOTS / 2));
    t->slot_of = malloc(sizeof(int32_t) * (INTERN_SLOTS / 2));
    if (!t->slots || !t->reps || !t->hash || !t->slot_of) {
        table_free(t);
        return NULL;
    }
    memset(t->slots, 0xff, sizeof(int32_t) * INTERN_SLOTS);
    t->last = -1;
    return t;
}

/* clear a table and put it back in the pool (called with the GIL held) */
static void table_give(table *t) {
    if (t == NULL)
        return;
    for (Py_ssize_t k = 0; k < t->count; k++)
        t->slots[t->slot_of[k]] = -1;
    t->count = 0;
    t->last = -1;
    if (pool_n < POOL)
        pool[pool_n++] = t;
    else
        table_free(t);
}

static inline uint64_t load8(const uint8_t *p) {
    uint64_t x;
    memcpy(&x, p, 8);
    return x;
}

static inline uint64_t mix(uint64_t h) { /* MurmurHash3's finaliser: every bit reaches the slot */
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
}

static inline int same_bytes(const uint8_t *a, const uint8_t *b, Py_ssize_t n) {
    Py_ssize_t k = 0;
    for (; k + 8 <= n; k += 8)
        if (load8(a + k) != load8(b + k))
            return 0;
    for (; k < n; k++)
        if (a[k] != b[k])
            return 0;
    return 1;
}

/* a hash of n bytes: the words rotated and xored (a cycle each), then mixed; the tail is read as
 * the last 8 bytes (overlapping), so a string of 8 bytes or more is read a word at a time */
static inline uint64_t hash_bytes(const uint8_t *p, Py_ssize_t n) {
    uint64_t h = 0xcbf29ce484222325ULL ^ (uint64_t)n;
    if (n >= 8) {
        Py_ssize_t k = 0;
        for (; k + 8 <= n; k += 8)
            h = ((h << 7) | (h >> 57)) ^ load8(p + k);
        h = ((h << 7) | (h >> 57)) ^ load8(p + n - 8);
    } else
        for (Py_ssize_t k = 0; k < n; k++)
            h = ((h << 7) | (h >> 57)) ^ p[k];
    return mix(mix(h));
}

/* the id of buf[s:e]; -1 when the table is full or a new string is not ASCII (checked once per
 * distinct string) */
static Py_ssize_t intern(table *t, const uint8_t *buf, int64_t s, int64_t e) {
    Py_ssize_t n = (Py_ssize_t)(e - s);
    uint64_t h = hash_bytes(buf + s, n);
    Py_ssize_t mask = INTERN_SLOTS - 1, i = (Py_ssize_t)(h & (uint64_t)mask);
    for (;;) {
        int32_t id = t->slots[i];
        if (id < 0) {
            if (2 * t->count >= INTERN_SLOTS)
                return -1;
            for (Py_ssize_t k = 0; k < n; k++)
                if (buf[s + k] >= 128)
                    return -1;
            id = (int32_t)t->count++;
            t->slots[i] = id;
            t->reps[id][0] = s;
            t->reps[id][1] = e;
            t->hash[id] = h;
            t->slot_of[id] = (int32_t)i;
            return t->last = id;
        }
        int64_t rs = t->reps[id][0], re = t->reps[id][1];
        if (t->hash[id] == h && re - rs == n && same_bytes(buf + rs, buf + s, n))
            return t->last = id;
        i = (i + 1) & mask;
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* the line parser                                                                                 */

static int8_t HEX[256]; /* value of a lowercase hex digit, else -1 */

static inline int lit(const uint8_t *buf, int64_t i, int64_t e, const char *word, int64_t n) {
    return i + n <= e && memcmp(buf + i, word, (size_t)n) == 0;
}
#define LIT(buf, i, e, w) lit(buf, i, e, w, (int64_t)sizeof(w) - 1)

#define REP(c) (0x0101010101010101ULL * (uint64_t)(c))
#define HIGH REP(0x80)

/* whether the 8 bytes of x are all lowercase hex digits (a word at a time: for a byte b < 0x80,
 * b + (0x80 - lo) has its high bit set iff b >= lo, and no carry leaves the byte) */
static inline int hex8(uint64_t x) {
    if (x & HIGH)
        return 0;
    uint64_t digit = (x + REP(0x80 - '0')) & ~(x + REP(0x7f - '9'));
    uint64_t alpha = (x + REP(0x80 - 'a')) & ~(x + REP(0x7f - 'f'));
    return ((digit | alpha) & HIGH) == HIGH;
}

/* the value of 8 lowercase hex digits (checked by hex8), the first the most significant */
static inline uint64_t hex8_value(uint64_t x) {
    uint64_t nib = (x & REP(0x0f)) + ((x >> 6) & REP(0x01)) * 9; /* '0'-'9': 0-9, 'a'-'f': 10-15 */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    uint64_t y = nib; /* the first digit is in the top byte */
#else
    uint64_t y = __builtin_bswap64(nib); /* the first digit in the top byte */
#endif
    y = (y | (y >> 4)) & 0x00ff00ff00ff00ffULL;
    y = (y | (y >> 8)) & 0x0000ffff0000ffffULL;
    y = (y | (y >> 16)) & 0x00000000ffffffffULL;
    return y;
}

/* `word` then exactly `width` (8 or 16) hex digits at p: the position after them, or -1 */
static inline int64_t hex_field(const uint8_t *buf, int64_t p, int64_t e, const char *word, int64_t n, int width,
                                uint64_t *value) {
    if (!lit(buf, p, e, word, n) || p + n + width > e)
        return -1;
    p += n;
    uint64_t a = load8(buf + p);
    if (!hex8(a))
        return -1;
    if (width == 16) {
        uint64_t b = load8(buf + p + 8);
        if (!hex8(b))
            return -1;
        if (value)
            *value = (hex8_value(a) << 32) | hex8_value(b);
    } else if (value)
        *value = hex8_value(a);
    return p + width;
}
#define HEX_FIELD(buf, p, e, w, width, value) hex_field(buf, p, e, w, (int64_t)sizeof(w) - 1, width, value)

/* the payload at p: `vcpu %u reason %s%s%s rip 0x%lx info1 0x%016llx info2 0x%016llx intr_info
 * 0x%08x error_code 0x%08x`, then anything.  The end of the fields, or -1 if it has not this
 * shape.  (`e` bounds the line; the parser never consumes a newline or a carriage return.) */
static int64_t payload(const uint8_t *buf, int64_t p, int64_t e, uint32_t *vcpu, int64_t *rs, int64_t *re,
                       uint64_t *info1) {
    if (!LIT(buf, p, e, "vcpu "))
        return -1;
    p += 5;
    uint32_t v = 0;
    int nd = 0;
    while (p < e && buf[p] >= '0' && buf[p] <= '9' && nd <= 9) {
        v = v * 10 + (uint32_t)(buf[p] - '0');
        p++;
        nd++;
    }
    if (nd == 0 || nd > 9 || !LIT(buf, p, e, " reason "))
        return -1;
    p += 8;
    *rs = p;
    while (p < e && buf[p] >= 33 && buf[p] <= 126) /* the name: [!-~]+ */
        p++;
    if (p == *rs)
        return -1;
    while (!LIT(buf, p, e, " rip 0x")) { /* flags: (" FAILED_VMENTRY" | " 0x" hex+)* */
        if (LIT(buf, p, e, " FAILED_VMENTRY"))
            p += 15;
        else if (LIT(buf, p, e, " 0x") && p + 3 < e && HEX[buf[p + 3]] >= 0) {
            p += 3;
            while (p < e && HEX[buf[p]] >= 0)
                p++;
        } else
            return -1;
    }
    *re = p;
    p += 7;
    int64_t q = p;
    while (p < e && HEX[buf[p]] >= 0)
        p++;
    if (p == q)
        return -1;
    p = HEX_FIELD(buf, p, e, " info1 0x", 16, info1);
    if (p < 0)
        return -1;
    p = HEX_FIELD(buf, p, e, " info2 0x", 16, NULL);
    if (p < 0)
        return -1;
    p = HEX_FIELD(buf, p, e, " intr_info 0x", 8, NULL);
    if (p < 0)
        return -1;
    p = HEX_FIELD(buf, p, e, " error_code 0x", 8, NULL);
    *vcpu = v;
    return p;
}

static const double POW10[16] = {1e0, 1e1, 1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15};

/* buf[t:h] as <digits>[.<digits>] of at most 15 digits: its value (exactly as float() rounds:
 * an integer below 2**53 over an exact power of ten), or -1 */
static double timestamp(const uint8_t *buf, int64_t t, int64_t h) {
    uint64_t mant = 0;
    int nd = 0, frac = -1;
    for (int64_t k = t; k < h; k++) {
        uint8_t c = buf[k];
        if (c == '.') {
            if (frac >= 0 || nd == 0)
                return -1.0;
            frac = 0;
        } else {
            mant = mant * 10 + (uint64_t)(c - '0');
            nd++;
            if (frac >= 0)
                frac++;
        }
    }
    if (nd == 0 || frac == 0 || nd > 15)
        return -1.0;
    return (double)mant / POW10[frac > 0 ? frac : 0];
}

typedef struct {
    int64_t lines, headers, others;
    double tmin, tmax;
    exit_rec *exits; /* room for every line the chunk can hold */
    Py_ssize_t nexits, cap;
    vec slow;
    table *prefixes, *reasons;
} scanned;

static int is_header(const uint8_t *buf, int64_t start, int64_t e) {
    return e == start || buf[start] == '#' || LIT(buf, start, e, "cpus=") || LIT(buf, start, e, "version = ");
}

/* 0, or -1 when out of memory */
static int scan_chunk(const uint8_t *buf, int64_t n, int perf, int nul, scanned *r) {
    int64_t i = 0;
    r->tmin = INFINITY;
    r->tmax = -INFINITY;
    while (i < n) {
        int64_t start = i, end = -1, q = -1;
        r->lines++;
        if (nul) { /* a NUL byte somewhere in the chunk: find the line first, check it */
            const uint8_t *nl = memchr(buf + start, '\n', (size_t)(n - start));
            end = nl ? nl - buf : n;
            if (memchr(buf + start, 0, (size_t)(end - start)))
                q = -2; /* the reference parser reads NUL as U+FFFD */
        }
        if (q == -1) {
            /* the first "kvm_exit:" of the line, if any: a "k" before the line's newline, looked
             * for in windows of 256 bytes (a line without "k" is not read past its end) */
            int64_t limit = end >= 0 ? end : n, p = start;
            for (;;) {
                int64_t w = end >= 0 ? end : (limit - p > 256 ? p + 256 : limit);
                const uint8_t *k = memchr(buf + p, 'k', (size_t)(w - p));
                int64_t kp = k ? k - buf : w;
                if (end < 0) {
                    const uint8_t *nl = memchr(buf + p, '\n', (size_t)(kp - p));
                    if (nl) {
                        end = nl - buf;
                        break;
                    }
                }
                if (kp < w) {
                    if (LIT(buf, kp, limit, "kvm_exit:")) {
                        q = kp;
                        break;
                    }
                    p = kp + 1;
                    continue;
                }
                if (w == limit) { /* the end of the line, or of the chunk: no "kvm_exit:" */
                    if (end < 0)
                        end = n;
                    break;
                }
                p = w;
            }
        }
        if (q == -1) {
            int64_t e = end > start && buf[end - 1] == '\r' ? end - 1 : end;
            if (is_header(buf, start, e))
                r->headers++;
            else
                r->others++;
            i = end + 1;
            continue;
        }
        int ok = 0;
        int64_t fields_end = q + 9; /* where the newline search resumes, when the line end is unknown */
        if (q >= 0) {
            int64_t bound = end >= 0 ? end : n;
            int64_t ms = perf ? q - 5 : q - 1; /* the event name, then back over spaces, ':' and the timestamp */
            if (ms >= start && (perf ? LIT(buf, ms, bound, " kvm:") : buf[ms] == ' ')) {
                int64_t h = ms;
                while (h > start && buf[h - 1] == ' ')
                    h--;
                if (h > start && buf[h - 1] == ':') {
                    h--;
                    int64_t t = h;
                    while (t > start && ((buf[t - 1] >= '0' && buf[t - 1] <= '9') || buf[t - 1] == '.'))
                        t--;
                    double stamp = timestamp(buf, t, h);
                    int64_t p = q + 9;
                    while (p < bound && buf[p] == ' ')
                        p++;
                    uint32_t vcpu;
                    int64_t rs, re;
                    uint64_t info1;
                    int64_t pe = stamp >= 0 ? payload(buf, p, bound, &vcpu, &rs, &re, &info1) : -1;
                    if (pe >= 0) {
                        fields_end = pe;
                        Py_ssize_t tid = intern(r->prefixes, buf, start, t);
                        Py_ssize_t rid = intern(r->reasons, buf, rs, re);
                        if (tid >= 0 && rid >= 0 && r->nexits < r->cap) { /* (the room always suffices) */
                            exit_rec *x = &r->exits[r->nexits++];
                            x->ts = stamp;
                            x->info1 = info1;
                            x->start = start;
                            x->line = (uint32_t)r->lines;
                            x->vcpu = vcpu;
                            x->prefix = (uint32_t)tid;
                            x->reason = (uint32_t)rid;
                            if (stamp < r->tmin)
                                r->tmin = stamp;
                            if (stamp > r->tmax)
                                r->tmax = stamp;
                            ok = 1;
                        }
                    }
                }
            }
        }
        if (end < 0) {
            const uint8_t *nl = memchr(buf + fields_end, '\n', (size_t)(n - fields_end));
            end = nl ? nl - buf : n;
        }
        if (!ok) {
            slow_rec *s = vec_push(&r->slow);
            if (s == NULL)
                return -1;
            s->line = r->lines;
            s->start = start;
            s->end = end;
        }
        i = end + 1;
    }
    return 0;
}

static PyObject *strings(const uint8_t *buf, table *t) {
    PyObject *out = PyList_New(t->count);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < t->count; k++) {
        PyObject *s = PyBytes_FromStringAndSize((const char *)buf + t->reps[k][0], t->reps[k][1] - t->reps[k][0]);
        if (s == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, k, s);
    }
    return out;
}

PyDoc_STRVAR(scan_doc, "scan(chunk, perf, slow_guess) -> (lines, headers, others, exits, slow, prefixes, reasons,\n"
                       "tmin, tmax)\n\n"
                       "Scan a newline-aligned chunk.  `exits`: one 40-byte record per parsed kvm_exit line (float64\n"
                       "ts, uint64 info1, int64 start, uint32 line, vcpu, prefix id, reason id); `slow`: int64 (line,\n"
                       "start, end) per slow line; `prefixes`, `reasons`: the distinct byte strings the ids index.\n"
                       "`slow_guess` sizes the first allocation of slow lines (it grows as needed).");

/* a parsed line holds at least the payload's fixed text: never fewer bytes than this */
#define MIN_EXIT_LINE 100

static PyObject *py_scan(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer b;
    int perf;
    Py_ssize_t slow_guess;
    if (!PyArg_ParseTuple(args, "y*pn", &b, &perf, &slow_guess))
        return NULL;
    const uint8_t *buf = b.buf;
    int64_t n = b.len;
    scanned r;
    memset(&r, 0, sizeof r);
    PyObject *exits = PyBytes_FromStringAndSize(NULL, (n / MIN_EXIT_LINE + 1) * (Py_ssize_t)sizeof(exit_rec));
    r.exits = exits ? (exit_rec *)PyBytes_AS_STRING(exits) : NULL;
    r.prefixes = table_take();
    r.reasons = table_take();
    r.cap = n / MIN_EXIT_LINE + 1;
    int ok = exits && r.prefixes && r.reasons && vec_init(&r.slow, sizeof(slow_rec), slow_guess);
    if (ok) {
        Py_BEGIN_ALLOW_THREADS;
        int nul = memchr(buf, 0, (size_t)n) != NULL;
        ok = scan_chunk(buf, n, perf, nul, &r) == 0;
        Py_END_ALLOW_THREADS;
    }
    PyObject *out = NULL;
    if (!ok) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
    } else if (_PyBytes_Resize(&exits, r.nexits * (Py_ssize_t)sizeof(exit_rec)) == 0) {
        PyObject *prefixes = strings(buf, r.prefixes), *reasons = strings(buf, r.reasons);
        if (prefixes && reasons)
            out = Py_BuildValue("LLLOy#NNdd", (long long)r.lines, (long long)r.headers, (long long)r.others, exits,
                                r.slow.data, r.slow.len * r.slow.size, prefixes, reasons, r.tmin, r.tmax);
        else {
            Py_XDECREF(prefixes);
            Py_XDECREF(reasons);
        }
    }
    Py_XDECREF(exits);
    free(r.slow.data);
    table_give(r.prefixes);
    table_give(r.reasons);
    PyBuffer_Release(&b);
    return out;
}

/* ---------------------------------------------------------------------------------------------- */
/* grouping                                                                                        */

static Py_ssize_t capacity_for(Py_ssize_t rows) {
    Py_ssize_t cap = 16;
    while (cap < 2 * rows)
        cap <<= 1;
    return cap;
}

PyDoc_STRVAR(fold_doc, "fold(exits, task_of, rid_of, tdvmcall, width, keep_bad, times=True) -> (by_key, by_time, bad,\n"
                       "bad_lines)\n\n"
                       "Aggregate a chunk's exit records (scan's): task_of (int64 per prefix id, -1: the prefix does\n"
                       "not parse), rid_of (uint32 per reason id) and tdvmcall (uint8 per reason id: info1 is the\n"
                       "mask, else the mask is 0) name them; bucket = floor(ts / width).  `by_key`: per (task, vCPU,\n"
                       "reason id, mask), `by_time`: per (task, reason id, mask, bucket), as 64-byte records (int64\n"
                       "task, vcpu, rid, uint64 mask, int64 bucket, n, float64 first, last; vcpu 0 in by_time,\n"
                       "bucket 0 in by_key); `bad`: the records whose prefix does not parse; `bad_lines`: the\n"
                       "first keep_bad of them as (line, start).  Without `times`, by_time is left empty.");

typedef struct {
    int32_t *slots;
    group_rec *g;
    Py_ssize_t cap, groups, room;
} grouping;

/* a table of groups that starts small (a chunk has few groups: it stays in the fastest caches)
 * and doubles when half full */
static int grouping_init(grouping *t) {
    t->cap = 1024;
    t->room = 512;
    t->groups = 0;
    t->slots = malloc(sizeof(int32_t) * t->cap);
    t->g = malloc(sizeof(group_rec) * t->room);
    if (t->slots)
        memset(t->slots, 0xff, sizeof(int32_t) * t->cap);
    return t->slots && t->g;
}

static inline uint64_t group_hash(int64_t task, int64_t vcpu, int64_t rid, uint64_t mask, int64_t bucket) {
    /* three independent products (no chain of multiplications), then mixed */
    uint64_t h = ((uint64_t)task << 32 ^ (uint64_t)rid) * 0x9e3779b97f4a7c15ULL;
    h ^= mask * 0xc2b2ae3d27d4eb4fULL;
    h ^= ((uint64_t)vcpu << 40 ^ (uint64_t)bucket) * 0x165667b19e3779f9ULL;
    return h ^ (h >> 29);
}

/* twice the slots and the room; 0 when out of memory */
static int grouping_grow(grouping *t) {
    Py_ssize_t cap = t->cap * 2;
    int32_t *slots = malloc(sizeof(int32_t) * cap);
    group_rec *g = realloc(t->g, sizeof(group_rec) * (cap / 2));
    if (!slots || !g) {
        free(slots);
        if (g)
            t->g = g;
        return 0;
    }
    memset(slots, 0xff, sizeof(int32_t) * cap);
    for (Py_ssize_t k = 0; k < t->groups; k++) {
        const group_rec *y = &g[k];
        Py_ssize_t i = (Py_ssize_t)(group_hash(y->task, y->vcpu, y->rid, y->mask, y->bucket) & (uint64_t)(cap - 1));
        while (slots[i] >= 0)
            i = (i + 1) & (cap - 1);
        slots[i] = (int32_t)k;
    }
    free(t->slots);
    t->slots = slots;
    t->g = g;
    t->cap = cap;
    t->room = cap / 2;
    return 1;
}

/* count one exit in the group of its key (`bucket` and `vcpu` are part of it); 0 when out of memory */
static inline int grouping_add(grouping *t, int64_t task, int64_t vcpu, int64_t rid, uint64_t mask, int64_t bucket,
                               double ts) {
    uint64_t h = group_hash(task, vcpu, rid, mask, bucket);
    Py_ssize_t i = (Py_ssize_t)(h & (uint64_t)(t->cap - 1));
    for (;;) {
        int32_t k = t->slots[i];
        if (k < 0) {
            if (t->groups == t->room) {
                if (!grouping_grow(t))
                    return 0;
                return grouping_add(t, task, vcpu, rid, mask, bucket, ts);
            }
            k = (int32_t)t->groups++;
            t->slots[i] = k;
            t->g[k] = (group_rec){task, vcpu, rid, mask, bucket, 1, ts, ts};
            return 1;
        }
        group_rec *y = &t->g[k];
        if (y->task == task && y->vcpu == vcpu && y->rid == rid && y->mask == mask && y->bucket == bucket) {
            y->n++;
            if (ts < y->first)
                y->first = ts;
            if (ts > y->last)
                y->last = ts;
            return 1;
        }
        i = (i + 1) & (t->cap - 1);
    }
}

static PyObject *py_fold(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer ex, tk, rd, tv;
    double width;
    Py_ssize_t keep_bad;
    int times = 1;
    if (!PyArg_ParseTuple(args, "y*y*y*y*dn|p", &ex, &tk, &rd, &tv, &width, &keep_bad, &times))
        return NULL;
    PyObject *out = NULL;
    const exit_rec *rec = ex.buf;
    Py_ssize_t rows = ex.len / (Py_ssize_t)sizeof(exit_rec);
    const int64_t *task_of = tk.buf;
    const uint32_t *rid_of = rd.buf;
    const uint8_t *tdv = tv.buf;
    Py_ssize_t ntask = tk.len / 8, nrid = rd.len / 4;
    grouping by_key = {0}, by_time = {0};
    int64_t(*bad)[2] = NULL;
    if (ex.len % (Py_ssize_t)sizeof(exit_rec) || tv.len < nrid || keep_bad < 0) {
        PyErr_SetString(PyExc_ValueError, "fold: malformed arguments");
        goto done;
    }
    for (Py_ssize_t r = 0; r < rows; r++)
        if (rec[r].prefix >= ntask || rec[r].reason >= nrid) {
            PyErr_SetString(PyExc_ValueError, "fold: an id out of range");
            goto done;
        }
    bad = malloc(sizeof(int64_t[2]) * (keep_bad > 0 ? keep_bad : 1));
    if (!grouping_init(&by_key) || !grouping_init(&by_time) || !bad) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t nbad = 0, kept = 0;
    int ok = 1;
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t r = 0; r < rows; r++) {
        const exit_rec *x = &rec[r];
        int64_t task = task_of[x->prefix];
        if (task < 0) {
            if (kept < keep_bad) {
                bad[kept][0] = x->line;
                bad[kept][1] = x->start;
                kept++;
            }
            nbad++;
            continue;
        }
        int64_t rid = rid_of[x->reason];
        uint64_t mask = tdv[x->reason] ? x->info1 : 0;
        if (!grouping_add(&by_key, task, x->vcpu, rid, mask, 0, x->ts) ||
            (times && !grouping_add(&by_time, task, 0, rid, mask, (int64_t)floor(x->ts / width), x->ts))) {
            ok = 0;
            break;
        }
    }
    Py_END_ALLOW_THREADS;
    if (!ok) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject *bad_lines = PyList_New(kept);
    if (bad_lines != NULL) {
        for (Py_ssize_t k = 0; k < kept; k++) {
            PyObject *item = Py_BuildValue("LL", (long long)bad[k][0], (long long)bad[k][1]);
            if (item == NULL) {
                Py_CLEAR(bad_lines);
                break;
            }
            PyList_SET_ITEM(bad_lines, k, item);
        }
    }
    if (bad_lines != NULL)
        out = Py_BuildValue("y#y#nN", (const char *)by_key.g, by_key.groups * (Py_ssize_t)sizeof(group_rec),
                            (const char *)by_time.g, by_time.groups * (Py_ssize_t)sizeof(group_rec), nbad, bad_lines);
done:
    free(by_key.slots);
    free(by_key.g);
    free(by_time.slots);
    free(by_time.g);
    free(bad);
    PyBuffer_Release(&ex);
    PyBuffer_Release(&tk);
    PyBuffer_Release(&rd);
    PyBuffer_Release(&tv);
    return out;
}

PyDoc_STRVAR(group_doc, "group(keys, width, n, lo, hi) -> (first, total, least, greatest, of_row)\n\n"
                        "Merge the rows of `keys` (int64, rows x width, C order) that are equal: per group, the row\n"
                        "that opened it (int64), the sum of `n` (int64) over its rows, the least `lo` and the greatest\n"
                        "`hi` (float64); per row, its group (int64).  Each result is bytes.");

static PyObject *py_group(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer kb, nb, lb, hb;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "y*ny*y*y*", &kb, &width, &nb, &lb, &hb))
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t rows = width > 0 ? kb.len / (8 * width) : 0;
    if (width <= 0 || kb.len != rows * 8 * width || nb.len != rows * 8 || lb.len != rows * 8 || hb.len != rows * 8) {
        PyErr_SetString(PyExc_ValueError, "group: malformed arguments");
        goto done;
    }
    const int64_t *keys = kb.buf, *n = nb.buf;
    const double *lo = lb.buf, *hi = hb.buf;
    Py_ssize_t cap = capacity_for(rows), alloc = rows ? rows : 1;
    int32_t *slots = malloc(sizeof(int32_t) * cap);
    uint64_t *hash = malloc(8 * alloc);
    int64_t *first = malloc(8 * alloc), *total = malloc(8 * alloc), *of_row = malloc(8 * alloc);
    double *least = malloc(8 * alloc), *greatest = malloc(8 * alloc);
    if (!slots || !hash || !first || !total || !of_row || !least || !greatest) {
        PyErr_NoMemory();
        goto freed;
    }
    Py_ssize_t groups = 0;
    Py_BEGIN_ALLOW_THREADS;
    memset(slots, 0xff, sizeof(int32_t) * cap);
    for (Py_ssize_t r = 0; r < rows; r++) {
        const int64_t *key = keys + r * width;
        uint64_t h = 0xcbf29ce484222325ULL;
        for (Py_ssize_t c = 0; c < width; c++)
            h = (h ^ (uint64_t)key[c]) * 0x100000001b3ULL;
        h = mix(h);
        Py_ssize_t i = (Py_ssize_t)(h & (uint64_t)(cap - 1));
        int64_t g;
        for (;;) {
            g = slots[i];
            if (g < 0) {
                g = groups++;
                slots[i] = (int32_t)g;
                hash[g] = h;
                first[g] = r;
                total[g] = 0;
                least[g] = lo[r];
                greatest[g] = hi[r];
                break;
            }
            if (hash[g] == h) {
                const int64_t *other = keys + first[g] * width;
                Py_ssize_t c = 0;
                while (c < width && other[c] == key[c])
                    c++;
                if (c == width)
                    break;
            }
            i = (i + 1) & (cap - 1);
        }
        of_row[r] = g;
        total[g] += n[r];
        if (lo[r] < least[g])
            least[g] = lo[r];
        if (hi[r] > greatest[g])
            greatest[g] = hi[r];
    }
    Py_END_ALLOW_THREADS;
    out = Py_BuildValue("y#y#y#y#y#", (const char *)first, groups * 8, (const char *)total, groups * 8,
                        (const char *)least, groups * 8, (const char *)greatest, groups * 8, (const char *)of_row,
                        rows * 8);
freed:
    free(slots);
    free(hash);
    free(first);
    free(total);
    free(of_row);
    free(least);
    free(greatest);
done:
    PyBuffer_Release(&kb);
    PyBuffer_Release(&nb);
    PyBuffer_Release(&lb);
    PyBuffer_Release(&hb);
    return out;
}

static PyMethodDef methods[] = {
    {"scan", py_scan, METH_VARARGS, scan_doc},
    {"fold", py_fold, METH_VARARGS, fold_doc},
    {"group", py_group, METH_VARARGS, group_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scan", "The compiled fast path of `tdvmcall trace` (see scan.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__scan(void) {
    memset(HEX, 0xff, sizeof HEX);
    for (int c = '0'; c <= '9'; c++)
        HEX[c] = (int8_t)(c - '0');
    for (int c = 'a'; c <= 'f'; c++)
        HEX[c] = (int8_t)(c - 'a' + 10);
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "EXIT_RECORD", sizeof(exit_rec)) < 0 ||
                      PyModule_AddIntConstant(m, "GROUP_RECORD", sizeof(group_rec)) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
