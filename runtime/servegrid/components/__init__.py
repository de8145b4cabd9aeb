"""The LLM serving components, as SDK services: Frontend, Processor, Router, Worker."""
