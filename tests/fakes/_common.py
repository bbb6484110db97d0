"""What the fake servers share (stdlib only): their command line, TLS context and listening socket."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import ssl
import sys


def add_server_args(parser: argparse.ArgumentParser, tls: bool = True) -> None:
    """--port and --host; with ``tls``, --tls-cert and --tls-key too."""
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    if tls:
        parser.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
        parser.add_argument("--tls-key", help="private key of --tls-cert (PEM; default: in the chain file)")


def server_context(cert_file: str, key_file: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


def tls_context(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ssl.SSLContext | None:
    """The server context --tls-cert/--tls-key ask for, or None for plain HTTP."""
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    return server_context(args.tls_cert, args.tls_key) if args.tls_cert else None


def listen(host: str, port: int, backlog: int) -> socket.socket:
    """Bind and listen, print ``ready <port>`` for the test harness, and exit at once on SIGTERM/SIGINT."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(backlog)
    print(f"ready {listener.getsockname()[1]}", flush=True)

    def stop(_signum, _frame):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return listener
