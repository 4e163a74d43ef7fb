"""
End to end, as root (CI runs as root; elsewhere these tests fail under CI=true and are skipped
otherwise): the real twistd binds a privileged port, then runs as [gateway] user and group (a
user made for the test with useradd, removed afterwards), or as twistd's --uid/--gid; the spool,
logs and admin socket it creates are that user's, 0700/0600; mail still flows.
"""

import os
import pwd
import shutil
import stat
import subprocess
import tempfile

import pytest

from tests.e2e import harness as h
from tests.tlsutil import make_ca

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"), reason="needs root (CI runs as root)")


def _status_ids(pid):
    """(real, effective, saved, fs) uids and gids of a process, from /proc."""
    ids = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                ids[key] = [int(v) for v in value.split()]
    return ids


def privileged_port():
    for port in range(700, 1000):
        if h.port_is_free(port):
            return port
    raise RuntimeError("no free port below 1024")


@pytest.fixture
def account():
    """A system user and group of its own for the test, removed afterwards."""
    assert os.geteuid() == 0, "these tests need root (CI runs as root)"
    name = "mgtest%d" % (os.getpid() % 100000)
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", name], capture_output=True)
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                    "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def lab(account):
    # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, the dropped user could not enter.
    root = tempfile.mkdtemp(prefix="mailgate-priv-")
    os.chmod(root, 0o755)
    holding = h.Holding().start()
    gw = h.Gateway(os.path.join(root, "gw"))
    os.chmod(gw.directory, 0o755)
    ca = make_ca(os.path.join(root, "ca"))
    cert, key = h.issue_server_cert(ca, os.path.join(root, "tls"))
    os.chmod(os.path.join(root, "tls"), 0o755)
    # As a mail admin keeps them: root's, readable by the gateway's group, nobody else.
    os.chown(key, 0, account.pw_gid)
    os.chmod(key, 0o640)
    users = os.path.join(root, "users")
    from mailgate.smtp.auth import set_user

    set_user(users, "alice@example.com", "secret")
    os.chown(users, 0, account.pw_gid)
    os.chmod(users, 0o640)
    config = h.base_config(gw.directory, cert, key, users, holding)
    config["logging"] = {"dir": "logs"}
    try:
        yield gw, config, ca
    finally:
        gw.cleanup()
        holding.stop()
        shutil.rmtree(root, ignore_errors=True)


def _owned(path, account, mode):
    st = os.lstat(path)
    assert (st.st_uid, st.st_gid) == (account.pw_uid, account.pw_gid), path
    assert stat.S_IMODE(st.st_mode) == mode, "%s: %04o" % (path, stat.S_IMODE(st.st_mode))


def _send(gw, ca):
    client = h.smtp(gw.ports["submission"])
    try:
        client.starttls(context=h.client_context(ca.ca_path))
        client.login("alice@example.com", "secret")
        return h.transaction(client, "alice@example.com", ["bob@example.org"],
                             h.make_message("dropped", sender="alice@example.com"))
    finally:
        h.close(client)


def test_gateway_user_after_binding_a_privileged_port(lab, account):
    gw, config, ca = lab
    port = privileged_port()
    config["gateway"]["user"] = account.pw_name
    config["listener:relay"]["endpoint"] = "tcp:%d:interface=127.0.0.1" % port
    gw.start(config)
    assert gw.ports["relay"] == port
    ids = _status_ids(gw.process.pid)
    assert ids["Uid"] == [account.pw_uid] * 4, ids
    assert ids["Gid"] == [account.pw_gid] * 4, ids
    assert 0 not in ids["Groups"]
    assert "running as user %s" % account.pw_name in gw.stdout
    from tests.e2e.test_processes import children

    receivers = children(gw.process.pid)  # [gateway] workers = auto: started as root, then
    assert receivers  # each switched to the user before its first session
    for pid in receivers:
        ids = _status_ids(pid)
        assert (ids["Uid"], ids["Gid"]) == ([account.pw_uid] * 4, [account.pw_gid] * 4), ids
        assert 0 not in ids["Groups"]
    queue_id = _send(gw, ca)
    client = h.smtp(port)  # the privileged port answers
    assert client.banner[0] == 220
    h.close(client)
    spool = gw.path("spool")
    _owned(spool, account, 0o700)
    for name in ("tmp", "active", "deferred", "state"):
        _owned(os.path.join(spool, name), account, 0o700)
    h.wait_until(lambda: h.queued_state(spool, queue_id) is not None, 10, "the message queued")
    entry = os.path.join(spool, h.queued_state(spool, queue_id), queue_id)
    _owned(entry, account, 0o600)
    _owned(os.path.join(spool, "admin.sock"), account, 0o600)
    _owned(gw.path("logs"), account, 0o700)
    h.wait_until(lambda: os.path.exists(gw.path("logs", "tracking.log")), 10, "tracking.log")
    _owned(gw.path("logs", "tracking.log"), account, 0o600)
    # The admin channel works for root (mailgate queue list) across the drop.
    listed = h.run_cli("queue", "list", "--config", gw.config_path)
    assert queue_id in listed.stdout, listed
    gw.stop()
    assert gw.stopped_cleanly(), gw.describe()
    assert "Traceback" not in gw.all_output()


def test_twistd_uid_and_gid_keep_working(lab, account):
    """twistd --uid/--gid instead of [gateway] user: ports bind first, then twistd drops."""
    gw, config, ca = lab
    port = privileged_port()
    config["listener:relay"]["endpoint"] = "tcp:%d:interface=127.0.0.1" % port
    for name in ("spool", "logs"):  # with --uid the directories must be that user's already
        os.makedirs(gw.path(name), mode=0o700)
        os.chown(gw.path(name), account.pw_uid, account.pw_gid)
    gw.twistd_args = ["--uid=%d" % account.pw_uid, "--gid=%d" % account.pw_gid]
    gw.start(config)
    assert gw.ports["relay"] == port
    ids = _status_ids(gw.process.pid)
    assert ids["Uid"][:2] == [account.pw_uid] * 2, ids
    _send(gw, ca)
    _owned(os.path.join(gw.path("spool"), "admin.sock"), account, 0o600)
    gw.stop()
    assert gw.stopped_cleanly(), gw.describe()


def test_unknown_user_is_one_line(lab):
    gw, config, _ = lab
    config["gateway"]["user"] = "no-such-user-here"
    path = h.write_config(gw.config_path, h._fill_ports(h.render_config(config)))
    result = h.run_twistd(path)
    assert result.returncode == 1
    assert h.meaningful_lines(result.stderr) == [
        "mailgate: %s: [gateway] user: no such user: no-such-user-here" % path], result.stderr


def test_secret_files_readable_by_anyone_are_refused(lab):
    gw, config, _ = lab
    key = os.path.normpath(os.path.join(gw.directory, config["tls"]["private_key"]))
    os.chmod(key, 0o644)
    path = h.write_config(gw.config_path, h._fill_ports(h.render_config(config)))
    result = h.run_twistd(path)
    assert result.returncode == 1
    [line] = h.meaningful_lines(result.stderr)
    assert line == ("mailgate: %s: [tls] private_key: %s can be read or written by anyone (mode "
                    "0644): allow its owner and group only (chmod o-rwx %s)" % (path, key, key))
