"""
Dropping root: started as root to bind ports 25, 465 and 587, the gateway switches to
[gateway] user and group once its listeners are bound (twistd's privilegedStartService), before
it greets anyone or writes anything.

Before the switch, the directories the gateway writes (the spool, the log directory, the admin
socket's directory) are handed to that user, so that what it creates afterwards (queue files,
logs, the admin socket) is its own, with modes 0700 and 0600.  Every problem is one ConfigError
naming [gateway] user or group.  twistd's --uid/--gid keep working on their own (they switch
after privilegedStartService too); given both, they must name the same user.
"""

import grp
import os
import pwd

import attr
from twisted.logger import Logger

from mailgate.errors import ConfigError

log = Logger()


@attr.s(frozen=True, slots=True)
class Identity:
    user = attr.ib()  # the name
    uid = attr.ib()
    gid = attr.ib()


def _lookup(database, text):
    """A pwd or grp entry by name or by number; KeyError when there is none."""
    try:
        return database.getpwnam(text) if database is pwd else database.getgrnam(text)
    except KeyError:
        if not text.isdigit():
            raise
    return database.getpwuid(int(text)) if database is pwd else database.getgrgid(int(text))


def identity(config):
    """The Identity [gateway] user and group name, or None when user is not set."""
    gateway = config.gateway
    if gateway.user is None:
        if gateway.group is not None:
            raise ConfigError(config.path, "gateway", "group", "set, but user is not")
        return None
    try:
        entry = _lookup(pwd, gateway.user)
    except KeyError:
        raise ConfigError(config.path, "gateway", "user", "no such user: %s" % (gateway.user,))
    gid = entry.pw_gid
    if gateway.group is not None:
        try:
            gid = _lookup(grp, gateway.group).gr_gid
        except KeyError:
            raise ConfigError(config.path, "gateway", "group", "no such group: %s" % (gateway.group,))
    return Identity(entry.pw_name, entry.pw_uid, gid)


SPOOL_NAMES = frozenset(("tmp", "active", "deferred", "hold", "quarantine", "corrupt", "state",
                         "admin.sock"))
LOG_PREFIXES = ("protocol.log", "tracking.log")


def _writable_directories(config):
    """(directory, its names are ours) for every directory the gateway writes in."""
    directories = [(config.queue.path, lambda name: name in SPOOL_NAMES)]
    if config.logging.dir:
        directories.append((config.logging.dir, lambda name: name.startswith(LOG_PREFIXES)))
    socket = getattr(config.admin, "socket", None)
    if socket:
        directories.append((os.path.dirname(socket),
                            lambda name: name == os.path.basename(socket)))
    return directories


def _hand_over(config, path, ours, who):
    """
    Make path owned by who: created when missing; when it belongs to someone else, taken over
    with everything in it only if all it holds is the gateway's own (never /var or /run).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        os.makedirs(path, mode=0o700)
        st = os.stat(path)
    if st.st_uid == who.uid:
        return
    strangers = sorted(name for name in os.listdir(path) if not ours(name))
    if strangers:
        raise ConfigError(config.path, "gateway", "user",
                          "%s is not owned by %s and holds files that are not mailgate's (%s): "
                          "chown it, or use a directory of its own" % (path, who.user, strangers[0]))
    log.info("handing {path} over to {user}", path=path, user=who.user)
    os.chown(path, who.uid, who.gid)
    os.chmod(path, 0o700)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), who.uid, who.gid)


def drop(config):
    """
    Switch to [gateway] user and group (when set).  Running as root: hand the writable
    directories over, then setgroups/setgid/setuid (for every thread).  Not root: fine when we
    already are that user (twistd --uid did it), else a ConfigError.
    """
    who = identity(config)
    if who is None:
        return None
    if os.getuid() != 0 and os.geteuid() != 0:
        if os.getuid() == who.uid and os.getgid() == who.gid:
            return who
        raise ConfigError(config.path, "gateway", "user",
                          "cannot switch to %s: not started as root" % (who.user,))
    try:
        for directory, ours in _writable_directories(config):
            _hand_over(config, directory, ours, who)
        os.setgroups([])
        os.initgroups(who.user, who.gid)
        os.setgid(who.gid)
        os.setuid(who.uid)
    except OSError as e:
        raise ConfigError(config.path, "gateway", "user",
                          "cannot switch to %s: %s" % (who.user, e.strerror or e))
    log.info("running as user {user} (uid {uid}, gid {gid})", user=who.user, uid=who.uid,
             gid=who.gid)
    return who
