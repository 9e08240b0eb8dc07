"""`edgeguard serve`: ``app`` (the Starlette app and its HTTP endpoints), ``websocket`` (live stream
moderation), ``workers`` (the engine threads behind the endpoints), ``moderation`` (OpenAI's
moderation shapes), ``errors`` (the configuration and the one error shape), ``clients`` (clients
that leave or stall mid-body), ``slow_clients`` (connections that never finish a request head),
``playground`` (the page at ``/``), and ``proxy`` (guarding an upstream LLM's chat completions).
"""
