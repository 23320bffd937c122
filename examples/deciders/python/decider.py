#!/usr/bin/env python3
"""A cmdflow remote decider in Python, with the standard library only.

It decides the kind `py.order`: an order that collects items, then ships them through a child
command it waits for, and completes when the child has settled. cmdflow POSTs each event as
{"command": ..., "event": ...}, signed as Standard Webhooks sign a delivery; the decider checks
the signature and answers a decision as JSON.

    DECIDER_SECRET=... python3 decider.py --port 9000

Declare it to the workers (CMDFLOW_DECIDERS_FILE):

    [[decider]]
    kind = "py.order"
    url = "http://127.0.0.1:9000/decide"
    secret_env = "DECIDER_SECRET"
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = os.environ.get("DECIDER_SECRET", "").encode()
TOLERANCE_SECONDS = 300
# Event ids answered 503 once already (the "order.item_added" with data.flaky = true).
FLAKY_SEEN = set()


def signed_correctly(headers, body):
    """Standard Webhooks: v1,base64(HMAC-SHA256(secret, id.timestamp.body)), fresh timestamp."""
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    signatures = headers.get("webhook-signature", "")
    try:
        if abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
            return False
    except ValueError:
        return False
    mac = hmac.new(SECRET, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    expected = "v1," + base64.b64encode(mac.digest()).decode()
    return any(hmac.compare_digest(expected, s) for s in signatures.split(" "))


def decide(command, event):
    """(status, decision or error) for one event of a py.order command."""
    data = command["data"]
    kind = event["type"]
    if kind == "command.start":
        return 200, {
            "state": "running",
            "patch": {"items": 0},
            "ui": {"code": "order.open", "text": "Your order is open"},
        }
    if kind == "order.item_added":
        if event["data"].get("flaky") and event["id"] not in FLAKY_SEEN:
            FLAKY_SEEN.add(event["id"])
            return 503, {"error": "the stock service is down; try again"}
        return 200, {"patch": {"items": data.get("items", 0) + 1}}
    if kind == "order.checked_out":
        if data.get("items", 0) == 0:
            return 422, {"error": "an empty order cannot be checked out"}
        return 200, {
            "state": "waiting",
            "ui": {"code": "order.shipping", "text": "Your order is on its way"},
            "groups": [{
                "name": "ship",
                "policy": "all",
                "deadline_ms": 60000,
                "children": [{"kind": "demo.noop", "data": {}}],
            }],
        }
    if kind == "children.settled":
        shipped = event["data"].get("outcome") == "succeeded"
        return 200, {"complete": {"items": data.get("items", 0), "shipped": shipped}, "ui": None}
    if kind == "order.scrambled":
        # A bug in the decider: a state that does not exist.
        return 200, {"state": "shipped"}
    if kind.startswith("command.") or kind.startswith("children."):
        return 200, {}
    return 422, {"error": f"py.order does not handle {kind}"}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if not signed_correctly(self.headers, body):
            return self.answer(401, {"error": "bad signature"})
        request = json.loads(body)
        status, answer = decide(request["command"], request["event"])
        self.answer(status, answer)

    def answer(self, status, value):
        payload = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    args = parser.parse_args()
    if len(SECRET) < 16:
        sys.exit("set DECIDER_SECRET to a shared secret of at least 16 bytes")
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    # The port, for whoever started it with --port 0.
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
