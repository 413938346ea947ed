"""The date every test application pins its default system prompt to.

The checkpoints' default system prompt carries today's date (`{today}`,
`{yesterday}`), so an application left on the clock templates a new prompt
each day. On some dates the demo model's random weights then give one token
over and over whatever the seed or temperature (2026-11-25, 2026-12-01,
2026-12-02 were such days), and a test about sampling would fail for the
date alone. The test applications set `system_prompt_date` to this date
instead, and the references fill the prompt with the same date.
"""

import datetime as dt

SYSTEM_PROMPT_DATE = dt.date(2026, 3, 1)
