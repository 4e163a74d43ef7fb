"""
End to end: 1,000 concurrent connections (below the connection limit) to the real gateway, held
open by bench/connections.py: every one gets its banner, mail sent meanwhile is accepted and
delivered, and the gateway's memory stays bounded.
"""

import importlib.util
import os

from tests import REPO

SESSIONS = 1000
MAX_GROWTH_KB = 40 * 1024  # 40 kB a session at most; measured: about 4.5 kB
MAX_PEAK_KB = 300 * 1024


def _bench():
    path = os.path.join(REPO, "bench", "connections.py")
    spec = importlib.util.spec_from_file_location("bench_connections", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_thousand_sessions_all_greeted_and_mail_still_flows():
    result = _bench().run(SESSIONS, messages=20)
    print("\n1000 connections: %r" % (result,))
    assert result["greeted"] == SESSIONS, result
    assert result["accepted"] == result["messages"] == 20, result
    assert result["delivered"] == 20, result
    assert result["rss_open_kb"] - result["rss_idle_kb"] < MAX_GROWTH_KB, result
    assert result["peak_kb"] < MAX_PEAK_KB, result
