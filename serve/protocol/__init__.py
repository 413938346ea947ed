"""The OpenAI-compatible HTTP API: request and response schemas, one module per endpoint family.

Lenient where OpenAI is (unknown request fields are accepted and logged),
strict where it matters (wrong types and out-of-range values are 400s naming
the field). No torch or vLLM import here: this package is the API contract.
"""
