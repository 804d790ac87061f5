"""The SMTP ingress, in parts each readable on its own:

- ``server``: listeners, admission (session caps), session bookkeeping and graceful drain;
- ``session``: one SMTP session, its timers, command loop and commands;
- ``auth``: AUTH PLAIN/LOGIN; ``throttle``: AUTH failure throttling;
- ``policy``: sender policy (envelope and header sender, suspension, pause, limits);
- ``hygiene``: message hygiene and normalisation (line endings, smuggling, header scan, trace);
- ``replies``: the reply table.
"""

from .server import SubmissionServer

__all__ = ["SubmissionServer"]
