"""The guards: ``core`` (the engine every guard shares: batching, cache reuse, growth), ``gen``
(Qwen3Guard-Gen), ``stream`` (Qwen3Guard-Stream), and what they share: ``template`` (the chat
templates), ``retokenize`` (text to Qwen3 ids as it arrives), ``debounce`` (the flagging rule),
``scoring`` (logits to the tri-class scores).
"""
