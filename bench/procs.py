"""
Child processes for bench/run, and what /proc says about them.

Every child is started in a session (and so a process group) of its own, and is torn down by that
group id: SIGTERM, a grace period, SIGKILL, then any member of the group still alive is killed by
its PID.  Nothing is ever killed by name.  Readiness is a connect (and a 220 greeting) polled
against a deadline, never a sleep.
"""

import errno
import os
import signal
import socket
import subprocess
import threading
import time

CLOCK_TICK = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"


class StartError(Exception):
    """A child did not start; str() is the reason, ideally the child's own one-line message."""


def free_port():
    """A TCP port of 127.0.0.1 that is free right now (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for_greeting(port, deadline, alive=lambda: True, host=LOOPBACK):
    """Connect to host:port until it answers 220 or the deadline passes (False), polling."""
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                s.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
                banner = s.recv(512)
                s.sendall(b"QUIT\r\n")
                if banner.startswith(b"220"):
                    return True
        except OSError:
            pass
        # a refused connect returns at once: yield the CPU without sleeping for readiness
        time.sleep(0.02)
    return False


# --- /proc --------------------------------------------------------------------------------------


def _stat_fields(pid):
    """The fields of /proc/PID/stat after the command name (index 0 is field 3, state)."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].split()


def scan(pgids):
    """{pgid: {pid: fields}} for every process whose group is one of pgids (one pass of /proc)."""
    wanted = set(pgids)
    found = {pgid: {} for pgid in wanted}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fields = _stat_fields(int(name))
        except (OSError, ValueError):
            continue
        pgid = int(fields[2])
        if pgid in wanted:
            found[pgid][int(name)] = fields
    return found


def group_pids(pgid):
    return sorted(scan([pgid])[pgid])


def cpu_snapshot(pgid):
    """{pid: (own ticks, reaped children's ticks)} of every process of the group."""
    snapshot = {}
    for pid, f in scan([pgid])[pgid].items():
        snapshot[pid] = (int(f[11]) + int(f[12]), int(f[13]) + int(f[14]))
    return snapshot


def cpu_seconds(before, after):
    """
    CPU seconds (user + system) the group used between two snapshots.  A process alive at both
    counts its own difference; one born since counts all of its time; one that exited in between
    was reaped by its parent (Postfix's master), whose children's time then holds its whole life,
    so what it had already used before is taken off again.
    """
    ticks = 0
    for pid, (own, reaped) in after.items():
        own0, reaped0 = before.get(pid, (0, 0))
        ticks += (own - own0) + (reaped - reaped0)
    for pid, (own0, _) in before.items():
        if pid not in after:
            ticks -= own0
    return ticks / CLOCK_TICK


def _status_kb(pid, key):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0  # gone, or a zombie (no memory lines)


def memory_kb(pgid, key="VmHWM:"):
    """The sum over the group's processes of one /proc/PID/status line (VmHWM:, VmRSS:), in kB."""
    return sum(_status_kb(pid, key) for pid in scan([pgid])[pgid])


def pss_kb(pid):
    """The proportional set size of a process (shared pages divided among their users), kB."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class PeakSampler(threading.Thread):
    """
    Samples the watched group that is being driven (focus) a few times a second: the sum of
    VmHWM of its processes, and the sum of their Pss (smaps_rollup).  peak(pgid) samples once more
    and is (largest VmHWM sum, largest Pss sum) seen.  A Postfix process that exits takes its
    VmHWM with it: sampling catches most of them.  Only the focused group is sampled in the
    background, so that reading /proc of idle targets costs the driven one no CPU.
    """

    def __init__(self, interval=0.25):
        threading.Thread.__init__(self, name="peak-rss", daemon=True)
        self.interval = interval
        self._peaks = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.focus = None

    def watch(self, pgid):
        with self._lock:
            self._peaks.setdefault(pgid, (0, 0))

    def forget(self, pgid):
        with self._lock:
            return self._peaks.pop(pgid, (0, 0))

    def peak(self, pgid):
        self.sample([pgid])
        with self._lock:
            return self._peaks.get(pgid, (0, 0))

    def sample(self, pgids):
        with self._lock:
            pgids = [pgid for pgid in pgids if pgid in self._peaks]
        if not pgids:
            return
        groups = scan(pgids)
        for pgid, members in groups.items():
            hwm = sum(_status_kb(pid, "VmHWM:") for pid in members)
            pss = sum(pss_kb(pid) for pid in members)
            with self._lock:
                if pgid in self._peaks:
                    old = self._peaks[pgid]
                    self._peaks[pgid] = (max(old[0], hwm), max(old[1], pss))

    def run(self):
        while not self._stop.wait(self.interval):
            focus = self.focus
            if focus is not None:
                self.sample([focus])

    def stop(self):
        self._stop.set()


# --- children -----------------------------------------------------------------------------------


class Children:
    """Every process the bench starts; stop_all() tears them all down (also on Ctrl-C)."""

    def __init__(self):
        self._children = []
        self._started = []  # every group ever started, for the final check
        self._lock = threading.Lock()

    def spawn(self, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs):
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                   start_new_session=True, **kwargs)
        with self._lock:
            self._children.append(process)
            self._started.append(process.pid)
        return process

    def stop(self, process, grace=10.0):
        """SIGTERM the process's group, then SIGKILL it; wait until no member is left."""
        pgid = process.pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if process.poll() is not None and not group_pids(pgid):
                break
            time.sleep(0.05)
        if process.poll() is None or group_pids(pgid):
            _signal_group(pgid, signal.SIGKILL)
            for pid in group_pids(pgid):  # members that somehow escaped the group signal
                _kill_pid(pid)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            if process in self._children:
                self._children.remove(process)
        return process.returncode

    def stop_all(self):
        with self._lock:
            children = list(self._children)
        for process in reversed(children):
            self.stop(process, grace=5.0)

    def leftovers(self):
        """PIDs still alive in the groups of every child ever started (should be none)."""
        with self._lock:
            started = list(self._started)
        groups = scan(started)
        return sorted(pid for members in groups.values() for pid in members)


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise


def _kill_pid(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise
