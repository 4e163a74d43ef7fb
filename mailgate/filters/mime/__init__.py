"""
The MIME walker behind the attachment policy (mailgate.filters.attachments).

This package's namespace is the API the filter uses: policy_from_config() turns the
[attachments] configuration into a Policy, inspect() walks a parsed message into a Report of
Findings, strip() rewrites the message without them; decode_payload() and the streaming
constants (CHUNK, RATIO_FLOOR) are exported for the tests.
"""

from mailgate.filters.mime.archives import CHUNK, RATIO_FLOOR
from mailgate.filters.mime.decode import decode_payload
from mailgate.filters.mime.policy import Finding, Policy, Report, policy_from_config
from mailgate.filters.mime.walker import inspect, strip

__all__ = [
    "CHUNK",
    "RATIO_FLOOR",
    "Finding",
    "Policy",
    "Report",
    "decode_payload",
    "inspect",
    "policy_from_config",
    "strip",
]
