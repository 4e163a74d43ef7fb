"""
Durable accept rate of the real listener: messages per second that got their 250 (each one
written and fsynced to the spool first), over loopback.

The gateway runs in its own process (embedded with Gateway.from_config, delivery and filters off,
so only receiving is measured); clients are threads in this process, each with one SMTP session
sending messages back to back.  Usage:

    python bench/accept_bench.py [--messages 2000] [--clients 20] [--size 10240]
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import smtplib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GATEWAY = textwrap.dedent("""
    import sys
    from twisted.internet import reactor
    from mailgate import Gateway
    from mailgate.config import load_config

    service = Gateway.from_config(load_config(sys.argv[1]), reactor=reactor, deliver=False,
                                  admin=False)
    service.startService()
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(root, port):
    path = os.path.join(root, "bench.ini")
    with open(path, "w") as f:
        f.write(textwrap.dedent("""
            [gateway]
            hostname = bench.example
            accepted_domains = example.com
            [queue]
            path = spool
            [dns]
            nameservers = 127.0.0.1:1
            [listener:relay]
            endpoint = tcp:%d:interface=127.0.0.1
            role = relay
            tls = none
            auth = none
            filters =
            max_recipients = 10
        """ % port))
    return path


def client(port, count, body, results):
    done = 0
    with smtplib.SMTP("127.0.0.1", port, local_hostname="bench-client.example", timeout=60) as s:
        for _ in range(count):
            s.sendmail("sender@remote.example", ["user@example.com"], body)
            done += 1
    results.append(done)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--size", type=int, default=10240)
    args = parser.parse_args()
    line = b"x" * 76 + b"\r\n"
    body = b"Subject: bench\r\n\r\n" + line * (args.size // len(line))
    with tempfile.TemporaryDirectory() as root:
        port = free_port()
        config = write_config(root, port)
        env = dict(os.environ, PYTHONPATH=REPO)
        gateway = subprocess.Popen([sys.executable, "-c", GATEWAY, config], stdout=subprocess.PIPE,
                                   env=env, text=True)
        try:
            if gateway.stdout.readline().strip() != "ready":
                raise SystemExit("gateway did not start")
            per_client = args.messages // args.clients
            results, threads = [], []
            start = time.perf_counter()
            for _ in range(args.clients):
                t = threading.Thread(target=client, args=(port, per_client, body, results))
                t.start()
                threads.append(t)
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - start
        finally:
            gateway.terminate()
            gateway.wait()
        accepted = sum(results)
        stored = len(os.listdir(os.path.join(root, "spool", "active")))
        print("accepted %d messages of %d bytes in %.2f s with %d clients: %.0f messages/s "
              "(%d in the spool)" % (accepted, len(body), elapsed, args.clients, accepted / elapsed,
                                     stored))


if __name__ == "__main__":
    main()
