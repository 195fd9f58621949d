"""Rollout: engines behind one interface, live weight sync, prompts, rewards and the agent loop.

    from megatron_spo.rollout.engine import EngineConfig, make_engine
    from megatron_spo.rollout.types import GenerationRequest, SamplingParams
    from megatron_spo.rollout.weight_sync import sync_weights

    engine = make_engine(EngineConfig(model="path/to/hf_dir", name="hf"))   # or name="vllm"
    results = engine.generate([GenerationRequest(prompt_token_ids=ids, params=SamplingParams(n=4))])
    stats = sync_weights(engine, bridge.export_hf(chunks))                  # after each update

Modules: `types` (records, the engine interface), `engine` (config, factory), `hf_engine`,
`vllm_engine`, `weight_sync`, `prompts`, `estimate` (`megatron-spo values estimate`),
`graded_sampling` (the sample-and-grade pass of estimate and eval), plus
`rewards`, `scoring`, `sandbox`, `agent_loop`. Nothing is imported here, so a reward worker that
imports `megatron_spo.rollout.rewards` does not pay for torch or an engine.
"""
