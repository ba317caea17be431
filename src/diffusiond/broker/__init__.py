"""Past one machine: API nodes and GPU workers sharing a SAQ job queue on Redis.

`serve --broker URL` runs an API node (no model); `worker --broker URL` runs a worker that
loads the model once and takes one job at a time. Both sides meet only in Redis, through
SAQ's job records and the few keys of `diffusiond.broker.queue`.
"""
