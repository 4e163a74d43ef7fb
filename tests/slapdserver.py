"""
A real OpenLDAP slapd for the directory tests: a throwaway slapd.conf and mdb database in a
temporary directory, an Active-Directory-like schema subset (userPrincipalName, sAMAccountName,
proxyAddresses next to the standard mail), plain LDAP with StartTLS and ldaps on loopback ports,
with a certificate from the test CA (tests/tlsutil.py).

    slapd = shared_slapd()         # one per test process, started on first use, stopped at exit
    slapd.uri, slapd.ldaps_uri     # "ldap://127.0.0.1:PORT", "ldaps://127.0.0.1:PORT"
    slapd.ca_path                  # the CA that issued its certificate (for [ldap] ca_file)
    slapd.bind_dn, slapd.bind_password, slapd.base_dn
    slapd.password_file(directory) # bind_password written to a file, for bind_password_file
    slapd.add(ldif) / slapd.delete(dn) / slapd.replace(dn, attribute, *values)   (as the rootdn)

The users (USERS below) have proxyAddresses like Exchange's: "SMTP:" the primary address,
"smtp:" the aliases.  Anonymous clients may only bind; the service account (bind_dn) may read.

slapd comes from Debian's `slapd` package (.ci/run installs it).  When it is missing the tests
that need it fail under CI (the CI variable is set) and are skipped elsewhere.
"""

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading

from tests.tlsutil import make_ca

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
LDAPMODIFY = shutil.which("ldapmodify") or "/usr/bin/ldapmodify"
SCHEMAS = "/etc/ldap/schema"
MODULES = "/usr/lib/ldap"
START_TIMEOUT = 30.0

BASE_DN = "dc=contoso,dc=test"
ROOT_DN = "cn=admin," + BASE_DN
ROOT_PASSWORD = "root-secret"
BIND_DN = "cn=mailgate,ou=services," + BASE_DN
BIND_PASSWORD = "service-secret"

# Active Directory's own OIDs and names; case-insensitive matching as AD does.
AD_SCHEMA = """\
attributetype ( 1.2.840.113556.1.4.656 NAME 'userPrincipalName'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.2.210 NAME 'proxyAddresses'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
objectclass ( 1.3.6.1.4.1.55555.1.1 NAME 'mailgateTestADUser' SUP top AUXILIARY
  MAY ( userPrincipalName $ sAMAccountName $ proxyAddresses ) )
"""

# name: (password, mail, userPrincipalName, sAMAccountName, proxyAddresses)
USERS = {
    "alice": ("alice-pw", "alice@contoso.test", "alice@corp.contoso.test", "alice",
              ["SMTP:alice@contoso.test", "smtp:a.smith@contoso.test",
               "smtp:alice@contoso-alias.test", "X500:/o=Contoso/cn=alice"]),
    "bob": ("bob-pw", "bob@contoso.test", "bob@corp.contoso.test", "bob",
            ["SMTP:Bob.Jones@Contoso.test", "smtp:bob@contoso.test"]),
    "joerg": ("joerg-pw", "joerg@contoso.test", "joerg@corp.contoso.test", "joerg",
              ["SMTP:joerg@contoso.test", "smtp:jörg@contoso.test"]),
    # In the directory, but with no mail address: may authenticate, may send as nobody.
    "svc-scanner": ("scanner-pw", None, "scanner@corp.contoso.test", "svc-scanner", []),
}


def _user_ldif(name, password, mail, upn, sam, proxies):
    lines = ["dn: cn=%s,ou=people,%s" % (name, BASE_DN), "objectClass: inetOrgPerson",
             "objectClass: mailgateTestADUser", "cn: %s" % name, "sn: %s" % name,
             "userPassword: %s" % password, "userPrincipalName: %s" % upn,
             "sAMAccountName: %s" % sam]
    if mail:
        lines.append("mail: %s" % mail)
    lines += ["proxyAddresses: %s" % p for p in proxies]
    return "\n".join(lines) + "\n"


def _data_ldif():
    parts = [
        "dn: %s\nobjectClass: dcObject\nobjectClass: organization\no: contoso\ndc: contoso\n"
        % BASE_DN,
        "dn: ou=people,%s\nobjectClass: organizationalUnit\nou: people\n" % BASE_DN,
        "dn: ou=services,%s\nobjectClass: organizationalUnit\nou: services\n" % BASE_DN,
        "dn: %s\nobjectClass: person\ncn: mailgate\nsn: mailgate\nuserPassword: %s\n"
        % (BIND_DN, BIND_PASSWORD),
    ]
    parts += [_user_ldif(name, *fields) for name, fields in USERS.items()]
    return "\n".join(parts)


def _conf(directory, cert, key, ca):
    return """\
include {schemas}/core.schema
include {schemas}/cosine.schema
include {schemas}/inetorgperson.schema
include {directory}/ad.schema
pidfile {directory}/slapd.pid
modulepath {modules}
moduleload back_mdb
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
database mdb
suffix "{base}"
rootdn "{root}"
rootpw {rootpw}
directory {directory}/db
maxsize 16777216
access to attrs=userPassword
  by anonymous auth
  by self write
  by * none
access to *
  by dn.exact="{bind}" read
  by self read
  by * none
""".format(schemas=SCHEMAS, modules=MODULES, directory=directory, cert=cert, key=key, ca=ca,
           base=BASE_DN, root=ROOT_DN, rootpw=ROOT_PASSWORD, bind=BIND_DN)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """In the child: get SIGTERM when the test process goes, however it goes."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def require_slapd():
    """Skip (or, under CI, fail) when slapd is not installed."""
    if os.access(SLAPD, os.X_OK) and os.access(SLAPADD, os.X_OK):
        return
    message = "OpenLDAP's slapd is not installed (Debian: apt-get install slapd ldap-utils)"
    if os.environ.get("CI"):
        raise RuntimeError(message)
    import pytest

    pytest.skip(message)


class Slapd:
    """One slapd in directory; start() returns once it serves, stop() ends it."""

    def __init__(self, directory):
        self.directory = directory
        self.base_dn, self.bind_dn, self.bind_password = BASE_DN, BIND_DN, BIND_PASSWORD
        self.process = None
        self.log_path = os.path.join(directory, "slapd.log")

    def start(self):
        require_slapd()
        d = self.directory
        os.makedirs(os.path.join(d, "db"), exist_ok=True)
        ca = make_ca(os.path.join(d, "ca"))
        self.ca_path = ca.ca_path
        cert, key = ca.issue("127.0.0.1", os.path.join(d, "tls"))
        with open(os.path.join(d, "ad.schema"), "w") as f:
            f.write(AD_SCHEMA)
        self.conf = os.path.join(d, "slapd.conf")
        with open(self.conf, "w") as f:
            f.write(_conf(d, cert, key, ca.ca_path))
        data = os.path.join(d, "data.ldif")
        with open(data, "w", encoding="utf-8") as f:
            f.write(_data_ldif())
        subprocess.run([SLAPADD, "-q", "-f", self.conf, "-l", data], check=True,
                       capture_output=True, timeout=60)
        self.port, self.ldaps_port = _free_port(), _free_port()
        self.uri = "ldap://127.0.0.1:%d" % self.port
        self.ldaps_uri = "ldaps://127.0.0.1:%d" % self.ldaps_port
        urls = "%s/ %s/" % (self.uri, self.ldaps_uri)
        self.process = subprocess.Popen(
            [SLAPD, "-f", self.conf, "-h", urls, "-d", "stats"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
        ready = threading.Event()
        threading.Thread(target=self._drain, args=(ready,), daemon=True).start()
        if not ready.wait(START_TIMEOUT) or self.process.poll() is not None:
            self.stop()
            with open(self.log_path, errors="replace") as f:
                raise RuntimeError("slapd did not start:\n" + f.read()[-4000:])
        return self

    def _drain(self, ready):
        """Keep slapd's log (stderr) in slapd.log; ready is set at "slapd starting"."""
        with open(self.log_path, "wb") as log:
            for line in self.process.stderr:
                log.write(line)
                log.flush()
                if b"slapd starting" in line:
                    ready.set()
        ready.set()  # it died: start() looks at the process

    def stop(self):
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)

    def password_file(self, directory):
        path = os.path.join(directory, "ldap-bind-password")
        with open(path, "w") as f:
            f.write(self.bind_password + "\n")
        return path

    # -- changing the directory while tests run (as the rootdn)

    def modify(self, ldif):
        subprocess.run([LDAPMODIFY, "-x", "-H", self.uri, "-D", ROOT_DN, "-w", ROOT_PASSWORD],
                       input=ldif.encode("utf-8"), check=True, capture_output=True, timeout=30)

    def add(self, ldif):
        self.modify(_as_add(ldif))

    def delete(self, dn):
        self.modify("dn: %s\nchangetype: delete\n" % dn)

    def replace(self, dn, attribute, *values):
        lines = ["dn: %s" % dn, "changetype: modify", "replace: %s" % attribute]
        lines += ["%s: %s" % (attribute, v) for v in values]
        self.modify("\n".join(lines) + "\n")

    def user_dn(self, name):
        return "cn=%s,ou=people,%s" % (name, BASE_DN)


def _as_add(ldif):
    first, _, rest = ldif.partition("\n")
    return "%s\nchangetype: add\n%s" % (first, rest)


def add_user(slapd, name, password, mail=None, upn=None, sam=None, proxies=()):
    """A user like those of USERS, added while the tests run."""
    slapd.add(_user_ldif(name, password, mail, upn or name + "@corp.contoso.test", sam or name,
                         list(proxies)))


_shared = None
_lock = threading.Lock()


def shared_slapd():
    """The test process's slapd, started on first use and stopped when the process exits."""
    global _shared
    with _lock:
        if _shared is None:
            require_slapd()
            directory = tempfile.mkdtemp(prefix="mailgate-slapd-")
            server = Slapd(directory).start()

            def cleanup():
                server.stop()
                shutil.rmtree(directory, ignore_errors=True)

            atexit.register(cleanup)
            _shared = server
        return _shared
