"""DKIM signing: sign with DKIMSigner, verify with dkimpy, the key record served from a dict."""

import base64
import re

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mailgate.config import DKIMConfig
from mailgate.delivery.dkimsign import DKIMSigner, dns_record, from_domain, generate_key
from mailgate.errors import ConfigError
from tests.syncrun import Runner, result_of

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: lunch?\r\n"
    b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"\r\n"
    b"Noon at the usual place.\r\n"
)


def pem(key, fmt=serialization.PrivateFormat.PKCS8):
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key():
    return ed25519.Ed25519PrivateKey.generate()


def rsa_record(key):
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki)


def ed_record(key):
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)


def dnsfunc(records):
    def lookup(name, timeout=5):
        return records.get(name)

    return lookup


def signer(tmp_path, key_bytes, domains=("example.com",), selector="s1", runner=None, **kwargs):
    path = tmp_path / "dkim.key"
    path.write_bytes(key_bytes)
    config = DKIMConfig(sign_domains=domains, selector=selector, private_key=str(path), **kwargs)
    return DKIMSigner(config, runner or Runner(), config_path="/etc/mailgate.ini")


def sign(s, data):
    header = result_of(s.sign(data))
    if header is not None:
        assert header.startswith(b"DKIM-Signature: ")
        assert header.endswith(b"\r\n") and b"\r\n\r\n" not in header
        assert header.isascii()
        assert b"\n" not in header.replace(b"\r\n", b"")
    return header


# --- signing and verifying ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pkcs8", "pkcs1"])
def test_rsa_sign_verify(tmp_path, rsa_key, fmt):
    formats = serialization.PrivateFormat
    form = formats.PKCS8 if fmt == "pkcs8" else formats.TraditionalOpenSSL
    s = signer(tmp_path, pem(rsa_key, form))
    assert s.key_type == "rsa"
    header = sign(s, MESSAGE)
    fields = dkim.util.parse_tag_value(header.split(b":", 1)[1])
    assert fields[b"a"] == b"rsa-sha256"
    assert fields[b"c"] == b"relaxed/relaxed"
    assert fields[b"d"] == b"example.com"
    assert fields[b"s"] == b"s1"
    signed_headers = [h.strip() for h in fields[b"h"].split(b":")]
    assert signed_headers.count(b"from") == 2  # oversigned: a second From breaks it
    assert b"subject" in signed_headers
    records = {b"s1._domainkey.example.com.": rsa_record(rsa_key)}
    assert dkim.verify(header + MESSAGE, dnsfunc=dnsfunc(records))


def test_ed25519_sign_verify(tmp_path, ed_key):
    s = signer(tmp_path, pem(ed_key))
    assert s.key_type == "ed25519"
    header = sign(s, MESSAGE)
    assert dkim.util.parse_tag_value(header.split(b":", 1)[1])[b"a"] == b"ed25519-sha256"
    records = {b"s1._domainkey.example.com.": ed_record(ed_key)}
    assert dkim.verify(header + MESSAGE, dnsfunc=dnsfunc(records))


def test_ed25519_dknewkey_format(tmp_path, ed_key):
    """dkimpy's dknewkey writes the 32-byte seed in base64 on one line."""
    seed = ed_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    s = signer(tmp_path, base64.b64encode(seed) + b"\n")
    assert s.key_type == "ed25519"
    records = {b"s1._domainkey.example.com.": ed_record(ed_key)}
    assert dkim.verify(sign(s, MESSAGE) + MESSAGE, dnsfunc=dnsfunc(records))


def test_tampering_fails(tmp_path, rsa_key):
    s = signer(tmp_path, pem(rsa_key))
    signed = sign(s, MESSAGE) + MESSAGE
    lookup = dnsfunc({b"s1._domainkey.example.com.": rsa_record(rsa_key)})
    assert dkim.verify(signed, dnsfunc=lookup)
    assert not dkim.verify(signed.replace(b"usual place", b"other place"), dnsfunc=lookup)
    assert not dkim.verify(signed.replace(b"lunch?", b"dinner?"), dnsfunc=lookup)
    added_from = signed.replace(b"To: Bob", b"From: mallory@example.net\r\nTo: Bob")
    assert not dkim.verify(added_from, dnsfunc=lookup)
    # relaxed/relaxed: harmless whitespace changes on the way still verify
    assert dkim.verify(signed.replace(b"Subject: lunch?", b"Subject:   lunch? "), dnsfunc=lookup)


def test_signs_in_the_thread_runner(tmp_path, rsa_key):
    runner = Runner()
    s = signer(tmp_path, pem(rsa_key), runner=runner)
    sign(s, MESSAGE)
    assert runner.calls == 1
    assert sign(s, MESSAGE.replace(b"example.com>", b"example.net>", 1)) is None
    assert runner.calls == 1  # nothing to sign: no thread needed


# --- which domain ------------------------------------------------------------------------------


def test_from_subdomain_signs_as_the_sign_domain(tmp_path, rsa_key):
    s = signer(tmp_path, pem(rsa_key), domains=("example.com", "other.org"))
    data = MESSAGE.replace(b"alice@example.com", b"alice@news.Example.COM")
    assert s.domain_for(data) == "example.com"
    header = sign(s, data)
    assert dkim.util.parse_tag_value(header.split(b":", 1)[1])[b"d"] == b"example.com"
    lookup = dnsfunc({b"s1._domainkey.example.com.": rsa_record(rsa_key)})
    assert dkim.verify(header + data, dnsfunc=lookup)


def test_most_specific_sign_domain(tmp_path, rsa_key):
    s = signer(tmp_path, pem(rsa_key), domains=("example.com", "news.example.com"))
    news = MESSAGE.replace(b"@example.com>", b"@news.example.com>")
    assert s.domain_for(news) == "news.example.com"
    assert s.domain_for(news.replace(b"@news.", b"@a.news.")) == "news.example.com"
    assert s.domain_for(MESSAGE) == "example.com"


@pytest.mark.parametrize(
    "header",
    [
        b"From: mallory@badexample.com\r\n",  # not a subdomain, just the same ending
        b"From: a@example.net\r\n",
        b"From: a@example.com, b@example.com\r\n",  # two addresses
        b"From: list:;\r\n",  # a group with no address
        b"From: \r\n",
        b"From: a@example.com\r\nFrom: b@example.com\r\n",  # two From fields
        b"",  # no From at all
    ],
)
def test_not_signed(tmp_path, rsa_key, header):
    s = signer(tmp_path, pem(rsa_key))
    data = b"To: bob@example.org\r\nSubject: x\r\n" + header + b"\r\nbody\r\n"
    assert s.domain_for(data) is None
    assert sign(s, data) is None


def test_from_in_the_body_does_not_count(tmp_path, rsa_key):
    s = signer(tmp_path, pem(rsa_key))
    assert s.domain_for(b"To: b@example.org\r\n\r\nFrom: a@example.com\r\n") is None
    assert s.domain_for(b"\r\nFrom: a@example.com\r\n") is None


def test_from_domain_variants():
    assert from_domain(b"from: \"A, B\" <a@Example.COM>\r\n\r\n") == "example.com"
    assert from_domain(b"From: a@example.com\n\nbody") == "example.com"  # bare LF
    assert from_domain(b"From:\r\n  A <a@example.com>\r\n\r\n") == "example.com"  # folded
    assert from_domain("From: a@exämple.com\r\n\r\n".encode("utf-8")) == "xn--exmple-cua.com"
    assert from_domain(b"From: nobody\r\n\r\n") is None


def test_unparseable_message_goes_unsigned(tmp_path, rsa_key):
    s = signer(tmp_path, pem(rsa_key))
    assert sign(s, b"From: a@example.com\r\nno colon here\r\n\r\nbody\r\n") is None


def test_no_sign_domains_no_key():
    s = DKIMSigner(DKIMConfig(), Runner())
    assert s.domain_for(MESSAGE) is None
    assert result_of(s.sign(MESSAGE)) is None


# --- bad keys and settings ---------------------------------------------------------------------


def config_error(tmp_path, key_bytes, **kwargs):
    with pytest.raises(ConfigError) as info:
        signer(tmp_path, key_bytes, **kwargs)
    return info.value


def test_rsa_1024_refused(tmp_path):
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    e = config_error(tmp_path, pem(small))
    assert (e.file, e.section, e.key) == ("/etc/mailgate.ini", "dkim", "private_key")
    assert "1024 bits" in e.message and "2048" in e.message
    assert "\n" not in str(e)


@pytest.mark.parametrize(
    "key_bytes, words",
    [
        (b"", "not a PEM private key"),
        (b"hello", "not a PEM private key"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a usable PEM"),
        (base64.b64encode(b"x" * 31), "not a PEM private key"),
    ],
)
def test_unparseable_key(tmp_path, key_bytes, words):
    e = config_error(tmp_path, key_bytes)
    assert (e.section, e.key) == ("dkim", "private_key")
    assert words in e.message


def test_encrypted_key(tmp_path, ed_key):
    encrypted = ed_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    assert "encrypted" in config_error(tmp_path, encrypted).message


def test_ec_key_refused(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    assert "RSA or Ed25519" in config_error(tmp_path, pem(key)).message


def test_unreadable_key(tmp_path):
    config = DKIMConfig(sign_domains=("example.com",), selector="s1",
                        private_key=str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError) as info:
        DKIMSigner(config, Runner(), config_path="m.ini")
    assert (info.value.section, info.value.key) == ("dkim", "private_key")
    assert "cannot read" in info.value.message
    assert str(info.value).startswith("m.ini: [dkim] private_key: cannot read ")


def test_settings_checked(tmp_path, ed_key):
    with pytest.raises(ConfigError) as info:
        DKIMSigner(DKIMConfig(sign_domains=("example.com",), selector="s1"), Runner())
    assert (info.value.section, info.value.key) == ("dkim", "private_key")
    assert info.value.file == "<config>"
    assert config_error(tmp_path, pem(ed_key), selector=None).key == "selector"
    assert config_error(tmp_path, pem(ed_key), selector="../x").key == "selector"
    assert config_error(tmp_path, pem(ed_key), headers=("to", "subject")).key == "headers"
    assert config_error(tmp_path, pem(ed_key), headers=("from", "received")).key == "headers"


# --- key generation helpers (the CLI's are tested in test_cli_dkim.py) ----------------------------


@pytest.mark.parametrize("key_type", ["rsa", "ed25519"])
def test_generate_key(tmp_path, key_type):
    key_pem, txt = generate_key(key_type)
    s = signer(tmp_path, key_pem)
    assert s.key_type == key_type
    assert txt.startswith("v=DKIM1; k=%s; p=" % key_type)
    lookup = dnsfunc({b"s1._domainkey.example.com.": txt.encode("ascii")})
    assert dkim.verify(sign(s, MESSAGE) + MESSAGE, dnsfunc=lookup)


def test_dns_record_splits_strings():
    record = dns_record("s1", "example.com.", "v=DKIM1; p=" + "A" * 600)
    name, _, value = record.partition(" IN TXT ")
    assert name == "s1._domainkey.example.com."
    strings = re.findall(r'"([^"]*)"', value)
    assert value == " ".join('"%s"' % s for s in strings)
    assert [len(s) for s in strings] == [255, 255, 101]
    assert "".join(strings) == "v=DKIM1; p=" + "A" * 600
