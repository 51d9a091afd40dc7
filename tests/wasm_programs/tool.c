/* A small multi-command WASI program for the WASM backend tests.
 * Usage: tool COMMAND [ARGS...]; every command prints what the test checks. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile unsigned long long counter;
static char *volatile last_block; /* keeps malloc from being optimized away */

static int cmd_hello(int argc, char **argv) {
    for (int i = 0; i < argc; i++) printf("arg%d=%s\n", i, argv[i]);
    const char *names[] = {"GREETING", "HOME", "PATH", "SECRET_HOST_VAR"};
    for (unsigned i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *value = getenv(names[i]);
        printf("env %s=%s\n", names[i], value ? value : "(unset)");
    }
    return 0;
}

static int cmd_stdin(void) {
    char buf[4096];
    size_t total = 0, n;
    printf("stdin=");
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) {
        fwrite(buf, 1, n, stdout);
        total += n;
    }
    printf("\nstdin_bytes=%zu\n", total);
    return 0;
}

static int cmd_read(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        printf("open failed: %s\n", strerror(errno));
        return 1;
    }
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    fclose(f);
    printf("content=%s\n", buf);
    return 0;
}

static int cmd_write(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) {
        printf("open failed: %s\n", strerror(errno));
        return 1;
    }
    fputs(text, f);
    if (fclose(f) != 0) {
        printf("close failed: %s\n", strerror(errno));
        return 1;
    }
    printf("written\n");
    return 0;
}

static int cmd_spin(int report) {
    /* Never ends; with report, prints a line every 2^24 iterations. */
    for (;;) {
        counter++;
        if (report && (counter & ((1u << 24) - 1)) == 0) {
            printf("tick %llu\n", counter >> 24);
            fflush(stdout);
        }
    }
}

static int cmd_grow(void) {
    /* Allocates 1 MiB blocks until malloc fails; prints how many it got. */
    unsigned long mib = 0;
    while (mib < 8192) {
        char *block = malloc(1 << 20);
        if (!block) break;
        memset(block, 1, 1 << 20);
        last_block = block;
        mib++;
    }
    printf("allocated_mib=%lu\n", mib);
    return 0;
}

static int cmd_flood(long bytes) {
    char line[1024];
    memset(line, 'x', sizeof line);
    while (bytes > 0) {
        long chunk = bytes < (long)sizeof line ? bytes : (long)sizeof line;
        fwrite(line, 1, (size_t)chunk, stdout);
        bytes -= chunk;
    }
    fprintf(stderr, "flood done\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: tool COMMAND\n");
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "hello")) return cmd_hello(argc, argv);
    if (!strcmp(cmd, "stdin")) return cmd_stdin();
    if (!strcmp(cmd, "exit") && argc > 2) return atoi(argv[2]);
    if (!strcmp(cmd, "read") && argc > 2) return cmd_read(argv[2]);
    if (!strcmp(cmd, "write") && argc > 3) return cmd_write(argv[2], argv[3]);
    if (!strcmp(cmd, "spin")) return cmd_spin(argc > 2);
    if (!strcmp(cmd, "grow")) return cmd_grow();
    if (!strcmp(cmd, "sleep") && argc > 2) {
        sleep((unsigned)atoi(argv[2]));
        printf("slept\n");
        return 0;
    }
    if (!strcmp(cmd, "flood") && argc > 2) return cmd_flood(atol(argv[2]));
    if (!strcmp(cmd, "print") && argc > 2) {
        printf("%s\n", argv[2]);
        return 0;
    }
    fprintf(stderr, "unknown command %s\n", cmd);
    return 2;
}
