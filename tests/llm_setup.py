"""Sizes of the tests' exported LLM decoders (see the ``llm_exports`` fixture)."""

LLM_CONTEXT = 256  # tokens: the decoders' context limit in the tests
LLM_CHUNK = 8  # tokens per prefill call: prompts longer than this run in chunks
