"""[queue] backend = postgresql and its keys, and listeners behind a load balancer (haproxy:, proxy_from)."""

import ipaddress

import pytest

from mailgate.config import load_config, render_config
from mailgate.errors import ConfigError

LISTENER = "[listener:mx]\nendpoint = tcp:2525\nrole = relay\ntls = none\nauth = none\n"
PG = "[queue]\nbackend = postgresql\ndsn = host=/tmp dbname=mailgate\n"


def load(tmp_path, text):
    path = tmp_path / "mailgate.ini"
    path.write_text(text)
    return load_config(str(path))


def error(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return str(info.value).replace(str(tmp_path / "mailgate.ini"), "FILE")


def test_postgresql_defaults(tmp_path):
    queue = load(tmp_path, PG + LISTENER).queue
    assert (queue.backend, queue.dsn, queue.password_file, queue.node_id, queue.lease,
            queue.pool_size) == ("postgresql", "host=/tmp dbname=mailgate", None, None, 300.0, 4)


def test_postgresql_keys(tmp_path):
    (tmp_path / "pw").write_text("s3cret\n")
    text = PG + "password_file = pw\nnode_id = MX1\nlease = 30s\npool_size = 8\n" + LISTENER
    queue = load(tmp_path, text).queue
    assert (queue.password_file, queue.node_id, queue.lease, queue.pool_size) == (
        str(tmp_path / "pw"), "mx1", 30.0, 8)


def test_url_and_multi_host_dsn(tmp_path):
    for dsn in ("postgresql://mailgate@db1:5432,db2:5432/mailgate?target_session_attrs=read-write",
                "host=db1,db2 port=5432,5432 dbname=mailgate target_session_attrs=read-write",
                "host=db1 application_name='mail gate'"):
        assert load(tmp_path, PG.replace("host=/tmp dbname=mailgate", dsn) + LISTENER).queue.dsn == dsn


@pytest.mark.parametrize("text, expected", [
    ("[queue]\nbackend = postgresql\n" + LISTENER,
     "FILE: [queue] dsn: required with backend = postgresql"),
    (PG + "lease = 0.5s\n" + LISTENER, "FILE: [queue] lease: expected at least 1s, got 0.5s"),
    (PG + "pool_size = 0\n" + LISTENER,
     "FILE: [queue] pool_size: expected an integer from 1 to 100, got '0'"),
    (PG + "node_id = mx_1\n" + LISTENER,
     "FILE: [queue] node_id: expected a DNS label like mail2024 (letters, digits and '-'), got 'mx_1'"),
    (PG.replace("host=/tmp dbname=mailgate", "just words") + LISTENER,
     "FILE: [queue] dsn: expected a libpq connection string (key=value ...) or a postgresql:// URL,"
     " got 'just words'"),
    (PG + "password_file = missing\n" + LISTENER, "FILE: [queue] password_file: file not found: "),
    ("[queue]\ndsn = host=db1\n" + LISTENER, "FILE: [queue] dsn: only used with backend = postgresql"),
])
def test_broken_queue(tmp_path, text, expected):
    assert error(tmp_path, text).startswith(expected)


def test_dsn_password_hidden_by_check_config(tmp_path):
    config = load(tmp_path, PG.replace("dbname=mailgate", "password=hunter2 dbname=mailgate") + LISTENER)
    assert "hunter2" not in render_config(config)
    assert "dsn = host=/tmp password=<hidden> dbname=mailgate" in render_config(config)
    assert "password=hunter2" in render_config(config, show_secrets=True)
    url = load(tmp_path, PG.replace("host=/tmp dbname=mailgate", "postgresql://u:hunter2@db/x") + LISTENER)
    assert "dsn = postgresql://u:<hidden>@db/x" in render_config(url)


def test_render_loads_back(tmp_path):
    config = load(tmp_path, PG + "lease = 45s\n" + LISTENER.replace("tcp:2525", "haproxy:tcp:2525")
                  + "proxy_from = 10.0.0.5, 10.1.0.0/16\n")
    again = load(tmp_path, render_config(config, show_secrets=True))
    assert again.queue == config.queue and again.listeners == config.listeners


def test_haproxy_endpoint_and_proxy_from(tmp_path):
    text = LISTENER.replace("tcp:2525", "haproxy:tcp:2525") + "proxy_from = 10.0.0.5, 10.1.0.0/16\n"
    listener = load(tmp_path, text).listeners[0]
    assert listener.endpoint == "haproxy:tcp:2525"
    assert listener.proxy_from == (ipaddress.ip_network("10.0.0.5/32"), ipaddress.ip_network("10.1.0.0/16"))
    unix = load(tmp_path, LISTENER.replace("tcp:2525", "haproxy:unix:/run/mg.sock"))
    assert unix.listeners[0].proxy_from == ()


@pytest.mark.parametrize("text, expected", [
    (LISTENER.replace("tcp:2525", "haproxy:tcp:2525"),
     "FILE: [listener:mx] proxy_from: required with a haproxy: endpoint: the load balancers' addresses"),
    (LISTENER + "proxy_from = 10.0.0.5\n",
     "FILE: [listener:mx] proxy_from: only used with a haproxy: endpoint (haproxy:tcp:25)"),
    (LISTENER.replace("tcp:2525", "haproxy:haproxy:tcp:2525") + "proxy_from = 10.0.0.5\n",
     "FILE: [listener:mx] endpoint: expected haproxy: once, around a tcp, tcp6, unix or systemd "
     "endpoint, got 'haproxy:haproxy:tcp:2525'"),
    (LISTENER.replace("tcp:2525", "haproxy:ssl:2525") + "proxy_from = 10.0.0.5\n",
     "FILE: [listener:mx] endpoint: ssl endpoints are not used"),
    (LISTENER.replace("tcp:2525", "haproxy:tcp:99999") + "proxy_from = 10.0.0.5\n",
     "FILE: [listener:mx] endpoint: expected a port from 0 to 65535, got 'haproxy:tcp:99999'"),
])
def test_broken_proxy(tmp_path, text, expected):
    assert error(tmp_path, text).startswith(expected)
