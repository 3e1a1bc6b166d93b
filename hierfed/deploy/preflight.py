"""Checks before a Flower process starts: is the SuperLink reachable, and does its TLS
certificate verify against the configured CA? One clear line naming the fix, instead of a
SuperNode retrying forever or exiting with a bare code.
"""

from __future__ import annotations

import socket
import ssl

from hierfed.errors import HierfedError


class SuperLinkUnreachable(HierfedError):
    """The SuperLink's address does not answer, or its certificate does not verify."""


def check_superlink(address: str, *, root_certificates: str | None, timeout_s: float = 5.0) -> None:
    """Connect to ``address`` (host:port) and, unless ``root_certificates`` is None (insecure),
    complete a TLS handshake verifying the server against that CA file."""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise SuperLinkUnreachable(
            f"deployment.superlink = {address!r} is not host:port: write e.g. 10.0.0.5:9093"
        ) from None
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise SuperLinkUnreachable(
            f"cannot reach the SuperLink at {address} ({exc.strerror or exc}): start it "
            "(`python -m hierfed deploy superlink CONFIG`) or fix deployment.superlink"
        ) from None
    with sock:
        if root_certificates is None:
            return
        try:
            ctx = ssl.create_default_context(cafile=root_certificates)
        except (OSError, ssl.SSLError) as exc:
            raise SuperLinkUnreachable(
                f"deployment.root_certificates = {root_certificates!r} is not a readable PEM CA "
                f"certificate ({exc}): point it at the CA file (ca.crt)"
            ) from None
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as exc:
            raise SuperLinkUnreachable(
                f"the SuperLink at {address} has a certificate that does not verify against "
                f"{root_certificates} ({exc.verify_message}): use the CA that signed the "
                "SuperLink's certificate, or a certificate issued for this host name"
            ) from None
        except (ssl.SSLError, OSError) as exc:
            raise SuperLinkUnreachable(
                f"TLS handshake with the SuperLink at {address} failed ({exc}): is it started "
                "with TLS (not --insecure), and is deployment.superlink its address?"
            ) from None
