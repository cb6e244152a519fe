"""``rtns web``: a page any browser opens and a WebSocket protocol for web and telephony
apps (docs/web.md, docs/protocol.md). aiohttp (the ``web`` extra) is imported only by
:mod:`rtns.web.server`; :mod:`rtns.web.protocol` and :mod:`rtns.web.sessions` need only the
core dependencies."""
