"""The vLLM integration: a scheduler plugin that adapts vLLM's V1 engine to a `lamps_core`
policy, and the engine-side driver of augmented requests (pause at an API call, resume)."""
