"""`edgeguard serve`: ``app`` (the Starlette app and its HTTP endpoints), ``websocket`` (live stream
moderation), ``workers`` (the engine threads behind the endpoints), ``moderation`` (OpenAI's
moderation shapes), ``errors`` (the configuration and the one error shape).
"""
