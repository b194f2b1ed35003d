/*
 * route-tune's native forwarder: the `route-tune` executable a CNI runtime runs on a node.
 *
 * It does what cniplugin/transport/shim.py's forward() does -- hand one CNI request (env, stdin,
 * the pod's and the caller's netns fds) to the resident engine and print its reply -- without an
 * interpreter start, which was most of the cost of a resident request. Everything else is the
 * Python plugin's: when no engine takes the request (or the command reads no stdin, or
 * ROUTE_TUNE_ENGINE=inprocess) this process execs the in-process plugin, RT_PYTHON -I -S -c
 * RT_CODE, with stdin untouched or replayed from a memfd. So every error reply, the VERSION
 * answer and the in-process engine stay one implementation, in Python.
 *
 * Wire format: docs/resident.md (the constants below are transport/shim.py's; a test keeps them
 * equal). Built by cniplugin/transport/native.py, which defines RT_PYTHON, RT_CODE and
 * RT_VERSION.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef RT_PYTHON
#error "RT_PYTHON (the in-process interpreter) must be defined"
#endif
#ifndef RT_CODE
#error "RT_CODE (the in-process -c program) must be defined"
#endif
#ifndef RT_VERSION
#define RT_VERSION "unknown"
#endif

/* Found by `cni-route-tune install` in the installed file, as in the script shim. */
__attribute__((used)) static const char version_marker[] =
    "\n# route-tune-runtime-version: " RT_VERSION "\n";

#define MAGIC "RTE\x01"
#define HEADER_LEN 13
#define FLAG_POD_NETNS 1
#define FLAG_NODE_NETNS 2
#define DEFAULT_SOCKET "/run/route-tune/engine.sock"
#define MAX_REPLY (64u << 20)
#define NS_GET_NSTYPE 0xB703
#define NSTYPE_NET 0x40000000

extern char **environ;

static const char *env_or_empty(const char *name) {
    const char *v = getenv(name);
    return v ? v : "";
}

/* argv of this process: the plugin gets the same arguments */
static char **plugin_args;
/* stdin once this process has read it: replayed to the plugin on fd 0 */
static const char *read_stdin;
static size_t read_stdin_len;
static int stdin_was_read;

static int replay_stdin(void) {
    int fd = memfd_create("route-tune-stdin", 0);
    if (fd < 0) return -1;
    size_t off = 0;
    while (off < read_stdin_len) {
        ssize_t n = write(fd, read_stdin + off, read_stdin_len - off);
        if (n <= 0) break;
        off += (size_t)n;
    }
    int ok = off == read_stdin_len && lseek(fd, 0, SEEK_SET) == 0 && dup2(fd, 0) == 0;
    close(fd);
    return ok ? 0 : -1;
}

/* The in-process plugin, with this process's arguments. `failed` non-NULL: the engine may
 * have run the request (or stdin cannot be replayed), so it must not run here; the plugin then
 * only prints the code-11 reply "<failed>: <details>" in the config's cniVersion. */
static void exec_python_plugin(const char *failed, const char *details) {
    char *argv[64] = {RT_PYTHON, "-I", "-S", "-c", RT_CODE};
    int n = 5;
    if (stdin_was_read && replay_stdin() != 0 && !failed) {
        failed = "resident engine not reachable";
        details = "cannot hand the request to the in-process plugin (memfd)";
    }
    if (failed) {
        argv[n++] = "--forwarder-failed";
        argv[n++] = (char *)failed;
        argv[n++] = (char *)details;
    } else {
        for (char **a = plugin_args + 1; *a && n < 63; a++) argv[n++] = *a;
    }
    argv[n] = NULL;
    execve(RT_PYTHON, argv, environ);
    /* No interpreter: one CNI error object on stdout, as the plugin would print it. */
    static const char msg[] =
        "{\n    \"cniVersion\": \"1.1.0\",\n    \"code\": 999,\n"
        "    \"msg\": \"route-tune runtime missing\",\n"
        "    \"details\": \"cannot execute " RT_PYTHON ": reinstall with cni-route-tune install\"\n}";
    ssize_t ignored = write(1, msg, sizeof msg - 1);
    (void)ignored;
    _exit(1);
}

static void exec_plugin(void) { exec_python_plugin(NULL, NULL); }

static void exec_dropped(const char *details) {
    exec_python_plugin("resident engine dropped the request", details);
}

static int mode_is(const char *want) {
    /* shim.mode(): strip, lower, "" -> auto, unknown -> auto. */
    const char *v = env_or_empty("ROUTE_TUNE_ENGINE");
    while (*v == ' ' || (*v >= '\t' && *v <= '\r')) v++;
    size_t n = strlen(v);
    while (n && (v[n - 1] == ' ' || (v[n - 1] >= '\t' && v[n - 1] <= '\r'))) n--;
    char mode[16];
    if (n == 0 || n >= sizeof mode) {
        return strcmp(want, "auto") == 0;
    }
    for (size_t i = 0; i < n; i++) {
        char c = v[i];
        mode[i] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
    }
    mode[n] = 0;
    if (strcmp(mode, "resident") && strcmp(mode, "inprocess") && strcmp(mode, "auto")) {
        return strcmp(want, "auto") == 0;
    }
    return strcmp(mode, want) == 0;
}

static int reads_stdin(const char *command) {
    static const char *const commands[] = {"ADD", "DEL", "CHECK", "GC", "STATUS"};
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++) {
        if (strcmp(command, commands[i]) == 0) return 1;
    }
    return 0;
}

struct buf {
    char *data;
    size_t len, cap;
};

static int buf_add(struct buf *b, const void *data, size_t len) {
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 8192;
        while (cap < b->len + len) cap *= 2;
        char *p = realloc(b->data, cap);
        if (!p) return -1;
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    return 0;
}

static int read_all(int fd, struct buf *b) {
    char chunk[65536];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n == 0) return 0;
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (buf_add(b, chunk, (size_t)n)) return -1;
    }
}

static void put_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static uint32_t get_be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Up to n bytes; fewer only if the engine closed the connection (or it broke). */
static size_t recv_exact(int sock, char *into, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(sock, into + got, n - got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    return got;
}

static int write_all(int fd, const char *data, size_t len) {
    while (len) {
        ssize_t n = write(fd, data, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* shim._is_net_ns: an nsfs file of a network namespace (other nsfs files stay paths). */
static int is_net_ns(int fd, int node_fd) {
    struct stat a, b;
    if (fstat(fd, &a) || fstat(node_fd, &b) || a.st_dev != b.st_dev) return 0;
    return ioctl(fd, NS_GET_NSTYPE) == NSTYPE_NET;
}

int main(int argc, char **argv) {
    plugin_args = argv;
    const char *command = env_or_empty("CNI_COMMAND");
    if (argc > 1 || !reads_stdin(command) || mode_is("inprocess")) exec_plugin();

    const char *path = getenv("ROUTE_TUNE_SOCKET");
    if (!path || !*path) path = DEFAULT_SOCKET;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    /* Not connected: no engine has seen anything. The plugin tries once more and then runs
     * in-process (auto) or prints the code-11 reply (resident); stdin is still unread. */
    if (sock < 0 || strlen(path) >= sizeof addr.sun_path) exec_plugin();
    memcpy(addr.sun_path, path, strlen(path) + 1);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0) exec_plugin();

    struct buf in = {0}, env = {0};
    if (read_all(0, &in)) exec_python_plugin("error reading from stdin", strerror(errno));
    read_stdin = in.data ? in.data : "";
    read_stdin_len = in.len;
    stdin_was_read = 1;
    int fds[2], nfds = 0, flags = 0;
    int node_fd = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (node_fd < 0) exec_plugin();
    const char *netns = env_or_empty("CNI_NETNS");
    if (*netns) {
        /* Missing or not a netns: the engine opens the path itself and reports it exactly as
         * in-process (DEL succeeds, ADD fails with code 3). */
        int fd = open(netns, O_RDONLY | O_CLOEXEC);
        if (fd >= 0 && is_net_ns(fd, node_fd)) {
            fds[nfds++] = fd;
            flags |= FLAG_POD_NETNS;
        } else if (fd >= 0) {
            close(fd);
        }
    }
    fds[nfds++] = node_fd;
    flags |= FLAG_NODE_NETNS;
    for (char **e = environ; *e; e++) {
        if (strncmp(*e, "CNI_", 4) == 0 || strncmp(*e, "ROUTE_TUNE_", 11) == 0) {
            if (buf_add(&env, *e, strlen(*e) + 1)) exec_plugin();
        }
    }

    unsigned char header[HEADER_LEN];
    memcpy(header, MAGIC, 4);
    header[4] = (unsigned char)flags;
    put_be32(header + 5, (uint32_t)env.len);
    put_be32(header + 9, (uint32_t)in.len);
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov[3] = {{header, HEADER_LEN}, {env.data, env.len}, {in.data, in.len}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 3, .msg_control = control,
                         .msg_controllen = CMSG_SPACE(nfds * sizeof(int))};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(cmsg), fds, nfds * sizeof(int));
    /* One sendmsg carries the fds; the rest of a big request follows. A send error is not
     * fatal: an engine that refused early (bad peer, too big) explains it in its reply. */
    size_t total = HEADER_LEN + env.len + in.len, sent = 0;
    ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n > 0) {
        sent = (size_t)n;
        while (sent < total) {
            size_t skip = sent, i = 0;
            while (skip >= iov[i].iov_len) skip -= iov[i++].iov_len;
            const char *base = (const char *)iov[i].iov_base + skip;
            ssize_t m = send(sock, base, iov[i].iov_len - skip, MSG_NOSIGNAL);
            if (m < 0 && errno == EINTR) continue;
            if (m <= 0) break;
            sent += (size_t)m;
        }
    }
    for (int i = 0; i < nfds; i++) close(fds[i]);

    char head[HEADER_LEN];
    size_t got = recv_exact(sock, head, HEADER_LEN);
    if (got >= 4 && memcmp(head, MAGIC, 3) == 0 && head[3] != MAGIC[3]) {
        /* Another protocol version: nothing was run. The plugin asks again and applies the
         * policy (auto: in-process; resident: code 11 naming both versions). */
        close(sock);
        exec_plugin();
    }
    if (got == 0) exec_dropped("connection closed before any reply");
    if (got < 4 || memcmp(head, MAGIC, 4) != 0) exec_dropped("reply is not from a route-tune engine");
    if (got < HEADER_LEN) exec_dropped("truncated reply header");
    uint32_t out_len = get_be32((unsigned char *)head + 5), err_len = get_be32((unsigned char *)head + 9);
    if ((uint64_t)out_len + err_len > MAX_REPLY) exec_dropped("reply too large");
    char *body = malloc((size_t)out_len + err_len + 1);
    if (!body) exec_dropped("reply too large");
    if (recv_exact(sock, body, (size_t)out_len + err_len) < (size_t)out_len + err_len)
        exec_dropped("truncated reply");
    close(sock);
    if (err_len) write_all(2, body + out_len, err_len);
    write_all(1, body, out_len);
    return (unsigned char)head[4];
}
