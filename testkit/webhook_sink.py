#!/usr/bin/env python3
"""A webhook receiver for Stitch's tests, independent of Stitch's code: it verifies every
request with the Standard Webhooks reference library (PyPI `standardwebhooks`).

Usage: webhook_sink.py --log FILE --secrets whsec_a,whsec_b --responses 500,500,200
       [--redirect-to URL] [--hang-seconds N] [--keep-alive] [--reply-body JSON]

Prints {"port": N} on its first line once it listens on 127.0.0.1. For each request it
appends one JSON line to FILE: the path, the headers, the body, which secrets verified it,
what it answered, and the sender's port (the same port: the same connection). --responses
is consumed one per request (the last repeats): a number is a status, `hang` waits
--hang-seconds before answering 200, `redirect` answers 302 to --redirect-to. It speaks
HTTP/1.0, closing each connection after one answer; with --keep-alive, HTTP/1.1, keeping
connections open for more requests. With --reply-body, every answer carries that body as
application/json (a pre-create hook's verdict) instead of `ok`.
"""

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    from standardwebhooks.webhooks import Webhook
except ImportError:  # pragma: no cover - the test fails loudly on this line
    sys.stderr.write("webhook_sink.py needs `pip install standardwebhooks`\n")
    sys.exit(3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--secrets", required=True)
    parser.add_argument("--responses", default="200")
    parser.add_argument("--redirect-to", default="http://127.0.0.1:9/")
    parser.add_argument("--hang-seconds", type=float, default=600)
    parser.add_argument("--keep-alive", action="store_true")
    parser.add_argument("--reply-body", default=None)
    args = parser.parse_args()
    secrets = [s for s in args.secrets.split(",") if s]
    responses = args.responses.split(",")
    lock = threading.Lock()
    served = {"n": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1" if args.keep_alive else "HTTP/1.0"

        def log_message(self, *a):
            pass

        def do_POST(self):
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            verified = []
            for secret in secrets:
                try:
                    Webhook(secret).verify(body, headers)
                    verified.append(secret)
                except Exception:
                    pass
            with lock:
                index = served["n"]
                served["n"] += 1
            plan = responses[min(index, len(responses) - 1)]
            entry = {
                "path": self.path,
                "headers": headers,
                "body": body.decode("utf-8", "replace"),
                "verified_with": verified,
                "received_at": time.time(),
                "answer": plan,
                "peer_port": self.client_address[1],
            }
            with lock:
                with open(args.log, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            if plan == "hang":
                time.sleep(args.hang_seconds)
                plan = "200"
            if plan == "redirect":
                self.send_response(302)
                self.send_header("Location", args.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            reply = b"ok" if args.reply_body is None else args.reply_body.encode()
            self.send_response(int(plan))
            if args.reply_body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
