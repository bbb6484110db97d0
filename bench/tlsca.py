"""The HTTPS scenarios' certificates: a CA and the fake upstream's certificate, made at each run.

trustme (in the dev requirements) makes a throw-away CA and a leaf certificate for the IP address
127.0.0.1 (an IP subjectAltName), both ECDSA P-256. Nothing is installed anywhere: the peers are
told where ca.pem is (our proxy: ``UPSTREAM_CA_BUNDLE``; the Go reference: ``SSL_CERT_FILE``;
sseload: ``-ca``; wrk does not verify).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA certificate (PEM): what the clients of the upstream trust
    cert: Path  # the upstream's certificate chain (PEM)
    key: Path  # its private key (PEM)


def make_certificates(directory: Path) -> TlsFiles:
    """Write ca.pem, upstream-cert.pem and upstream-key.pem into ``directory``.

    Raises RuntimeError when trustme is missing (the HTTPS scenarios are then skipped)."""
    try:
        import trustme
    except ImportError:
        raise RuntimeError("trustme not installed (it is in requirements-dev.txt: `make dev`)") from None
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="proxy bench CA")
    leaf = ca.issue_cert("127.0.0.1", common_name="127.0.0.1")
    files = TlsFiles(directory / "ca.pem", directory / "upstream-cert.pem", directory / "upstream-key.pem")
    ca.cert_pem.write_to_path(str(files.ca))
    leaf.private_key_pem.write_to_path(str(files.key))
    with open(files.cert, "wb") as handle:
        for pem in leaf.cert_chain_pems:
            handle.write(pem.bytes())
    files.key.chmod(0o600)
    return files
