"""Throwaway credentials for a local or trial deployment, made with ``cryptography``.

``make_credentials(folder, nodes=[...])`` writes a self-signed CA, a SuperLink TLS certificate
signed by it (valid for ``localhost``, ``127.0.0.1`` and any extra host names), and one EC key
pair per SuperNode for node authentication (private key in OpenSSH PEM, public key in OpenSSH
format: what ``flower-supernode --auth-supernode-private-key`` and
``flwr supernode register`` read). Production sites use their own PKI; these files are for
trials, and their private keys are written readable by the owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hierfed.errors import HierfedError


@dataclass(frozen=True)
class Credentials:
    """Where ``make_credentials`` put each file."""

    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, tuple[Path, Path]]  # node name -> (private key, public key)


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    *,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    hosts: Sequence[str],
    days: int,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if hosts:
        alt: list[x509.GeneralName] = []
        for h in hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                alt.append(x509.DNSName(h))
        b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_credentials(
    folder: str | Path,
    *,
    nodes: Sequence[str],
    hosts: Sequence[str] = (),
    days: int = 30,
) -> Credentials:
    """Write a CA, a SuperLink certificate and one auth key pair per node into ``folder``.

    ``nodes`` are file-name-safe node names (e.g. institution names); ``hosts`` are extra
    names or IPs the SuperLink is reached at. Refuses a folder that already holds a CA (it
    never overwrites keys somebody may be using).

    >>> import tempfile
    >>> creds = make_credentials(tempfile.mkdtemp(), nodes=["inst-00"])
    >>> sorted(p.name for p in creds.folder.iterdir())[:3]
    ['ca.crt', 'ca.key', 'inst-00.key']
    """
    out = Path(folder)
    if (out / "ca.crt").exists():
        raise HierfedError(
            f"deploy certs: '{out}' already holds a CA (ca.crt): pick an empty folder "
            "or delete the old credentials first"
        )
    for n in nodes:
        if not n or "/" in n or n.startswith("."):
            raise HierfedError(
                f"deploy certs: node name {n!r} is not a file name: use e.g. 'inst-00'"
            )
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _cert("hierfed trial CA", ca_key, issuer=None, hosts=(), days=days)
    srv_key = ec.generate_private_key(ec.SECP384R1())
    names = ["localhost", "127.0.0.1", "::1", *hosts]
    srv = _cert("superlink", srv_key, issuer=("hierfed trial CA", ca_key), hosts=names, days=days)
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    _write(out / "ca.crt", ca.public_bytes(pem), private=False)
    _write(out / "ca.key", ca_key.private_bytes(pem, pkcs8, none), private=True)
    _write(out / "server.pem", srv.public_bytes(pem), private=False)
    _write(out / "server.key", srv_key.private_bytes(pem, pkcs8, none), private=True)
    keys: dict[str, tuple[Path, Path]] = {}
    for n in nodes:
        k = ec.generate_private_key(ec.SECP384R1())
        priv, pub = out / f"{n}.key", out / f"{n}.pub"
        _write(priv, k.private_bytes(pem, serialization.PrivateFormat.OpenSSH, none), private=True)
        ssh = serialization.Encoding.OpenSSH
        _write(
            pub, k.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH), private=False
        )
        keys[n] = (priv, pub)
    return Credentials(out, out / "ca.crt", out / "server.pem", out / "server.key", keys)
