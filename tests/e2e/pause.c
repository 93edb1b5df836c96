/*
 * The pod sandbox's "pause" process for the CRI e2e tests: what the pause image of
 * Kubernetes does, written for these tests.  PID 1 of the pod: it holds the pod's
 * namespaces, sleeps in pause(2) and reaps whatever gets re-parented to it (with a shared
 * PID namespace, orphans of every container of the pod).  SIGINT/SIGTERM end it with 0,
 * which is how StopPodSandbox stops it without waiting for the kill timeout.
 *
 * Built by tests/e2e/cri.py with `gcc -static -Os` into the test's pause image.
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

static int on(int sig, void (*handler)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = handler;
    sa.sa_flags = SA_RESTART | (sig == SIGCHLD ? SA_NOCLDSTOP : 0);
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        static const char version[] = "pyshim e2e pause\n";
        (void)!write(1, version, sizeof version - 1);
        return 0;
    }
    if (getpid() != 1) {
        static const char warning[] = "pause: not PID 1, reaping only my own children\n";
        (void)!write(2, warning, sizeof warning - 1);
    }
    if (on(SIGINT, stop) < 0 || on(SIGTERM, stop) < 0 || on(SIGCHLD, reap) < 0) {
        return 1;
    }
    for (;;) {
        pause();
    }
}
