/*
 * The benchmark's anchor for the UDP echo: the least a UDP echo server can do.
 *
 * One socket, one blocking recvfrom/sendto loop, no checks at all. Whatever Reflector's echo
 * adds on top of this (authentication, rate limits, timestamps, Python) is the overhead the
 * benchmark reports. Usage: echo HOST PORT; prints the bound port on stdout, runs until killed.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Larger than any probe the benchmark sends (120 octets) and than a 1500-byte MTU's payload. */
#define BUFFER_SIZE 2048

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
        return 2;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "echo: not an IPv4 address: %s\n", argv[1]);
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("echo: bind");
        return 1;
    }
    socklen_t len = sizeof addr;
    getsockname(fd, (struct sockaddr *)&addr, &len);
    printf("%u\n", ntohs(addr.sin_port));
    fflush(stdout);
    char buffer[BUFFER_SIZE];
    for (;;) {
        struct sockaddr_in peer;
        socklen_t peer_len = sizeof peer;
        ssize_t n = recvfrom(fd, buffer, sizeof buffer, 0, (struct sockaddr *)&peer, &peer_len);
        if (n < 0)
            continue;
        sendto(fd, buffer, (size_t)n, 0, (struct sockaddr *)&peer, peer_len);
    }
}
