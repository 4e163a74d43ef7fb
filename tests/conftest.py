"""
The test session's umask: 027, as on a mail server, so that files the tests write (keys, users
files) are not readable by everyone, which mailgate refuses for secrets (issue 9).  Tests of
that refusal chmod their files explicitly.
"""

import os

os.umask(0o027)
