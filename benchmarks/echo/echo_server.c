/* The daemon's messaging floor, compiled: a ZeroMQ ROUTER that speaks just enough of the
 * rtns protocol for benchmarks/load.py (hello -> ready, audio -> an answer of the same PCM,
 * stats -> the figures load.py reads) and does no DSP. What its process spends per hop is
 * what libzmq and the kernel cost the daemon for the same messages, with no Python at all.
 *
 *   gcc -O2 -o /tmp/rtns-echo benchmarks/echo/echo_server.c -lzmq   (Debian: libzmq3-dev)
 *   python benchmarks/load.py --server-cmd '/tmp/rtns-echo {endpoint} [TICK_MS]' ...
 *
 * TICK_MS (default 4, the daemon's --tick-ms): answers are held and sent together every
 * TICK_MS, as the daemon sends a tick's answers (0: each answer at once).
 *
 * Not part of rtns: a measuring instrument for issue 28 ("what a compiled path would buy").
 */
#define _GNU_SOURCE /* memmem */
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <zmq.h>

#define HOP 128 /* samples per hop at 16 kHz: the daemon's unit of work */

/* An audio answer held until the tick: the client's id, the header, the PCM to echo. */
typedef struct {
    zmq_msg_t id, pcm;
    int head_len;
    char head[96];
} answer_t;

#define MAX_PENDING 65536
static answer_t pending[MAX_PENDING];
static int n_pending = 0;

static void flush_answers(void *sock) {
    for (int i = 0; i < n_pending; i++) {
        answer_t *a = &pending[i];
        zmq_msg_send(&a->id, sock, ZMQ_SNDMORE | ZMQ_DONTWAIT);
        zmq_send(sock, a->head, (size_t)a->head_len, ZMQ_SNDMORE | ZMQ_DONTWAIT);
        zmq_msg_send(&a->pcm, sock, ZMQ_DONTWAIT);
        zmq_msg_close(&a->id); /* no-ops after a successful send */
        zmq_msg_close(&a->pcm);
    }
    n_pending = 0;
}

static volatile sig_atomic_t stop = 0;
static void on_term(int sig) { (void)sig; stop = 1; }

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static double cpu_s(void) { /* every thread of the process: libzmq's I/O thread too */
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + 1e-6 * r.ru_utime.tv_usec + r.ru_stime.tv_sec +
           1e-6 * r.ru_stime.tv_usec;
}

/* Receive one part; 0 on success. */
static int recv_part(void *sock, zmq_msg_t *m, int flags) {
    zmq_msg_init(m);
    if (zmq_msg_recv(m, sock, flags) < 0) {
        zmq_msg_close(m);
        return -1;
    }
    return 0;
}

static void send_bytes(void *sock, const void *data, size_t n, int more) {
    zmq_send(sock, data, n, more ? ZMQ_SNDMORE | ZMQ_DONTWAIT : ZMQ_DONTWAIT);
}

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: %s ENDPOINT [TICK_MS]\n", argv[0]);
        return 2;
    }
    double tick_s = (argc == 3 ? atof(argv[2]) : 4.0) / 1e3;
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    void *ctx = zmq_ctx_new();
    /* As the daemon's context (rtns.daemon.server.io_context): the I/O thread at SCHED_BATCH. */
    zmq_ctx_set(ctx, ZMQ_THREAD_SCHED_POLICY, SCHED_BATCH);
    void *sock = zmq_socket(ctx, ZMQ_ROUTER);
    /* A signal may land on libzmq's I/O thread and never interrupt the main thread's
     * receive: wake at least every 200 ms to look at the stop flag. */
    int hwm = 10000, one = 1, linger = 0, wake_ms = 200;
    zmq_setsockopt(sock, ZMQ_RCVTIMEO, &wake_ms, sizeof wake_ms);
    zmq_setsockopt(sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_bind(sock, argv[1]) != 0) {
        fprintf(stderr, "bind %s: %s\n", argv[1], zmq_strerror(errno));
        return 1;
    }
    long long hops = 0, messages = 0;
    double t0 = now_s(), c0 = cpu_s();
    char head[160];
    static const char ready[] =
        "{\"type\":\"ready\",\"session\":\"echo\",\"model\":\"echo\",\"latency\":0,"
        "\"latency_16k\":0,\"block_shift\":128,\"sample_rate\":16000,\"format\":\"f32le\","
        "\"channels\":1}";
    double next_tick = now_s();
    while (!stop) {
        zmq_msg_t id, parts[3];
        int n = 0, more = 1;
        double t = now_s();
        if (tick_s > 0 && n_pending && t >= next_tick) {
            flush_answers(sock);
            next_tick = t + tick_s;
        }
        if (tick_s > 0 && n_pending) { /* wait for a message, at most until the tick */
            zmq_pollitem_t item = {sock, 0, ZMQ_POLLIN, 0};
            long wait_ms = (long)(1e3 * (next_tick - t) + 0.999);
            if (zmq_poll(&item, 1, wait_ms < 0 ? 0 : wait_ms) <= 0) continue;
        } else if (tick_s > 0) {
            next_tick = t + tick_s; /* idle: the first answer waits at most one tick */
        }
        if (recv_part(sock, &id, 0) != 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            break;
        }
        while (more && n < 3) { /* header, then PCM (anything beyond is dropped) */
            if (recv_part(sock, &parts[n], 0) != 0) break;
            more = zmq_msg_more(&parts[n]);
            n++;
        }
        while (more) { /* a message of more parts than we read: discard the rest */
            zmq_msg_t extra;
            if (recv_part(sock, &extra, 0) != 0) break;
            more = zmq_msg_more(&extra);
            zmq_msg_close(&extra);
        }
        if (n == 0) {
            zmq_msg_close(&id);
            continue;
        }
        const char *h = zmq_msg_data(&parts[0]);
        size_t hn = zmq_msg_size(&parts[0]);
        int is_audio = hn > 15 && memcmp(h, "{\"type\":\"audio\"", 15) == 0 && n == 2;
        if (!(is_audio && tick_s > 0)) send_bytes(sock, zmq_msg_data(&id), zmq_msg_size(&id), 1);
        if (is_audio) {
            long long seq = 0;
            for (size_t i = 0; i < hn; i++) { /* the digits after "seq": */
                if (h[i] == 'q' && i + 3 < hn && h[i + 1] == '"' && h[i + 2] == ':') {
                    for (size_t j = i + 3; j < hn && h[j] >= '0' && h[j] <= '9'; j++)
                        seq = 10 * seq + (h[j] - '0');
                    break;
                }
            }
            size_t pcm = zmq_msg_size(&parts[1]);
            long long samples = (long long)(pcm / 4);
            messages++;
            hops += samples / HOP;
            if (tick_s > 0) { /* held until the tick: keep the id and the PCM */
                if (n_pending == MAX_PENDING) flush_answers(sock);
                answer_t *a = &pending[n_pending++];
                a->head_len = snprintf(a->head, sizeof a->head,
                                       "{\"type\":\"audio\",\"seq\":%lld,\"samples\":%lld,"
                                       "\"queued\":0}",
                                       seq, samples);
                zmq_msg_init(&a->id);
                zmq_msg_move(&a->id, &id);
                zmq_msg_init(&a->pcm);
                zmq_msg_move(&a->pcm, &parts[1]);
                zmq_msg_close(&parts[0]);
                zmq_msg_close(&parts[1]);
                zmq_msg_close(&id);
                continue;
            }
            int k = snprintf(head, sizeof head,
                             "{\"type\":\"audio\",\"seq\":%lld,\"samples\":%lld,\"queued\":0}",
                             seq, samples);
            send_bytes(sock, head, (size_t)k, 1);
            zmq_msg_send(&parts[1], sock, ZMQ_DONTWAIT); /* the same bytes back, no copy */
            n = 1;                                     /* parts[1] was handed to libzmq */
        } else if (hn > 15 && memcmp(h, "{\"type\":\"hello\"", 15) == 0) {
            send_bytes(sock, ready, sizeof ready - 1, 0);
        } else if (hn > 15 && memcmp(h, "{\"type\":\"stats\"", 15) == 0) {
            double t = now_s(), c = cpu_s();
            int k = snprintf(
                head, sizeof head,
                "{\"type\":\"stats\",\"blocks_processed\":%lld,\"uptime_s\":%.6f,\"cpu_s\":%.6f,"
                "\"overruns\":0,\"messages\":%lld}",
                hops, t - t0, c - c0, messages);
            send_bytes(sock, head, (size_t)k, 0);
            if (memmem(h, hn, "true", 4) != NULL) { /* {"reset": true} */
                hops = messages = 0;
                t0 = now_s();
                c0 = cpu_s();
            }
        } else { /* close, ping, anything else: an empty object, so the peer is not left waiting */
            send_bytes(sock, "{}", 2, 0);
        }
        for (int i = 0; i < n; i++) zmq_msg_close(&parts[i]);
        zmq_msg_close(&id);
    }
    zmq_close(sock);
    zmq_ctx_term(ctx);
    return 0;
}
