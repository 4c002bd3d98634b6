"""Key directories: what init-fleet and add-node write, what load_node checks, what export copies."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from cryptography import x509

from syncfw.errors import KeyFileError
from syncfw.keyfiles import (
    add_node,
    certificate_identity,
    export_node,
    init_fleet,
    load_fleet,
    load_node,
    revoke,
)
from syncfw.trust import KeyRing, Registration, Revocation, open_statement, public_key_bytes
from syncfw.zones import Fleet, Grant


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys") / "fleet"
    init_fleet(d, "mine", authority="cloud")
    for n in ("cloud", "t7", "t9"):
        add_node(d, n)
    return d


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_private_keys_are_0600_and_public_files_are_readable(fleet_dir: Path) -> None:
    for p in (fleet_dir / "authority.key", fleet_dir / "ca.key",
              fleet_dir / "nodes/t7/node.key", fleet_dir / "nodes/t7/sign.key"):
        assert _mode(p) == 0o600, p
    assert _mode(fleet_dir / "ca.crt") & 0o044
    assert not (fleet_dir / "nodes/cloud/sign.key").exists()  # the authority signs with its key


def test_a_node_loads_with_a_registration_the_authority_signed(fleet_dir: Path) -> None:
    trust = load_fleet(fleet_dir)
    keys = load_node(fleet_dir, "t7")
    assert (keys.fleet_id, keys.authority, keys.node_id) == ("mine", "cloud", "t7")
    assert keys.authority_key == trust.authority_key
    reg = open_statement(keys.registration, trust.authority_key, "mine")
    assert isinstance(reg, Registration)
    assert reg.node == "t7" and reg.public_key == public_key_bytes(keys.signing_key)
    assert reg.from_seq == 1 and reg.not_after_ms > reg.issued_ms > 0
    ring = KeyRing("mine", "cloud", trust.authority_key)
    assert ring.learn_value(keys.registration) and ring.knows("t7")
    # the certificate names the node in its CN and its SAN, and the CA issued it
    assert certificate_identity(keys.cert_pem) == ("t7", ("t7",))
    cert = x509.load_pem_x509_certificate(keys.cert_pem)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(keys.ca_pem))


def test_the_authority_signs_with_the_authority_key(fleet_dir: Path) -> None:
    keys = load_node(fleet_dir, "cloud")
    assert keys.registration == b""
    assert public_key_bytes(keys.signing_key) == load_fleet(fleet_dir).authority_key


def test_load_fleet_binds_the_bootstrap(fleet_dir: Path) -> None:
    base = Fleet(fleet_id="mine", authority="cloud", grants=(Grant.of("site/", "*"),))
    fleet = load_fleet(fleet_dir).bind(base)
    assert fleet.signed and fleet.grants == base.grants
    with pytest.raises(KeyFileError, match="not 'other'"):
        load_fleet(fleet_dir).bind(Fleet(fleet_id="other", authority="cloud"))


def test_revoke_seals_a_revocation_of_the_registered_key(fleet_dir: Path) -> None:
    trust = load_fleet(fleet_dir)
    st = open_statement(revoke(fleet_dir, "t9", 4), trust.authority_key, "mine")
    assert isinstance(st, Revocation)
    assert st.node == "t9" and st.after_seq == 4
    assert st.public_key == public_key_bytes(load_node(fleet_dir, "t9").signing_key)
    with pytest.raises(KeyFileError, match="cannot be revoked"):
        revoke(fleet_dir, "cloud", 1)
    with pytest.raises(KeyFileError, match="missing"):
        revoke(fleet_dir, "nobody", 1)


def test_export_copies_only_what_the_node_needs(fleet_dir: Path, tmp_path: Path) -> None:
    out = export_node(fleet_dir, "t7", tmp_path / "t7")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "authority.pub", "ca.crt", "fleet.toml",
        "nodes/t7/node.crt", "nodes/t7/node.key", "nodes/t7/registration", "nodes/t7/sign.key",
    ]
    assert _mode(out / "nodes/t7/sign.key") == 0o600
    assert load_node(out, "t7").registration == load_node(fleet_dir, "t7").registration
    with pytest.raises(KeyFileError, match="no keys for node 't9'"):
        load_node(out, "t9")
    with pytest.raises(KeyFileError, match=r"authority\.key"):  # no authority key: cannot revoke
        revoke(out, "t7", 1)
    cloud = export_node(fleet_dir, "cloud", tmp_path / "cloud")
    assert (cloud / "authority.key").exists() and not (cloud / "ca.key").exists()
    assert load_node(cloud, "cloud").registration == b""


def test_a_private_key_readable_by_others_is_refused_naming_the_fix(
    fleet_dir: Path, tmp_path: Path
) -> None:
    out = export_node(fleet_dir, "t7", tmp_path / "t7")
    key = out / "nodes/t7/sign.key"
    os.chmod(key, 0o644)
    with pytest.raises(KeyFileError, match=re.escape(f"chmod 600 {key}")):
        load_node(out, "t7")
    os.chmod(key, 0o600)
    assert load_node(out, "t7").node_id == "t7"


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("nodes/t7/sign.key", None, "op-signing key .* is missing"),
        ("nodes/t7/sign.key", b"garbage", "not a PEM private key"),
        ("nodes/t7/node.crt", b"-----BEGIN CERTIFICATE-----\nxx\n", "not a PEM X.509"),
        ("nodes/t7/registration", b"\x92\xc4\x01a\xc4\x01b", "does not verify"),
        ("fleet.toml", b"fleet_id = [", "corrupt"),
        ("authority.pub", b"zz\n", "not hex"),
        ("ca.crt", None, "fleet CA certificate .* is missing"),
    ],
)
def test_missing_or_corrupt_files_name_the_file(
    fleet_dir: Path, tmp_path: Path, name: str, content: bytes | None, match: str
) -> None:
    out = export_node(fleet_dir, "t7", tmp_path / "t7")
    path = out / name
    if content is None:
        path.unlink()
    else:
        os.chmod(path, 0o600)
        path.write_bytes(content)
    with pytest.raises(KeyFileError, match=match):
        load_node(out, "t7")


def test_files_that_do_not_belong_together_are_refused(fleet_dir: Path, tmp_path: Path) -> None:
    out = export_node(fleet_dir, "t7", tmp_path / "t7")
    # t9's signing key beside t7's registration
    (out / "nodes/t7/sign.key").unlink()
    other = (fleet_dir / "nodes/t9/sign.key").read_bytes()
    fd = os.open(out / "nodes/t7/sign.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, other)
    os.close(fd)
    with pytest.raises(KeyFileError, match="names another key"):
        load_node(out, "t7")
    # a certificate from another fleet's CA
    foreign = tmp_path / "foreign"
    init_fleet(foreign, "mine", authority="cloud")
    add_node(foreign, "t7")
    out2 = export_node(fleet_dir, "t7", tmp_path / "t7b")
    (out2 / "nodes/t7/node.crt").write_bytes((foreign / "nodes/t7/node.crt").read_bytes())
    with pytest.raises(KeyFileError, match="was not issued by"):
        load_node(out2, "t7")


def test_nothing_is_overwritten(tmp_path: Path) -> None:
    d = tmp_path / "f"
    init_fleet(d, "x", authority="hq")
    before = (d / "authority.key").read_bytes()
    with pytest.raises(KeyFileError, match="already holds a fleet"):
        init_fleet(d, "x")
    assert (d / "authority.key").read_bytes() == before
    add_node(d, "n1")
    with pytest.raises(KeyFileError, match="already has keys"):
        add_node(d, "n1")
    with pytest.raises(KeyFileError, match="not a node id"):
        add_node(d, "a/b")
    with pytest.raises(KeyFileError, match=r"no keys .* to rotate"):
        add_node(d, "n2", from_seq=5)


def test_rotation_registers_a_new_key_from_a_seq_and_keeps_the_old(tmp_path: Path) -> None:
    d = tmp_path / "f"
    trust = init_fleet(d, "x", authority="hq")
    add_node(d, "n1")
    old = load_node(d, "n1")
    add_node(d, "n1", from_seq=50)
    new = load_node(d, "n1")
    reg = open_statement(new.registration, trust.authority_key, "x")
    assert isinstance(reg, Registration) and reg.from_seq == 50
    assert reg.public_key != public_key_bytes(old.signing_key)
    assert (d / "nodes/n1/registration.1").read_bytes() == old.registration
