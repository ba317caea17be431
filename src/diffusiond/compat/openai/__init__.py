"""The OpenAI Images API under /openai/v1: another front door onto the same engine.

Each request is translated into an ordinary `GenerationRequest` and submitted through the
same `JobRunner` as POST /v1/images/generations; the job's state is translated back into
OpenAI's answer. No generation logic lives here.
"""
