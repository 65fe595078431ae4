"""Ray Serve wiring: engine replicas, tool workers and the HTTP/handle ingress. Deployments hold
no scheduling logic: they connect the engine (lamps_vllm) and the tools (tool_workers)."""
