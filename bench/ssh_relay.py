#!/usr/bin/env python3
"""Byte-counting ssh ProxyCommand: relays stdin/stdout to HOST PORT and, when the
connection ends, appends "sent received" (bytes, as seen from the client) to COUNT_FILE.

    ssh -o ProxyCommand="python3 bench/ssh_relay.py %h %p /tmp/bytes" ...

Used by the remote benchmarks to compare what osync.py and rsync send over ssh."""
import os
import signal
import socket
import sys
import threading


def pump(source_read, sink_write, counter, index, done):
    try:
        while True:
            data = source_read(65536)
            if not data:
                break
            sink_write(data)
            counter[index] += len(data)
    except OSError:
        pass
    done()


def main(host, port, count_file):
    connection = socket.create_connection((host, int(port)))
    counter = [0, 0]
    stdin = os.fdopen(0, "rb", buffering=0)
    stdout = os.fdopen(1, "wb", buffering=0)

    def close_write():
        try:
            connection.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    written = []

    def report(*_):
        if not written:
            written.append(True)
            with open(count_file, "a") as handle:
                handle.write("%d %d\n" % (counter[0], counter[1]))
        if _:
            os._exit(0)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, report)
    upstream = threading.Thread(target=pump, args=(stdin.read, connection.sendall, counter, 0, close_write))
    upstream.daemon = True
    upstream.start()
    pump(connection.recv, stdout.write, counter, 1, lambda: None)
    upstream.join(timeout=5)
    report()


if __name__ == "__main__":
    main(*sys.argv[1:4])
