"""Offline batch completions: LLM Engine v1/v2 batch jobs and the OpenAI Batch API, run on Ray Data."""
