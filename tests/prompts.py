"""The date every test application pins its default system prompt to.

The checkpoints' default system prompt carries today's date (`{today}`,
`{yesterday}`), so an application left on the clock templates a new prompt
each day. On some dates the demo model's random weights then give one token
over and over whatever the seed or temperature (2026-11-25, 2026-12-01,
2026-12-02 and 2026-03-01 were such days), and a test about sampling would
fail for the date alone. The test applications set `system_prompt_date` to
this date instead, and the references fill the prompt with the same date.

This date was chosen by sampling: for each candidate date, transformers'
`Mistral3ForConditionalGeneration` on the demo checkpoint drew the `n` test's
sampled request (`tests/integration/test_sampling.py`) under many seeds and
counted how often every choice came out the same. Of the dates tried, this one
had the fewest such draws (about 6 in 100, against 99 in 100 for 2026-03-01),
and the seeds the tests send pass on it.
"""

import datetime as dt

SYSTEM_PROMPT_DATE = dt.date(2026, 12, 25)
