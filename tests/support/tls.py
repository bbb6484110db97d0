"""Certificates for TLS tests, made at test time: a private CA (trustme) and server certificates
signed by it (good, for another host name, expired), plus a self-signed one and a CA directory in
OpenSSL's hashed layout. Nothing is checked in; every file lives in a pytest tmp dir.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_IDENTITIES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class ServerCert:
    """A server certificate (chain PEM) and its private key (PEM), as files."""

    name: str
    cert_file: Path
    key_file: Path


class LocalCA:
    """A private CA for the test session; ``ca_file`` is its certificate (the bundle to trust)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name="llm-token-proxy tests")
        self.ca_file = self.dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._serial = itertools.count(1)

    def _write(self, name: str, cert_pem: bytes, key_pem: bytes) -> ServerCert:
        stem = f"{name}-{next(self._serial)}"
        cert_file, key_file = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        key_file.chmod(0o600)
        return ServerCert(name, cert_file, key_file)

    def server_cert(
        self,
        *identities: str,
        name: str = "server",
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> ServerCert:
        """A certificate signed by this CA for ``identities`` (default: 127.0.0.1 and localhost)."""
        leaf = self.ca.issue_cert(
            *(identities or LOCAL_IDENTITIES), not_before=not_before, not_after=not_after
        )
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        return self._write(name, chain, leaf.private_key_pem.bytes())

    def other_host_cert(self) -> ServerCert:
        """Signed by this CA, valid, but only for ``other.example`` (not 127.0.0.1 nor localhost)."""
        return self.server_cert("other.example", name="other-host")

    def expired_cert(self) -> ServerCert:
        """Signed by this CA for 127.0.0.1/localhost, but its validity ended yesterday."""
        now = datetime.datetime.now(datetime.UTC)
        return self.server_cert(
            *LOCAL_IDENTITIES,
            name="expired",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )

    def self_signed_cert(self) -> ServerCert:
        """A self-signed leaf for 127.0.0.1/localhost, valid now: only its issuer is wrong."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed test server")])
        now = datetime.datetime.now(datetime.UTC)
        sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return self._write("self-signed", cert.public_bytes(serialization.Encoding.PEM), key_pem)

    def hashed_dir(self) -> Path:
        """A directory holding only the CA certificate as ``<subject hash>.0`` (``openssl rehash``)."""
        directory = self.dir / "hashed-ca"
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir()
        subject_hash = subprocess.run(
            ["openssl", "x509", "-hash", "-noout", "-in", str(self.ca_file)],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        assert len(subject_hash) == 8, subject_hash
        shutil.copyfile(self.ca_file, directory / f"{subject_hash}.0")
        return directory
