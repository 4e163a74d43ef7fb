# The `twistd mailgate` plugin.  Nothing else lives here: twisted/plugins must not be a package.
from twisted.application.service import ServiceMaker

mailgate = ServiceMaker(
    "mailgate",
    "mailgate.tap",
    "mailgate: an edge mail gateway (SMTP listeners, filters, durable queue, delivery)",
    "mailgate",
)
