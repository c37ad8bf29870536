"""A throwaway CA and a server certificate for 127.0.0.1: the local fleet's `--tls`."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from scripts.local.processes import LocalFleetError, need_binary


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate it signed, for 127.0.0.1 only."""

    ca: Path  # what clients trust (FLEET_TLS_CA_FILE)
    cert: Path
    key: Path


def make_tls_files(directory: Path, days: int = 30) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1, made with openssl.

    The CA's key is deleted once it signed the server's: nothing else can
    ever be signed by it.
    """
    openssl = need_binary("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectAltName = IP:127.0.0.1\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n"
    )
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    old_umask = os.umask(0o077)  # the keys are born private
    try:
        steps = [
            [
                openssl,
                "req",
                "-x509",
                *newkey,
                "-keyout",
                str(ca_key),
                "-out",
                str(ca),
                "-days",
                str(days),
                "-subj",
                "/CN=celery-fleet local CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            [
                openssl,
                "req",
                *newkey,
                "-keyout",
                str(key),
                "-out",
                str(csr),
                "-subj",
                "/CN=127.0.0.1",
            ],
            [
                openssl,
                "x509",
                "-req",
                "-in",
                str(csr),
                "-CA",
                str(ca),
                "-CAkey",
                str(ca_key),
                "-CAcreateserial",
                "-out",
                str(cert),
                "-days",
                str(days),
                "-extfile",
                str(ext),
            ],
        ]
        for argv in steps:
            done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if done.returncode != 0:
                raise LocalFleetError(
                    f"openssl failed making the fleet's TLS certificates: {done.stderr.strip()}"
                )
    finally:
        os.umask(old_umask)
        for leftover in (ca_key, csr, ext, directory / "ca.srl"):
            leftover.unlink(missing_ok=True)
    ca.chmod(0o644)
    cert.chmod(0o644)
    return TlsFiles(ca, cert, key)
