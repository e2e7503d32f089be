"""Sessions: the flow table (session id per packet, TCP state and quality, timeouts)."""

from wiretrail.sessions.flowtable import FlowTable  # noqa: F401
from wiretrail.sessions.schema import SESSIONS_SCHEMA  # noqa: F401
