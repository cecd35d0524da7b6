"""Batch jobs: OpenAI Batch JSONL in and out (`openai_batch`), the synced, resumable result writer (`writer`),
figures and the HTML report (`report`), and the `batchllm run` command (`command`)."""
