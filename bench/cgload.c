/* cgload: an open-loop load generator that plays Asterisk 22 for whole calls.
 *
 * It is both sides of Asterisk that a call-control server sees:
 *
 *  FastAGI client  each call, at its scheduled time (open loop: never waiting for
 *                  earlier calls), connects to --agi-port and sends the request
 *                  headers in Asterisk 22's order, in two writes
 *                  (callguard/simulator/asterisk.py agi_headers). Each command the
 *                  server writes is answered as res_agi does: one per time the socket
 *                  turns readable; after the server's half-close the rest, then
 *                  HANGUP, then close (../shared/protocol/asterisk/agi-pipelined.md).
 *  AMI server      on --ami-port: banner, Login, Ping, Events, Filter, CoreShowChannels,
 *                  AbsoluteTimeout, Hangup, Getvar, Logoff, answered byte for byte as in
 *                  tests/fixtures/asterisk/ami-*.jsonl; and per call the events that
 *                  asterisk_conf/manager.conf's eventfilter lets through, as a PJSIP
 *                  caller Dial()ing PJSIP/EXTEN@trunk produces them, with Timestamp
 *                  (timestampevents = yes):
 *                    placed     Newchannel (caller, Ring), racing the FastAGI connection
 *                    denied     Hangup (caller, cause 21) right after the AGI
 *                    allowed    Newchannel (callee, Down), Newstate (callee, Ringing);
 *                               after --ring: Newstate (callee, Up), DialEnd ANSWER,
 *                               Newstate (caller, Up); after --talk: Hangup callee and
 *                               caller (cause 16). --events caller: the caller's only.
 *                  TIMEOUT(absolute) from the AGI and each AbsoluteTimeout set the
 *                  channel's deadline as Asterisk does (each replaces the one before);
 *                  one that passes before the talk ends hangs the call up (Hangup,
 *                  cause 16, as on PJSIP) and counts it as cut off.
 *
 * --talk 0 hangs every call up right after its AGI (a setups-only load).
 *
 * One run with --rate/--duration, after the first AMI login (plus --settle seconds),
 * then one JSON line of results on stdout. With --control, runs come from stdin lines
 * "run RATE DURATION [TALK]" ("quit" ends), each answered with a JSON line; other stdout
 * lines start with "# " (listening, logins, CoreShowChannels) for a driver to wait on.
 *
 * Single thread, epoll, a timerfd for the schedule; libc only. bench/calls.py builds
 * it with  cc -O2 -Wall -Wextra -o bench/.build/cgload bench/cgload.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_AMI 8            /* AMI sessions at once */
#define AGI_BUF 1024         /* a FastAGI session's unread command bytes */
#define MAX_QUEUED 32        /* commands res_agi has buffered and not yet run */
#define MAX_FIELDS 64        /* header lines of one AMI action */
#define DIALLED_OFFSET 1000000000u /* callee uniqueids: BASE.(SEQ + this), never a caller's */
#define THREADID "139932030469824"

/* -- options ------------------------------------------------------------------------- */
static struct {
    int agi_port, ami_port, accounts;
    double rate, duration, ring, talk, lead, drain, settle, linger;
    unsigned seed;
    bool caller_only, control;
    const char *user, *secret, *exten;
} opt = {.agi_port = 4573, .ami_port = 5038, .accounts = 100, .rate = 100, .duration = 10,
         .ring = 0.5, .talk = 5,
         .lead = 7,    /* callguard's lead + grace: min(5, quota / 2) + 2 */
         .drain = 10,  /* seconds past a run's last expected hangup before giving up */
         .settle = 1,  /* one-shot: seconds after the first login before the run */
         .linger = 1,  /* one-shot: seconds of AMI after the run, for the last actions */
         .user = "callguard", .exten = "41901234567"};

/* -- time ---------------------------------------------------------------------------- */
static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Asterisk's "%ld.%06ld" of the wall clock (Timestamp:, Ping, CDR(answer,u)). */
static void stamp(char *out, size_t n, const struct timespec *ts) {
    snprintf(out, n, "%ld.%06ld", (long)ts->tv_sec, ts->tv_nsec / 1000);
}

static void wall_now(struct timespec *ts) { clock_gettime(CLOCK_REALTIME, ts); }

static double cpu_seconds(double *user, double *sys) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    *sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    return *user + *sys;
}

/* -- growable byte buffers (AMI input and output) -------------------------------------- */
struct buf { char *p; size_t off, len, cap; };

static void buf_reserve(struct buf *b, size_t n) {
    if (b->off && b->len + n > b->cap) { /* reuse the space already written out */
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap < b->len + n) cap *= 2;
        if (!(b->p = realloc(b->p, cap))) { perror("realloc"); exit(1); }
        b->cap = cap;
    }
}

static void buf_add(struct buf *b, const char *s, size_t n) {
    buf_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void buf_fmt(struct buf *b, const char *fmt, ...) {
    for (size_t room = 512;; room *= 2) {
        buf_reserve(b, room);
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n >= 0 && (size_t)n < b->cap - b->len) { b->len += n; return; }
        room = n + 1;
    }
}

static size_t buf_pending(const struct buf *b) { return b->len - b->off; }

/* -- statistics ------------------------------------------------------------------------ */
struct series { double *v; size_t n, cap; };

static void series_add(struct series *s, double x) {
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1024;
        if (!(s->v = realloc(s->v, s->cap * sizeof *s->v))) { perror("realloc"); exit(1); }
    }
    s->v[s->n++] = x;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Linear-interpolated percentile of sorted values, as bench/common.py's percentile. */
static double pct(const struct series *s, double p) {
    double k = (s->n - 1) * p / 100;
    size_t lo = (size_t)k, hi = lo + 1 < s->n ? lo + 1 : lo;
    return s->v[lo] + (s->v[hi] - s->v[lo]) * (k - lo);
}

/* Counts by name (deny reasons, error kinds, AMI actions): a handful of names each;
 * past MAX_NAMES - 1 names the last slot counts the rest as "other". */
#define MAX_NAMES 24
struct counter { char name[MAX_NAMES][40]; long n[MAX_NAMES]; int used; };

static void count(struct counter *c, const char *name) {
    for (int i = 0; i < c->used; i++)
        if (!strcmp(c->name[i], name)) { c->n[i]++; return; }
    if (c->used == MAX_NAMES - 1) name = "other";
    if (c->used == MAX_NAMES) { c->n[MAX_NAMES - 1]++; return; }
    snprintf(c->name[c->used], sizeof c->name[0], "%s", name);
    c->n[c->used++] = 1;
}

/* "connect:ECONNREFUSED": the error kinds a loopback load runs into, by name. */
static void count_errno(struct counter *c, const char *what, int err) {
    static const struct { int e; const char *name; } names[] = {
        {ECONNREFUSED, "ECONNREFUSED"}, {ECONNRESET, "ECONNRESET"}, {ETIMEDOUT, "ETIMEDOUT"},
        {EADDRNOTAVAIL, "EADDRNOTAVAIL"}, {EMFILE, "EMFILE"}, {ENFILE, "ENFILE"},
        {EPIPE, "EPIPE"}, {ENOBUFS, "ENOBUFS"}, {EAGAIN, "EAGAIN"}};
    char kind[40];
    snprintf(kind, sizeof kind, "%s:errno%d", what, err);
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (names[i].e == err) snprintf(kind, sizeof kind, "%s:%s", what, names[i].name);
    count(c, kind);
}

/* -- calls ------------------------------------------------------------------------------ */
enum state { WAITING, IN_AGI, RINGING, TALKING, ENDED };
enum ending { END_REJECTED, END_SETUP_ONLY, END_COMPLETED, END_CUTOFF, END_HUNGUP_BY_AMI,
              END_FAILED, END_UNFINISHED, N_ENDINGS };
static const char *ending_name[] = {"rejected", "setup_only", "completed", "cutoff",
                                    "hungup_by_ami", "failed", "unfinished"};

struct agi;

struct call {
    struct agi *agi;                       /* its FastAGI session while IN_AGI */
    double scheduled, launched, answered;  /* monotonic seconds */
    struct timespec answered_wall;         /* for CDR(answer,u) */
    double push_at, push_timeout;          /* the last AbsoluteTimeout: arrival, seconds */
    uint32_t seq, deadline_gen, pushes;
    int pending_cause;                     /* an AMI Hangup that came during the AGI */
    uint8_t state;
    bool allowed, dialled;                 /* dialled: the callee channel exists */
};

/* The current run. Calls of earlier runs have all ended before the next starts. */
static struct run {
    bool active;
    double rate, duration, talk, t0, last_agi_end, schedule_end, give_up, first_start, last_end;
    uint32_t total, launched, live, lowest_live, first_seq;
    struct call *calls;
    double cpu0, user0, sys0, wall0;
    long ok, denied, errors, answered, pushes, early, answered_no_push, ends[N_ENDINGS];
    long ami_backlog_max;
    double timeout_min, timeout_max;
    struct series latency, lag, late, first_push;
    struct counter reasons, error_kinds, actions;
} run;

static long base;             /* uniqueid prefix: the epoch second this process started */
static uint32_t next_seq = 1; /* uniqueid suffix and channel number, across runs */
static uint64_t rng = 88172645463325252ull;

static uint32_t account_of(const struct call *c) {
    if (!opt.seed) return c->seq % opt.accounts; /* round robin, as bench/agi_load.py */
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng % opt.accounts);
}

/* -- timers: a binary heap; an entry for a replaced deadline is skipped when due --------- */
enum timer_kind { T_ANSWER, T_TALK_END, T_DEADLINE };
struct timer { double at; uint32_t call, gen; uint8_t kind; };
static struct { struct timer *t; size_t n, cap; } heap;

static void timer_add(double at, uint32_t call, uint8_t kind, uint32_t gen) {
    if (heap.n == heap.cap) {
        heap.cap = heap.cap ? heap.cap * 2 : 4096;
        if (!(heap.t = realloc(heap.t, heap.cap * sizeof *heap.t))) { perror("realloc"); exit(1); }
    }
    size_t i = heap.n++;
    while (i && heap.t[(i - 1) / 2].at > at) { heap.t[i] = heap.t[(i - 1) / 2]; i = (i - 1) / 2; }
    heap.t[i] = (struct timer){at, call, gen, kind};
}

static struct timer timer_pop(void) {
    struct timer top = heap.t[0], last = heap.t[--heap.n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= heap.n) break;
        if (c + 1 < heap.n && heap.t[c + 1].at < heap.t[c].at) c++;
        if (heap.t[c].at >= last.at) break;
        heap.t[i] = heap.t[c];
        i = c;
    }
    if (heap.n) heap.t[i] = last;
    return top;
}

/* -- epoll handlers: each registered object starts with its kind ------------------------ */
enum kind { K_TIMER, K_STDIN, K_AMI_LISTEN, K_AMI, K_AGI };
struct handler { int kind; int fd; };
static int ep;

static void watch(struct handler *h, int op, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = h};
    if (epoll_ctl(ep, op, h->fd, &ev) < 0) { perror("epoll_ctl"); exit(1); }
}

/* -- AMI sessions and events --------------------------------------------------------------- */
struct ami {
    struct handler h;
    bool used, logged_in, listener, closing, want_out;
    struct buf in, out;
};
static struct ami amis[MAX_AMI];
static struct buf ev; /* the event being built, then copied to every listener */
static long logins;

static void emit(void) {
    for (int i = 0; i < MAX_AMI; i++)
        if (amis[i].used && amis[i].listener && !amis[i].closing)
            buf_add(&amis[i].out, ev.p, ev.len);
    ev.len = 0;
}

static bool have_listener(void) {
    for (int i = 0; i < MAX_AMI; i++)
        if (amis[i].used && amis[i].listener && !amis[i].closing) return true;
    return false;
}

static const char *state_desc(int state) {
    switch (state) {
    case 0: return "Down";
    case 4: return "Ring";
    case 5: return "Ringing";
    default: return "Up";
    }
}

static const char *cause_txt(int cause) {
    switch (cause) {
    case 16: return "Normal Clearing";
    case 17: return "User busy";
    case 21: return "Call Rejected";
    case 34: return "Circuit/channel congestion";
    default: return "Unknown";
    }
}

/* The two channels of a call, as Asterisk names them in events. */
struct chan {
    char name[40], uniqueid[32], linkedid[32], account[16];
    const char *cid_num, *cid_name, *con_num, *con_name, *context, *exten;
};

static void caller_chan(const struct call *c, uint32_t account, struct chan *ch) {
    snprintf(ch->name, sizeof ch->name, "PJSIP/bench-%08x", c->seq);
    snprintf(ch->uniqueid, sizeof ch->uniqueid, "%ld.%u", base, c->seq);
    memcpy(ch->linkedid, ch->uniqueid, sizeof ch->linkedid);
    snprintf(ch->account, sizeof ch->account, "4144%07u", account);
    ch->cid_num = ch->cid_name = "sipp";
    ch->con_num = ch->con_name = "<unknown>";
    ch->context = "test";
    ch->exten = opt.exten;
}

/* The dialled channel; `created`: as it is announced, before Dial gave it caller id and
 * account (ami-pjsip-call's farend;1). */
static void callee_chan(const struct call *c, uint32_t account, bool created, struct chan *ch) {
    snprintf(ch->name, sizeof ch->name, "PJSIP/trunk-%08x", c->seq);
    snprintf(ch->uniqueid, sizeof ch->uniqueid, "%ld.%u", base, c->seq + DIALLED_OFFSET);
    snprintf(ch->linkedid, sizeof ch->linkedid, "%ld.%u", base, c->seq);
    if (created) {
        ch->account[0] = 0;
        ch->cid_num = ch->cid_name = ch->con_num = ch->con_name = "<unknown>";
    } else {
        snprintf(ch->account, sizeof ch->account, "4144%07u", account);
        ch->cid_num = opt.exten;
        ch->cid_name = "<unknown>";
        ch->con_num = ch->con_name = "sipp";
    }
    ch->context = "farend";
    ch->exten = opt.exten;
}

/* One event of a channel: Event, Privilege, Timestamp, the channel's fields, then `extra`
 * (lines ending in \r\n), as manager.c writes them. */
static void channel_event(const char *name, const struct chan *ch, int state, int priority,
                          const char *exten, const char *extra) {
    struct timespec ts;
    char when[32];
    wall_now(&ts);
    stamp(when, sizeof when, &ts);
    buf_fmt(&ev,
            "Event: %s\r\nPrivilege: call,all\r\nTimestamp: %s\r\nChannel: %s\r\n"
            "ChannelState: %d\r\nChannelStateDesc: %s\r\nCallerIDNum: %s\r\n"
            "CallerIDName: %s\r\nConnectedLineNum: %s\r\nConnectedLineName: %s\r\n"
            "Language: en\r\nAccountCode: %s\r\nContext: %s\r\nExten: %s\r\n"
            "Priority: %d\r\nUniqueid: %s\r\nLinkedid: %s\r\n%s\r\n",
            name, when, ch->name, state, state_desc(state), ch->cid_num, ch->cid_name,
            ch->con_num, ch->con_name, ch->account, ch->context, exten ? exten : ch->exten,
            priority, ch->uniqueid, ch->linkedid, extra);
}

static uint32_t *accounts_of; /* per call of the run: its account */

static void emit_newchannel(const struct call *c) {
    if (!have_listener()) return;
    struct chan ch;
    caller_chan(c, accounts_of[c - run.calls], &ch);
    channel_event("Newchannel", &ch, 4, 1, NULL, "");
    emit();
}

static void emit_dial(const struct call *c) {
    if (!have_listener()) return;
    struct chan ch;
    callee_chan(c, accounts_of[c - run.calls], true, &ch);
    channel_event("Newchannel", &ch, 0, 1, NULL, "");
    callee_chan(c, accounts_of[c - run.calls], false, &ch);
    channel_event("Newstate", &ch, 5, 1, NULL, "");
    emit();
}

static void emit_answer(const struct call *c) {
    if (!have_listener()) return;
    struct chan caller, callee;
    uint32_t account = accounts_of[c - run.calls];
    caller_chan(c, account, &caller);
    callee_chan(c, account, false, &callee);
    if (c->dialled) channel_event("Newstate", &callee, 6, 1, NULL, "");
    char extra[1024];
    snprintf(extra, sizeof extra,
             "DestChannel: %s\r\nDestChannelState: 6\r\nDestChannelStateDesc: Up\r\n"
             "DestCallerIDNum: %s\r\nDestCallerIDName: <unknown>\r\nDestConnectedLineNum: sipp\r\n"
             "DestConnectedLineName: sipp\r\nDestLanguage: en\r\nDestAccountCode: %s\r\n"
             "DestContext: farend\r\nDestExten: \r\nDestPriority: 1\r\nDestUniqueid: %s\r\n"
             "DestLinkedid: %s\r\nDialStatus: ANSWER\r\n",
             callee.name, opt.exten, callee.account, callee.uniqueid, callee.linkedid);
    channel_event("DialEnd", &caller, 4, 2, NULL, extra);
    channel_event("Newstate", &caller, 6, 2, NULL, "");
    emit();
}

static void emit_hangup(const struct call *c, int cause) {
    if (!have_listener()) return;
    struct chan ch;
    char extra[96];
    uint32_t account = accounts_of[c - run.calls];
    int state = c->state == TALKING ? 6 : 4;
    if (c->dialled) { /* the bridge breaks: the callee goes first (ami-pjsip-call) */
        callee_chan(c, account, false, &ch);
        snprintf(extra, sizeof extra, "Cause: 16\r\nCause-txt: %s\r\n", cause_txt(16));
        channel_event("Hangup", &ch, c->state == TALKING ? 6 : 5, 1, "", extra);
    }
    caller_chan(c, account, &ch);
    snprintf(extra, sizeof extra, "Cause: %d\r\nCause-txt: %s\r\n", cause, cause_txt(cause));
    channel_event("Hangup", &ch, state, 3, "h", extra);
    emit();
}

/* -- the life of a call --------------------------------------------------------------------- */
static struct call *call_by_channel(const char *name) {
    static const char prefix[] = "PJSIP/bench-";
    if (!name || strncmp(name, prefix, sizeof prefix - 1)) return NULL;
    char *end;
    unsigned long seq = strtoul(name + sizeof prefix - 1, &end, 16);
    if (*end || end - name != (long)sizeof prefix - 1 + 8 || seq < run.first_seq) return NULL;
    uint32_t i = (uint32_t)(seq - run.first_seq);
    if (!run.calls || i >= run.launched) return NULL;
    struct call *c = &run.calls[i];
    return c->state == WAITING || c->state == ENDED ? NULL : c;
}

static void agi_close(struct agi *a);

static void end_call(struct call *c, int cause, enum ending why) {
    if (c->state == ENDED) return;
    if (c->agi) agi_close(c->agi);
    emit_hangup(c, cause);
    c->state = ENDED;
    run.ends[why]++;
    run.live--;
    run.last_end = mono();
    if (c->answered && !c->pushes) run.answered_no_push++;
}

static void set_deadline(struct call *c, double now, double seconds) {
    timer_add(now + seconds, (uint32_t)(c - run.calls), T_DEADLINE, ++c->deadline_gen);
}

/* The AGI is over (the server closed after its commands): the dialplan goes on. */
static void agi_done(struct call *c, double now, double timeout_absolute) {
    if (c->pending_cause) { end_call(c, c->pending_cause, END_HUNGUP_BY_AMI); return; }
    if (!c->allowed) { end_call(c, 21, END_REJECTED); return; }  /* callguard-authorize */
    if (run.talk <= 0) { end_call(c, 16, END_SETUP_ONLY); return; }
    c->state = RINGING;
    if (timeout_absolute > 0) set_deadline(c, now, timeout_absolute);
    if (!opt.caller_only) { c->dialled = true; emit_dial(c); }
    timer_add(now + opt.ring, (uint32_t)(c - run.calls), T_ANSWER, 0);
}

static void answer(struct call *c, double now) {
    c->state = TALKING;
    c->answered = now;
    wall_now(&c->answered_wall);
    run.answered++;
    emit_answer(c);
    timer_add(now + run.talk, (uint32_t)(c - run.calls), T_TALK_END, 0);
}

static void fire(struct timer t, double now) {
    struct call *c = &run.calls[t.call];
    if (c->state == ENDED) return;
    if (t.kind == T_ANSWER && c->state == RINGING) answer(c, now);
    else if (t.kind == T_TALK_END && c->state == TALKING) end_call(c, 16, END_COMPLETED);
    else if (t.kind == T_DEADLINE && t.gen == c->deadline_gen && c->state != IN_AGI)
        end_call(c, 16, END_CUTOFF); /* Asterisk's own timeout: callguard did not extend */
}

/* -- FastAGI client ------------------------------------------------------------------------- */
enum reply { R_OK1, R_OK0, R_UNKNOWN };
static const char *reply_text[] = {"200 result=1\n", "200 result=0\n",
                                   "510 Invalid or unknown command\n"};

struct agi {
    struct handler h;
    uint32_t call;
    bool connected;
    uint8_t queue[MAX_QUEUED];
    int queued;
    double timeout_absolute;
    char reason[32];           /* CALLGUARD_REASON as set */
    size_t len;
    char buf[AGI_BUF];
};

static void agi_close(struct agi *a) {
    run.calls[a->call].agi = NULL;
    close(a->h.fd); /* and out of the epoll set */
    free(a);
}

/* AGISTATUS is not SUCCESS: the dialplan denies and hangs up. */
static void agi_fail(struct agi *a, const char *kind, int err) {
    struct call *c = &run.calls[a->call];
    run.errors++;
    if (err) count_errno(&run.error_kinds, kind, err);
    else count(&run.error_kinds, kind);
    end_call(c, 21, END_FAILED);
}

static void agi_headers(struct agi *a, const struct call *c) {
    struct chan ch;
    char first[1024], second[256];
    caller_chan(c, accounts_of[a->call], &ch);
    int n1 = snprintf(first, sizeof first,
        "agi_network: yes\nagi_network_script: authorize\n"
        "agi_request: agi://127.0.0.1:%d/authorize\nagi_channel: %s\nagi_language: en\n"
        "agi_type: PJSIP\nagi_uniqueid: %s\nagi_version: 22.10.1\nagi_callerid: sipp\n"
        "agi_calleridname: sipp\nagi_callingpres: 0\nagi_callingani2: 0\n"
        "agi_callington: 0\nagi_callingtns: 0\nagi_dnid: %s\nagi_rdnis: unknown\n"
        "agi_context: test\n", opt.agi_port, ch.name, ch.uniqueid, opt.exten);
    int n2 = snprintf(second, sizeof second,
        "agi_extension: %s\nagi_priority: 1\nagi_enhanced: 0.0\nagi_accountcode: %s\n"
        "agi_threadid: " THREADID "\n\n", opt.exten, ch.account);
    /* Two writes, as Asterisk 22 does; a fresh loopback socket takes both whole. */
    if (send(a->h.fd, first, n1, MSG_NOSIGNAL) != n1 ||
        send(a->h.fd, second, n2, MSG_NOSIGNAL) != n2)
        agi_fail(a, "agi_send_headers", 0);
}

/* One command line from the server: what it sets, and the reply res_agi will give. */
static void agi_command(struct agi *a, char *line) {
    struct call *c = &run.calls[a->call];
    enum reply r = R_UNKNOWN;
    if (!strncmp(line, "SET VARIABLE ", 13)) {
        char *name = line + 13, *value = strchr(name, ' ');
        r = R_OK1;
        if (value) {
            *value++ = 0;
            if (*value == '"') { value++; value[strcspn(value, "\"")] = 0; }
            if (!strcmp(name, "CALLGUARD_RESULT")) c->allowed = !strcmp(value, "ALLOW");
            else if (!strcmp(name, "CALLGUARD_REASON"))
                snprintf(a->reason, sizeof a->reason, "%s", value);
            else if (!strcmp(name, "TIMEOUT(absolute)")) a->timeout_absolute = atof(value);
        }
    } else if (!strcmp(line, "NOOP") || !strncmp(line, "NOOP ", 5)) {
        r = R_OK0;
    } else if (!strncmp(line, "VERBOSE ", 8)) {
        r = R_OK1;
    } else {
        count(&run.error_kinds, "agi_unknown_command");
    }
    if (a->queued < MAX_QUEUED) a->queue[a->queued++] = r;
}

static void agi_reply_one(struct agi *a) {
    if (!a->queued) return;
    const char *r = reply_text[a->queue[0]];
    send(a->h.fd, r, strlen(r), MSG_NOSIGNAL);
    memmove(a->queue, a->queue + 1, --a->queued);
}

static void agi_readable(struct agi *a, uint32_t events) {
    struct call *c = &run.calls[a->call];
    if (!a->connected) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(a->h.fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) { agi_fail(a, "connect", err); return; }
        a->connected = true;
        watch(&a->h, EPOLL_CTL_MOD, EPOLLIN);
        agi_headers(a, c);
        return;
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    for (;;) {
        ssize_t n = read(a->h.fd, a->buf + a->len, sizeof a->buf - 1 - a->len);
        if (n < 0 && errno == EAGAIN) return;
        if (n < 0) { agi_fail(a, "read", errno); return; }
        if (n == 0) break;
        a->len += n;
        char *line = a->buf, *nl;
        while ((nl = memchr(line, '\n', a->buf + a->len - line))) {
            *nl = 0;
            agi_command(a, line);
            line = nl + 1;
        }
        a->len -= line - a->buf;
        memmove(a->buf, line, a->len);
        if (a->len == sizeof a->buf - 1) { agi_fail(a, "agi_line_too_long", 0); return; }
        agi_reply_one(a); /* res_agi runs one buffered command per readable event */
    }
    /* EOF: Asterisk runs what is left, says HANGUP, closes (agi-pipelined.halfclose). */
    double now = mono();
    if (a->len) { a->buf[a->len] = 0; agi_command(a, a->buf); }
    char out[MAX_QUEUED * 32 + 8];
    size_t len = 0;
    for (int i = 0; i < a->queued; i++) {
        size_t n = strlen(reply_text[a->queue[i]]);
        memcpy(out + len, reply_text[a->queue[i]], n);
        len += n;
    }
    memcpy(out + len, "HANGUP\n", 7);
    send(a->h.fd, out, len + 7, MSG_NOSIGNAL);
    double timeout_absolute = a->timeout_absolute;
    run.last_agi_end = now;
    if (c->allowed) {
        run.ok++;
        series_add(&run.latency, (now - c->launched) * 1e3);
    } else {
        run.denied++;
        count(&run.reasons, a->reason[0] ? a->reason : "no_result"); /* closed, nothing set */
    }
    agi_close(a);
    if (timeout_absolute > 0) {
        if (run.timeout_min < 0 || timeout_absolute < run.timeout_min)
            run.timeout_min = timeout_absolute;
        if (timeout_absolute > run.timeout_max) run.timeout_max = timeout_absolute;
    }
    agi_done(c, now, timeout_absolute);
}

static struct sockaddr_in agi_addr;

static void launch(uint32_t i, double now) {
    struct call *c = &run.calls[i];
    c->launched = now;
    c->seq = next_seq++;
    c->state = IN_AGI;
    accounts_of[i] = account_of(c);
    run.launched++;
    run.live++;
    series_add(&run.lag, (now - c->scheduled) * 1e3);
    if (!run.first_start) run.first_start = now;
    /* Asterisk announces the channel before its dialplan reaches the AGI. */
    emit_newchannel(c);
    struct agi *a = calloc(1, sizeof *a);
    a->h.kind = K_AGI;
    a->call = i;
    a->h.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (a->h.fd < 0) {
        run.errors++;
        count_errno(&run.error_kinds, "socket", errno);
        free(a);
        end_call(c, 21, END_FAILED);
        return;
    }
    c->agi = a;
    int one = 1;
    setsockopt(a->h.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(a->h.fd, (struct sockaddr *)&agi_addr, sizeof agi_addr) < 0 &&
        errno != EINPROGRESS) {
        agi_fail(a, "connect", errno);
        return;
    }
    watch(&a->h, EPOLL_CTL_ADD, EPOLLOUT | EPOLLIN);
}

/* -- AMI server: actions ------------------------------------------------------------------------ */
struct fields { int n; char *key[MAX_FIELDS], *value[MAX_FIELDS]; };

/* Asterisk looks headers up case-insensitively and takes the first. */
static const char *get(const struct fields *f, const char *key) {
    for (int i = 0; i < f->n; i++)
        if (!strcasecmp(f->key[i], key)) return f->value[i];
    return NULL;
}

static void reply(struct ami *s, const char *aid, const char *status, const char *fmt, ...) {
    buf_fmt(&s->out, "Response: %s\r\n", status);
    if (aid && *aid) buf_fmt(&s->out, "ActionID: %s\r\n", aid);
    char body[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(body, sizeof body, fmt, ap);
    va_end(ap);
    buf_fmt(&s->out, "%s\r\n", body);
}

static void core_show_channel(struct ami *s, const char *aid, const struct chan *ch, int state,
                              int priority, const char *app, const char *data, double age) {
    int secs = (int)age;
    buf_fmt(&s->out,
            "Event: CoreShowChannel\r\nActionID: %s\r\nChannel: %s\r\nChannelState: %d\r\n"
            "ChannelStateDesc: %s\r\nCallerIDNum: %s\r\nCallerIDName: %s\r\n"
            "ConnectedLineNum: %s\r\nConnectedLineName: %s\r\nLanguage: en\r\n"
            "AccountCode: %s\r\nContext: %s\r\nExten: %s\r\nPriority: %d\r\nUniqueid: %s\r\n"
            "Linkedid: %s\r\nApplication: %s\r\nApplicationData: %s\r\n"
            "Duration: %02d:%02d:%02d\r\nBridgeId: \r\n\r\n",
            aid, ch->name, state, state_desc(state), ch->cid_num, ch->cid_name, ch->con_num,
            ch->con_name, ch->account, ch->context, ch->exten, priority, ch->uniqueid,
            ch->linkedid, app, data, secs / 3600, secs / 60 % 60, secs % 60);
}

static void core_show_channels(struct ami *s, const char *aid, double now) {
    reply(s, aid, "Success", "EventList: start\r\nMessage: Channels will follow\r\n");
    long items = 0;
    char dial[64];
    snprintf(dial, sizeof dial, "PJSIP/%s@trunk,60", opt.exten);
    while (run.lowest_live < run.launched && run.calls[run.lowest_live].state == ENDED)
        run.lowest_live++;
    for (uint32_t i = run.lowest_live; run.calls && i < run.launched; i++) {
        struct call *c = &run.calls[i];
        if (c->state == ENDED) continue;
        struct chan ch;
        int state = c->state == TALKING ? 6 : 4;
        caller_chan(c, accounts_of[i], &ch);
        core_show_channel(s, aid, &ch, state, 2, c->state == IN_AGI ? "AGI" : "Dial",
                          c->state == IN_AGI ? "agi://127.0.0.1/authorize" : dial,
                          now - c->launched);
        items++;
        if (c->dialled) {
            callee_chan(c, accounts_of[i], false, &ch);
            core_show_channel(s, aid, &ch, c->state == TALKING ? 6 : 5, 1, "AppDial",
                              "(Outgoing Line)", now - c->launched);
            items++;
        }
    }
    buf_fmt(&s->out, "Event: CoreShowChannelsComplete\r\nActionID: %s\r\n"
                     "EventList: Complete\r\nListItems: %ld\r\n\r\n", aid ? aid : "", items);
    printf("# coreshowchannels items=%ld\n", items);
    fflush(stdout);
}

static void absolute_timeout(struct ami *s, const char *aid, const struct fields *f, double now) {
    struct call *c = call_by_channel(get(f, "Channel"));
    const char *t = get(f, "Timeout");
    double seconds = t ? atof(t) : 0;
    if (!c) { reply(s, aid, "Error", "Message: No such channel\r\n"); return; }
    if (seconds <= 0) { reply(s, aid, "Error", "Message: No timeout specified\r\n"); return; }
    run.pushes++;
    if (c->pushes) {
        /* Due `lead` (callguard's lead + grace) before the deadline the last one set,
         * as bench/supervise.py measures it; late is after that. */
        double late = now - (c->push_at + c->push_timeout - opt.lead);
        series_add(&run.late, late * 1e3);
        if (late < -0.05) run.early++;
    } else if (c->answered) {
        series_add(&run.first_push, (now - c->answered) * 1e3);
    }
    c->pushes++;
    c->push_at = now;
    c->push_timeout = seconds;
    set_deadline(c, now, seconds);
    reply(s, aid, "Success", "Message: Timeout Set\r\n");
}

static void hangup_action(struct ami *s, const char *aid, const struct fields *f) {
    struct call *c = call_by_channel(get(f, "Channel"));
    if (!c) { reply(s, aid, "Error", "Message: No such channel\r\n"); return; }
    const char *cause = get(f, "Cause");
    int q850 = cause && *cause ? atoi(cause) : 16;
    reply(s, aid, "Success", "Message: Channel Hungup\r\n");
    /* During an open FastAGI session Asterisk reports the hangup when the AGI ends. */
    if (c->state == IN_AGI) c->pending_cause = q850 ? q850 : 16;
    else end_call(c, q850, END_HUNGUP_BY_AMI);
}

static void getvar(struct ami *s, const char *aid, const struct fields *f) {
    const char *channel = get(f, "Channel"), *variable = get(f, "Variable");
    struct call *c = call_by_channel(channel);
    if (channel && !c) { reply(s, aid, "Error", "Message: No such channel\r\n"); return; }
    char value[32] = "";
    if (c && variable && !strcmp(variable, "CDR(answer,u)")) {
        /* func_cdr raw mode: the CDR's answer time, zero while unanswered */
        if (c->answered) stamp(value, sizeof value, &c->answered_wall);
        else strcpy(value, "0.000000");
    }
    reply(s, aid, "Success", "Variable: %s\r\nValue: %s\r\n", variable ? variable : "", value);
}

static void act(struct ami *s, struct fields *f, double now) {
    const char *action = get(f, "Action"), *aid = get(f, "ActionID");
    if (!action || strcasecmp(f->key[0], "Action")) {
        buf_fmt(&s->out, "Response: Error\r\nMessage: Missing action in request\r\n\r\n");
        return;
    }
    char lower[32];
    snprintf(lower, sizeof lower, "%s", action);
    for (char *p = lower; *p; p++) *p = (*p >= 'A' && *p <= 'Z') ? *p + 32 : *p;
    count(&run.actions, lower);
    if (!strcmp(lower, "login")) {
        const char *user = get(f, "Username"), *secret = get(f, "Secret"), *events = get(f, "Events");
        if (!user || strcmp(user, opt.user) || (opt.secret && (!secret || strcmp(secret, opt.secret)))) {
            reply(s, aid, "Error", "Message: Authentication failed\r\n");
            s->closing = true;
            return;
        }
        s->logged_in = true;
        s->listener = !events || strcasecmp(events, "off");
        logins++;
        reply(s, aid, "Success", "Message: Authentication accepted\r\n");
        printf("# login user=%s events=%s\n", user, events ? events : "");
        fflush(stdout);
    } else if (!strcmp(lower, "logoff")) {
        reply(s, aid, "Goodbye", "Message: Thanks for all the fish.\r\n");
        s->closing = true;
    } else if (!s->logged_in) {
        reply(s, aid, "Error", "Message: Permission denied\r\n");
    } else if (!strcmp(lower, "ping")) {
        struct timespec ts;
        char when[32];
        wall_now(&ts);
        stamp(when, sizeof when, &ts);
        reply(s, aid, "Success", "Ping: Pong\r\nTimestamp: %s\r\n", when);
    } else if (!strcmp(lower, "events")) {
        const char *mask = get(f, "EventMask");
        s->listener = !mask || strcasecmp(mask, "off");
        reply(s, aid, "Success", "Events: %s\r\n", s->listener ? "On" : "Off");
    } else if (!strcmp(lower, "filter")) {
        reply(s, aid, "Success", "Message: Success\r\n");
    } else if (!strcmp(lower, "coreshowchannels")) {
        core_show_channels(s, aid, now);
    } else if (!strcmp(lower, "absolutetimeout")) {
        absolute_timeout(s, aid, f, now);
    } else if (!strcmp(lower, "hangup")) {
        hangup_action(s, aid, f);
    } else if (!strcmp(lower, "getvar")) {
        getvar(s, aid, f);
    } else {
        reply(s, aid, "Error", "Message: Invalid/unknown command\r\n");
    }
}

static void ami_close(struct ami *s) {
    close(s->h.fd);
    free(s->in.p);
    free(s->out.p);
    memset(s, 0, sizeof *s);
}

static void ami_flush(struct ami *s) {
    while (buf_pending(&s->out)) {
        ssize_t n = send(s->h.fd, s->out.p + s->out.off, buf_pending(&s->out), MSG_NOSIGNAL);
        if (n < 0 && errno == EAGAIN) break;
        if (n < 0) { ami_close(s); return; }
        s->out.off += n;
    }
    if (!buf_pending(&s->out)) s->out.off = s->out.len = 0;
    if ((long)buf_pending(&s->out) > run.ami_backlog_max) run.ami_backlog_max = buf_pending(&s->out);
    if (s->closing && !buf_pending(&s->out)) { ami_close(s); return; }
    bool want = buf_pending(&s->out) > 0; /* the peer reads slower than we write */
    if (want != s->want_out) {
        s->want_out = want;
        watch(&s->h, EPOLL_CTL_MOD, EPOLLIN | (want ? EPOLLOUT : 0));
    }
}

static void ami_readable(struct ami *s, double now) {
    bool gone = false;
    for (;;) {
        buf_reserve(&s->in, 65536);
        ssize_t n = read(s->h.fd, s->in.p + s->in.len, s->in.cap - s->in.len);
        if (n < 0 && errno == EAGAIN) break;
        if (n <= 0) { gone = true; break; }
        s->in.len += n;
    }
    char *start = s->in.p + s->in.off, *end = s->in.p + s->in.len, *stop;
    while ((stop = memmem(start, end - start, "\r\n\r\n", 4))) {
        struct fields f = {0};
        *stop = 0;
        for (char *line = start; line && f.n < MAX_FIELDS;) {
            char *next = strstr(line, "\r\n");
            if (next) { *next = 0; next += 2; }
            char *colon = strstr(line, ": ");
            if (colon) {
                *colon = 0;
                f.key[f.n] = line;
                f.value[f.n++] = colon + 2;
            } else if (*line) { /* manager.c keeps "Key:value" too, and so do we */
                char *c = strchr(line, ':');
                if (c) { *c = 0; f.key[f.n] = line; f.value[f.n++] = c + 1; }
            }
            line = next;
        }
        if (f.n) act(s, &f, now);
        start = stop + 4;
    }
    s->in.off = start - s->in.p;
    if (s->in.off == s->in.len) s->in.off = s->in.len = 0;
    if (gone) ami_close(s); /* what it sent last is answered into the void, as Asterisk does */
}

static void ami_accept(struct handler *listener) {
    for (;;) {
        int fd = accept4(listener->fd, NULL, NULL, SOCK_NONBLOCK);
        if (fd < 0) return;
        int slot = 0;
        while (slot < MAX_AMI && amis[slot].used) slot++;
        if (slot == MAX_AMI) { close(fd); continue; }
        struct ami *s = &amis[slot];
        *s = (struct ami){.h = {K_AMI, fd}, .used = true};
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        watch(&s->h, EPOLL_CTL_ADD, EPOLLIN);
        buf_add(&s->out, "Asterisk Call Manager/11.0.0\r\n", 30);
    }
}

/* -- runs ------------------------------------------------------------------------------------ */
static void run_start(double rate, double duration, double talk) {
    free(run.calls);
    free(accounts_of);
    free(run.latency.v), free(run.lag.v), free(run.late.v), free(run.first_push.v);
    memset(&run, 0, sizeof run);
    run.active = true;
    run.rate = rate;
    run.duration = duration;
    run.talk = talk;
    run.total = (uint32_t)(rate * duration + 0.5);
    if (!run.total) run.total = 1;
    run.calls = calloc(run.total, sizeof *run.calls);
    accounts_of = calloc(run.total, sizeof *accounts_of);
    run.first_seq = next_seq;
    run.timeout_min = -1;
    run.t0 = mono() + 0.01;
    for (uint32_t i = 0; i < run.total; i++) run.calls[i].scheduled = run.t0 + i / rate;
    run.schedule_end = run.calls[run.total - 1].scheduled;
    run.give_up = run.schedule_end + opt.ring + talk + opt.drain;
    run.wall0 = mono();
    run.cpu0 = cpu_seconds(&run.user0, &run.sys0);
    heap.n = 0;
}

static void json_summary(struct buf *b, const char *name, struct series *s) {
    if (!s->n) {
        buf_fmt(b, "\"%s\": {\"n\": 0, \"median\": null, \"p90\": null, \"p99\": null, "
                   "\"p999\": null, \"max\": null}, ", name);
        return;
    }
    qsort(s->v, s->n, sizeof *s->v, cmp_double);
    buf_fmt(b, "\"%s\": {\"n\": %zu, \"median\": %.3f, \"p90\": %.3f, \"p99\": %.3f, "
               "\"p999\": %.3f, \"max\": %.3f}, ", name, s->n, pct(s, 50), pct(s, 90),
            pct(s, 99), pct(s, 99.9), s->v[s->n - 1]);
}

static void json_counter(struct buf *b, const char *name, const struct counter *c) {
    buf_fmt(b, "\"%s\": {", name);
    for (int i = 0; i < c->used; i++)
        buf_fmt(b, "%s\"%s\": %ld", i ? ", " : "", c->name[i], c->n[i]);
    buf_fmt(b, "}, ");
}

static void run_report(void) {
    double user, sys, cpu = cpu_seconds(&user, &sys) - run.cpu0;
    double wall = mono() - run.wall0;
    struct buf b = {0};
    buf_fmt(&b, "{\"bench\": \"cgload\", \"rate\": %g, \"duration\": %g, \"ring\": %g, "
                "\"talk\": %g, \"events\": \"%s\", \"accounts\": %d, ",
            run.rate, run.duration, opt.ring, run.talk, opt.caller_only ? "caller" : "full",
            opt.accounts);
    buf_fmt(&b, "\"sent\": %u, \"ok\": %ld, \"denied\": %ld, \"errors\": %ld, \"answered\": %ld, ",
            run.launched, run.ok, run.denied, run.errors, run.answered);
    for (int i = 0; i < N_ENDINGS; i++) buf_fmt(&b, "\"%s\": %ld, ", ending_name[i], run.ends[i]);
    json_counter(&b, "deny_reasons", &run.reasons);
    json_counter(&b, "error_kinds", &run.error_kinds);
    json_counter(&b, "ami_actions", &run.actions);
    json_summary(&b, "lat_ms", &run.latency);
    json_summary(&b, "lag_ms", &run.lag);
    json_summary(&b, "late_ms", &run.late);
    json_summary(&b, "first_push_ms", &run.first_push);
    buf_fmt(&b, "\"pushes\": %ld, \"extends\": %zu, \"early_pushes\": %ld, "
                "\"answered_without_push\": %ld, \"timeout_absolute_min\": %g, "
                "\"timeout_absolute_max\": %g, \"ami_backlog_max\": %ld, \"ami_logins\": %ld, ",
            run.pushes, run.late.n, run.early, run.answered_no_push,
            run.timeout_min < 0 ? 0 : run.timeout_min, run.timeout_max, run.ami_backlog_max,
            logins);
    buf_fmt(&b, "\"schedule_s\": %.3f, \"setup_span_s\": %.3f, \"span_s\": %.3f, "
                "\"wall_s\": %.3f, \"cpu_s\": %.4f, "
                "\"cpu_user_s\": %.4f, \"cpu_sys_s\": %.4f, \"us_per_call\": %.2f}\n",
            run.schedule_end - run.t0, run.last_agi_end - run.first_start,
            run.last_end - run.first_start, wall, cpu,
            user - run.user0, sys - run.sys0, run.launched ? cpu / run.launched * 1e6 : 0.0);
    fwrite(b.p, 1, b.len, stdout);
    fflush(stdout);
    free(b.p);
    run.active = false;
}

/* Start what is due, fire what is due, give up on stragglers; returns the next due time. */
static double run_due(double now) {
    if (!run.active) return 0;
    while (run.launched < run.total && run.calls[run.launched].scheduled <= now) {
        launch(run.launched, now);
        now = mono(); /* each launch's own lag and latency start */
    }
    while (heap.n && heap.t[0].at <= now) fire(timer_pop(), now);
    if (now >= run.give_up && run.live) { /* the server never finished these */
        for (uint32_t i = 0; i < run.launched; i++) {
            struct call *c = &run.calls[i];
            if (c->state == IN_AGI) { run.errors++; count(&run.error_kinds, "timeout"); }
            if (c->state != ENDED) end_call(c, 16, END_UNFINISHED);
        }
    }
    if (run.launched == run.total && !run.live) {
        run_report();
        return 0;
    }
    double next = run.give_up;
    if (run.launched < run.total && run.calls[run.launched].scheduled < next)
        next = run.calls[run.launched].scheduled;
    if (heap.n && heap.t[0].at < next) next = heap.t[0].at;
    return next;
}

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 128) < 0) {
        perror("AMI listen");
        exit(1);
    }
    return fd;
}

static void arm(int tfd, double at) {
    static double armed = -1;
    if (at == armed) return;
    armed = at;
    struct itimerspec its = {0};
    if (at > 0) {
        its.it_value.tv_sec = (time_t)at;
        its.it_value.tv_nsec = (long)((at - (time_t)at) * 1e9);
        if (!its.it_value.tv_sec && !its.it_value.tv_nsec) its.it_value.tv_nsec = 1;
    }
    timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

static void usage(void) {
    fprintf(stderr,
        "usage: cgload [--agi-port P] [--ami-port P] [--rate R] [--duration S] [--ring S]\n"
        "              [--talk S] [--accounts N] [--seed N] [--lead S] [--drain S]\n"
        "              [--settle S] [--linger S] [--events full|caller] [--secret S]\n"
        "              [--user U] [--exten N] [--control]\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--control")) { opt.control = true; continue; }
        if (!v) usage();
        i++;
        if (!strcmp(a, "--agi-port")) opt.agi_port = atoi(v);
        else if (!strcmp(a, "--ami-port")) opt.ami_port = atoi(v);
        else if (!strcmp(a, "--rate")) opt.rate = atof(v);
        else if (!strcmp(a, "--duration")) opt.duration = atof(v);
        else if (!strcmp(a, "--ring")) opt.ring = atof(v);
        else if (!strcmp(a, "--talk")) opt.talk = atof(v);
        else if (!strcmp(a, "--accounts")) opt.accounts = atoi(v);
        else if (!strcmp(a, "--seed")) opt.seed = (unsigned)atol(v);
        else if (!strcmp(a, "--lead")) opt.lead = atof(v);
        else if (!strcmp(a, "--drain")) opt.drain = atof(v);
        else if (!strcmp(a, "--settle")) opt.settle = atof(v);
        else if (!strcmp(a, "--linger")) opt.linger = atof(v);
        else if (!strcmp(a, "--user")) opt.user = v;
        else if (!strcmp(a, "--secret")) opt.secret = v;
        else if (!strcmp(a, "--exten")) opt.exten = v;
        else if (!strcmp(a, "--events")) {
            if (strcmp(v, "full") && strcmp(v, "caller")) usage();
            opt.caller_only = !strcmp(v, "caller");
        } else usage();
    }
    if (opt.rate <= 0 || opt.accounts <= 0) usage();
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    if (opt.seed) rng ^= (uint64_t)opt.seed * 0x9E3779B97F4A7C15ull;
    base = (long)time(NULL);
    struct rlimit rl;
    if (!getrlimit(RLIMIT_NOFILE, &rl)) { rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }
    agi_addr = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(opt.agi_port),
                                    .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ep = epoll_create1(0);
    struct handler listener = {K_AMI_LISTEN, listen_on(opt.ami_port)};
    struct handler timer = {K_TIMER, timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK)};
    struct handler in = {K_STDIN, 0};
    watch(&listener, EPOLL_CTL_ADD, EPOLLIN);
    watch(&timer, EPOLL_CTL_ADD, EPOLLIN);
    if (opt.control) watch(&in, EPOLL_CTL_ADD, EPOLLIN);
    printf("# listening ami=127.0.0.1:%d agi=127.0.0.1:%d\n", opt.ami_port, opt.agi_port);
    fflush(stdout);

    double start_at = 0, exit_at = 0; /* one-shot mode: first login + settle; then linger */
    bool done = false, quit = false, quit_after_run = false;
    char line[256];
    size_t line_len = 0;
    while (!quit) {
        double now = mono();
        if (!opt.control && !run.active && !done && logins && !start_at) start_at = now + opt.settle;
        if (start_at && now >= start_at && !run.active && !done) {
            run_start(opt.rate, opt.duration, opt.talk);
            start_at = 0;
        }
        bool was_active = run.active;
        double next = run_due(now);
        if (was_active && !run.active && !opt.control) { done = true; exit_at = mono() + opt.linger; }
        if ((exit_at && now >= exit_at) || (quit_after_run && !run.active)) break;
        for (int i = 0; i < MAX_AMI; i++) if (amis[i].used) ami_flush(&amis[i]);
        if (start_at && (!next || start_at < next)) next = start_at;
        if (exit_at && (!next || exit_at < next)) next = exit_at;
        arm(timer.fd, next);

        struct epoll_event evs[256];
        int n = epoll_wait(ep, evs, 256, -1);
        now = mono();
        for (int i = 0; i < n; i++) {
            struct handler *h = evs[i].data.ptr;
            switch (h->kind) {
            case K_TIMER: {
                uint64_t expirations;
                if (read(h->fd, &expirations, sizeof expirations) < 0) { /* nothing due */ }
                break;
            }
            case K_AMI_LISTEN: ami_accept(h); break;
            case K_AMI:
                if (((struct ami *)h)->used) {
                    if (evs[i].events & EPOLLIN) ami_readable((struct ami *)h, now);
                    if (((struct ami *)h)->used && (evs[i].events & EPOLLOUT)) ami_flush((struct ami *)h);
                }
                break;
            case K_AGI: agi_readable((struct agi *)h, evs[i].events); break;
            case K_STDIN: {
                ssize_t got = read(0, line + line_len, sizeof line - 1 - line_len);
                if (got <= 0) { /* the driver is gone: finish the run under way, then exit */
                    quit_after_run = true;
                    epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);
                    break;
                }
                line_len += got;
                char *nl;
                while ((nl = memchr(line, '\n', line_len))) {
                    *nl = 0;
                    double rate, duration, talk = opt.talk;
                    if (!strcmp(line, "quit")) quit = true;
                    else if (sscanf(line, "run %lf %lf %lf", &rate, &duration, &talk) >= 2 &&
                             rate > 0 && !run.active)
                        run_start(rate, duration, talk);
                    else fprintf(stderr, "cgload: ignored command %s\n", line);
                    line_len -= nl + 1 - line;
                    memmove(line, nl + 1, line_len);
                }
                if (line_len == sizeof line - 1) line_len = 0;
                break;
            }
            }
        }
    }
    for (int i = 0; i < MAX_AMI; i++) if (amis[i].used) ami_flush(&amis[i]);
    return 0;
}
