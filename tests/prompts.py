"""A system message that keeps a test's prompt the same on every date.

The checkpoints' default system prompt carries today's date, so a test that
leaves it in samples from a new prompt each day. On some dates the demo
model's random weights then give one token over and over whatever the seed
or temperature (2026-11-25, 2026-12-01, 2026-12-02), and a test about
sampling fails for the date alone. Such tests send this message instead.
"""

UNDATED_SYSTEM_MESSAGE = {"role": "system", "content": "You are a helpful assistant."}
