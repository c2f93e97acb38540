"""The keys and certificates of a loopback deployment (``fedpeft deploy``).

A test CA and a server certificate it signs, whose subjectAltName carries
127.0.0.1 and localhost (the SuperLink's TLS), and one ECDSA P-384 key pair
per SuperNode in OpenSSH format, the only kind Flower 1.41's SuperNode
authentication loads (``ssh-keygen -t ecdsa -b 384`` makes the same). They
are made fresh for every deployment and never leave its folder: they are
for trying a deployment on one machine, not for production, where the
certificates come from your own CA.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_test_certificates(folder: Path, hosts=("127.0.0.1", "localhost"), days: int = 7) -> dict[str, Path]:
    """Write ca.pem, ca.key, server.pem, server.key under ``folder``; returns their paths.

    The server certificate is signed by the CA and its subjectAltName carries every
    entry of ``hosts`` (IP addresses as iPAddress, names as dNSName).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))

    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv_cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                .issuer_name(ca_name).public_key(srv_key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))

    paths = {"ca_cert": folder / "ca.pem", "ca_key": folder / "ca.key",
             "server_cert": folder / "server.pem", "server_key": folder / "server.key"}
    paths["ca_cert"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(ca_key, paths["ca_key"])
    paths["server_cert"].write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(srv_key, paths["server_key"])
    return paths


def make_supernode_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """Write an OpenSSH-format ECDSA P-384 key pair ``name`` / ``name.pub`` (what Flower 1.41 loads).

    flower-supernode --auth-supernode-private-key reads it with load_ssh_private_key and
    needs an EllipticCurvePrivateKey; flwr supernode register reads the .pub with
    load_ssh_public_key and accepts NIST curves only (P-256/P-384/P-521).
    Same as: ssh-keygen -t ecdsa -b 384 -N "" -f NAME
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = folder / name, folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub
